"""Replenishment: replace a replica that stayed failed longer than
`replica-replenishment-wait-interval` with a new, empty one on another disk.

Vocabulary:
- A *disk* is a directory that holds replica directories as `<disk>/replicas/<vol>/<rep>`
  (`volume create --disk`, manager/paths.py). The disks a volume may use are the disks of its
  replicas plus the home (where replicas go without --disk). A replacement goes to a disk that
  no replica of the volume uses, the failed one's included: a disk that failed once is not
  trusted with the new copy, and two replicas on one disk would fail together.
- The replacement keeps the replica's *name* (so the engine's replica table, logs and configs
  stay keyed the same) and gets a new directory. It is created `Rebuilding`, so no engine start
  trusts it before its first resync (engine/generation.py); the old directory is renamed to
  `<dir>.replaced-<UTC time>`, never deleted: an operator can still salvage from it.

The order below survives a daemon crash at any step: until the store points at the new
directory the old replica stays configured (a half-made new directory is moved aside by the
next attempt); after it, the engine config is rewritten from the store and the engine is told.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from blockhorn.control.store import ReplicaRow
from blockhorn.manager import process
from blockhorn.manager.volumes import VolumeManager, engine_replace
from blockhorn.replica.store import Replica
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.manager")

REPLACED_SUFFIX = ".replaced-"


def disk_of(directory: str) -> str | None:
    """The disk a replica directory `<disk>/replicas/<vol>/<rep>` lives on; None for a
    directory outside that layout (configured by hand)."""
    vol_dir = os.path.dirname(os.path.abspath(directory))
    replicas_dir = os.path.dirname(vol_dir)
    if os.path.basename(replicas_dir) != "replicas":
        return None
    return os.path.dirname(replicas_dir)


def pick_disk(home_root: str, reps: list[ReplicaRow]) -> str:
    """A disk of the volume that none of its replicas uses; BlockhornError (ENOSPC) naming the
    disks in use when there is none."""
    used = {disk_of(r.directory) for r in reps}
    known = sorted(d for d in used | {os.path.abspath(home_root)} if d)
    free = [d for d in known if d not in used and os.path.isdir(d) and os.access(d, os.W_OK)]
    if not free:
        raise BlockhornError(
            f"no free disk for a replacement: the volume's disks ({', '.join(known)}) each hold "
            "one of its replicas already", errno.ENOSPC)
    return free[0]


def move_aside(path: str) -> str | None:
    """Rename `path` (a directory or whatever took its place) to `<path>.replaced-<time>`;
    None when there is nothing there. A rename that fails (the disk is gone or read-only) is
    logged and ignored: the replacement lives elsewhere."""
    if not os.path.lexists(path):
        return None
    target = path + REPLACED_SUFFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while os.path.lexists(target + (f".{n}" if n else "")):
        n += 1
    target += f".{n}" if n else ""
    try:
        os.rename(path, target)
    except OSError as e:
        log.warning("could not move %s aside (%s): leaving it there", path, e)
        return None
    return target


def replace(vm: VolumeManager, volume: str, rname: str) -> str:
    """Replace replica `rname` of `volume` (the caller holds the volume's lock): stop its
    process, create the new directory Rebuilding, point the store and configs at it, start
    it, and hand it to a running engine. Returns the new directory."""
    store = vm.store
    vol = store.volume(volume)
    reps = store.replicas(volume)
    old = next(r for r in reps if r.name == rname)
    disk = pick_disk(vm.home.root, reps)
    new_dir = vm.home.replica_dir(volume, rname, disk)
    process.terminate([old.process])
    store.set_replica_process(rname, None)
    leftover = move_aside(new_dir)   # a replacement a crashed daemon left half made
    if leftover:
        log.warning("moved an earlier attempt's %s aside to %s", new_dir, leftover)
    os.makedirs(os.path.dirname(new_dir), mode=0o700, exist_ok=True)
    Replica.create(new_dir, vol.size, volume, {"Rebuilding": True}).close()
    store.set_replica_directory(rname, new_dir)
    vm.write_configs(volume)
    moved = move_aside(old.directory)
    log.warning("replica %s of %s replaced: new directory %s; old one %s", rname, volume,
                new_dir, f"moved to {moved}" if moved else "gone")
    row = next(r for r in store.replicas(volume) if r.name == rname)
    vm.start_replicas(volume, [row], restarted=True)
    eng = store.engine(volume)
    if process.alive(eng.process):
        engine_replace(eng.control_socket, rname, row.address, new_dir)
    return new_dir
