"""The scrub: compare the RW replicas' data of a volume while it is in use, and repair it.

Vocabulary:
- a *chunk* is `CHUNK_SIZE` bytes of the volume (the last one may be shorter); each replica
  digests a chunk's logical content (blockhorn/replica/digest.py), so holes, written zeros and
  snapshot layers compare by what a read returns.
- a chunk *differs* when the compared replicas do not all report the same digest. The
  *majority* is the largest group of replicas agreeing on a digest when it holds more than half
  of the compared replicas (a strict majority); the others are the *minority*. Two replicas that
  disagree, or three that all disagree, have no majority: the scrub reports them and does not
  guess which one is right.

Invariants:
- Digest requests are sent under the engine's `order_lock`, like mutations (engine.py's
  module docstring), so every replica digests a chunk at the same point of the write stream:
  writes running beside the scrub never show up as differences.
- A repair reads the chunk from a majority replica and sends it as an ordinary WRITE to every
  RW/WO replica, both under one hold of `order_lock`: no write can slip in between the read
  and the rewrite, and every replica still receives the same mutation stream (the good ones
  rewrite what they already hold), so revision counters stay equal and a rebuilding replica
  gets the fix too. The write is settled by `Engine.end`, as any other write.
- Only replicas that are RW when the scrub starts are compared (a WO replica is still being
  rebuilt and would differ for that reason alone); one that goes ERR meanwhile is dropped from
  the rest of the run and named in the report.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any

from blockhorn.engine.client import Call
from blockhorn.engine.engine import Engine, Pending, ReplicaState
from blockhorn.replica.proto import Op, decode_json, encode_json
from blockhorn.types import BlockhornError, Busy, InvalidArgument, ReplicaMode

log = logging.getLogger("blockhorn.engine")

CHUNK_SIZE = 1 << 20      # bytes per digest; the unit of difference and repair
BATCH_CHUNKS = 8          # chunks per digest request: one request holds a replica ~ms per batch
MAX_LISTED = 10000        # differences listed in a report (the counts are always complete)
MiB = 1 << 20


class Scrub:
    """One verify run over `engine` (see the module docstring). `run` returns the report;
    `progress` may be read from another thread meanwhile."""

    def __init__(self, engine: Engine, repair: bool = False, rate_mib_s: float = 0.0,
                 chunk: int = CHUNK_SIZE, batch: int = BATCH_CHUNKS) -> None:
        if rate_mib_s < 0:
            raise InvalidArgument(f"invalid rate {rate_mib_s}: MiB/s, 0 for unlimited")
        self.engine = engine
        self.repair = repair
        self.rate = rate_mib_s * MiB        # bytes/s; 0: unlimited
        self.chunk = chunk
        self.batch = batch
        self.size = engine.size
        self.timeout = engine.cfg.timeout_s * 2
        self.failed: dict[str, str] = {}
        self.diffs: list[dict[str, Any]] = []
        self.counts = {"differing": 0, "repaired": 0, "unresolved": 0}
        self.by_replica: dict[str, dict[str, int]] = {}
        self.progress: dict[str, Any] = {"state": "running", "done": 0, "total": self.size,
                                         "started": time.time(), "differing_chunks": 0,
                                         "repair": repair}
        if len(engine.replicas) < 2:
            raise InvalidArgument(f"volume {engine.cfg.volume} has one replica: there is "
                                  "nothing to compare it with")
        self.compared = [r for r in engine.readers() if r.client is not None]
        if len(self.compared) < 2:
            raise Busy(f"volume {engine.cfg.volume} has {len(self.compared)} RW replica(s): "
                       "verify needs two; wait until rebuilding replicas are RW")

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        eng = self.engine
        compared = self.compared
        names = [r.ref.name for r in compared]
        self.by_replica = {n: {"differing_chunks": 0, "repaired_chunks": 0} for n in names}
        t0 = time.monotonic()
        pos = 0
        while pos < self.size:
            if eng.stopping():
                raise BlockhornError("the engine is stopping: verify interrupted", errno.EINTR)
            n = min(self.batch * self.chunk, self.size - pos)
            digests = self._digests(compared, pos, n)
            for i, offset in enumerate(range(pos, pos + n, self.chunk)):
                length = min(self.chunk, pos + n - offset)
                self._compare(offset, length, {k: v[i] for k, v in digests.items()})
            pos += n
            self.progress["done"] = pos
            self._throttle(pos, t0)
        elapsed = time.monotonic() - t0
        remaining = self.counts["differing"] - self.counts["repaired"]
        return {
            "volume": eng.cfg.volume, "size": self.size, "chunk_size": self.chunk,
            "algorithm": "xxh3_128", "repair": self.repair, "replicas": names,
            "failed_replicas": self.failed, "bytes_compared": self.size,
            "elapsed_s": round(elapsed, 3),
            "throughput_mib_s": round(self.size / MiB / elapsed, 1) if elapsed else None,
            "rate_limit_mib_s": self.rate / MiB or None,
            "differing_chunks": self.counts["differing"],
            "repaired_chunks": self.counts["repaired"],
            "unresolved_chunks": self.counts["unresolved"],
            "remaining_chunks": remaining, "by_replica": self.by_replica,
            "differences": self.diffs,
            "differences_listed": len(self.diffs) == self.counts["differing"],
            "ok": remaining == 0 and not self.failed,
        }

    def _throttle(self, done: int, t0: float) -> None:
        if self.rate:
            ahead = done / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                self.engine._stop.wait(ahead)   # an engine stop ends the wait (and the run)

    # --- digests ---------------------------------------------------------------------------

    def _digests(self, compared: list[ReplicaState], offset: int,
                 length: int) -> dict[str, list[str]]:
        """Every still-RW compared replica's digests of [offset, offset+length), requested in
        the global order (see the module docstring). Replicas that fail are dropped."""
        eng = self.engine
        body = encode_json({"op": "digest", "offset": offset, "length": length,
                            "chunk": self.chunk})
        replies: dict[str, bytearray] = {}
        with eng.order_lock:
            live = [r for r in compared if r.ref.name not in self.failed
                    and r.mode == ReplicaMode.RW and r.client is not None]
            for r in compared:
                if r not in live and r.ref.name not in self.failed:
                    self.failed[r.ref.name] = r.error or f"left RW ({r.mode})"
            if len(live) < 2:
                raise BlockhornError(f"verify of {eng.cfg.volume} stopped at offset {offset}: "
                                     f"fewer than two RW replicas left ({self.failed})",
                                     errno.EIO)
            call = Call(len(live))
            sent = [(r, r.client) for r in live]
            for r, client in sent:
                replies[r.ref.name] = bytearray()
                client.enqueue(call, Op.CONTROL, data=body,  # type: ignore[union-attr]
                               reply_buf=replies[r.ref.name])
        for _, client in sent:
            client.pump()  # type: ignore[union-attr]
        call.wait(self.timeout)
        out: dict[str, list[str]] = {}
        for r, client in sent:
            status = call.results.get(r.ref.name, errno.ETIMEDOUT)
            if status in (errno.EPROTO, errno.EINVAL):
                # Not the replica's data at fault: an old replica server or a bad request.
                raise BlockhornError(f"replica {r.ref.name} refused the digest request: "
                                     f"{os.strerror(status)}", status)
            if status:
                reason = f"verify: digest failed: {os.strerror(status)}"
                self.failed[r.ref.name] = reason
                eng.set_error(r, reason, client)
                continue
            digests = decode_json(replies[r.ref.name])["digests"]
            if len(digests) != -(-length // self.chunk):
                raise BlockhornError(f"replica {r.ref.name} answered {len(digests)} digests "
                                     f"for {length} bytes", errno.EPROTO)
            out[r.ref.name] = digests
        if len(out) < 2:
            raise BlockhornError(f"verify of {eng.cfg.volume} stopped at offset {offset}: "
                                 f"fewer than two replicas answered ({self.failed})", errno.EIO)
        return out

    # --- comparing and repairing -----------------------------------------------------------

    def _compare(self, offset: int, length: int, digests: dict[str, str]) -> None:
        groups: dict[str, list[str]] = {}
        for name, d in digests.items():
            groups.setdefault(d, []).append(name)
        if len(groups) == 1:
            return
        biggest = max(groups.values(), key=len)
        majority = sorted(biggest) if 2 * len(biggest) > len(digests) else None
        minority = sorted(n for n in digests if majority and n not in majority)
        entry: dict[str, Any] = {"offset": offset, "length": length, "digests": digests,
                                 "majority": majority, "minority": minority, "repaired": False}
        self.counts["differing"] += 1
        self.progress["differing_chunks"] = self.counts["differing"]
        for n in (minority if majority else digests):
            self.by_replica[n]["differing_chunks"] += 1
        if majority is None:
            self.counts["unresolved"] += 1
            log.error("verify %s: chunk at %d differs with no majority: %s",
                      self.engine.cfg.volume, offset, digests)
        else:
            log.warning("verify %s: chunk at %d differs on %s", self.engine.cfg.volume, offset,
                        ", ".join(minority))
            if self.repair:
                entry["repaired"] = self._repair(offset, length, majority, minority)
                if entry["repaired"]:
                    self.counts["repaired"] += 1
                    for n in minority:
                        self.by_replica[n]["repaired_chunks"] += 1
        if len(self.diffs) < MAX_LISTED:
            self.diffs.append(entry)

    def _repair(self, offset: int, length: int, majority: list[str],
                minority: list[str]) -> bool:
        """Rewrite the chunk everywhere from a majority replica; then check that the replicas
        now agree on it. False (and logged) when that could not be done."""
        eng = self.engine
        buf = bytearray(length)
        try:
            with eng.order_lock:
                src = next((eng.replicas[n] for n in majority
                            if eng.replicas[n].mode == ReplicaMode.RW
                            and eng.replicas[n].client is not None), None)
                if src is None or src.client is None:
                    raise BlockhornError("no majority replica is RW any more", errno.EIO)
                read = Call(1, dest=memoryview(buf))
                src.client.submit(read, Op.READ, offset, length)
                if not read.wait(eng.cfg.timeout_s) or read.results.get(src.ref.name):
                    raise BlockhornError(f"reading the chunk from {src.ref.name} failed",
                                         errno.EIO)
                # Every RW and WO replica, as any write (engine._send): see the docstring.
                targets = eng._targets
                write = Call(len(targets))
                sent = [(r, r.client) for r in targets]
                for _, client in sent:
                    client.enqueue(write, Op.WRITE, offset, length, buf)  # type: ignore[union-attr]
            for _, client in sent:
                client.pump()  # type: ignore[union-attr]
            eng.end(Pending(Op.WRITE, length, write, sent), write.wait(eng.cfg.timeout_s))
            compared = [eng.replicas[n] for n in majority + minority]
            after = self._digests(compared, offset, length)
        except BlockhornError as e:
            log.error("verify %s: repair of chunk at %d failed: %s", eng.cfg.volume, offset, e)
            return False
        ok = len(set(d[0] for d in after.values())) == 1 and all(n in after for n in minority)
        log.info("verify %s: chunk at %d rewritten from %s: %s", eng.cfg.volume, offset,
                 src.ref.name, "replicas agree" if ok else "replicas still differ")
        return ok


class Verifier:
    """At most one scrub of an engine at a time, run in a thread of its own so that a long one
    outlives the control request that started it; `status` reports progress, then the report."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.scrub: Scrub | None = None
        self.report: dict[str, Any] | None = None
        self.error: BlockhornError | None = None
        self.done = threading.Event()
        self.done.set()

    def start(self, repair: bool = False, rate_mib_s: float = 0.0,
              wait: float = 0.0) -> dict[str, Any]:
        """Start a scrub (EBUSY while one runs); with `wait` > 0 wait up to that many seconds
        for it to finish. Returns `status()`."""
        with self.lock:
            if not self.done.is_set():
                raise Busy(f"a verify of {self.engine.cfg.volume} is already running")
            scrub = Scrub(self.engine, repair, rate_mib_s)
            self.scrub, self.report, self.error = scrub, None, None
            self.done.clear()
        threading.Thread(target=self._run, args=(scrub,), name="verify", daemon=True).start()
        if wait > 0:
            self.done.wait(wait)
        return self.status()

    def _run(self, scrub: Scrub) -> None:
        try:
            report = scrub.run()
            scrub.progress["state"] = "done"
            self.report = report
        except BlockhornError as e:
            log.error("verify of %s failed: %s", self.engine.cfg.volume, e)
            scrub.progress.update(state="failed", error=str(e), errno=e.errno)
            self.error = e
        finally:
            scrub.progress["finished"] = time.time()
            self.done.set()

    def status(self) -> dict[str, Any]:
        """{"verify": progress or None (never run), "report": the last finished report}."""
        scrub = self.scrub
        return {"verify": dict(scrub.progress) if scrub else None, "report": self.report}
