"""Whether the replica disks can hold a volume of a given size, asked before any replica file
is made or grown (create, clone, expand).

On a cluster an expand's room check and the promise of that room are one step across nodes
(`expand_reservation`: control/store/base.py `guarded`), as a create's placement is
(manager/create.py): two expansions, or an expansion and a create, asked at one moment on
two nodes cannot both pass on the same free room.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from blockhorn.control.scheduler import Node, Policy, room_left
from blockhorn.control.store import ReplicaRow, guarded
from blockhorn.types import BlockhornError, NoSpace, TooLarge, format_size

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def check_disk_room(size: int, directories: list[str]) -> str | None:
    """Before a replica file of `size` bytes is made or grown in each of `directories`:
    refuse (TooLarge) a size past the largest file the directory's filesystem can hold — the
    kernel answers EFBIG, which used to surface as an internal error, and during an online
    expand set every replica ERR — and (NoSpace) one larger than the whole filesystem, which
    could never be filled. A thin volume larger than the free space is allowed: the returned
    warning says that writes will fail with ENOSPC once the disk is full (Longhorn's default
    over-provisioning also stops at 100 %)."""
    warnings = []
    seen: set[int] = set()
    for d in directories:
        where = _existing_ancestor(d)
        st = os.statvfs(where)
        if st.f_fsid in seen:
            continue
        seen.add(st.f_fsid)
        try:
            # Sparse and unnamed (O_TMPFILE): nothing is allocated and nothing is left behind.
            # pathconf(PC_FILESIZEBITS) cannot tell: ext4 answers 64 and stops at 16 TiB.
            with tempfile.TemporaryFile(dir=where) as probe:
                os.ftruncate(probe.fileno(), size)
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise BlockhornError(f"cannot create a replica file in {where}: {e.strerror}",
                                     e.errno) from None
            raise TooLarge(
                f"{format_size(size)} is larger than the largest file the filesystem at "
                f"{where} can hold: choose a smaller --size, or put the replicas with --disk "
                "on a filesystem that allows larger files (ext4 with 4 KiB blocks: 16 TiB; "
                "XFS, btrfs: 8 EiB)") from None
        capacity, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if size > capacity:
            raise NoSpace(f"{format_size(size)} is larger than the whole filesystem at {where} "
                          f"({format_size(capacity)}): a replica there could never be filled; "
                          "choose a smaller --size or a larger --disk")
        if size > free:
            warnings.append(f"{where} has {format_size(free)} free")
    if not warnings:
        return None
    return (f"thin volume of {format_size(size)}: {'; '.join(warnings)}; writes fail with "
            "ENOSPC once a replica's disk is full")


def check_expand_room(volume: str, old: int, new: int, replicas: Sequence[ReplicaRow],
                      nodes: Sequence[Node], policy: Policy, here: str | None = None) -> None:
    """Before `volume` grows from `old` to `new` bytes: every replica's disk registered with
    `disk add`, as the store reports it (any node's, not only this one's; a replica with no
    node is on node `here`: one host's), must take the extra bytes under
    the scheduler's own rule (control/scheduler.py `room_left`: what is promised stays within
    storage-over-provisioning-percentage of capacity less reserve, and the disk has more free
    than storage-minimal-available-percentage). NoSpace naming each disk that cannot, with
    its numbers; nothing is changed. A replica outside the `<disk>/replicas/` layout (a
    directory given by hand) has no disk record: check_disk_room covers this node's."""
    from blockhorn.manager.replenish import disk_of
    if new <= old:
        return
    disks = {(n.name, d.path): d for n in nodes for d in n.disks}
    on_disk: dict[tuple[str, str], list[str]] = {}
    for r in replicas:
        path = disk_of(r.directory)
        node = r.node or here
        if node is not None and path is not None and (node, path) in disks:
            on_disk.setdefault((node, path), []).append(r.name)
    short = []
    for (node, path), names in sorted(on_disk.items()):
        d = disks[(node, path)]
        more = (new - old) * len(names)
        if room_left(d, policy, more) is not None:
            continue
        limit = (d.capacity - d.reserved) * policy.over_provisioning_pct // 100
        why = []
        if d.scheduled + more > limit:
            why.append(f"{format_size(d.scheduled)} is promised already and "
                       f"{format_size(more)} more would pass the limit of {format_size(limit)} "
                       f"({policy.over_provisioning_pct} % of capacity {format_size(d.capacity)}"
                       f" less reserve {format_size(d.reserved)})")
        if d.available * 100 <= d.capacity * policy.minimal_available_pct:
            why.append(f"only {format_size(d.available)} of {format_size(d.capacity)} is "
                       f"free, not more than the {policy.minimal_available_pct} % minimum")
        short.append(f"disk {path} of node {node} (replica {', '.join(names)}): "
                     + " and ".join(why))
    if short:
        raise NoSpace(f"cannot expand {volume!r} from {format_size(old)} to {format_size(new)}: "
                      + "; ".join(short) + " (settings storage-over-provisioning-percentage, "
                      "storage-minimal-available-percentage; a disk's --reserve): nothing was "
                      "changed")


@contextmanager
def expand_reservation(volumes: VolumeManager, name: str, new: int) -> Iterator[None]:
    """Around an expand of `name` to `new` bytes: `check_expand_room` on what the store says
    now and the promise of the room (the store's `reserve_expand`) in one step, decided again
    if another create, expand or move promised room meanwhile; the promise ends with the
    block (the size then holds it, or the expand failed). On one host as across nodes: the
    registered disks follow the scheduler's rules (replicas given by `--disk` have no disk
    record: check_disk_room covers them). Without a node service (no daemon): nothing."""
    nodes, store = volumes.cluster or volumes.nodes, volumes.store
    if nodes is None or new <= store.volume(name).size:
        yield   # nothing grows, or no disk records to keep promises on
        return

    def decide() -> None:
        vol = store.volume(name)
        # From what is promised already: a reservation an earlier expand left (a daemon
        # that died during it) is counted once, not twice.
        check_expand_room(name, vol.promised, new, store.replicas(name),
                          nodes.nodes_for_scheduling(), nodes.policy(), nodes.name)

    guarded(store, decide, lambda _, mark: store.reserve_expand(name, new, mark, nodes.name),
            f"expand {name}")
    try:
        yield
    finally:
        store.end_expand(name, new)
