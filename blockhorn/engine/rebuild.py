"""Layer-aware online rebuild: make a replica an exact copy of a RW replica while I/O runs.

1. The target is marked Rebuilding (durably) and given the source's chain: empty snapshot
   layers with the source's metadata, oldest first, under an empty head.
2. Under the order lock it becomes WO: from then on it receives every mutation. While any WO
   replica exists the engine widens unaligned writes to whole 4 KiB blocks, so a target never
   copies up a block from a layer that is not filled yet (Longhorn bug #4354).
3. Snapshot layers are immutable: they are copied extent by extent without the order lock.
4. The head is copied in chunks, each under the order lock: the source read is ordered after
   every write sent before it, the target write before every write sent after it.
5. A final FLUSH, the source's revision, the layer map rebuilt: RW. The join commit
   (Engine.commit_if_needed) then records the new set, reaching the target last and clearing
   its Rebuilding flag in that same write: until then no engine start trusts it.
The engine's maintenance lock keeps snapshots, purges and expansion out meanwhile.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any

from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.replica.proto import Op
from blockhorn.replica.proto import encode_json as proto_json
from blockhorn.types import BlockhornError, ReplicaMode, ReplicaUnavailable

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine, ReplicaState

REBUILD_CHUNK = 2 << 20      # bytes per copy step (Longhorn's batch size)
PURGE_WAIT_S = 600.0         # how long a rebuild waits for a running purge on its source


def rebuild_replica(eng: Engine, r: ReplicaState, progress: dict[str, Any]) -> None:
    if r.client:
        r.client.close("reconnecting for rebuild")
    r.mode = ReplicaMode.ERR
    # Its leaving the in-sync set is on record before it is emptied (the Rebuilding flag
    # guards that as well: docs/DURABILITY.md, "Generations").
    eng.commit_if_needed()
    eng.connect_replica(r)
    target = r.client
    if target is None:
        raise BlockhornError(r.error or "cannot connect", errno.EHOSTUNREACH)
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
        since = _incremental_since(target.stat(), source.stat(), chain, eng.size)
        if since is not None and _resync_changes(eng, r, target, source, since,
                                                 chain["head"], progress):
            return
        progress["mode"] = "full"
        target.control({"op": "set_rebuilding", "value": True})
        target.control({"op": "reset_chain", "chain": chain["chain"]})
        eng.set_mode(r, ReplicaMode.WO)
        layers = [m["Name"] for m in chain["chain"]]
        plan = {layer: _extents(source, layer, 0, eng.size) for layer in layers + [chain["head"]]}
        progress["total"] = sum(n for ext in plan.values() for _, n in ext)
        for layer in layers:
            for start, length in plan[layer]:
                for pos, n in _chunks(start, length):
                    _check_running(eng, r)
                    data = _read_layer(eng, source, layer, pos, n)
                    _request(eng, target, Op.WRITE_LAYER, pos, n, _layer_payload(layer, data))
                    progress["done"] += n
        for start, length in plan[chain["head"]]:
            for pos, n in _chunks(start, length):
                _check_running(eng, r)
                with eng.order_lock:
                    data = _read_layer(eng, source, chain["head"], pos, n)
                    call = Call(1)
                    target.submit(call, Op.WRITE, pos, n, data)
                _wait(eng, call, target, "rebuild write")
                progress["done"] += n
        _finish(eng, r, target, source)


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
    """Copy to the target only the chunks the source changed after revision `since`. False
    when the source's log no longer reaches back that far (then: a full rebuild)."""
    # Durable first: a crash from here on resumes from the same revision (the content stays).
    target.control({"op": "set_rebuilding", "value": True, "since": since})
    with eng.order_lock:
        # Atomically with the switch to WO: what changed before it is in `ranges`, what
        # changes after it reaches the target directly.
        reply = source.control({"op": "changes_since", "revision": since})
        if reply.get("ranges") is None:
            return False
        eng.set_mode(r, ReplicaMode.WO, order_held=True)
    ranges = [(s, min(n, eng.size - s)) for s, n in reply["ranges"] if s < eng.size]
    progress.update(mode="incremental", since=since,
                    total=sum(n for _, n in ranges), done=0, copied=0)
    for start, length in ranges:
        for pos, n in _chunks(start, length):
            _check_running(eng, r)
            # Layer-exact: the target's head range becomes the source's head range, holes
            # and all (older layers are equal: same chain), so the replicas stay identical
            # file by file, not only in what reads return.
            with eng.order_lock:
                extents = _extents(source, head, pos, n)
                calls = [_submit_control(target, {"op": "punch_head", "offset": pos,
                                                  "length": n})]
                for s_, n_ in extents:
                    progress["copied"] += n_       # bytes that crossed: data, not holes
                    data = _read_layer(eng, source, head, s_, n_)
                    call = Call(1)
                    target.submit(call, Op.WRITE, s_, n_, data)
                    calls.append(call)
            for call in calls:
                _wait(eng, call, target, "resync write")
            progress["done"] += n
    _finish(eng, r, target, source)
    return True


def _finish(eng: Engine, r: ReplicaState, target: ReplicaClient, source: ReplicaClient) -> None:
    """Under the order lock: a final FLUSH, the source's revision, then RW (the join commit
    follows in Engine._rebuild)."""
    with eng.order_lock:
        final = source.stat()
        target.request(Op.FLUSH, timeout=eng.cfg.timeout_s * 4)
        target.control({"op": "finish_rebuild", "revision": final["revision"]})
        r.stat = target.stat()
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


def _layer_payload(layer: str, data: bytearray) -> bytes:
    name = layer.encode()
    return len(name).to_bytes(2, "little") + name + bytes(data)


def _read_layer(eng: Engine, source: ReplicaClient, layer: str, offset: int,
                length: int) -> bytearray:
    buf = bytearray(length)
    call = Call(1, dest=memoryview(buf))
    source.submit(call, Op.READ_LAYER, offset, length, layer.encode())
    _wait(eng, call, source, "rebuild read")
    return buf


def _request(eng: Engine, client: ReplicaClient, op: int, offset: int, length: int,
             data: bytes) -> None:
    call = Call(1)
    client.submit(call, op, offset, length, data)
    _wait(eng, call, client, "rebuild write")


def _wait(eng: Engine, call: Call, client: ReplicaClient, what: str) -> None:
    if not call.wait(eng.cfg.timeout_s) or call.results.get(client.name):
        raise BlockhornError(f"{what} on {client.name} failed", errno.EIO)
