"""The engine: replicates every write of one volume to its replicas.

Invariants (docs/DURABILITY.md):
- Every data-changing request is *sent* to all non-ERR replicas under one lock (`order_lock`),
  so every replica receives and executes mutations in the same order. Overlapping concurrent
  writes therefore land identically everywhere, and a read or copy sent to a replica after a
  write sees it.
- A write is acknowledged when every RW and WO replica acknowledged it; a replica that errors
  or does not answer within `timeout_s` is set ERR and the write still succeeds while at least
  `min_rw` RW replicas acknowledged it. Otherwise the request fails with EIO. When every
  replica refused it with ENOSPC (nothing changed on any), it fails with ENOSPC and no replica
  goes ERR.
- FLUSH and FUA reach every RW/WO replica's disk (fdatasync) before the reply.
- Every change of the RW set is committed (engine/generation.py) before the next mutation is
  acknowledged: `end` runs the pending commit (`commit_if_needed`) before it returns. In quorum
  mode (`cfg.quorum`) a commit whose set is not a majority of the replicas acknowledges nothing:
  mutations fail with EIO until a resync brings a majority back; reads go on.
- Reads go to one RW replica: the local one when it lives on this host (read directly from its
  head file), else round-robin; on error, the next RW replica.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from blockhorn.config import EngineConfig, ReplicaRef
from blockhorn.engine import commit, generation, migrate
from blockhorn.engine.client import Call, Receiver, ReplicaClient
from blockhorn.engine.commit import NoQuorum
from blockhorn.engine.limits import Limits
from blockhorn.engine.local import LocalChain
from blockhorn.engine.ping import maintain
from blockhorn.engine.rebuild import progress_of, rebuild_replica
from blockhorn.keys import load_key
from blockhorn.replica.proto import FLAG_FUA, FLAG_MAY_TRIM, Op, handshake_name
from blockhorn.replica.proto import encode_json as proto_json
from blockhorn.types import (
    BLOCK_SIZE,
    BlockhornError,
    Busy,
    InvalidArgument,
    NoSpace,
    ReplicaMode,
    ReplicaUnavailable,
    Robustness,
)

log = logging.getLogger("blockhorn.engine")

LOCAL_RETIRE_S = 60.0        # replaced local-read descriptors are closed after this long
MAINT_WAIT_S = 5.0           # a snapshot/purge/expand waits this long for a running one
PURGE_WAIT_S = 3600.0        # purge(wait=True) gives up after this long
# Seconds a start gives a replica on a node known down (`EngineConfig.down`) to connect and
# answer its claim: a live host answers in milliseconds; a dead one would hold the start for
# the full connection timeout (client.CONNECT_TIMEOUT_S).
DOWN_CONNECT_TIMEOUT_S = 1.0


_COUNTER: dict[int, str] = {Op.WRITE: "writes", Op.FLUSH: "flushes", Op.TRIM: "trims", Op.ZERO: "zeros"}


@dataclass(slots=True)
class Pending:
    """A mutation sent to replicas and not yet settled (`Engine._send` / `end`)."""
    op: int
    length: int
    call: Call
    sent: list[tuple[ReplicaState, ReplicaClient | None]]


@dataclass
class ReplicaState:
    ref: ReplicaRef
    mode: ReplicaMode = ReplicaMode.ERR
    client: ReplicaClient | None = None
    local: LocalChain | None = None      # layer files opened directly, for local reads
    error: str = ""
    stat: dict[str, Any] = field(default_factory=dict)
    rebuild: dict[str, Any] | None = None
    # The outstanding ping (sent at, connection, call, reply buffer) and when the last
    # answered one was sent (`Engine._ping`).
    ping: tuple[float, ReplicaClient, Call, bytearray] | None = None
    last_ping: float = 0.0
    shadow_of: str = ""     # a migration target (engine/migrate.py): the replica it replaces
    # A replacement (replace_replica) told while a resync attempt of the old one ran: taken
    # when that attempt ends.
    replacement: ReplicaRef | None = None

    @property
    def resyncing(self) -> bool:
        """A resync (rebuild) of this replica is queued or running."""
        return self.rebuild is not None and self.rebuild.get("state") in ("queued", "running")


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.size = cfg.size
        self.key = load_key(cfg.key_file)
        self.replicas = {r.name: ReplicaState(r) for r in cfg.replicas}
        self.order_lock = threading.Lock()     # see module docstring
        self.maint_lock = threading.Lock()     # one of rebuild / snapshot / purge / expand
        self.state_lock = threading.Lock()     # guards modes and the RW list
        self._rr = 0
        self._readers: list[ReplicaState] = []   # RW replicas, local first
        self._targets: list[ReplicaState] = []   # RW and WO replicas: every mutation goes here
        self._rebuilding = False                  # a WO replica exists: widen partial writes
        self.counters = {"reads": 0, "writes": 0, "flushes": 0, "trims": 0, "zeros": 0,
                         "read_bytes": 0, "write_bytes": 0, "errors": 0}
        self._stop = threading.Event()
        self._rebuilds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rebuild")
        self._maint: threading.Thread | None = None
        self.receiver = Receiver()   # one thread receives every replica's replies
        self._retired: list[tuple[float, LocalChain]] = []
        # Generations (engine/generation.py): the last completed commit, the RW set now, and
        # replicas set RW by a resync whose join commit has not reached them yet.
        self.generation = 0
        self.commit_lock = threading.Lock()
        self._committed: frozenset[str] = frozenset()
        self._rw_set: frozenset[str] = frozenset()
        self._joining: set[str] = set()
        self._started = False           # the first commit of this engine is its start commit
        self._attempted = 0             # the highest generation this engine tried to commit
        self.voters = sorted(self.replicas)       # quorum mode: every commit's universe U
        self.majority = generation.majority(len(self.voters))
        self._quorum_note = ""          # the last "no majority" reason logged
        # Quorum mode: the (RW set, joiners) left unwritten because it is not a majority.
        self._unwritten: tuple[frozenset[str], frozenset[str]] | None = None
        self._adopt_pending = ""        # quorum mode: the suspect source, adopted once committed
        # Voter sets the first commit must hold a majority of too (the replicas or the quorum
        # setting changed since the newest commit the start saw: generation.prior_voters).
        self.prior_voters: list[frozenset[str]] = []
        self.decision: generation.Decision | None = None
        self.rebuild_limits = Limits(cfg.rebuild_limits)
        # Migrations (engine/migrate.py): replica -> its target while one runs (WO, never a
        # member), and replica -> the last migration's target and progress.
        self.shadows: dict[str, ReplicaState] = {}
        self.migrations: dict[str, dict[str, Any]] = {}
        self.fenced = ""   # why every request fails now (engine/ping.py fence_if_lease_lost)
        self.fenced_at = 0.0

    # --- start / stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect to every replica, choose the source by the generation rule, commit the new
        in-sync set, and resync every other reachable replica from the source."""
        # A replica whose node the manager knew was down gets a short try only: its host's
        # silence would hold the start for a whole connection timeout, and the rule treats a
        # replica not reached like one that is gone (docs/DURABILITY.md, "The commit quorum",
        # "Not waiting for a dead node"). The maintenance thread retries it as any ERR one.
        down = set(self.cfg.down)
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(self.replicas)) as pool:
            list(pool.map(lambda r: self.connect_replica(
                r, DOWN_CONNECT_TIMEOUT_S if r.ref.name in down else None),
                self.replicas.values()))
        migrate.resolve_at_start(self)
        reachable = [r for r in self.replicas.values() if r.client]
        log.info("volume %s: %d of %d replicas answered in %.1f s%s", self.cfg.volume,
                 len(reachable), len(self.replicas), time.monotonic() - began,
                 f" (on nodes known down: {', '.join(sorted(down))})" if down else "")
        seen = [generation.Seen.from_stat(r.ref.name, r.stat) for r in reachable]
        salvage = self.cfg.salvage
        if salvage and generation.salvaged(self.cfg.record, self.cfg.salvage_id):
            log.info("volume %s: salvage %s already done (%s): the start rule decides",
                     self.cfg.volume, salvage, self.cfg.salvage_id)
            salvage = ""
        if salvage:
            decision = generation.salvage(seen, salvage)
        else:
            try:
                decision = generation.choose(list(self.replicas), seen,
                                             generation.load_record(self.cfg.record,
                                                                    self.cfg.epoch),
                                             quorum=self.cfg.quorum)
            except ReplicaUnavailable as e:
                raise ReplicaUnavailable(f"volume {self.cfg.volume}: {e}"
                                         + "".join(f"; {r.ref.name}: {r.error}"
                                                   for r in self.replicas.values()
                                                   if not r.client)) from None
        log.info("volume %s: start rule: %s", self.cfg.volume, decision.why)
        self.decision = decision
        if not salvage:   # a salvage is the operator's override
            self.prior_voters = decision.prior_voters
        chosen = [self.replicas[n] for n in decision.rw]
        # An expansion a replica missed (it was down) is caught up here: the largest wins.
        self.size = max([self.size] + [r.stat["size"] for r in reachable])
        for r in chosen:
            if r.stat["size"] < self.size and r.client:
                r.stat = r.client.control({"op": "expand", "size": self.size})
        if decision.adopt and ((self.cfg.quorum and len(decision.rw) < self.majority)
                               or self.prior_voters):
            # Adopted now, the suspect source could clear its Dirty flag (a flush) while the
            # last commit still names replicas at its revision with other content: adopted
            # only right after the first commit this engine writes (engine/commit.py).
            self._adopt_pending = decision.source
        elif decision.adopt:
            src = self.replicas[decision.source]
            assert src.client is not None
            src.stat = src.client.control({"op": "adopt"})
        for r in chosen:
            r.mode = ReplicaMode.RW
            self._open_local(r)
        self._joining = {r.ref.name for r in chosen if r.stat.get("rebuilding")}  # salvage
        self.generation = decision.generation
        self._update_readers()
        # In quorum mode a start whose current replicas are fewer than a majority (the others
        # stale or suspect) commits nothing and acknowledges nothing until resyncs join.
        self.commit_if_needed(require_quorum=False)
        if salvage and self.started():
            # The start commit made the salvaged replica the newest set: once only. (Not
            # committed yet, quorum mode: nothing is acknowledged until it is, so a second
            # salvage from it loses nothing.)
            generation.record_salvage(self.cfg.record, self.cfg.salvage_id)
        stale = [r for r in self.replicas.values() if r.client and r.mode != ReplicaMode.RW]
        log.info("volume %s: generation %d, RW %s, resyncing %s", self.cfg.volume,
                 self.generation, decision.rw, [r.ref.name for r in stale])
        for r in stale:
            r.mode = ReplicaMode.ERR
            self.rebuild(r.ref.name)
        self._maint = threading.Thread(target=maintain, args=(self,), name="maintain",
                                       daemon=True)
        self._maint.start()

    # --- generations -------------------------------------------------------------------------

    def _set_changed(self) -> bool:
        return ((self._committed != self._rw_set or bool(self._joining))
                and self._unwritten != (self._rw_set, frozenset(self._joining)))

    def no_quorum(self) -> bool:
        """Quorum mode: the RW set (or the last commit's, before the first) is not a majority:
        nothing is acknowledged."""
        if self.prior_voters and not self._started:
            return True     # the first commit after a change of the voters is not written
        return self.cfg.quorum and min(len(self._rw_set), len(self._committed)) < self.majority

    def started(self) -> bool:
        """This engine's start commit is done (quorum mode: it waits for a majority)."""
        return self._started

    def commit_pending(self) -> bool:
        """Whether a mutation must go through `commit_if_needed` before it is acknowledged."""
        return self._set_changed() or self.no_quorum()

    def commit_if_needed(self, require_quorum: bool = True) -> None:
        """Make the current RW set durable as a new generation: the record first, then every
        member that stays, then joining replicas (clearing their Rebuilding flag). A member
        that fails it goes ERR and the commit starts over without it, at a new generation
        (every attempt has its own: one generation names one set). Blocks; never call it
        from the thread that receives replies (the FUSE frontend runs it in a worker).
        `require_quorum`: raise NoQuorum (EIO) when, in quorum mode, the set committed is
        not a majority of the replicas — a caller about to acknowledge a mutation; resyncs
        and the maintenance thread commit without it."""
        commit.commit_changes(self)
        if require_quorum and self.no_quorum():
            raise NoQuorum(commit.quorum_reason(self, len(self._rw_set)))

    def connect_replica(self, r: ReplicaState, timeout: float | None = None) -> None:
        """Connect and claim `r` (its STAT in `r.stat`); on failure `r.client` stays None.
        `timeout`: seconds for the connection and for the claim each (None: the defaults)."""
        client = ReplicaClient(r.ref, self.key, handshake_name(self.cfg.volume, self.cfg.epoch),
                               on_lost=self._on_lost,
                               send_timeout=self.cfg.timeout_s, receiver=self.receiver)
        try:
            if timeout is None:
                client.connect()
                r.stat = client.claim()
            else:
                client.connect(timeout)
                r.stat = client.claim(timeout)
        except BlockhornError as e:
            client.close()
            r.error = str(e) + (" (its node was down when the engine was configured)"
                                if timeout is not None else "")
            log.warning("replica %s unavailable: %s", r.ref.name, r.error)
            return
        r.client = client
        r.error = ""

    def _open_local(self, r: ReplicaState) -> None:
        """Read this replica's layer files directly when it is on this host (its head file
        here is the very file the replica writes: same inode and device)."""
        self._close_local(r)
        if not self.cfg.local_reads or not r.ref.path or not r.stat.get("chain"):
            return
        try:
            r.local = LocalChain(r.ref.path, list(r.stat["chain"]), r.stat["head_ino"],
                                 r.stat["head_dev"])
        except OSError as e:
            log.info("replica %s: no local reads (%s)", r.ref.name, e)

    def _close_local(self, r: ReplicaState) -> None:
        """Stop local reads from `r`. The descriptors are closed only later: a read running
        in another thread may still use them, and a descriptor number closed now could be
        reused for another file before that read's preadv runs."""
        if r.local is not None:
            self._retired.append((time.monotonic(), r.local))
            r.local = None

    def _close_retired(self, older_than: float = LOCAL_RETIRE_S) -> None:
        now = time.monotonic()
        while self._retired and now - self._retired[0][0] >= older_than:
            self._retired.pop(0)[1].close()

    def close(self) -> None:
        """Flush every replica and drop the connections."""
        self._stop.set()
        self._rebuilds.shutdown(wait=False, cancel_futures=True)
        try:
            if self._writable():
                self.flush()
        except BlockhornError as e:
            log.warning("final flush failed: %s", e)
        for r in [*self.replicas.values(), *self.shadows.values()]:
            if r.client:
                r.client.close()
            self._close_local(r)
        self.receiver.close()
        self._close_retired(older_than=0)

    # --- modes -------------------------------------------------------------------------------

    def _writable(self) -> list[ReplicaState]:
        return [r for r in [*self.replicas.values(), *self.shadows.values()]
                if r.mode in (ReplicaMode.RW, ReplicaMode.WO) and r.client]

    def _update_readers(self) -> None:
        """Recompute the lists the data path reads without locking; call after every mode
        change. The lists are replaced, never mutated, so a reader holds a consistent one."""
        rw = [r for r in self.replicas.values() if r.mode == ReplicaMode.RW]
        rw.sort(key=lambda r: r.local is None)      # local replicas first
        self._readers = rw
        self._rw_set = frozenset(r.ref.name for r in rw)
        self._targets = self._writable()
        self._rebuilding = any(r.mode == ReplicaMode.WO for r in self._targets)

    def readers(self) -> list[ReplicaState]:
        return self._readers

    def stopping(self) -> bool:
        return self._stop.is_set()

    def set_mode(self, r: ReplicaState, mode: ReplicaMode, order_held: bool = False) -> None:
        """Change a replica's mode in the global order: a mutation is sent before or after.
        `order_held`: the caller already holds `order_lock`. A replica set RW here joins:
        the next commit reaches it last and clears its Rebuilding flag."""
        if not order_held:
            with self.order_lock:
                self.set_mode(r, mode, order_held=True)
            return
        with self.state_lock:
            r.mode = mode
            if mode == ReplicaMode.RW:
                r.error = ""
                self._joining.add(r.ref.name)
                self._open_local(r)
            self._update_readers()

    def set_error(self, r: ReplicaState, reason: str,
                  client: ReplicaClient | None = None) -> None:
        """Set `r` ERR. With `client`: only if that is still r's connection — a failure seen
        on an old connection must not fail a replica that was reconnected and rebuilt since."""
        with self.state_lock:
            if r.mode == ReplicaMode.ERR or (client is not None and r.client is not client):
                return
            log.error("replica %s -> ERR: %s", r.ref.name, reason)
            r.mode = ReplicaMode.ERR
            r.error = reason
            self._close_local(r)
            self._update_readers()
        if r.client:
            r.client.close(reason)

    def _on_lost(self, client: ReplicaClient, reason: str) -> None:
        r = self.replicas.get(client.name) or next(
            (s for s in list(self.shadows.values()) if s.client is client), None)
        if r is not None and r.client is client:
            self.set_error(r, reason)

    def robustness(self) -> Robustness:
        rw = sum(r.mode == ReplicaMode.RW for r in self.replicas.values())
        if rw < self.cfg.min_rw:
            return Robustness.FAULTED
        return Robustness.HEALTHY if rw == len(self.replicas) else Robustness.DEGRADED

    # --- data path ---------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if self.fenced:
            raise ReplicaUnavailable(self.fenced)
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range {offset}+{length}")
        if offset + length > self.size:
            raise NoSpace(f"{offset}+{length} is past the end of the volume ({self.size})")

    def _fan_out(self, op: int, offset: int, length: int, data: Any = None,
                 flags: int = 0) -> None:
        """Send one mutation to every RW/WO replica (in the global order) and wait for all."""
        pending = self._send(op, offset, length, data, flags)
        assert pending is not None
        self.end(pending, pending.call.wait(self.answer_timeout()))
        self.commit_if_needed()

    def answer_timeout(self) -> float:
        """How long a mutation waits for its replies: `timeout_s`, twice that when a single
        RW replica is left (setting it ERR would fault the volume: Longhorn's rule)."""
        return self.cfg.timeout_s * (2 if len(self._readers) <= 1 else 1)

    def _send(self, op: int, offset: int, length: int, data: Any = None, flags: int = 0,
              on_done: Callable[[], None] | None = None,
              may_block: bool = True) -> Pending | None:
        """Queue one mutation to every RW/WO replica under the order lock, and send it.
        `on_done` runs (in whichever thread completes the call) once every replica answered.
        With `may_block` False, returns None instead of waiting: for the order lock (another
        thread may hold it while it waits for replies the caller's thread receives), or for
        a read (a partial-block write during a rebuild must be widened: see `_widen`)."""
        if not self.order_lock.acquire(blocking=may_block):
            return None
        try:
            if self._rebuilding and op in (Op.WRITE, Op.TRIM, Op.ZERO) and (
                    offset % BLOCK_SIZE or length % BLOCK_SIZE):
                if not may_block:
                    return None
                op, offset, length, data = self._widen(op, offset, length, data)
            targets = self._targets
            if self.fenced:
                raise ReplicaUnavailable(self.fenced)
            if self.no_quorum():
                # Not sent at all: nothing could be acknowledged, and a replica (the source,
                # not adopted yet) must not change under a commit that names others.
                raise NoQuorum(commit.quorum_reason(self, len(self._rw_set)))
            if len(self._readers) < self.cfg.min_rw:
                raise ReplicaUnavailable(f"volume {self.cfg.volume} is faulted: fewer than "
                                         f"{self.cfg.min_rw} RW replicas")
            call = Call(len(targets), on_done=on_done)
            sent = [(r, r.client) for r in targets]
            for _, client in sent:
                client.enqueue(call, op, offset, length, data, flags)  # type: ignore[union-attr]
        finally:
            self.order_lock.release()
        for _, client in sent:
            client.pump()  # type: ignore[union-attr]
        return Pending(op, length, call, sent)

    def end(self, pending: Pending, answered: bool) -> None:
        """After every replica answered (or `timeout_s` passed: `answered` False): replicas
        that failed or stayed silent go ERR; raise unless `min_rw` RW replicas have it."""
        op, call, sent = pending.op, pending.call, pending.sent
        if not answered:
            for r, client in sent:
                if r.ref.name not in call.results:
                    self.set_error(r, f"no answer within {self.answer_timeout():g} s", client)
        statuses = [call.results.get(r.ref.name, errno.ETIMEDOUT) for r, _ in sent]
        if op == Op.WRITE and sent and all(s == errno.ENOSPC for s in statuses):
            # Every replica refused a WRITE for lack of space before changing anything (a
            # replica torn by ENOSPC answers EIO): they still agree, so none leaves the
            # in-sync set; the writer gets ENOSPC and reads go on (docs/DURABILITY.md,
            # "Out of space"). Only a WRITE reserves its space first.
            self.counters["errors"] += 1
            raise NoSpace("every replica is out of space")
        ok_rw = 0
        failures = []
        for (r, client), status in zip(sent, statuses, strict=True):
            if status:
                failures.append(status)
                self.set_error(r, f"op {op} failed: {os.strerror(status)}", client)
            elif r.mode == ReplicaMode.RW:
                ok_rw += 1
        if ok_rw < self.cfg.min_rw:
            self.counters["errors"] += 1
            raise ReplicaUnavailable(f"volume {self.cfg.volume}: write reached only {ok_rw} RW "
                                     f"replicas, {self.cfg.min_rw} needed")
        self.counters[_COUNTER[op]] += 1
        if op == Op.WRITE:
            self.counters["write_bytes"] += pending.length

    # The same mutations for callers that must not block (the FUSE frontend's event loop):
    # `*_begin` sends and returns a Pending, or None when only the blocking method will do;
    # `on_done` is called by the thread that received the last reply; then `end` (in the
    # caller's thread) settles the result exactly as the blocking methods do, and when
    # `commit_pending()` the caller runs `commit_if_needed` in a worker thread before it
    # acknowledges.

    def pwrite_begin(self, buf: Any, offset: int, on_done: Callable[[], None],
                     fua: bool = False) -> Pending | None:
        self._check_range(offset, len(buf))
        return self._send(Op.WRITE, offset, len(buf), buf, FLAG_FUA if fua else 0,
                          on_done, may_block=False)

    def flush_begin(self, on_done: Callable[[], None]) -> Pending | None:
        return self._send(Op.FLUSH, 0, 0, None, 0, on_done, may_block=False)

    def _widen(self, op: int, offset: int, length: int, data: Any) -> tuple[int, int, int, Any]:
        """Under the order lock, while a replica rebuilds: turn a partial-block mutation into a
        write of whole blocks, read first from a RW replica (ordered after every earlier
        write). A rebuilding replica then never copies up a block from a layer it has not
        received yet."""
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + length) // BLOCK_SIZE) * BLOCK_SIZE
        block = bytearray(end - start)
        for r in self._readers:
            if r.client is None:
                continue
            call = Call(1, dest=memoryview(block))
            r.client.submit(call, Op.READ, start, end - start)
            if call.wait(self.cfg.timeout_s) and not call.results.get(r.ref.name):
                break
        else:
            raise ReplicaUnavailable("no RW replica answers the read of a partial-block write")
        patch = bytes(length) if op != Op.WRITE else data
        block[offset - start:offset - start + length] = patch
        return Op.WRITE, start, end - start, block

    def pwrite(self, buf: Any, offset: int, fua: bool = False) -> None:
        self._check_range(offset, len(buf))
        self._fan_out(Op.WRITE, offset, len(buf), buf, FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._fan_out(Op.FLUSH, 0, 0)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_range(offset, length)
        self._fan_out(Op.TRIM, offset, length, None, FLAG_FUA if fua else 0)

    def zero(self, offset: int, length: int, may_trim: bool = False, fua: bool = False) -> None:
        self._check_range(offset, length)
        flags = (FLAG_MAY_TRIM if may_trim else 0) | (FLAG_FUA if fua else 0)
        self._fan_out(Op.ZERO, offset, length, None, flags)

    def pread(self, buf: Any, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        self.counters["reads"] += 1
        self.counters["read_bytes"] += len(view)
        tried = 0
        while True:
            readers = self._readers
            if not readers or tried >= len(self.replicas):
                self.counters["errors"] += 1
                raise ReplicaUnavailable(f"volume {self.cfg.volume}: no RW replica can read")
            if readers[0].local is not None:
                r = readers[0]
            else:
                self._rr += 1
                r = readers[self._rr % len(readers)]
            tried += 1
            local = r.local
            if local is not None:
                try:
                    if local.read(view, offset):
                        return
                except OSError as e:
                    self.set_error(r, f"local read failed: {e}")
                    continue
            if r.client is None:
                continue
            client = r.client
            call = Call(1, dest=view)
            client.submit(call, Op.READ, offset, len(view))
            if not call.wait(self.cfg.timeout_s):
                self.set_error(r, f"read: no answer within {self.cfg.timeout_s:g} s", client)
                continue
            status = call.results[r.ref.name]
            if status == 0:
                return
            self.set_error(r, f"read failed: {os.strerror(status)}", client)

    def pread_nowait(self, buf: Any, offset: int) -> bool:
        """`pread` for a caller on an event loop (the FUSE frontend): served only from a local
        single-layer replica's page cache (`RWF_NOWAIT`), so it never blocks; False when that
        cannot be done (no local replica, a snapshot chain, data not cached, a short read, an
        error): then call `pread`, which handles every one of those."""
        readers = self._readers
        local = readers[0].local if readers else None
        view = memoryview(buf).cast("B")
        if local is None or len(local.fds) != 1 or offset < 0 or offset + len(view) > self.size \
                or self.fenced:
            return False
        try:
            if os.preadv(local.head, [view], offset, os.RWF_NOWAIT) != len(view):
                return False
        except OSError:
            return False   # EAGAIN: not in the page cache; anything else: `pread` meets it
        self.counters["reads"] += 1
        self.counters["read_bytes"] += len(view)
        return True

    # --- rebuild -----------------------------------------------------------------------------

    def rebuild(self, name: str) -> None:
        """(Re)connect replica `name` and resync it fully from a RW replica, in the background."""
        r = self.replicas.get(name)
        if r is None:
            raise InvalidArgument(f"volume {self.cfg.volume} has no replica {name!r}")
        with self.state_lock:
            if r.mode == ReplicaMode.RW or r.resyncing:
                return
            r.rebuild = {"state": "queued", "done": 0, "total": 0, "started": time.time()}
        self._rebuilds.submit(self._rebuild, r)

    def replace_replica(self, ref: ReplicaRef) -> None:
        """Point replica `ref.name` at a new replica (the daemon's replacement: another
        directory, created Rebuilding) and resync it fully. Only an ERR replica can be
        replaced (else EBUSY). While a resync attempt of the old one runs — the maintenance
        thread retries an unreachable replica every REBUILD_RETRY_S, each attempt up to the
        connect timeout — the replacement waits for that attempt to end and is taken then,
        unless the attempt brought the old replica back RW: a replacement refused in that
        window, retried by the daemon every tick, could keep missing it."""
        r = self.replicas.get(ref.name)
        if r is None:
            raise InvalidArgument(f"volume {self.cfg.volume} has no replica {ref.name!r}")
        with self.state_lock:
            if r.mode != ReplicaMode.ERR:
                raise Busy(f"replica {ref.name} is {r.mode}: only a failed replica can be "
                           "replaced")
            if r.resyncing:
                if r.replacement != ref:
                    log.warning("replica %s: replacement by %s (%s) waits for the running "
                                "resync attempt to end", ref.name, ref.path, ref.address)
                r.replacement = ref
                return
            r.replacement = None
            old, r.client = r.client, None
            r.ref, r.stat, r.error = ref, {}, "replaced: waiting for its resync"
            self._close_local(r)
        if old is not None:
            old.close("replaced")
        log.warning("replica %s replaced by %s (%s): resyncing it", ref.name, ref.path,
                    ref.address)
        self.rebuild(ref.name)

    def _take_replacement(self, r: ReplicaState) -> None:
        """After a resync attempt of `r` ended: the replacement told meanwhile, if any."""
        with self.state_lock:
            ref, r.replacement = r.replacement, None
        if ref is None or self.stopping():
            return
        if r.mode != ReplicaMode.ERR:
            log.warning("replica %s is RW again at %s: its replacement by %s is dropped (the "
                        "daemon tells it again if it is still wanted)", r.ref.name,
                        r.ref.address, ref.path)
            return
        try:
            self.replace_replica(ref)
        except BlockhornError as e:
            log.error("replacing replica %s by %s: %s", r.ref.name, ref.path, e)

    def migrate_replica(self, ref: ReplicaRef) -> None:
        """Move replica `ref.name` to a new directory without leaving the in-sync set: rebuild
        it there beside the old one, then swap (engine/migrate.py)."""
        migrate.start(self, ref)

    def _rebuild(self, r: ReplicaState) -> None:
        assert r.rebuild is not None
        progress = r.rebuild
        progress["state"] = "running"
        try:
            rebuild_replica(self, r, progress)
            self.commit_if_needed(require_quorum=False)   # the join: clears Rebuilding last
            progress.update(state="done", finished=time.time())
            log.info("replica %s rebuilt: %d bytes copied", r.ref.name, progress["done"])
        except BlockhornError as e:
            progress.update(state="failed", error=str(e))
            log.error("rebuild of %s failed: %s", r.ref.name, e)
            self.set_error(r, f"rebuild failed: {e}")
        finally:
            self._take_replacement(r)

    # --- snapshots and expansion -------------------------------------------------------------

    @contextlib.contextmanager
    def _maintenance(self) -> Iterator[None]:
        """The maintenance lock, or a clear EBUSY after a short wait (a rebuild holds it)."""
        if not self.maint_lock.acquire(timeout=MAINT_WAIT_S):
            raise Busy(f"volume {self.cfg.volume} is busy (a rebuild, purge or snapshot is "
                       "running): try again when it has finished")
        try:
            yield
        finally:
            self.maint_lock.release()

    def _everywhere(self, req: dict[str, Any], include_wo: bool = False) -> list[str]:
        """Send one control request to every RW (and WO) replica in the global order; replicas
        that fail it go ERR. Mutations sent after it land after it on every replica — this is
        what makes a snapshot consistent without pausing I/O. Returns who succeeded."""
        body = proto_json(req)
        with self.order_lock:
            targets = [r for r in self._targets
                       if include_wo or r.mode == ReplicaMode.RW]
            if req["op"] == "snapshot":
                # Local reads pause: the head file is about to become a snapshot.
                with self.state_lock:
                    for r in targets:
                        self._close_local(r)
                    self._update_readers()
            call = Call(len(targets))
            sent = [(r, r.client) for r in targets]
            for _, client in sent:
                client.enqueue(call, Op.CONTROL, data=body)  # type: ignore[union-attr]
        for _, client in sent:
            client.pump()  # type: ignore[union-attr]
        call.wait(self.cfg.timeout_s * 2)
        ok = []
        for r, client in sent:
            status = call.results.get(r.ref.name, errno.ETIMEDOUT)
            if status == 0:
                ok.append(r.ref.name)
            elif status in (errno.EEXIST, errno.ENOENT, errno.EINVAL) and not ok:
                raise BlockhornError(f"{req['op']} refused: {os.strerror(status)}", status)
            else:
                self.set_error(r, f"{req['op']} failed: {os.strerror(status)}", client)
        if req["op"] == "snapshot":
            for r in targets:
                if r.ref.name in ok and r.client is not None:
                    try:
                        r.stat = r.client.stat(timeout=self.cfg.timeout_s)
                    except BlockhornError as e:
                        self.set_error(r, f"stat failed: {e}")
                        continue
                    with self.state_lock:
                        if r.mode == ReplicaMode.RW:
                            self._open_local(r)
                        self._update_readers()
        if len(ok) < self.cfg.min_rw:
            raise ReplicaUnavailable(f"{req['op']} reached only {len(ok)} RW replicas")
        return ok

    def snapshot(self, name: str, labels: dict[str, str] | None = None,
                 user_created: bool = True) -> dict[str, Any]:
        with self._maintenance():
            if self._rebuilding:
                raise Busy("a replica is rebuilding: snapshot after it has finished")
            ok = self._everywhere({"op": "snapshot", "name": name, "labels": labels or {},
                                   "user_created": user_created})
        return {"name": name, "replicas": ok}

    def snapshot_remove(self, name: str) -> None:
        with self._maintenance():
            self._everywhere({"op": "snapshot_rm", "name": name})
            self._everywhere({"op": "purge"})

    def purge(self, wait: bool = True) -> dict[str, Any]:
        """Fold removed snapshots on every replica (each in the background, beside I/O)."""
        with self._maintenance():
            self._everywhere({"op": "purge"})
            deadline = time.monotonic() + PURGE_WAIT_S
            while wait:
                states = self.snapshots()["purge"]
                if all(s.get("state") != "running" for s in states.values()):
                    return {"purge": states}
                if time.monotonic() > deadline:
                    raise Busy("purge still running; see `snapshot ls`")
                time.sleep(0.1)
        return {"purge": "started"}

    def snapshots(self) -> dict[str, Any]:
        """The snapshot tree (from the first RW replica) and every replica's purge state."""
        tree: list[dict[str, Any]] | None = None
        purge_states = {}
        for r in list(self._readers):
            if r.client is None:
                continue
            try:
                reply = r.client.control({"op": "snapshots"}, timeout=self.cfg.timeout_s)
            except BlockhornError as e:
                self.set_error(r, f"snapshots failed: {e}")
                continue
            purge_states[r.ref.name] = reply["purge"]
            if tree is None:
                tree = reply["snapshots"]
        if tree is None:
            raise ReplicaUnavailable(f"volume {self.cfg.volume}: no RW replica answers")
        return {"snapshots": tree, "purge": purge_states}

    def expand(self, size: int) -> dict[str, Any]:
        """Grow the volume online. NBD clients see the new size when they reconnect."""
        if size % BLOCK_SIZE:
            raise InvalidArgument(f"size {size} is not a multiple of 4096")
        if size < self.size:
            raise InvalidArgument(f"shrinking is not supported: the volume has {self.size} "
                                  f"bytes, asked for {size}")
        with self._maintenance():
            if size > self.size:
                self._everywhere({"op": "expand", "size": size}, include_wo=True)
                self.size = size
        return {"size": self.size}

    # --- maintenance and status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        replicas = []
        for r in self.replicas.values():
            replicas.append({
                "name": r.ref.name, "address": r.ref.address, "path": r.ref.path,
                "mode": str(r.mode), "error": r.error or None, "local": r.local is not None,
                "revision": r.stat.get("revision"),
                "rebuild": progress_of(r.rebuild),
                "migration": migrate.status_of(self, r.ref.name),
                "replacement": r.replacement.path if r.replacement else None,
            })
        # Quorum mode: how many are in sync of how many needed; writes fail while below.
        quorum = ({"in_sync": len(self._rw_set), "majority": self.majority,
                   "writable": not self.no_quorum()} if self.cfg.quorum else None)
        return {"volume": self.cfg.volume, "size": self.size, "generation": self.generation,
                "robustness": str(self.robustness()), "min_rw": self.cfg.min_rw,
                "quorum": quorum,
                "replicas": replicas, "counters": dict(self.counters)}
