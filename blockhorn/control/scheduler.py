"""Replica scheduling: where the N replicas of a volume go. A pure function of its inputs.

Vocabulary and rules (Longhorn's, with its setting names; manager/settings.py has them):
- a *node* is a host; it is a candidate when it is `up` and `schedulable` and carries every tag
  of the volume's node selector. A *disk* is a directory on a node with its filesystem's
  `capacity` and `available` bytes, a `reserved` part no replica may use, `scheduled` bytes
  (the sizes of the replicas already placed on it) and tags; a candidate when schedulable and
  carrying every tag of the disk selector.
- room (`storage-over-provisioning-percentage` P, `storage-minimal-available-percentage` M): a
  disk takes a replica of size S when `scheduled + S <= (capacity - reserved) * P / 100` (the
  promise made) and `available > capacity * M / 100` (what is really free now; a new replica
  is sparse, so it takes nothing at once).
- `replica-soft-anti-affinity` false: never two replicas of a volume on one node (true: allowed
  when there are not enough nodes, still spread as far as they go). Never two on one disk.
- `replica-zone-soft-anti-affinity` true: replicas go to distinct zones while there are zones
  left, then share; false: never two in one zone. Nodes without a zone are not constrained.
- data locality `best-effort`: with `prefer_node` (the node the engine runs on) the first
  replica goes there when it can; never a reason to fail.

Among the disks allowed, the next replica takes, in order: a zone not used yet by this volume,
a node with fewest replicas of this volume, the disk with the most room left, then by node name
and path — so the result is deterministic, and many volumes spread over the disks evenly.
An impossible placement raises Unschedulable naming what is missing; nothing is placed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from blockhorn.types import BlockhornError, format_size


class Unschedulable(BlockhornError):
    """The replicas cannot be placed under the rules: the message says what is missing."""

    errno = errno.ENOSPC


@dataclass(frozen=True)
class Disk:
    path: str
    capacity: int               # bytes of the disk's filesystem
    available: int              # bytes free on it now
    reserved: int = 0           # bytes no replica may be promised
    scheduled: int = 0          # bytes promised to replicas already placed here
    tags: frozenset[str] = frozenset()
    schedulable: bool = True


@dataclass(frozen=True)
class Node:
    name: str
    disks: tuple[Disk, ...]
    up: bool = True
    schedulable: bool = True
    zone: str | None = None
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Policy:
    soft_anti_affinity: bool = False          # replica-soft-anti-affinity
    zone_soft_anti_affinity: bool = True      # replica-zone-soft-anti-affinity
    over_provisioning_pct: int = 100          # storage-over-provisioning-percentage
    minimal_available_pct: int = 25           # storage-minimal-available-percentage
    data_locality: str = "best-effort"        # default-data-locality: disabled | best-effort


@dataclass(frozen=True)
class Placement:
    node: str
    disk: str


@dataclass
class _Candidate:
    node: Node
    disk: Disk
    room: int = field(default=0)   # bytes still promisable after this replica


def room_left(disk: Disk, policy: Policy, size: int) -> int | None:
    """Bytes still promisable on `disk` after a replica of `size`, or None if it does not fit."""
    limit = (disk.capacity - disk.reserved) * policy.over_provisioning_pct // 100
    if disk.scheduled + size > limit:
        return None
    if disk.available * 100 <= disk.capacity * policy.minimal_available_pct:
        return None
    return limit - disk.scheduled - size


def schedule(size: int, count: int, nodes: Sequence[Node], policy: Policy = Policy(),
             node_selector: Iterable[str] = (), disk_selector: Iterable[str] = (),
             prefer_node: str | None = None) -> list[Placement]:
    """Places `count` replicas of `size` bytes on `nodes`: one Placement per replica."""
    if count < 1:
        raise Unschedulable(f"a volume needs at least one replica, not {count}")
    want_node, want_disk = frozenset(node_selector), frozenset(disk_selector)
    up = [n for n in nodes if n.up and n.schedulable]
    tagged = [n for n in up if want_node <= n.tags]
    cands: list[_Candidate] = []
    tagged_disks = 0
    for n in tagged:
        for d in n.disks:
            if d.schedulable and want_disk <= d.tags:
                tagged_disks += 1
                room = room_left(d, policy, size)
                if room is not None:
                    cands.append(_Candidate(n, d, room))
    roomy_nodes = {c.node.name for c in cands}
    _check_enough(size, count, policy, nodes, up, tagged, tagged_disks, cands, roomy_nodes,
                  want_node, want_disk)

    chosen: list[_Candidate] = []
    for i in range(count):
        used_nodes = [c.node.name for c in chosen]
        used_zones = {c.node.zone for c in chosen if c.node.zone is not None}
        used_disks = {(c.node.name, c.disk.path) for c in chosen}
        allowed = [c for c in cands if (c.node.name, c.disk.path) not in used_disks
                   and (policy.soft_anti_affinity or c.node.name not in used_nodes)
                   and (policy.zone_soft_anti_affinity or c.node.zone is None
                        or c.node.zone not in used_zones)]
        if not allowed:
            raise Unschedulable(_shortfall(count, i, policy, cands))
        local = i == 0 and policy.data_locality == "best-effort" and prefer_node is not None
        best = min(allowed, key=lambda c: (
            local and c.node.name != prefer_node,
            c.node.zone is not None and c.node.zone in used_zones,
            used_nodes.count(c.node.name),
            -c.room, c.node.name, c.disk.path))
        chosen.append(best)
    return [Placement(c.node.name, c.disk.path) for c in chosen]


def _needs(count: int, thing: str) -> str:
    """"3 replicas need 3 zones", "1 replica needs 1 zone"."""
    if count == 1:
        return f"1 replica needs 1 {thing}"
    return f"{count} replicas need {count} {thing}s"


def _check_enough(size: int, count: int, policy: Policy, nodes: Sequence[Node],
                  up: list[Node], tagged: list[Node], tagged_disks: int,
                  cands: list[_Candidate], roomy_nodes: set[str], want_node: frozenset[str],
                  want_disk: frozenset[str]) -> None:
    """Name the first missing thing, in the order an operator would look for it."""
    if not policy.soft_anti_affinity:
        need = _needs(count, "schedulable node")
        if len(up) < count:
            raise Unschedulable(f"{need}; {len(up)} {'is' if len(up) == 1 else 'are'} up and "
                                f"schedulable (of {len(nodes)} known). Add nodes, or set "
                                "replica-soft-anti-affinity true to allow several on a node")
        if len(tagged) < count:
            raise Unschedulable(f"{need} with tags {sorted(want_node)}; {len(tagged)} "
                                f"{'has' if len(tagged) == 1 else 'have'} them")
    if not tagged:
        raise Unschedulable("no schedulable node is up" if not up else
                            f"no schedulable node has the tags {sorted(want_node)}")
    if tagged_disks == 0:
        raise Unschedulable(f"no schedulable disk has the tags {sorted(want_disk)}"
                            if want_disk else "no schedulable disk: add one with "
                            "`blockhorn disk add PATH`")
    if not cands:
        raise Unschedulable(
            f"no disk has room for a replica of {format_size(size)} (storage-over-provisioning-"
            f"percentage {policy.over_provisioning_pct}, storage-minimal-available-percentage "
            f"{policy.minimal_available_pct}): add disks or free space")
    if not policy.soft_anti_affinity and len(roomy_nodes) < count:
        raise Unschedulable(f"{_needs(count, 'schedulable node')} with room for "
                            f"{format_size(size)}; {len(roomy_nodes)} "
                            f"{'has' if len(roomy_nodes) == 1 else 'have'} it")
    if len(cands) < count:
        raise Unschedulable(f"{_needs(count, 'disk')} with room for {format_size(size)} "
                            f"(never two replicas on one disk); {len(cands)} "
                            f"{'has' if len(cands) == 1 else 'have'} it")


def _shortfall(count: int, placed: int, policy: Policy, cands: list[_Candidate]) -> str:
    zones = {c.node.zone for c in cands if c.node.zone is not None}
    if not policy.zone_soft_anti_affinity and zones:
        return (f"{_needs(count, 'zone')} (replica-zone-soft-anti-affinity is "
                f"false); disks with room are in {len(zones)}: {', '.join(sorted(zones))}")
    return f"only {placed} of {count} replicas could be placed under the anti-affinity rules"


def place(nodes: Sequence[Node], placements: Iterable[Placement], size: int) -> list[Node]:
    """`nodes` with `size` more bytes scheduled on each placement's disk (for a caller that
    schedules many volumes in a row, such as the bench, or a plan before committing it)."""
    add: dict[tuple[str, str], int] = {}
    for p in placements:
        add[(p.node, p.disk)] = add.get((p.node, p.disk), 0) + size
    return [replace(n, disks=tuple(replace(d, scheduled=d.scheduled + add.get((n.name, d.path), 0))
                                   for d in n.disks)) if any(k[0] == n.name for k in add) else n
            for n in nodes]
