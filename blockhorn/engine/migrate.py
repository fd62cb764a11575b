"""Migration: move a replica to another directory (another node) without ever running short.

`node drain` (manager/leader.py) must not take a replica out of the in-sync set while its copy
elsewhere is rebuilt: a 2-replica volume would run on one copy meanwhile. So the engine keeps
the replica RW and builds its successor beside it (docs/DURABILITY.md, "Moving a replica"):

1. The target (the *shadow*: an empty, `Rebuilding` replica process in the new directory) is
   connected under an internal name (`<replica>~migrate`). It is never a voter and never a
   member of a commit: the replica's name and its slot in every commit stay the old one's.
2. It is rebuilt fully from a RW replica with the rebuild code (engine/rebuild.py): WO, so
   every mutation reaches it as well as the replica it replaces, and a failure of it only
   drops the shadow (the old replica stays RW, nothing is lost).
3. In sync, under the order lock (`swap`): every request sent to either is answered; the old
   replica is durably marked `Rebuilding` (from now on no engine start trusts it: it will miss
   what follows); the shadow takes the replica's slot (its connection, address, directory) and
   joins: the next commit reaches it last and clears its `Rebuilding` flag, and no mutation is
   acknowledged before that commit is written. The old connection is closed.
4. The daemon points the store at the new directory (`finish_move`) once the status shows the
   replica's path changed; only then does the old node stop the old process and remove it.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, Any

from blockhorn.config import ReplicaRef
from blockhorn.types import BlockhornError, Busy, InvalidArgument, ReplicaMode

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine, ReplicaState

log = logging.getLogger("blockhorn.engine")

SHADOW_SUFFIX = "~migrate"   # a replica name never contains "~" (types.check_name)
DRAIN_POLL_S = 0.001          # how often the swap looks whether every request was answered


def start(eng: Engine, ref: ReplicaRef) -> None:
    """Begin migrating replica `ref.name` to `ref.path` at `ref.address` in the background
    (module docstring). The same target again while it runs, or once the replica is there,
    is a no-op; only a RW replica is migrated (else EBUSY: try again once it is)."""
    from blockhorn.engine.engine import ReplicaState
    slot = eng.replicas.get(ref.name)
    if slot is None:
        raise InvalidArgument(f"volume {eng.cfg.volume} has no replica {ref.name!r}")
    with eng.state_lock:
        cur = eng.shadows.get(ref.name)
        if cur is not None:
            if (cur.ref.address, cur.ref.path) == (ref.address, ref.path):
                return
            raise Busy(f"replica {ref.name} is being migrated to {cur.ref.path} already")
        if (slot.ref.address, slot.ref.path) == (ref.address, ref.path):
            return    # swapped in already
        if slot.mode != ReplicaMode.RW:
            raise Busy(f"replica {ref.name} is {slot.mode}: only an in-sync replica is "
                       "migrated (the move is retried once it is RW again)")
        shadow = ReplicaState(ReplicaRef(ref.name + SHADOW_SUFFIX, ref.address, ref.path,
                                         slot.ref.frame_auth), shadow_of=ref.name)
        shadow.rebuild = {"state": "queued", "done": 0, "total": 0, "started": time.time()}
        eng.shadows[ref.name] = shadow
        eng.migrations[ref.name] = {"to": ref.path, "address": ref.address,
                                    "progress": shadow.rebuild}
    log.warning("replica %s: migrating to %s (%s)", ref.name, ref.path, ref.address)
    eng._rebuilds.submit(run, eng, shadow)


def run(eng: Engine, shadow: ReplicaState) -> None:
    """The migration's thread (the engine's rebuild worker): rebuild, swap, join commit."""
    from blockhorn.engine.rebuild import rebuild_replica
    progress = shadow.rebuild
    assert progress is not None
    progress["state"] = "running"
    try:
        rebuild_replica(eng, shadow, progress)     # ends in `swap` (rebuild._finish)
    except BlockhornError as e:
        progress.update(state="failed", error=str(e), finished=time.time())
        log.error("migration of %s to %s failed: %s (the replica stays where it was)",
                  shadow.shadow_of, shadow.ref.path, e)
        drop(eng, shadow, f"migration failed: {e}")
        return
    progress.update(state="done", finished=time.time())
    log.info("replica %s migrated to %s: %d bytes copied", shadow.shadow_of, shadow.ref.path,
             progress.get("copied", 0))
    try:
        eng.commit_if_needed(require_quorum=False)   # the join (if no write ran it first)
    except BlockhornError as e:
        log.error("volume %s: commit after the migration of %s failed: %s", eng.cfg.volume,
                  shadow.shadow_of, e)


def drop(eng: Engine, shadow: ReplicaState, reason: str) -> None:
    """Forget a shadow that did not make it: mutations stop going to it."""
    with eng.state_lock:
        if eng.shadows.get(shadow.shadow_of) is shadow:
            del eng.shadows[shadow.shadow_of]
        shadow.mode = ReplicaMode.ERR
        shadow.error = reason
        eng._update_readers()
    if shadow.client is not None:
        shadow.client.close(reason)


def swap(eng: Engine, shadow: ReplicaState) -> None:
    """Under the order lock, the shadow in sync (its final flush and revision done): make it
    the replica (module docstring, step 3). Raises, changing nothing in memory, when the
    replica is no longer RW and committed, or when a request stays unanswered."""
    slot = eng.replicas[shadow.shadow_of]
    new, old = shadow.client, slot.client
    if new is None or old is None or slot.mode != ReplicaMode.RW \
            or slot.ref.name not in eng._committed:
        raise BlockhornError(f"replica {slot.ref.name} left the in-sync set during its "
                             "migration: retried once it is back", errno.EAGAIN)
    # No mutation is sent meanwhile (the order lock); those sent before are answered first,
    # so none is in flight on the shadow's connection when it takes the replica's name.
    deadline = time.monotonic() + eng.cfg.timeout_s
    while new.pending or old.pending:
        if time.monotonic() > deadline:
            if new.pending:
                raise BlockhornError("requests to the migration target stay unanswered",
                                     errno.ETIMEDOUT)
            break   # the old replica's leftovers fail below; the others hold them
        time.sleep(DRAIN_POLL_S)
    try:
        # Durable before anything it lacks can be acknowledged: an engine started from the
        # store (which still names the old directory until the daemon's finish_move) must
        # resync it, never trust it (docs/DURABILITY.md, "Moving a replica").
        old.control({"op": "set_rebuilding", "value": True}, timeout=eng.cfg.timeout_s)
    except BlockhornError as e:
        eng.set_error(slot, f"marking it before its migration's swap failed: {e}", old)
        raise BlockhornError(f"replica {slot.ref.name} could not be marked for the swap: {e}",
                             e.errno) from None
    with eng.state_lock:
        eng._close_local(slot)
        new.name = slot.ref.name          # replies now complete calls under the replica's name
        slot.ref = ReplicaRef(slot.ref.name, shadow.ref.address, shadow.ref.path,
                              slot.ref.frame_auth)
        new.ref = slot.ref
        slot.client, slot.stat, slot.error, slot.ping = new, shadow.stat, "", None
        eng._joining.add(slot.ref.name)   # the join commit clears the new one's Rebuilding
        eng._open_local(slot)
        shadow.client, shadow.mode = None, ReplicaMode.ERR
        del eng.shadows[slot.ref.name]
        eng._update_readers()
    old.close(f"migrated to {shadow.ref.path}")
    log.warning("replica %s: swapped to %s (%s); the old one is marked Rebuilding",
                slot.ref.name, shadow.ref.path, shadow.ref.address)


def resolve_at_start(eng: Engine) -> None:
    """At start, for each move the daemon had not finished (`EngineConfig.moving`): which
    directory answers for the replica's name. The swap marks the old one Rebuilding before
    the target's join commit, and only a later resync's join clears that mark again, so:
    - the old one not Rebuilding: it is the replica (the target is not swapped in yet, or
      was resynced past since) — the target is ignored;
    - the old one Rebuilding, the target joined (not Rebuilding): the swap happened and the
      target is the replica (its connection takes the slot; the daemon then finishes the
      move in the store);
    - the old one Rebuilding, the target unreachable: the target may carry commits the old
      one does not, so the old one must not answer for the name (the generation rule counts
      a name that answered as one that carries no newer set): the replica is unreachable;
    - both Rebuilding: neither is trusted; the old one is resynced.
    docs/DURABILITY.md, "Moving a replica"."""
    from blockhorn.engine.engine import ReplicaState
    for ref in eng.cfg.moving:
        slot = eng.replicas.get(ref.name)
        if slot is None or slot.client is None or not slot.stat.get("rebuilding") \
                or (slot.ref.address, slot.ref.path) == (ref.address, ref.path):
            continue
        probe = ReplicaState(ReplicaRef(ref.name, ref.address, ref.path, slot.ref.frame_auth))
        eng.connect_replica(probe)
        if probe.client is not None and not probe.stat.get("rebuilding"):
            slot.client.close("superseded by its move target")
            slot.ref, slot.client, slot.stat, slot.error = probe.ref, probe.client, \
                probe.stat, ""
            log.warning("replica %s: its move to %s was swapped in before this start: using "
                        "it", ref.name, ref.path)
        elif probe.client is None:
            slot.client.close("its move target is unreachable")
            slot.client = None
            slot.error = (f"the old directory was swapped out for {ref.path}, which is "
                          f"unreachable ({probe.error})")
            log.warning("replica %s: %s", ref.name, slot.error)
        else:
            probe.client.close("not swapped in")


def status_of(eng: Engine, name: str) -> dict[str, Any] | None:
    """The replica's last migration for `status`: target, state and progress."""
    from blockhorn.engine.rebuild import progress_of
    m = eng.migrations.get(name)
    if m is None:
        return None
    return {"to": m["to"], "address": m["address"], **(progress_of(m["progress"]) or {})}
