"""`volume create`: where the replicas go, and the volume's records and directories.

The placement (manager/nodes.py `place`: the scheduler over every node's registered disks)
and the store write that promises its room (`add_volume`) are one step across nodes: the
write carries the scheduling mark the placement was decided at, and a create that lost to
another create, expand or move (on any node, or another API thread here) decides again on
fresh state: another disk, or the scheduler's clear refusal (control/store/base.py `guarded`,
docs/OPERATIONS.md "Nodes, disks and scheduling"). Nothing is written before that step and
nothing is left after a refusal: the replica directories of this node are made only once the
store holds the volume, and removed with its records if making them fails.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockhorn.control.store import guarded
from blockhorn.keys import ensure_key
from blockhorn.manager import process
from blockhorn.manager.capacity import check_disk_room
from blockhorn.manager.nodes import parse_tags
from blockhorn.manager.paths import UNIX_PATH_MAX
from blockhorn.types import AlreadyExists, InvalidArgument, NotFound, check_name, parse_size

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager

log = logging.getLogger("blockhorn.manager")

ACCESS_MODES = ("rwo", "rwx")   # rwx: exported over NFSv4 by a share manager (blockhorn.sharemgr)
TRANSPORTS = ("auto", "tcp", "unix")
# auto: unix sockets for replicas on this host (measured ~40 % more 1 MiB write bandwidth
# with 3 replicas than TCP loopback), TCP when a socket path would be too long.
MAX_REPLICAS = 16


@dataclass
class _Layout:
    """Where one placement puts the replicas: directories, their nodes, the ones this node
    makes, and a warning about a thin volume larger than a local disk's free space."""

    dirs: list[str]
    local: list[str]
    room_warning: str | None


def create_volume(vm: VolumeManager, name: str, size: int | str, replicas: int,
                  disks: list[str] | None, transport: str, access: str,
                  share: dict[str, Any] | None, node_selector: Any,
                  disk_selector: Any) -> dict[str, Any]:
    check_name(name)
    size = parse_size(size)
    share_opts = _share_options(access, size, share)
    if not isinstance(disks or [], list) or not all(isinstance(d, str) for d in disks or []):
        raise InvalidArgument("disks must be a list of directories")
    node_sel, disk_sel = parse_tags(node_selector or []), parse_tags(disk_selector or [])
    if (node_sel or disk_sel) and disks:
        raise InvalidArgument("--node-selector and --disk-selector choose among the "
                              "registered disks (`blockhorn disk add`); they do not go with "
                              "--disk, which names the directories itself")
    if (node_sel or disk_sel) and vm.placer is None:
        raise InvalidArgument("--node-selector and --disk-selector need the daemon's "
                              "scheduler")
    if (isinstance(replicas, bool) or not isinstance(replicas, int)
            or not 1 <= replicas <= MAX_REPLICAS):
        raise InvalidArgument(f"invalid replica count {replicas!r}: use 1 to {MAX_REPLICAS}")
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"invalid transport {transport!r}: use auto, tcp or unix")
    names = [f"{name}-r{i}" for i in range(replicas)]
    for rname in names:
        check_name(rname, "replica")   # the suffix may push a long volume name over 63
    try:
        vm.store.volume(name)
    except NotFound:
        pass
    else:
        raise AlreadyExists(f"volume {name!r} already exists")
    if vm.cluster is not None:
        if transport == "unix":
            raise InvalidArgument("on a cluster (daemon run --etcd) replicas are reached "
                                  "over TCP: drop --transport unix")
        transport = "tcp"   # an engine on any node must reach every replica
    if transport == "auto":
        fits = all(len(vm.home.replica_socket(name, r).encode()) <= UNIX_PATH_MAX
                   for r in names)
        transport = "unix" if fits else "tcp"
    ensure_key(vm.home.key)
    given = [os.path.abspath(d) for d in disks or []]
    Plan = tuple[list[str], list[str | None], bool]   # disks, their nodes, by the scheduler

    def decide() -> Plan:
        """(disk, node) of each replica: the scheduler's on what the store says now."""
        if not given and vm.placer is not None:
            placed = vm.placer(size, replicas, node_sel, disk_sel)
            if placed:
                return [p.disk for p in placed], [p.node for p in placed], True
        return given, [vm.me] * len(given), False

    def commit(plan: Plan, mark: int) -> _Layout:
        disks, where, scheduled = plan
        layout = _layout(vm, name, size, names, disks, where, transport)
        addresses: list[str | None] = [
            None if transport == "tcp" else f"unix:{vm.home.replica_socket(name, r)}"
            for r in names]
        nodes = where if disks else [vm.me] * replicas
        if vm.cluster is not None:   # HOST:0: a port is allocated for the replica's node
            addresses = [f"{vm.cluster.address_of(n or vm.cluster.name)}:0" for n in nodes]
        # Directories given with --disk (or the home, no disk registered) have no room
        # rule to keep: unguarded, but the write still moves the mark, so a concurrent
        # scheduled create counts them.
        vm.store.add_volume(
            name, size, list(zip(names, layout.dirs, addresses, nodes, strict=True)),
            (vm.home.nbd_socket(name), vm.home.control_socket(name)),
            is_free=process.tcp_port_free, guard=mark if scheduled else None)
        return layout

    layout = guarded(vm.store, decide, commit, f"create volume {name}")
    created: list[str] = []
    try:
        from blockhorn.replica.store import Replica
        for d in layout.local:
            created.append(d)
            # In sync at generation 0 with each other (engine/generation.py).
            Replica.create(d, size, name, {"Members": names}).close()
        vm.write_configs(name)
        if share_opts is not None:
            vm.store.update_volume(name, access_mode="rwx")
            vm.shares.add(name, share_opts)
        if layout.room_warning:
            vm.store.update_volume(name, message=layout.room_warning)
        if node_sel or disk_sel:
            vm.store.update_volume(name, node_selector=node_sel, disk_selector=disk_sel)
    except BaseException:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
            _rmdir_if_empty(os.path.dirname(d))
        shutil.rmtree(vm.home.volume_dir(name), ignore_errors=True)
        vm.store.delete_volume(name)
        raise
    log.info("created volume %s: %d bytes, %d replicas in %s", name, size, replicas,
             ", ".join(layout.dirs))
    return vm.show(name)


def _layout(vm: VolumeManager, name: str, size: int, names: list[str], disks: list[str],
            where: list[str | None], transport: str) -> _Layout:
    """Check one placement (`disks`, their nodes `where`; none: the home) and say where the
    replicas go; nothing is made yet."""
    replicas = len(names)
    for d, n in zip(disks, where, strict=True):
        if vm.here(n) and not os.path.isdir(d):
            raise InvalidArgument(f"disk {d} is not a directory")
    if len(set(disks)) != len(disks):
        raise InvalidArgument("the same --disk was given twice: each replica needs its own")
    if disks and replicas > len(disks):
        raise InvalidArgument(
            f"{replicas} replicas need {replicas} disks (one per replica) but only "
            f"{len(disks)} given with --disk: add disks or use --replicas {len(disks)}")
    dirs = [vm.home.replica_dir(name, r, disks[i] if disks else None)
            for i, r in enumerate(names)]
    nodes = [where[i] if disks else vm.me for i in range(replicas)]
    # Replicas on other nodes are created by their nodes' daemons (manager/supervisor.py).
    local = [d for d, n in zip(dirs, nodes, strict=True) if vm.here(n)]
    for d in local:
        if os.path.exists(d) and os.listdir(d):
            raise AlreadyExists(f"replica directory {d} already exists and is not empty: "
                                "remove it or use another disk")
    room_warning = check_disk_room(size, local)
    sockets = [vm.home.nbd_socket(name), vm.home.control_socket(name)]
    if transport == "unix":
        sockets += [vm.home.replica_socket(name, r) for r in names]
    for s in sockets:
        if len(s.encode()) > UNIX_PATH_MAX:
            raise InvalidArgument(f"socket path {s} is longer than {UNIX_PATH_MAX} bytes: "
                                  "use a shorter --home or volume name")
    return _Layout(dirs, local, room_warning)


def _share_options(access: str, size: int,
                   share: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validated share settings for an RWX volume; None for RWO (which takes none)."""
    from blockhorn.sharemgr.config import share_options
    from blockhorn.sharemgr.device import MIN_SIZE
    if access not in ACCESS_MODES:
        raise InvalidArgument(f"invalid access mode {access!r}: use rwo or rwx")
    if access == "rwo":
        if share:
            raise InvalidArgument("NFS share settings need --access rwx")
        return None
    if size < MIN_SIZE:
        raise InvalidArgument(f"an RWX volume needs at least {MIN_SIZE >> 20} MiB (ext4 with "
                              f"a journal): {size >> 20} MiB is too small")
    try:
        return share_options(**(share or {}))
    except TypeError as e:
        raise InvalidArgument(f"bad share settings: {e}") from None


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass   # not empty (other volumes) or already gone: leave it
