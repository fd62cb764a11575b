"""Tier 3: the node's rebuild limits (issue 9): `replica-rebuilding-bandwidth-limit` paces a
rebuild, `concurrent-replica-rebuild-per-node-limit` makes a second engine's rebuild wait.
Real replica processes and nbdkit engines sharing one limits file (one node)."""

from __future__ import annotations

import hashlib
import random

import nbd
from conftest import assert_replicas_identical
from t3_engine_rebuild_resume import empty_replica, node_limits, replica_status, wait_for

from blockhorn.control.store import SqliteStore as Store
from blockhorn.engine.limits import Limits
from blockhorn.manager.settings import (
    REBUILD_BANDWIDTH,
    REBUILDS_PER_NODE,
    Settings,
    write_rebuild_limits,
)

MiB = 1 << 20
SIZE = 64 * MiB


def fill(c, seed: int, mib: int) -> dict[int, str]:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    rng = random.Random(seed)
    acked = {}
    for i in range(mib):
        data = rng.randbytes(MiB)
        h.pwrite(data, i * MiB)
        acked[i * MiB] = hashlib.sha256(data).hexdigest()
    h.flush()
    h.shutdown()
    return acked


def check(c, acked: dict[int, str]) -> None:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    for off, digest in acked.items():
        assert hashlib.sha256(h.pread(MiB, off)).hexdigest() == digest, f"data at {off}"
    h.shutdown()


def finished(c, name: str) -> dict | None:
    st = replica_status(c, name)
    rb = st.get("rebuild") or {}
    return rb if st["mode"] == "RW" and rb.get("state") == "done" else None


def test_bandwidth_limit_paces_a_rebuild(cluster_factory, tmp_path) -> None:
    path = node_limits(tmp_path, 20)
    c = cluster_factory(size=SIZE, replicas=2, transport="unix", rebuild_limits=path)
    acked = fill(c, 1, 40)                                  # 40 MiB: >= 1.75 s at 20 MiB/s
    empty_replica(c, 1)
    c.control().call({"op": "rebuild", "replica": "vol-r1"})
    rb = wait_for(lambda: finished(c, "vol-r1"), "the rebuild", timeout=20)
    took = rb["finished"] - rb["started_copy"]
    # 40 MiB at 20 MiB/s, minus the limiter's 0.25 s burst, with slack for clocks.
    assert rb["copied"] == 40 * MiB and took >= 1.6, (took, rb)
    check(c, acked)
    assert_replicas_identical(c)


def test_second_rebuild_on_the_node_waits_for_a_slot(cluster_factory, tmp_path) -> None:
    path = node_limits(tmp_path, 16, per_node=1)
    a = cluster_factory(size=SIZE, replicas=2, transport="unix", volume="va",
                        rebuild_limits=path)
    b = cluster_factory(size=SIZE, replicas=2, transport="unix", volume="vb",
                        rebuild_limits=path)
    acked_a, acked_b = fill(a, 2, 24), fill(b, 3, 8)
    empty_replica(a, 1)
    empty_replica(b, 1)
    a.control().call({"op": "rebuild", "replica": "va-r1"})
    wait_for(lambda: (replica_status(a, "va-r1").get("rebuild") or {}).get("done", 0) > 0,
             "the first rebuild to copy")
    b.control().call({"op": "rebuild", "replica": "vb-r1"})
    waiting = wait_for(lambda: (replica_status(b, "vb-r1").get("rebuild") or {})
                       .get("waiting"), "the second rebuild to queue")
    assert "concurrent-replica-rebuild-per-node-limit" in waiting
    ra = wait_for(lambda: finished(a, "va-r1"), "the first rebuild", timeout=20)
    rb = wait_for(lambda: finished(b, "vb-r1"), "the second rebuild", timeout=20)
    assert rb["started_copy"] >= ra["started_copy"] + 1.0, (ra, rb)
    check(a, acked_a)
    check(b, acked_b)
    assert_replicas_identical(a)
    assert_replicas_identical(b)


def test_settings_reach_the_limits_file(tmp_path) -> None:
    """The daemon's side: the settings become the node's limits file engines read."""
    settings = Settings(Store(str(tmp_path / "state.db")))
    path = str(tmp_path / "rebuild-limits.json")
    settings.set(REBUILD_BANDWIDTH, 20)
    settings.set(REBUILDS_PER_NODE, 2)
    write_rebuild_limits(settings, path)
    limits = Limits(path)
    assert limits.bandwidth() == 20 * MiB and limits.per_node() == 2
    assert Limits("").bandwidth() == 0 and Limits("").per_node() is None
