"""Tier 1: replica scheduling (control/scheduler.py), a pure function: examples of each rule
and its error, and hypothesis properties (never two replicas on a node unless soft
anti-affinity, never past a disk's limits, deterministic); plus the boolean settings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockhorn.control.scheduler import (
    Disk,
    Node,
    Placement,
    Policy,
    Unschedulable,
    place,
    room_left,
    schedule,
)
from blockhorn.manager.settings import lookup
from blockhorn.types import InvalidArgument

GiB = 1 << 30


def node(name: str, *disks: Disk, zone: str | None = None, tags: tuple[str, ...] = (),
         up: bool = True, schedulable: bool = True) -> Node:
    return Node(name, disks or (Disk(f"/d/{name}", 100 * GiB, 100 * GiB),), up, schedulable,
                zone, frozenset(tags))


def test_replicas_go_to_distinct_nodes_and_spread() -> None:
    nodes = [node(f"n{i}") for i in range(4)]
    got = schedule(10 * GiB, 3, nodes)
    assert len({p.node for p in got}) == 3
    # Many volumes in a row: every node gets its share (most room first).
    for _ in range(8):
        nodes = place(nodes, schedule(10 * GiB, 3, nodes), 10 * GiB)
    assert sorted(d.scheduled for n in nodes for d in n.disks) == [60 * GiB] * 4


def test_too_few_nodes_is_named() -> None:
    nodes = [node("a"), node("b"), node("c", up=False), node("d", schedulable=False)]
    with pytest.raises(Unschedulable, match="3 replicas need 3 schedulable nodes; 2 are up"):
        schedule(GiB, 3, nodes)
    # Soft anti-affinity: a node takes two, on two disks (never two on one disk).
    two = node("a", Disk("/x", 100 * GiB, 100 * GiB), Disk("/y", 100 * GiB, 100 * GiB))
    got = schedule(GiB, 3, [two, node("b")], Policy(soft_anti_affinity=True))
    assert sorted(p.node for p in got) == ["a", "a", "b"] and len(set(got)) == 3
    with pytest.raises(Unschedulable, match="3 disks with room"):
        schedule(GiB, 3, [node("a"), node("b")], Policy(soft_anti_affinity=True))


def test_zones() -> None:
    nodes = [node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b")]
    got = schedule(GiB, 2, nodes)
    assert {p.node for p in got} in ({"a1", "b1"}, {"a2", "b1"})   # two zones used
    assert len(schedule(GiB, 3, nodes)) == 3                        # soft: zones shared
    with pytest.raises(Unschedulable, match="3 replicas need 3 zones.*in 2: a, b"):
        schedule(GiB, 3, nodes, Policy(zone_soft_anti_affinity=False))


def test_tag_selectors() -> None:
    nodes = [node("a", Disk("/ssd", 100 * GiB, 100 * GiB, tags=frozenset({"ssd"})),
                  tags=("fast",)),
             node("b", tags=("fast",)), node("c")]
    assert schedule(GiB, 1, nodes, disk_selector=["ssd"]) == [Placement("a", "/ssd")]
    assert {p.node for p in schedule(GiB, 2, nodes, node_selector=["fast"])} == {"a", "b"}
    with pytest.raises(Unschedulable, match=r"3 schedulable nodes with tags \['fast'\]; 2 have"):
        schedule(GiB, 3, nodes, node_selector=["fast"])
    with pytest.raises(Unschedulable, match=r"no schedulable disk has the tags \['nvme'\]"):
        schedule(GiB, 1, nodes, disk_selector=["nvme"])


def test_room_limits() -> None:
    disk = Disk("/d", 100 * GiB, 90 * GiB, reserved=20 * GiB, scheduled=70 * GiB)
    assert room_left(disk, Policy(), 10 * GiB) == 0
    assert room_left(disk, Policy(), 10 * GiB + 1) is None            # past (100-20)*100 %
    assert room_left(disk, Policy(over_provisioning_pct=200), 50 * GiB) == 40 * GiB
    full = Disk("/d", 100 * GiB, 25 * GiB)                            # 25 % free: not above
    assert room_left(full, Policy(), 1) is None
    with pytest.raises(Unschedulable, match="no disk has room for a replica of 200 GiB"):
        schedule(200 * GiB, 1, [node("a")])
    with pytest.raises(Unschedulable, match="add one with `blockhorn disk add PATH`"):
        schedule(GiB, 1, [Node("a", ())])


def test_data_locality_best_effort() -> None:
    nodes = [node("a"), node("b"), node("c", Disk("/d", 100 * GiB, 100 * GiB, scheduled=90 * GiB))]
    assert schedule(GiB, 2, nodes, prefer_node="c")[0].node == "c"
    assert "c" not in {p.node for p in schedule(GiB, 2, nodes)}       # least room: last
    assert schedule(GiB, 2, nodes, Policy(data_locality="disabled"), prefer_node="c")[0].node \
        != "c"
    assert len(schedule(GiB, 2, nodes, prefer_node="gone")) == 2      # never a failure


# --- properties -----------------------------------------------------------------------------

disks = st.builds(
    lambda i, cap, free_pct, res_pct, sched_pct, tags, ok: Disk(
        f"/disk{i}", cap * GiB, cap * GiB * free_pct // 100, cap * GiB * res_pct // 100,
        cap * GiB * sched_pct // 100, frozenset(tags), ok),
    st.integers(0, 3), st.integers(1, 100), st.integers(0, 100), st.integers(0, 30),
    st.integers(0, 150), st.sets(st.sampled_from(["ssd", "hdd"])), st.booleans())
nodes_st = st.lists(
    st.builds(lambda i, ds, up, ok, zone, tags: Node(
        f"n{i}", tuple({d.path: d for d in ds}.values()), up, ok, zone, frozenset(tags)),
        st.integers(0, 20), st.lists(disks, min_size=0, max_size=3), st.booleans(),
        st.booleans(), st.sampled_from([None, "z1", "z2", "z3"]),
        st.sets(st.sampled_from(["fast", "edge"]))),
    max_size=8).map(lambda ns: list({n.name: n for n in ns}.values()))
policies = st.builds(Policy, st.booleans(), st.booleans(), st.sampled_from([50, 100, 200]),
                     st.sampled_from([0, 10, 25]),
                     st.sampled_from(["disabled", "best-effort"]))


@settings(max_examples=300, deadline=None)
@given(nodes_st, st.integers(1, 5), st.integers(1, 40), policies,
       st.sets(st.sampled_from(["fast", "edge"])), st.sets(st.sampled_from(["ssd", "hdd"])),
       st.sampled_from([None, "n0", "n1"]))
def test_placements_keep_every_rule(nodes: list[Node], count: int, size_gib: int,
                                    policy: Policy, nsel: set[str], dsel: set[str],
                                    prefer: str | None) -> None:
    size = size_gib * GiB
    try:
        got = schedule(size, count, nodes, policy, nsel, dsel, prefer)
    except Unschedulable as e:
        assert str(e)   # a reason, and the same answer every time
        with pytest.raises(Unschedulable, match="."):
            schedule(size, count, nodes, policy, nsel, dsel, prefer)
        return
    assert got == schedule(size, count, nodes, policy, nsel, dsel, prefer)   # deterministic
    assert len(got) == count and len(set(got)) == count                     # one per disk
    by_name = {n.name: n for n in nodes}
    if not policy.soft_anti_affinity:
        assert len({p.node for p in got}) == count
    zones = [by_name[p.node].zone for p in got if by_name[p.node].zone is not None]
    if not policy.zone_soft_anti_affinity:
        assert len(zones) == len(set(zones))
    for p in got:
        n = by_name[p.node]
        d = next(d for d in n.disks if d.path == p.disk)
        assert n.up and n.schedulable and d.schedulable
        assert nsel <= n.tags and dsel <= d.tags
        assert room_left(d, policy, size) is not None                       # within limits
    # Placing them keeps every disk within the over-provisioning limit.
    for n in place(nodes, got, size):
        for d in n.disks:
            orig = next(o for o in by_name[n.name].disks if o.path == d.path)
            if d.scheduled != orig.scheduled:
                assert d.scheduled <= (d.capacity - d.reserved) * policy.over_provisioning_pct \
                    // 100


def test_scheduling_settings_are_registered() -> None:
    soft = lookup("replica-soft-anti-affinity")
    assert soft.default is False and soft.parse("yes") is True and soft.parse(False) is False
    with pytest.raises(InvalidArgument, match="true or false"):
        soft.parse("maybe")
    assert lookup("replica-zone-soft-anti-affinity").default is True
    assert lookup("storage-over-provisioning-percentage").default == 100
    assert lookup("storage-minimal-available-percentage").parse("25") == 25
    with pytest.raises(InvalidArgument, match="out of range"):
        lookup("storage-minimal-available-percentage").parse(101)
    loc = lookup("default-data-locality")
    assert loc.parse("disabled") == "disabled"
    with pytest.raises(InvalidArgument, match="disabled or best-effort"):
        loc.parse("strict-local")
