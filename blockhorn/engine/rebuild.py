"""Layer-aware online rebuild: make a replica an exact copy of a RW replica while I/O runs.

1. The target is marked Rebuilding (durably) and given the source's chain: empty snapshot
   layers with the source's metadata, oldest first, under an empty head.
2. Under the order lock it gets `begin_copy` and becomes WO: from then on it receives every
   mutation, and marks the blocks they reach (its copy session). While any WO replica exists
   the engine widens mutations to whole 4 KiB blocks.
3. Every layer is copied extent by extent, pipelined (`_Copier`), without the order lock: a
   copy into the head skips blocks the session marked, which hold newer data than the copy.
4. A durable cursor on the target every few seconds lets a killed rebuild resume: digests
   compared below it, copied above it.
5. A final FLUSH, the source's revision, the layer map rebuilt: RW. The join commit
   (Engine.commit_if_needed) then records the new set, reaching the target last and clearing
   its Rebuilding flag in that same write: until then no engine start trusts it.
docs/DURABILITY.md, "Rebuild", argues why this is exact. The engine's maintenance lock keeps
snapshots, purges and expansion out meanwhile.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from typing import TYPE_CHECKING, Any

from blockhorn.engine import migrate
from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.engine.limits import RateLimiter
from blockhorn.replica import digest, proto
from blockhorn.replica.proto import Op
from blockhorn.replica.proto import decode_json as proto_decode
from blockhorn.replica.proto import encode_json as proto_json
from blockhorn.types import BlockhornError, ReplicaMode, ReplicaUnavailable

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine, ReplicaState

log = logging.getLogger("blockhorn.engine")

REBUILD_CHUNK = 2 << 20      # bytes per copy request (Longhorn's batch size)
COPY_WINDOW = 64             # copy reads, and copy writes, in flight at once at most
COPY_BYTES = 16 << 20        # and at most this many bytes in flight (2 MiB chunks: 8)
CURSOR_EVERY = 256 << 20     # bytes copied between two durable cursors on the target,
CURSOR_EVERY_S = 2.0         # or seconds, whichever comes first
PUNCH_BATCH = 512            # changed ranges one resync punch request covers
VECTOR_PIECES = 256          # small pieces one resync vector copy carries at most,
VECTOR_BYTES = 1 << 20       # and bytes
PURGE_WAIT_S = 600.0         # how long a rebuild waits for a running purge on its source


def progress_of(rebuild: dict[str, Any] | None) -> dict[str, Any] | None:
    """A rebuild's state for `status`: while it copies, with its rate (bytes of the plan
    per second since the copy began) and an ETA."""
    if not rebuild:
        return None
    out = dict(rebuild)
    began = out.get("started_copy")
    if out.get("state") == "running" and began:
        elapsed = max(time.time() - began, 1e-3)
        rate = out.get("done", 0) / elapsed
        out["rate"] = rate
        left = max(out.get("total", 0) - out.get("done", 0), 0)
        out["eta_s"] = left / rate if rate > 0 else None
    return out


def rebuild_replica(eng: Engine, r: ReplicaState, progress: dict[str, Any]) -> None:
    if r.client:
        r.client.close("reconnecting for rebuild")
    r.mode = ReplicaMode.ERR
    # Its leaving the in-sync set is on record before it is emptied (the Rebuilding flag
    # guards that as well: docs/DURABILITY.md, "Generations").
    eng.commit_if_needed(require_quorum=False)   # a resync is how a lost majority comes back
    eng.connect_replica(r)
    target = r.client
    if target is None:
        raise BlockhornError(r.error or "cannot connect", errno.EHOSTUNREACH)

    def queued() -> None:
        progress["waiting"] = "a free rebuild slot (concurrent-replica-rebuild-per-node-limit)"

    with eng.rebuild_limits.slot(eng.stopping, queued):
        progress.pop("waiting", None)
        progress["started"] = time.time()
        _rebuild_from_source(eng, r, target, progress)


def _rebuild_from_source(eng: Engine, r: ReplicaState, target: ReplicaClient,
                         progress: dict[str, Any]) -> None:
    with eng.maint_lock:
        sources = [s for s in eng.readers() if s.client]
        if not sources:
            raise ReplicaUnavailable("no RW replica to rebuild from")
        source = sources[0].client
        assert source is not None
        _wait_purge_idle(source)
        chain = source.control({"op": "chain"})
        if r.stat.get("size", 0) < eng.size:
            target.control({"op": "expand", "size": eng.size})
        # Before this engine's start commit (quorum mode: a start of fewer than a majority
        # writes none) the source's start_generation is an older engine's: full copies only.
        since = (_incremental_since(target.stat(), source.stat(), chain, eng.size)
                 if eng.started() else None)
        if since is not None and _resync_changes(eng, r, target, source, since,
                                                 chain["head"], progress):
            return
        _full_rebuild(eng, r, target, source, chain, progress)


def _full_rebuild(eng: Engine, r: ReplicaState, target: ReplicaClient, source: ReplicaClient,
                  chain: dict[str, Any], progress: dict[str, Any]) -> None:
    """Copy every layer, pipelined (docs/DURABILITY.md, "Rebuild"). A target left by an
    interrupted full rebuild of the same chain resumes: below its durable cursor chunks are
    compared by digest and only those that differ are copied; above it, copied."""
    names = [m["Name"] for m in chain["chain"]]
    tstat = target.stat()
    cursor = tstat.get("rebuild_cursor")
    resume = (bool(tstat.get("rebuilding")) and tstat.get("resync_since") is None
              and isinstance(cursor, list) and tstat.get("chain", [])[:-1] == names
              and int(tstat.get("size", 0)) == eng.size)
    target.control({"op": "set_rebuilding", "value": True})
    if not resume:
        target.control({"op": "reset_chain", "chain": chain["chain"]})
        cursor = [0, 0]
    assert isinstance(cursor, list)
    thead = target.stat()["head"]
    pairs = [(n, n) for n in names] + [(chain["head"], thead)]
    progress.update(mode="resume" if resume else "full", cursor=list(cursor))
    with eng.order_lock:
        # The copy session begins before any mutation that reaches the target as WO.
        begin = _submit_control(target, {"op": "begin_copy"})
        eng.set_mode(r, ReplicaMode.WO, order_held=True)
    _wait(eng, begin, target, "begin_copy")
    plan = [_extents(source, layer, 0, eng.size) for layer, _ in pairs]
    progress["total"] = sum(n for ext in plan for _, n in ext)
    copier = _Copier(eng, r, source, target, progress)
    for i, ((slayer, tlayer), extents) in enumerate(zip(pairs, plan, strict=True)):
        upto = eng.size if i < cursor[0] else min(cursor[1], eng.size) if i == cursor[0] else 0
        upto -= upto % REBUILD_CHUNK
        if upto:
            _compare_and_copy(eng, copier, slayer, tlayer, extents, upto)
        if resume and upto < eng.size:
            # What the interrupted copy wrote above its cursor may be stale: start empty.
            target.control({"op": "punch_layer", "layer": tlayer, "offset": upto,
                            "length": eng.size - upto})
        for start, length in _clip(extents, upto, eng.size):
            for pos, n in _chunks(start, length):
                copier.copy(slayer, tlayer, pos, n)
                if copier.cursor_due():
                    copier.drain()
                    target.control({"op": "rebuild_cursor", "layer": i, "offset": pos + n})
                    copier.since_cursor, copier.cursor_at = 0, time.monotonic()
                    progress["cursor"] = [i, pos + n]
    copier.drain()
    copied_at = time.monotonic()
    _finish(eng, r, target, source)
    log.info("rebuild of %s: %d bytes copied in %.2f s, final flush %.2f s", r.ref.name,
             progress["copied"], copied_at - copier.began, time.monotonic() - copied_at)


class _Copier:
    """Chunk copies from source to target, COPY_WINDOW reads and COPY_WINDOW writes in flight:
    the source reads the next chunks while the target writes the previous ones. No chunk waits
    for the order lock: the target's copy session skips blocks mutated meanwhile."""

    def __init__(self, eng: Engine, r: ReplicaState, source: ReplicaClient,
                 target: ReplicaClient, progress: dict[str, Any],
                 count_done: bool = True) -> None:
        self.eng, self.r, self.source, self.target = eng, r, source, target
        self.count_done = count_done       # False: the caller counts examined bytes
        self.inflight = 0                  # bytes read or written, not settled
        self.progress = progress
        # (offset, length, WRITE_LAYER payload, read call)
        self.reads: collections.deque[tuple[int, int, bytearray, Call]] = collections.deque()
        self.writes: collections.deque[tuple[int, Call]] = collections.deque()
        self.since_cursor = 0
        self.cursor_at = self.began = time.monotonic()
        self.limiter = RateLimiter(eng.rebuild_limits)
        progress.setdefault("copied", 0)
        progress["started_copy"] = time.time()

    def copy(self, slayer: str, tlayer: str, pos: int, n: int) -> None:
        """Copy [pos, pos+n) of layer `slayer` into the target's `tlayer` (whole blocks)."""
        _check_running(self.eng, self.r)
        self.limiter.wait(n, self.eng.stopping)
        name = tlayer.encode()
        pre = 2 + len(name)
        buf = bytearray(pre + n)        # the WRITE_LAYER payload; the read lands in place
        buf[:2] = len(name).to_bytes(2, "little")
        buf[2:pre] = name
        call = Call(1, dest=memoryview(buf)[pre:])
        self.source.submit(call, Op.READ_LAYER, pos, n, slayer.encode())
        self.reads.append((pos, n, buf, call))
        self.inflight += n
        while len(self.reads) >= COPY_WINDOW or (self.reads and self.inflight > COPY_BYTES):
            self._write_oldest()

    def copy_vector(self, slayer: str, tlayer: str, pieces: list[tuple[int, int]]) -> None:
        """Copy many small (offset, length) pieces of a layer with one read and one write
        (FLAG_VECTOR): a resync's scattered blocks cost two requests per batch, not per
        block. The read's request payload is the write's, without the data."""
        if len(pieces) == 1:
            self.copy(slayer, tlayer, *pieces[0])
            return
        _check_running(self.eng, self.r)
        n = sum(m for _, m in pieces)
        self.limiter.wait(n, self.eng.stopping)
        name = tlayer.encode()
        head = bytearray(len(name).to_bytes(2, "little") + name
                         + len(pieces).to_bytes(4, "little"))
        for off, m in pieces:
            head += proto.VECTOR_RANGE.pack(off, m)
        pre = len(head)
        buf = head + bytes(n)
        call = Call(1, dest=memoryview(buf)[pre:])
        sname = slayer.encode()
        # The source reads its own layer name: the same table under the source's name.
        rhead = (len(sname).to_bytes(2, "little") + sname + bytes(head[2 + len(name):]))
        self.source.submit(call, Op.READ_LAYER, 0, n, rhead, flags=proto.FLAG_VECTOR)
        self.reads.append((-1, n, buf, call))
        self.inflight += n
        while len(self.reads) >= COPY_WINDOW or (self.reads and self.inflight > COPY_BYTES):
            self._write_oldest()

    def _write_oldest(self) -> None:
        pos, n, buf, call = self.reads.popleft()
        _wait(self.eng, call, self.source, "rebuild read")
        wcall = Call(1)
        if pos < 0:          # a vector copy
            self.target.submit(wcall, Op.WRITE_LAYER, 0, n, buf, flags=proto.FLAG_VECTOR)
        else:
            self.target.submit(wcall, Op.WRITE_LAYER, pos, n, buf)
        self.writes.append((n, wcall))
        while len(self.writes) >= COPY_WINDOW or (self.writes and self.inflight > COPY_BYTES):
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        n, call = self.writes.popleft()
        _wait(self.eng, call, self.target, "rebuild write")
        self.inflight -= n
        if self.count_done:
            self.progress["done"] += n
        self.progress["copied"] += n
        self.since_cursor += n

    def cursor_due(self) -> bool:
        return self.since_cursor >= CURSOR_EVERY or (
            self.since_cursor > 0 and time.monotonic() - self.cursor_at >= CURSOR_EVERY_S)

    def drain(self) -> None:
        while self.reads:
            self._write_oldest()
        while self.writes:
            self._settle_oldest()


def _compare_and_copy(eng: Engine, copier: _Copier, slayer: str, tlayer: str,
                      extents: list[tuple[int, int]], upto: int) -> None:
    """Resume below the cursor: digest [0, upto) of the layer on both replicas, chunk by
    chunk, and copy (hole-exactly) only the chunks that differ. Both digest requests are
    sent under the order lock, so both replicas digest after the same mutations; whatever
    follows reaches both."""
    for span in range(0, upto, digest.MAX_DIGEST_SPAN):
        n = min(digest.MAX_DIGEST_SPAN, upto - span)
        req = {"op": "digest", "offset": span, "length": n, "chunk": REBUILD_CHUNK}
        _check_running(eng, copier.r)
        with eng.order_lock:
            sc, sbuf = _submit_reply(copier.source, dict(req, layer=slayer))
            tc, tbuf = _submit_reply(copier.target, dict(req, layer=tlayer))
        _wait(eng, sc, copier.source, "rebuild digest")
        _wait(eng, tc, copier.target, "rebuild digest")
        sdig, tdig = proto_decode(sbuf)["digests"], proto_decode(tbuf)["digests"]
        for k, (a, b) in enumerate(zip(sdig, tdig, strict=True)):
            pos = span + k * REBUILD_CHUNK
            length = min(REBUILD_CHUNK, upto - pos)
            data = _clip(extents, pos, pos + length)
            examined = sum(m for _, m in data)
            if a == b:
                copier.progress["done"] += examined
                continue
            copier.target.control({"op": "punch_layer", "layer": tlayer, "offset": pos,
                                   "length": length})
            for s_, m in data:
                copier.copy(slayer, tlayer, s_, m)
        copier.drain()


def _clip(extents: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of `extents` inside [lo, hi)."""
    out = []
    for s, n in extents:
        a, b = max(s, lo), min(s + n, hi)
        if a < b:
            out.append((a, b - a))
    return out


def _submit_reply(client: ReplicaClient, req: dict[str, Any]) -> tuple[Call, bytearray]:
    call, buf = Call(1), bytearray()
    client.submit(call, Op.CONTROL, data=proto_json(req), reply_buf=buf)
    return call, buf


def _incremental_since(tstat: dict[str, Any], sstat: dict[str, Any], chain: dict[str, Any],
                       size: int) -> int | None:
    """The revision from which the target may be resynced incrementally, or None (a full
    rebuild). It may when its first `since` mutations are the source's first `since`: it was
    in sync with the source after the source's log began (its generation is at least the
    log's) under the engine that runs now (no start commit since), its snapshot chain and
    size equal the source's, and it was not emptied by an interrupted full rebuild
    (Rebuilding without `resync_since`). Mutations it applied beyond its counter (unflushed
    before a crash) were sent to the source too, in the same order, so the source's log
    names their ranges. docs/DURABILITY.md, "Incremental resync"."""
    gen = int(tstat.get("generation", -1))
    if sstat.get("log_generation") is None or gen < int(sstat["log_generation"]):
        return None
    if int(sstat.get("start_generation", 0)) > gen:
        # An engine started after the target left: the engine before it may have crashed
        # between sending a mutation to the target and to the source, so their revision
        # numbers may name different mutations since.
        return None
    if tstat.get("rebuilding"):
        if tstat.get("resync_since") is None:
            return None       # a full rebuild was interrupted: its content is not a prefix
        since = min(int(tstat["resync_since"]), int(tstat.get("revision", 0)))
    else:
        since = int(tstat.get("revision", 0))
    chain_names = [m["Name"] for m in chain["chain"]]
    if tstat.get("chain", [])[:-1] != chain_names or int(tstat.get("size", 0)) != size:
        return None
    if since < int(sstat.get("log_start", since + 1)):
        return None
    return since


def _resync_changes(eng: Engine, r: ReplicaState, target: ReplicaClient, source: ReplicaClient,
                    since: int, head: str, progress: dict[str, Any]) -> bool:
    """Copy to the target only the blocks the source changed after revision `since`. False
    when the source's log no longer reaches back that far (then: a full rebuild). The copy
    is the full rebuild's (a copy session, pipelined, no lock per range), layer-exact: each
    changed range of the target's head is punched, then the source's head data in it
    written, so the replicas stay identical file by file, not only in what reads return."""
    # Durable first: a crash from here on resumes from the same revision (the content stays).
    target.control({"op": "set_rebuilding", "value": True, "since": since})
    thead = target.stat()["head"]
    with eng.order_lock:
        # Atomically with the switch to WO: what changed before it is in `ranges`, what
        # changes after it reaches the target directly (and is marked by its copy session).
        reply = source.control({"op": "changes_since", "revision": since})
        if reply.get("ranges") is None:
            return False
        begin = _submit_control(target, {"op": "begin_copy"})
        eng.set_mode(r, ReplicaMode.WO, order_held=True)
    _wait(eng, begin, target, "begin_copy")
    ranges = [(s, min(n, eng.size - s)) for s, n in reply["ranges"] if s < eng.size]
    progress.update(mode="incremental", since=since, started_copy=time.time(),
                    total=sum(n for _, n in ranges), done=0, copied=0)
    data = _extents(source, head, 0, eng.size)      # after the switch: holds every change
    copier = _Copier(eng, r, source, target, progress, count_done=False)
    di = 0
    for k in range(0, len(ranges), PUNCH_BATCH):
        batch = ranges[k:k + PUNCH_BATCH]
        _check_running(eng, r)
        # One punch for many ranges, sent before their copies (one connection, in order).
        punch = _submit_control(target, {"op": "punch_layer", "layer": thead,
                                         "ranges": [list(x) for x in batch]})
        copier.writes.append((0, punch))
        pieces: list[tuple[int, int]] = []
        for start, length in batch:
            while di < len(data) and data[di][0] + data[di][1] <= start:
                di += 1
            for s_, n_ in _clip(data[di:di + 1 + _span(data, di, start + length)],
                                start, start + length):
                for pos, n in _chunks(s_, n_):
                    if n >= VECTOR_BYTES:
                        copier.copy(head, thead, pos, n)
                        continue
                    pieces.append((pos, n))
                    if len(pieces) >= VECTOR_PIECES or \
                            sum(m for _, m in pieces) >= VECTOR_BYTES:
                        copier.copy_vector(head, thead, pieces)
                        pieces = []
            progress["done"] += length
        if pieces:
            copier.copy_vector(head, thead, pieces)
    copier.drain()
    copied_at = time.monotonic()
    _finish(eng, r, target, source)
    log.info("resync of %s: %d ranges, %d bytes copied in %.2f s, final flush %.2f s",
             r.ref.name, len(ranges), progress["copied"], copied_at - copier.began,
             time.monotonic() - copied_at)
    return True


def _span(extents: list[tuple[int, int]], i: int, end: int) -> int:
    """How many extents after extents[i] start before `end`."""
    j = i + 1
    while j < len(extents) and extents[j][0] < end:
        j += 1
    return j - i - 1


def _finish(eng: Engine, r: ReplicaState, target: ReplicaClient, source: ReplicaClient) -> None:
    """Under the order lock: a final FLUSH, the source's revision, then RW (the join commit
    follows in Engine._rebuild), or for a migration target the swap (engine/migrate.py)."""
    with eng.order_lock:
        final = source.stat()
        target.request(Op.FLUSH, timeout=eng.cfg.timeout_s * 4)
        target.control({"op": "finish_rebuild", "revision": final["revision"]})
        r.stat = target.stat()
        if r.shadow_of:
            migrate.swap(eng, r)     # a migration target takes its replica's slot
        else:
            eng.set_mode(r, ReplicaMode.RW, order_held=True)


def _submit_control(client: ReplicaClient, req: dict[str, Any]) -> Call:
    call = Call(1)
    client.submit(call, Op.CONTROL, data=proto_json(req))
    return call


def _wait_purge_idle(source: ReplicaClient) -> None:
    deadline = time.monotonic() + PURGE_WAIT_S
    while source.control({"op": "snapshots"})["purge"].get("state") == "running":
        if time.monotonic() > deadline:
            raise BlockhornError("the source replica is still purging snapshots", errno.EBUSY)
        time.sleep(0.2)


def _extents(source: ReplicaClient, layer: str, offset: int,
             length: int) -> list[tuple[int, int]]:
    """Where one layer of the source holds data in [offset, offset + length)."""
    reply = source.control({"op": "extents", "offset": offset, "length": length,
                            "layer": layer})
    return [(int(s), int(n)) for s, n in reply["extents"]]


def _chunks(start: int, length: int) -> list[tuple[int, int]]:
    return [(pos, min(REBUILD_CHUNK, start + length - pos))
            for pos in range(start, start + length, REBUILD_CHUNK)]


def _check_running(eng: Engine, r: ReplicaState) -> None:
    if eng.stopping() or r.mode != ReplicaMode.WO:
        raise BlockhornError("rebuild interrupted", errno.EINTR)


def _wait(eng: Engine, call: Call, client: ReplicaClient, what: str) -> None:
    if not call.wait(eng.cfg.timeout_s) or call.results.get(client.name):
        raise BlockhornError(f"{what} on {client.name} failed", errno.EIO)
