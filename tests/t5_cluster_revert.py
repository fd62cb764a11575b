"""Tier 5: `snapshot revert` of a detached cluster volume whose replicas live on other nodes
(three namespace hosts with real etcd, tests/support/cluster_site.py). The node asked runs
a maintenance attach (manager/maintenance.py) and its engine reverts every in-sync replica
(engine/revert.py); docs/DURABILITY.md, "Revert across nodes".

- a 2-replica volume on b and c, written (A), snapshot, written again (B), detached: the
  revert asked of a (no replica there) leaves it detached, and attached on c it reads A
  again, every replica RW and `volume verify` clean;
- a 3-replica volume with c's node down during the revert: a and b revert and are committed
  as the in-sync set; c, which still holds B, is never counted in sync again: when its node
  is back and the volume attaches on c itself, c is rebuilt from the reverted ones, the
  volume reads A and verify is clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import needs_root
from support.backup_util import volume_digest
from support.cluster_site import Site, module_site, wait_until

pytestmark = needs_root()



@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with module_site("bhv") as s:
        yield s


def detach(site: Site, host: Any, volume: str) -> None:
    site.cli(host, "volume", "detach", volume)
    wait_until(lambda: all(r["pid"] is None for r in site.show(host, volume)["replicas"]),
               20, f"every replica of {volume} stopped")


def attach_sum(site: Site, volume: str, host: Any, write_seed: int | None = None) -> str:
    site.cli(host, "volume", "attach", volume, "--frontend", "none")
    try:
        return volume_digest(site.show(host, volume)["endpoint"], write_seed=write_seed)
    finally:
        detach(site, host, volume)


def check_reads(site: Site, volume: str, host: Any, want: str) -> set[str]:
    """Attached on `host`: healthy with every replica RW (rebuilt if it had to be), reads
    `want`, and the replicas agree chunk by chunk (`volume verify`). Returns the nodes whose
    replica the engine rebuilt."""
    site.cli(host, "volume", "attach", volume, "--frontend", "none")
    try:
        nodes = site.nodes_of(host, volume)
        wait_until(lambda: site.healthy_on(host, volume, nodes), 60,
                   f"{volume} healthy on {host.name}")
        assert volume_digest(site.show(host, volume)["endpoint"]) == want
        verify = site.cli(host, "volume", "verify", volume, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        return {r["node"] for r in site.show(host, volume)["replicas"] if r.get("rebuild")}
    finally:
        detach(site, host, volume)


def test_revert_from_a_node_without_replicas(site: Site) -> None:
    a, b, c = site.hosts
    assert site.create_avoiding(a, "rv", 2, [a]) == {b.name, c.name}
    want = attach_sum(site, "rv", b, write_seed=1)
    site.cli(a, "snapshot", "create", "rv", "s1")
    later = attach_sum(site, "rv", c, write_seed=2)
    assert later != want
    t0 = time.monotonic()
    r = site.cli(a, "snapshot", "revert", "rv", "s1")
    took = time.monotonic() - t0
    assert "reverted to s1" in r.stdout and not r.stderr.strip(), r.stdout + r.stderr
    v = site.show(a, "rv")
    assert v["state"] == "detached" and not v["message"], v
    assert all(rep["pid"] is None for rep in v["replicas"]), v
    # Refused while attached, wherever that is.
    site.cli(b, "volume", "attach", "rv", "--frontend", "none")
    r = site.cli(a, "snapshot", "revert", "rv", "s1", check=False)
    assert r.returncode != 0 and "detach" in r.stderr and "Traceback" not in r.stderr, r.stderr
    detach(site, b, "rv")
    assert check_reads(site, "rv", c, want) == set()   # both reverted: nothing to rebuild
    site.cli(a, "volume", "rm", "rv")
    print(f"revert of a 2-replica volume across nodes: {took:.1f} s")


def test_revert_with_a_replicas_node_down(site: Site) -> None:
    a, b, c = site.hosts
    site.cli(a, "volume", "create", "rq", "--size", "32MiB", "--replicas", "3")
    want = attach_sum(site, "rq", a, write_seed=3)
    site.cli(b, "snapshot", "create", "rq", "s1")
    assert attach_sum(site, "rq", b, write_seed=4) != want
    site.kill(c)
    wait_until(lambda: site.states(a)[c.name] == "down", 30, f"{c.name} down")
    t0 = time.monotonic()
    r = site.cli(a, "snapshot", "revert", "rq", "s1")
    took = time.monotonic() - t0
    assert "reverted to s1" in r.stdout, r.stdout + r.stderr
    site.revive(c)
    wait_until(lambda: site.states(a)[c.name] == "up", 30, f"{c.name} up")
    # On c itself, whose replica still holds B at the generation before the revert: the
    # start rule takes a and b (reverted, committed without c) and rebuilds c from them.
    assert check_reads(site, "rq", c, want) == {c.name}
    site.cli(a, "volume", "rm", "rq")
    print(f"revert of a 3-replica volume with one node down: {took:.1f} s")
