"""A node's share of moving a replica of an attached volume (a drain: manager/leader.py
`start_move`; docs/DURABILITY.md, "Moving a replica"), done by its supervision pass:

- the target node (`serve_target`): creates the target directory (empty and `Rebuilding`, so
  no engine start trusts it before the swap's join commit) and keeps a process of the replica
  running in it, recorded in the row's `moving` target (the row's own process is the old
  one's, on the old node); `stop_targets` stops it when the volume is detached;
- the engine's node (`engine_pass`): asks the engine to `migrate_replica` while the replica
  is RW and the target runs (again, with back-off, after a failed migration); once the
  engine's status shows the replica at the target's directory (swapped in), calls
  `finish_move`: the row points at the target and the old directory becomes a leftover, so
  only now does the old node stop the old process and remove the directory. A move the
  leader or a drain asked to give up (`moving.give_up`: its target's node died, or the
  drain's wait ran out) is decided here, where the engine's status shows whether the target
  was swapped in: swapped, the move is finished all the same (the target may hold the only
  current copy); the replica RW at the old directory with no migration that could still swap,
  it is cancelled (`give_up`); else it waits.
A daemon restarted in between finds the same store and does the same: a running migration is
left alone, a finished one is finished in the store, an interrupted one is asked again. The
engine's config names the move target from the first ask on, so an engine restarted after the
swap but before `finish_move` takes the target for the replica (engine/migrate.py
`resolve_at_start`), and the daemon then finishes the move.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from blockhorn.control.store import ReplicaRow, VolumeRow
from blockhorn.manager import process
from blockhorn.types import BlockhornError, ReplicaMode

if TYPE_CHECKING:
    from blockhorn.manager.supervisor import Supervisor

log = logging.getLogger("blockhorn.manager")

RETRY_MAX_S = 5.0     # seconds, cap of the back-off between two asks of a failed migration
# Test only (tests/t5_cluster_drain.py): seconds the engine's node leaves a move it saw swapped
# in unfinished, doing nothing else for the replica meanwhile: it holds open the window between
# the engine's swap and finish_move that a daemon otherwise crosses within one pass, until the
# move is asked to be given up (what the window is held open for) at the latest. 0: none.
FINISH_DELAY_S = float(os.environ.get("BLOCKHORN_TEST_MOVE_FINISH_DELAY_S") or 0)
_swap_seen: dict[str, float] = {}   # replica@move start -> when FINISH_DELAY_S began


def give_up(sup: Supervisor, vol: VolumeRow, r: ReplicaRow, st: dict[str, Any]) -> bool:
    """Cancel the move of `r` that the leader or a drain asked to give up (`m.give_up`), but
    only once the engine certainly does not need the target: its status shows the replica
    RW at the old directory (the caller saw no migration that could still swap). RW in the
    running engine means the old directory holds every acknowledged write (the engine
    started from a source that held them, and keeps every RW replica current), so the target
    is not needed, swapped in before or not; and with no migration running, nothing swaps it
    in later (engine_pass asks for none while the move is to be given up). Otherwise (an
    engine started after the swap counts the replica unreachable: the target may hold writes
    the old directory lacks) the move waits: for the old directory's resync, or for the
    target's node to come back (docs/DURABILITY.md, "Moving a replica"). True once given
    up."""
    m = r.moving
    assert m is not None
    if st.get("path") != r.directory or st.get("mode") != ReplicaMode.RW:
        return False
    sup.store.cancel_move(r.name)
    log.warning("replica %s of %s: its move to node %s is given up (%s); it stays on %s",
                r.name, vol.name, m.node, m.give_up, r.node)
    sup.store.update_volume(vol.name, message=(
        f"replica {r.name}: its move to node {m.node} was given up ({m.give_up}); it stays "
        f"on {r.node or sup.volumes.me}"))
    return True


def engine_migrate(control_socket: str, replica: str, address: str,
                   path: str) -> dict[str, Any]:
    from blockhorn.engine.control import ControlClient
    return ControlClient(control_socket).call({"op": "migrate_replica", "replica": replica,
                                               "address": address, "path": path})


def target_row(r: ReplicaRow) -> ReplicaRow:
    """The row as it will be once the move finished (the target's node, directory, address)."""
    m = r.moving
    assert m is not None
    return dataclasses.replace(r, node=m.node, directory=m.directory, address=m.address,
                               process=m.process, moving=None)


def serve_target(sup: Supervisor, vol: VolumeRow, r: ReplicaRow) -> None:
    """On the target node: the target directory exists and its replica process runs."""
    m = r.moving
    assert m is not None
    if process.alive(m.process):
        return
    key = f"move-target/{r.name}"
    if not sup._due(key):
        return
    sup._attempted(key)
    vm = sup.volumes
    row = target_row(r)
    try:
        if not os.path.exists(m.directory):
            from blockhorn.manager.replenish import disk_of
            from blockhorn.replica.store import Replica
            disk = disk_of(m.directory)
            if disk is None or not os.path.isdir(disk):
                raise BlockhornError(f"the disk of {m.directory} is not there")
            os.makedirs(os.path.dirname(m.directory), mode=0o700, exist_ok=True)
            Replica.create(m.directory, vol.size, vol.name, {"Rebuilding": True}).close()
            log.info("created the move target of replica %s of %s in %s (empty, to be "
                     "rebuilt)", r.name, vol.name, m.directory)
        os.makedirs(vm.home.run_dir(vol.name), mode=0o700, exist_ok=True)
        vm.write_replica_config(vol.name, vol.size, row)
        log_path = vm.home.log(f"{r.name}.log")
        rec = vm.spawn_replica(vol.name, r.name)
        try:
            process.wait_ready(f"move target of replica {r.name}", m.address, rec, log_path)
        except BaseException:
            process.terminate([rec])
            raise
        # Recorded once it answers: the engine's node asks the engine to migrate then. (A
        # daemon dying before this leaves the process unrecorded: the next one's stop_strays
        # stops it, and this starts another.)
        sup.store.set_move_process(r.name, rec)
        vm.started[r.name] = (vol.name, rec)   # stopped by stop_strays once not this node's
        log.info("started the move target of replica %s of %s: pid %d on %s", r.name,
                 vol.name, rec.pid, m.address)
    except (BlockhornError, OSError) as e:
        log.error("move target of replica %s of %s: %s", r.name, vol.name, e)
        return
    sup._succeeded(key)


def stop_targets(sup: Supervisor, vol: VolumeRow) -> None:
    """On the target node, for a detached volume: stop the move targets' processes (the move
    goes on at the next attach)."""
    vm = sup.volumes
    if not any(v == vol.name for v, _ in list(vm.started.values())):
        return    # no process of the volume started here (every target is recorded there)
    for r in sup.store.replicas(vol.name):
        m = r.moving
        if m is not None and vm.here(m.node) and process.alive(m.process):
            log.info("volume %s was detached: stopping the move target of %s", vol.name,
                     r.name)
            process.terminate([m.process])
            sup.store.set_move_process(r.name, None)


def engine_pass(sup: Supervisor, vol: VolumeRow, r: ReplicaRow, st: dict[str, Any],
                control_socket: str) -> bool:
    """On the engine's node, for a moving replica with engine status `st`: ask the engine
    to migrate it, or finish the move in the store once it did. True when the store changed
    (the status read before is stale)."""
    m = r.moving
    assert m is not None
    key = f"move/{r.name}"
    if (st.get("path"), st.get("address")) == (m.directory, m.address):
        if FINISH_DELAY_S and not m.give_up and time.monotonic() - _swap_seen.setdefault(
                f"{r.name}@{m.started}", time.monotonic()) < FINISH_DELAY_S:
            return True    # as if this pass had not looked (the status is not recorded)
        # Swapped in: finished, also when the move is to be given up (its node died): the
        # target may hold the only current copy, and given up it would be a leftover of its
        # node, removed when the node is back. Finished, it is the replica, on a down node.
        sup.store.finish_move(r.name)
        sup.volumes.write_configs(vol.name)    # a restarted engine opens the new directory
        sup._succeeded(key)
        log.warning("replica %s of %s moved from node %s (%s) to node %s (%s)%s", r.name,
                    vol.name, r.node, r.directory, m.node, m.directory,
                    f" although asked to give it up ({m.give_up}): the engine had swapped it "
                    "in" if m.give_up else "")
        if m.give_up:
            sup.store.update_volume(vol.name, message=(
                f"replica {r.name}: moved to node {m.node} (the engine had swapped it in) "
                f"although the move was to be given up ({m.give_up}); it is that node's "
                "replica now"))
        return True
    mig = st.get("migration") or {}
    if mig.get("to") == m.directory and mig.get("state") in ("queued", "running"):
        return False     # it may still swap
    if m.give_up:
        # No new migration: a move to be given up is never swapped in again. "done" with the
        # old path: the status was read across the swap (path before, migration after; it
        # is not one snapshot): swapped, the next pass sees the target's path.
        if mig.get("to") == m.directory and mig.get("state") == "done":
            return False
        return give_up(sup, vol, r, st)
    if m.process is None or st.get("mode") != ReplicaMode.RW or st.get("path") != r.directory \
            or not sup._due(key):
        return False    # the target is not running yet, or the replica is not in sync
    sup._attempted(key, RETRY_MAX_S)
    try:
        # First the engine config names the target: an engine restarted after the swap (before
        # finish_move) then takes the target for the replica (migrate.resolve_at_start).
        sup.volumes.write_configs(vol.name)
        log.info("asking the engine of %s to migrate %s to %s", vol.name, r.name, m.directory)
        engine_migrate(control_socket, r.name, m.address, m.directory)
    except (BlockhornError, OSError) as e:
        log.warning("asking the engine of %s to migrate %s: %s", vol.name, r.name, e)
    return False
