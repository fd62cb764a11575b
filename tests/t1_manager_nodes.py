"""Tier 1: the node service's bookkeeping over a SQLite store (no daemon): node state from the
heartbeat, tag and zone checks, scheduled bytes per disk, placement without disks."""

from __future__ import annotations

import os
import time

import pytest

from blockhorn.control.scheduler import Placement, Unschedulable
from blockhorn.control.store import NodeRow, SqliteStore
from blockhorn.manager.nodes import NODE_DOWN_AFTER_S, NodeService, parse_tags
from blockhorn.types import InvalidArgument


def test_state_tags_and_placement(tmp_path: object) -> None:
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    svc = NodeService(store, "me")
    svc.register()
    now = time.time()
    store.put_node(NodeRow("fresh", "10.0.0.2", heartbeat=now - 1))
    store.put_node(NodeRow("stale", "10.0.0.3", heartbeat=now - NODE_DOWN_AFTER_S - 1))
    store.put_node(NodeRow("never", "10.0.0.4"))
    states = {n["name"]: n["state"] for n in svc.list_nodes()}
    assert states == {"me": "up", "fresh": "up", "stale": "down", "never": "down"}
    assert parse_tags("ssd, fast,ssd") == ["fast", "ssd"] and parse_tags("") == []
    for bad in ("UPPER", "a b", "-x", "x" * 64):
        with pytest.raises(InvalidArgument):
            parse_tags(bad)
    assert svc.place(1 << 20, 3) == []            # no disk registered: the home, as before
    disk = os.path.join(str(tmp_path), "d")
    os.makedirs(disk)
    svc.add_disk(disk)
    store.add_volume("v", 64 << 20, [("v-r0", os.path.join(disk, "replicas", "v", "v-r0"), None)],
                     ("/n", "/c"), is_free=lambda p: True)
    (d,) = svc.show("me")["disks"]
    assert d["scheduled"] == 64 << 20 and d["capacity"] > 0
    assert svc.place(1 << 20, 1) == [Placement("me", disk)]
    # "fresh" is up but has no disk: 2 nodes are up, 1 has room.
    with pytest.raises(Unschedulable, match="2 schedulable nodes with room for 1 MiB; 1 has it"):
        svc.place(1 << 20, 2)


def test_leader_moves_a_dead_engine_nodes_volume_before_its_replicas(tmp_path: object) -> None:
    """Issue 12: an RWO volume attached on a down node is attached on a live one holding a
    replica (after the replenishment wait, 0 here); the dead node's replica is not moved
    until an engine has started since (robustness reported): the generation rule may still
    need it (docs/DURABILITY.md, "A volume attached on a node that died")."""
    from blockhorn.manager.across import ATTACHING
    from blockhorn.manager.leader import Leader
    from blockhorn.manager.settings import REPLENISHMENT_WAIT, Settings
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    svc = NodeService(store, "me")
    svc.register()
    now = time.time()
    store.put_node(NodeRow("n2", "10.0.0.2", heartbeat=now))
    store.put_node(NodeRow("dead", "10.0.0.3", heartbeat=now - NODE_DOWN_AFTER_S - 1))
    store.add_volume("v", 1 << 20, [("v-r0", "/d/v-r0", "10.0.0.3:0", "dead"),
                                    ("v-r1", "/d/v-r1", "10.0.0.2:0", "n2")],
                     ("/n", "/c"), is_free=lambda p: True)
    store.claim_attachment("v", "dead", None, desired="attached", robustness="healthy")
    Settings(store).set(REPLENISHMENT_WAIT, 0)
    leader = Leader(svc)
    leader.tick()
    v = store.volume("v")
    assert (v.node, v.desired, v.message, v.robustness) == ("n2", "attached", ATTACHING + "n2",
                                                            None)
    assert store.engine("v").process is None
    leader.tick()   # no engine has passed its start on n2 yet: r0 stays where it is
    assert store.replicas("v")[0].node == "dead"
    assert store.volume("v").message == ATTACHING + "n2"   # not even tried
    store.update_volume("v", robustness="degraded", message=None)
    leader.tick()   # now it would be moved (no disk anywhere here: it says why it cannot)
    assert "v-r0 on down node dead cannot be replaced" in (store.volume("v").message or "")
