"""Tier 5: a volume across three hosts (network namespaces on a bridge), each with its own
home, disk and node daemon on one etcd (tests/support/cluster_site.py).

- placement: 3 replicas on 3 distinct nodes, each created by its node's daemon in that node's
  disk, reached over TCP at the node's address; a placement that cannot be met is refused
  with what is missing, and nothing is created;
- a volume written through an engine on host A, detached (asked of host B), attached on host
  B (asked of host A), reads the same: checksums equal.

The cluster is module-scoped: three daemons and etcd start once for every test here.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

import nbd
import pytest
from conftest import needs_root
from support.cluster_site import Site, cluster_site, wait_until

pytestmark = needs_root()

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import shutil
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    # Short path: replica and engine sockets live under the homes.
    root = os.path.join("/tmp", f"bhc{os.getpid()}")
    try:
        with cluster_site(root, 3) as s:
            yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


def nbd_handle(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def write_pattern(uri: str, seed: int, count: int = 64, block: int = 64 * 1024) -> str:
    """Write `count` blocks at spread offsets, flush; the sha256 of the whole volume."""
    h = nbd_handle(uri)
    try:
        size = h.get_size()
        for i in range(count):
            off = (i * 7919 * block) % (size - block)
            off -= off % 4096
            h.pwrite(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (block // 32), off)
        h.flush()
        return read_sum(h)
    finally:
        h.shutdown()


def read_sum(h: nbd.NBD) -> str:
    size, step = h.get_size(), 4 * MiB
    d = hashlib.sha256()
    for off in range(0, size, step):
        d.update(h.pread(min(step, size - off), off))
    return d.hexdigest()


def volume_sum(uri: str) -> str:
    h = nbd_handle(uri)
    try:
        return read_sum(h)
    finally:
        h.shutdown()


def test_placement_on_three_nodes_and_refusal(site: Site) -> None:
    a, b, c = site.hosts
    site.cli(a, "volume", "create", "spread", "--size", "32MiB", "--replicas", "3")
    v = site.show(a, "spread")
    by_node = {r["node"]: r for r in v["replicas"]}
    assert sorted(by_node) == sorted(h.name for h in site.hosts)
    for h in site.hosts:
        r = by_node[h.name]
        assert r["disk"] == h.disk and r["address"].startswith(h.ip + ":")
        # Each node's daemon creates its own replicas (within a supervision tick or two).
        wait_until(lambda r=r: os.path.exists(os.path.join(r["path"], "volume.meta")), 15,
                   f"replica {r['name']} created by {h.name}")
    # The other nodes see the same volume.
    assert {r["node"] for r in site.show(c, "spread")["replicas"]} == set(by_node)

    site.cli(c, "node", "update", c.name, "--schedulable", "no")
    try:
        bad = site.cli(b, "volume", "create", "nope", "--size", "16MiB", "--replicas", "3",
                       check=False)
        assert bad.returncode != 0
        assert "3 replicas need 3 schedulable nodes; 2 are up and schedulable" in bad.stderr
        assert "nope" not in {x["name"] for x in site.json(a, "volume", "ls")}
        # Two replicas fit on the two schedulable nodes.
        site.cli(b, "volume", "create", "two", "--size", "16MiB", "--replicas", "2")
        assert {r["node"] for r in site.show(b, "two")["replicas"]} == {a.name, b.name}
    finally:
        site.cli(c, "node", "update", c.name, "--schedulable", "yes")
    site.cli(a, "volume", "rm", "two")


def test_written_on_one_host_reads_the_same_on_another(site: Site) -> None:
    a, b, c = site.hosts
    site.cli(b, "volume", "create", "mover", "--size", "32MiB", "--replicas", "3")
    t0 = time.monotonic()
    site.cli(a, "volume", "attach", "mover", "--frontend", "none")   # on a: the default
    v = site.show(b, "mover")
    assert v["state"] == "attached" and v["node"] == a.name
    before = write_pattern(site.show(a, "mover")["endpoint"], seed=1)
    # Detach asked of another node than the engine's: a's daemon stops its engine.
    site.cli(b, "volume", "detach", "mover")
    assert site.show(a, "mover")["state"] == "detached"
    wait_until(lambda: all(r["pid"] is None for r in site.show(a, "mover")["replicas"]), 20,
               "every node stopped its replica")
    # Attach on b, asked of a: b's daemon brings the engine up and reaches a's and c's
    # replicas over TCP.
    site.cli(a, "volume", "attach", "mover", "--frontend", "none", "--node", b.name)
    v = site.show(b, "mover")
    assert v["node"] == b.name and v["robustness"] == "healthy", v
    assert {r["mode"] for r in v["replicas"]} == {"RW"}
    assert volume_sum(v["endpoint"]) == before
    site.cli(b, "volume", "detach", "mover")
    print(f"write, move and read back: {time.monotonic() - t0:.1f} s")
