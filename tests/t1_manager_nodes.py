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
