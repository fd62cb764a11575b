"""Revert a volume to a snapshot through its engine: the daemon's maintenance attach of a
detached cluster volume whose replicas live on other nodes (manager/snapshots.py).

Every RW replica is asked at once, in the global order of mutations, to start a new, empty
head on the snapshot (the replica op `revert`, docs/FORMAT.md). A replica counts a revert as
one mutation (replica/snapshots.py `revert`): Dirty first, the revision bumped after, its
change log started anew. The replicas that answer it are the new in-sync set; every other
one (it failed, it did not answer within the wait, its connection dropped) is set ERR before
any later mutation is sent, and the commit that follows leaves it out, so the start rule
never trusts it again as in sync: it is rebuilt in full from the reverted ones, as a replica
that missed writes. Why no crash in between leaves replicas that differ but look in sync:
docs/DURABILITY.md, "Revert across nodes".

Only the daemon asks, in a maintenance attach: no frontend, so nothing reads the volume
while its data changes (a mounted file system above would not expect that).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from blockhorn.engine.client import Call
from blockhorn.engine.ping import MAINT_TICK_S, expire_pings
from blockhorn.replica.proto import Op
from blockhorn.replica.proto import decode_json as proto_decode
from blockhorn.replica.proto import encode_json as proto_json
from blockhorn.types import BlockhornError, Busy, ReplicaMode, ReplicaUnavailable

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine, ReplicaState

log = logging.getLogger("blockhorn.engine")

# Answers a replica gives before it changes anything (replica/server.py, snapshots.revert):
# unknown op or bad field (a replica of an older release), no such snapshot, a purge
# running, a halted replica. Only when every replica answers one of these is nothing changed.
REFUSALS = frozenset({errno.EINVAL, errno.ENOENT, errno.EBUSY, errno.ECANCELED})
REVERT_WAIT_S = 30.0    # seconds a replica gets to revert (new head, fsyncs, old head unlinked)


def revert(eng: Engine, snap: str) -> dict[str, Any]:
    """Revert every RW replica to snapshot `snap`; commit the ones that did. Returns
    {"snapshot", "reverted", "left_out": {name: why}, "generation"}. Raises when nothing
    changed (every replica refused: the reason), or when the reverted replicas could not be
    committed as the in-sync set (then the next start decides, from the revisions)."""
    with eng._maintenance():
        if eng.fenced:
            raise ReplicaUnavailable(eng.fenced)
        if eng._rebuilding or eng.shadows:
            raise Busy(f"volume {eng.cfg.volume}: a replica is rebuilding: revert after it has "
                       "finished")
        if not eng.started() or eng.no_quorum():
            raise ReplicaUnavailable(f"volume {eng.cfg.volume}: too few replicas in sync to "
                                     "revert (the engine's start is not committed)")
        ok, left_out = _send(eng, snap)
        try:
            eng.commit_if_needed(require_quorum=False)
        except BlockhornError as e:
            raise BlockhornError(_undecided(eng, snap, ok, left_out, str(e)), e.errno) from None
        in_sync = sorted(eng._committed)
        if eng._unwritten is not None or not set(in_sync) <= set(ok) or not in_sync:
            raise ReplicaUnavailable(_undecided(eng, snap, ok, left_out,
                                                "the reverted replicas are not a majority"))
    log.warning("volume %s: reverted to snapshot %s on %s at generation %d%s",
                eng.cfg.volume, snap, in_sync, eng.generation,
                "".join(f"; {n} left out ({why}): it is rebuilt from them"
                        for n, why in sorted(left_out.items())))
    return {"snapshot": snap, "reverted": in_sync, "left_out": left_out,
            "generation": eng.generation}


def _send(eng: Engine, snap: str) -> tuple[list[str], dict[str, str]]:
    """Send `revert` to every RW replica and settle the answers, all under the order lock:
    no mutation is sent between the revert and the moment the replicas that did not revert
    are ERR (so none reaches them as if in sync). Returns (reverted, {left out: why})."""
    body = proto_json({"op": "revert", "name": snap})
    with eng.order_lock:
        targets = [r for r in eng._targets if r.mode == ReplicaMode.RW and r.client]
        if len(targets) < eng.cfg.min_rw:
            raise ReplicaUnavailable(f"volume {eng.cfg.volume}: {len(targets)} RW replicas, "
                                     f"{eng.cfg.min_rw} needed to revert")
        with eng.state_lock:
            for r in targets:       # local reads stop: the head file is about to go
                eng._close_local(r)
            eng._update_readers()
        call = Call(len(targets))
        sent: list[tuple[ReplicaState, Any, bytearray]] = []
        for r in targets:
            buf = bytearray()
            r.client.enqueue(call, Op.CONTROL, data=body, reply_buf=buf)  # type: ignore[union-attr]
            sent.append((r, r.client, buf))
        for _, client, _ in sent:
            client.pump()
        deadline = time.monotonic() + max(REVERT_WAIT_S, 2 * eng.cfg.timeout_s)
        while not call.wait(min(MAINT_TICK_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            expire_pings(eng)   # a silent replica's ping expires: its connection closes
        status = {r.ref.name: call.results.get(r.ref.name, errno.ETIMEDOUT) for r, _, _ in sent}
        if all(s in REFUSALS for s in status.values()):
            _reopen_local(eng, [r for r, _, _ in sent])
            raise BlockhornError(
                f"volume {eng.cfg.volume}: revert to snapshot {snap!r} refused by every "
                "replica, nothing changed: " + "; ".join(
                    f"{n}: {_why(s)}" for n, s in sorted(status.items())), min(status.values()))
        ok: list[str] = []
        left_out: dict[str, str] = {}
        for r, client, buf in sent:
            s = status[r.ref.name]
            if s == 0:
                try:
                    r.stat = proto_decode(buf)
                    ok.append(r.ref.name)
                    continue
                except BlockhornError as e:
                    why = f"unreadable answer: {e}"
            else:
                why = _why(s)
            left_out[r.ref.name] = why
            eng.set_error(r, f"revert to snapshot {snap!r} failed ({why}): it must be "
                             "rebuilt from the reverted replicas", client)
        _reopen_local(eng, [r for r, _, _ in sent if r.ref.name in ok])
    return ok, left_out


def _reopen_local(eng: Engine, replicas: list[ReplicaState]) -> None:
    with eng.state_lock:
        for r in replicas:
            if r.mode == ReplicaMode.RW:
                eng._open_local(r)
        eng._update_readers()


def _why(status: int) -> str:
    if status == errno.EINVAL:
        return ("EINVAL: refused (a replica of an older release does not know `revert`: "
                "upgrade it)")
    return f"{errno.errorcode.get(status, status)}: {os.strerror(status)}"


def _undecided(eng: Engine, snap: str, ok: list[str], left_out: dict[str, str],
               reason: str) -> str:
    return (f"volume {eng.cfg.volume}: revert to snapshot {snap!r} reached "
            f"{', '.join(ok) or 'no replica'} but could not be committed ({reason})"
            + "".join(f"; {n}: {why}" for n, why in sorted(left_out.items()))
            + ". The replicas never look in sync while they differ: the next attach starts "
            "from the reverted ones if any of them answers then, else from the others, and "
            "rebuilds the rest; check the data, or revert again with every node up")
