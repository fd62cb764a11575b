"""Removing a cluster node's replica directories that are no longer the store's.

`volume rm` on node A removes A's replica directories itself; the other nodes' are theirs to
remove, and a replica the leader or a drain moved away (manager/leader.py) leaves its old
directory on the old node. The store records each such directory (`LeftoverRow`, written in
the same transaction as the removal or the move: control/store/etcd.py), and every node's
supervisor calls `sweep` each tick for its own records:

1. the replica's process, if one runs here, is stopped first (found by its config file
   `<home>/volumes/<vol>/<replica>.json` on its command line, so also one an earlier daemon
   started); the directory is not touched while it runs. Not when the replica is moving
   here: that process and config are its move target's, and a directory that is the move
   target (a drain's move given up, and the replica moved here again: the same path) is kept;
2. the directory is removed, but only when it is where this node's registered disks keep
   replicas (`<disk>/replicas/<vol>/<replica>`, the disk registered for this node, no symlink
   on the way) and the store does not assign it to a replica of this node again;
3. the replica's config in the home (and, when the volume is gone, its home directories);
4. then the record is forgotten.
Every step can be done twice, so a daemon that dies between two steps does the rest at its
next start; a node that was down during the `volume rm` finds its records when it is back.
"""

from __future__ import annotations

import logging
import os
import shutil

from blockhorn.control.store import LeftoverRow, ProcessRecord
from blockhorn.manager import process
from blockhorn.manager.across import replica_processes
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import NotFound

log = logging.getLogger("blockhorn.manager")


def sweep(vm: VolumeManager) -> None:
    if vm.cluster is None:
        return
    rows = vm.store.leftovers(vm.cluster.name)
    if not rows:
        return
    disks = {os.path.realpath(d.path) for d in vm.store.disks(vm.cluster.name)}
    for row in rows:
        with vm.locked(row.volume, blocking=False) as got:
            if not got:
                continue   # an attach/create/rm of that name is working here: next tick
            try:
                if _remove(vm, row, disks):
                    vm.store.forget_leftover(row)
            except OSError as e:
                log.error("removing replica directory %s of %s: %s (retried next tick)",
                          row.directory, row.volume, e)


def _remove(vm: VolumeManager, row: LeftoverRow, disks: set[str]) -> bool:
    """Do the steps for one record; True when it may be forgotten."""
    try:
        vol = vm.store.volume(row.volume)
    except NotFound:
        vol = None
    reps = vm.store.replicas(vol.name) if vol is not None else []
    # The replica moving here: its process and config here are the move target's (same name,
    # same config path), not this record's to stop or remove; a process of the record's
    # directory was stopped when its move was given up, or by stop_strays when this node's
    # daemon started. A drain's move given up (its directory a leftover here) and the same
    # replica moved here again take the same directory: kept. (Before, a sweep that had not
    # run in between stopped the new target's process, then removed its directory under the
    # engine's migration.)
    target = next((r.moving for r in reps if r.name == row.replica and r.moving is not None
                   and vm.here(r.moving.node)), None)
    if target is not None and target.directory == row.directory:
        log.info("replica directory %s is a move target of this node again: kept",
                 row.directory)
        return True
    pids = [] if target is not None else [
        rec for volume, name, rec in replica_processes(vm.home)
        if (volume, name) == (row.volume, row.replica) and process.alive(rec)]
    if pids:
        log.warning("replica %s of %s is no longer this node's: stopping pid(s) %s",
                    row.replica, row.volume, ", ".join(str(p.pid) for p in pids))
        process.terminate(list[ProcessRecord | None](pids))
        return False   # look again next tick: the directory goes once nothing runs there
    if target is None:
        vm.started.pop(row.replica, None)
    mine_again = vol is not None and any(
        r.directory == row.directory and vm.is_local(r) for r in reps)
    if mine_again and not (vol is not None and vol.fresh
                           and vol.created != row.volume_created):
        # Moved back here, or the same volume's replica again: the store's now. (A volume
        # re-created under the old name while this node was down and not yet attached gets
        # the old directory removed: its own replica is created afresh right after.)
        log.info("replica directory %s is this node's again: kept", row.directory)
        return True
    if not _inside_disk(row, disks):
        log.error("not removing %s (replica %s of %s): not a replica directory of a disk "
                  "registered for this node", row.directory, row.replica, row.volume)
        return True
    if os.path.lexists(row.directory):
        shutil.rmtree(row.directory)
        log.info("removed replica directory %s (replica %s of %s %s)", row.directory,
                 row.replica, row.volume, "moved away" if vol is not None else "removed")
    try:
        os.rmdir(os.path.dirname(row.directory))
    except OSError:
        pass   # not empty (another replica of the volume on this disk) or gone already
    if not mine_again and target is None:
        for cfg in (vm.home.replica_config(row.volume, row.replica),
                    vm.home.replica_made(row.volume, row.replica)):
            if os.path.exists(cfg):
                os.unlink(cfg)
    if vol is None:   # the volume's home files here (configs, sockets) go with it
        for path in (vm.home.volume_dir(row.volume), vm.home.run_dir(row.volume)):
            shutil.rmtree(path, ignore_errors=True)
    return True


def _inside_disk(row: LeftoverRow, disks: set[str]) -> bool:
    """`<disk>/replicas/<volume>/<replica>` under a disk registered for this node, with no
    symlink on the way (a link could point anywhere)."""
    d = os.path.abspath(row.directory)
    vol_dir, replicas_dir = os.path.dirname(d), os.path.dirname(os.path.dirname(d))
    return (os.path.basename(d) == row.replica and os.path.basename(vol_dir) == row.volume
            and os.path.basename(replicas_dir) == "replicas"
            and os.path.dirname(replicas_dir) in disks
            and os.path.realpath(os.path.dirname(d)) == vol_dir
            and not os.path.islink(d))
