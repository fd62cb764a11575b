"""Tier 5: volumes across four hosts (network namespaces on a bridge), each with its own
home, disk and node daemon, on a three-member etcd across three of them
(tests/support/cluster_site.py).

- placement: 3 replicas on 3 distinct nodes, each created by its node's daemon in that node's
  disk, reached over TCP at the node's address; a placement that cannot be met is refused
  with what is missing, and nothing is created;
- a volume written through an engine on host A, detached (asked of host B), attached on host
  B (asked of host A), reads the same: checksums equal;
- `node drain`: refused with the reason while no node has room (nothing changed), then, under
  writes, each replica rebuilt on another node before the old one is dropped (the target
  node's daemon restarted meanwhile): the volume healthy with all its replicas RW at every
  look during the drain, every acknowledged write read back, the replicas identical
  (`volume verify`), the old directory removed;
- `upgrade --all` asked of any node: every node upgrades its engines, reported per node;
- a node killed (every process, and its link down) under writes: `down` in `node ls`, a
  leader among the live nodes replaces its replica after the (short) replenishment wait, the
  engine rebuilds it, the volume is healthy again and every acknowledged write reads back;
- a node cut off (link down only) is replaced the same way, and once its link returns its
  daemon stops the replica process that is no longer its own;
- one of the three etcd members killed: the cluster goes on (create, attach, write, rm);
- the leader killed: another node leads within the lease's TTL.

The cluster is module-scoped: four daemons and etcd start once for every test here, and the
tests run in this order (the last one kills a host).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import nbd
import psutil
import pytest
from conftest import needs_root
from netns_util import set_link
from support.cluster_site import Site, Writer, cluster_site, wait_until

from blockhorn.engine.control import ControlClient
from blockhorn.manager.paths import Home

pytestmark = needs_root()

MiB = 1 << 20


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import shutil
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    # Short path: replica and engine sockets live under the homes.
    root = os.path.join("/tmp", f"bhc{os.getpid()}")
    try:
        with cluster_site(root, 4, {"replica-replenishment-wait-interval": "2"}) as s:
            yield s
    finally:
        if not os.environ.get("BLOCKHORN_KEEP_SITE"):   # logs for a post-mortem
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
    a, b, c, d = site.hosts
    site.cli(a, "volume", "create", "spread", "--size", "32MiB", "--replicas", "3")
    v = site.show(a, "spread")
    by_node = {r["node"]: r for r in v["replicas"]}
    assert len(by_node) == 3 and a.name in by_node   # distinct nodes; data locality first
    for h in (x for x in site.hosts if x.name in by_node):
        r = by_node[h.name]
        assert r["disk"] == h.disk and r["address"].startswith(h.ip + ":")
        # Each node's daemon creates its own replicas (within a supervision tick or two).
        wait_until(lambda r=r: os.path.exists(os.path.join(r["path"], "volume.meta")), 15,
                   f"replica {r['name']} created by {h.name}")
    # The other nodes see the same volume.
    assert {r["node"] for r in site.show(c, "spread")["replicas"]} == set(by_node)

    for h in (c, d):
        site.cli(c, "node", "update", h.name, "--schedulable", "no")
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
        for h in (c, d):
            site.cli(c, "node", "update", h.name, "--schedulable", "yes")
    site.cli(a, "volume", "rm", "two")
    site.cli(a, "volume", "rm", "spread")


def test_written_on_one_host_reads_the_same_on_another(site: Site) -> None:
    a, b, c, d = site.hosts
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
    assert v["node"] == b.name, v
    # Every replica stayed in sync: none is resynced (the engine stopped before them).
    assert v["robustness"] == "healthy" and {r["mode"] for r in v["replicas"]} == {"RW"}, v
    assert volume_sum(v["endpoint"]) == before
    site.cli(b, "volume", "detach", "mover")
    print(f"write, move and read back: {time.monotonic() - t0:.1f} s")


def test_engine_requests_on_any_node(site: Site) -> None:
    """Snapshots, verify and show asked of a node that does not run the volume's engine are
    forwarded to the one that does (manager/forward.py) and answer the same."""
    a, b, c, d = site.hosts
    site.cli(a, "volume", "create", "fw", "--size", "16MiB", "--replicas", "2")
    site.cli(a, "volume", "attach", "fw", "--frontend", "none")
    t0 = time.monotonic()
    write_pattern(site.show(a, "fw")["endpoint"], seed=3, count=8)
    asker = next(h for h in (c, d, b) if h.name not in site.nodes_of(a, "fw"))
    site.cli(asker, "snapshot", "create", "fw", "s1")
    names = [s["name"] for s in site.json(asker, "snapshot", "ls", "fw")]
    assert "s1" in names, names
    assert names == [s["name"] for s in site.json(a, "snapshot", "ls", "fw")]
    v = site.show(asker, "fw")
    assert v["node"] == a.name and {r["mode"] for r in v["replicas"]} == {"RW"}, v
    assert all(r["revision"] is not None for r in v["replicas"]), v
    verify = site.cli(asker, "volume", "verify", "fw", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # A backup asked of the asker runs on the engine's node; the asker follows its job there.
    os.makedirs(os.path.join(site.root, "backups"))
    site.cli(asker, "backup", "target", "set", "fwt", f"file://{site.root}/backups")
    try:
        site.cli(asker, "backup", "create", "fw", "--snapshot", "s1", "--target", "fwt")
        assert [b["snapshot"] for b in site.json(a, "backup", "ls", "fw", "--target", "fwt")] \
            == ["s1"]
    finally:
        site.cli(asker, "backup", "target", "rm", "fwt")
    print(f"snapshot, ls, show, verify and backup through {asker.name}: {time.monotonic() - t0:.1f} s")
    site.cli(a, "volume", "detach", "fw")
    site.cli(a, "volume", "rm", "fw")


def test_upgrade_all_reaches_every_node(site: Site) -> None:
    """`upgrade --all` asked of a node that runs no engine upgrades the engines of every
    node (manager/forward.py), reports per node, and goes on after a volume that cannot be
    upgraded live (frontend none without a TCP endpoint: nothing retries its clients); the
    upgraded volumes read the same."""
    a, b, c, d = site.hosts
    t0 = time.monotonic()
    # Both on b, the one that fails first: b goes on after it. Asked of c: forwarded to b.
    on = {"upa": "none", "upb": "fuse-nbd"}   # volume -> frontend
    for name, frontend in on.items():
        site.cli(b, "volume", "create", name, "--size", "16MiB", "--replicas", "1")
        site.cli(b, "volume", "attach", name, "--frontend", frontend)
    sums = {"upb": write_pattern(site.show(b, "upb")["endpoint"], seed=5, count=8)}
    pids = {n: site.show(b, n)["engine"]["pid"] for n in on}
    t1 = time.monotonic()
    got = site.cli(c, "upgrade", "--all", "--json", check=False)
    t2 = time.monotonic()
    assert got.returncode == 1, got.stdout + got.stderr   # upa was not upgraded
    answer = json.loads(got.stdout)
    by_name = {r["name"]: r for r in answer["volumes"]}
    assert set(by_name) == set(on), answer
    assert {r["node"] for r in by_name.values()} == {b.name}, answer
    assert "frontend" in by_name["upa"]["error"] and pids["upa"] == \
        site.show(b, "upa")["engine"]["pid"]
    nodes = {n["node"]: n for n in answer["nodes"]}
    assert set(nodes) == {h.name for h in site.hosts} and not any("error" in n
                                                                 for n in nodes.values())
    assert nodes[b.name] == {"node": b.name, "volumes": 2, "failed": 1}, nodes
    for n in sums:
        assert "error" not in by_name[n] and by_name[n]["pause_s"] >= 0, by_name[n]
        v = site.show(b, n)
        assert v["engine"]["pid"] != pids[n] and volume_sum(v["endpoint"]) == sums[n]
    print(f"upgrade --all across {len(nodes)} nodes: {t2 - t1:.1f} s; create and attach "
          f"{t1 - t0:.1f} s")
    for name in on:
        site.cli(b, "volume", "rm", name, "--force")


def test_drain_refused_without_room_then_moves_each_replica(site: Site) -> None:
    a, b, c, d = site.hosts
    site.cli(a, "node", "update", d.name, "--schedulable", "no")
    site.cli(a, "volume", "create", "dr", "--size", "32MiB", "--replicas", "3")
    assert site.nodes_of(a, "dr") == {a.name, b.name, c.name}
    site.cli(a, "volume", "attach", "dr", "--frontend", "none")
    write_pattern(site.show(a, "dr")["endpoint"], seed=2)
    bad = site.cli(b, "node", "drain", c.name, check=False)
    assert bad.returncode != 0 and f"cannot drain node {c.name}" in bad.stderr, bad.stderr
    assert "no node for a replacement" in bad.stderr
    assert site.json(a, "node", "show", c.name)["schedulable"] is True   # nothing changed
    site.cli(a, "node", "update", d.name, "--schedulable", "yes")
    # The drain under writes, polling the volume meanwhile: the replica is rebuilt on d before
    # c's is dropped, so the volume never has fewer than 3 RW replicas. The copy is slowed
    # down (MiB/s) so that d's daemon can be killed and started again during the move: the
    # new daemon adopts the target process, whether or not the swap happened meanwhile.
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", "2")
    w = Writer(site.show(a, "dr")["endpoint"])
    w.start()
    wait_until(lambda: w.count >= 50 or w.error, 20, "writes before the drain")
    t0 = time.monotonic()
    drained: list[subprocess.CompletedProcess[str]] = []
    th = threading.Thread(target=lambda: drained.append(site.cli(b, "node", "drain", c.name,
                                                                 check=False)))
    th.start()
    # The engine's own status (its control socket on a, every 50 ms), and the daemon's view.
    engine = ControlClient(Home(a.home).control_socket("dr"))
    seen: list[tuple[str, int]] = []
    migrated = False
    restart: threading.Thread | None = None

    def restart_d() -> None:
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait(10)
        site.start(d)

    while th.is_alive():
        st = engine.call({"op": "status"})
        seen.append((st["robustness"], sum(r["mode"] == "RW" for r in st["replicas"])))
        migrated |= any(r.get("migration") for r in st["replicas"])
        if restart is None and any((r.get("migration") or {}).get("state") == "running"
                                   for r in st["replicas"]):
            restart = threading.Thread(target=restart_d)
            restart.start()
        th.join(0.05)
    assert restart is not None, "the migration was not seen running"
    restart.join(60)
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", "0")
    v = site.show(a, "dr")
    seen.append((v["robustness"], sum(r["mode"] == "RW" for r in v["replicas"])))
    w.finish()
    assert drained and drained[0].returncode == 0, drained
    out = drained[0].stdout
    print(f"drain of one replica under {w.count} writes: {time.monotonic() - t0:.1f} s, "
          f"{len(seen)} looks at the volume")
    assert migrated and all(s == ("healthy", 3) for s in seen), seen
    assert f"moved to {d.name}" in out
    assert site.healthy_on(a, "dr", {a.name, b.name, d.name})
    assert w.check(site.show(a, "dr")["endpoint"]) == 0
    verify = site.cli(a, "volume", "verify", "dr", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert site.json(a, "node", "show", c.name)["schedulable"] is False
    # c's daemon stopped its replica process (no longer its own).
    moved = next(r for r in site.show(a, "dr")["replicas"] if r["node"] == d.name)
    assert moved["disk"] == d.disk
    # ... and removed its old directory (the store's leftover record: manager/leftovers.py).
    old = os.path.join(c.disk, "replicas", "dr", moved["name"])
    wait_until(lambda: not os.path.exists(old), 15, f"{c.name} removing {old}")
    site.cli(a, "volume", "detach", "dr")
    site.cli(a, "node", "update", c.name, "--schedulable", "yes")


def test_node_killed_under_writes_replaced_elsewhere(site: Site) -> None:
    a, b, c, d = site.hosts
    assert site.create_avoiding(a, "kv", 3, [c]) == {a.name, b.name, d.name}
    site.cli(a, "volume", "attach", "kv", "--frontend", "none")
    # The leader (maybe a new one: d may have led) replaces d's replica on c, the engine on
    # a rebuilds it while the writes go on; every acknowledged write reads back the same.
    t = site.kill_and_heal(a, "kv", d)
    assert site.nodes_of(a, "kv") == {a.name, b.name, c.name}
    leaders = [n["name"] for n in site.json(a, "node", "ls") if n["leader"]]
    assert len(leaders) == 1 and leaders[0] != d.name
    verify = site.cli(a, "volume", "verify", "kv", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"{t['writes']:.0f} writes; node down after {t['down']:.1f} s, replica moved after "
          f"{t['moved']:.1f} s, volume healthy again {t['healthy']:.1f} s after the kill")
    site.cli(a, "volume", "detach", "kv")


def test_partitioned_node_replaced_and_its_replica_stopped_when_back(site: Site) -> None:
    """A replica node cut off (link down, processes running): replaced like a dead one; when
    its link returns, its daemon sees the replica is no longer its own and stops it."""
    a, b, c, d = site.hosts
    site.revive(d)   # killed by the test before: the fourth node again
    site.cli(a, "volume", "create", "pt", "--size", "32MiB", "--replicas", "3")
    site.cli(a, "volume", "attach", "pt", "--frontend", "none")
    v = site.show(a, "pt")
    old = next(r for r in v["replicas"] if r["node"] != a.name)
    victim = site.host(old["node"])
    assert old["pid"] and psutil.pid_exists(old["pid"])
    t = site.kill_and_heal(a, "pt", victim, partition=True)
    assert psutil.pid_exists(old["pid"])   # cut off, not dead: it still runs
    set_link(victim.name, True)
    t0 = time.monotonic()
    wait_until(lambda: not psutil.pid_exists(old["pid"])
               or psutil.Process(old["pid"]).status() == psutil.STATUS_ZOMBIE, 30,
               f"{victim.name} stopping its replica that moved away")
    print(f"partition: healthy elsewhere after {t['healthy']:.1f} s; the old replica stopped "
          f"{time.monotonic() - t0:.1f} s after the link returned")
    wait_until(lambda: site.states(a)[victim.name] == "up", 20, f"{victim.name} up again")
    site.cli(a, "volume", "detach", "pt")


def test_rm_with_a_node_down_cleans_up_when_it_returns(site: Site) -> None:
    """`volume rm` removes every node's replica directory (and process, config): the nodes
    that are up at once, one that was down when it comes back."""
    a = site.hosts[0]
    site.cli(a, "volume", "create", "gone", "--size", "16MiB", "--replicas", "3")
    reps = site.show(a, "gone")["replicas"]
    victim = site.host(next(r["node"] for r in reps if r["node"] != a.name))
    # Attached on the victim, so that an engine request asked of another node after the
    # victim died gets a clear error instead of a hang.
    site.cli(a, "volume", "attach", "gone", "--frontend", "none", "--node", victim.name)
    for r in reps:
        wait_until(lambda r=r: os.path.exists(os.path.join(r["path"], "volume.meta")), 15,
                   f"replica {r['name']} created")
    site.kill(victim)
    wait_until(lambda: site.states(a)[victim.name] == "down", 30, f"{victim.name} down")
    bad = site.cli(a, "snapshot", "create", "gone", "s", check=False, timeout=30)
    assert bad.returncode != 0 and f"runs on node {victim.name}, which is down" in bad.stderr, \
        bad.stdout + bad.stderr
    # show still answers (the store's). The leader may have tried to move the volume
    # meanwhile (2 s replenishment wait), which the generation rule refuses (the victim
    # holds a member of the newest set): either way it is not attached anywhere else.
    wait_until(lambda: (lambda v: v["node"] == victim.name or v["state"] == "detached")(
        site.show(a, "gone")), 30, "the volume still on the victim, or the move refused")
    site.cli(a, "volume", "detach", "gone")   # its engine is gone with its node
    t0 = time.monotonic()
    site.cli(a, "volume", "rm", "gone")
    by_node = {r["node"]: r["path"] for r in reps}
    for node, path in by_node.items():
        if node != victim.name:
            wait_until(lambda path=path: not os.path.exists(path), 15, f"{node} removing {path}")
    print(f"rm: every live node's replica directory gone after {time.monotonic() - t0:.1f} s")
    assert os.path.exists(by_node[victim.name])   # its node is down: nobody touched it
    cfg = os.path.join(victim.home, "volumes", "gone")
    assert os.path.exists(cfg)
    t0 = time.monotonic()
    site.revive(victim)
    wait_until(lambda: not os.path.exists(by_node[victim.name]) and not os.path.exists(cfg),
               30, f"{victim.name} removing its replica of the removed volume")
    print(f"the returned node removed its directory {time.monotonic() - t0:.1f} s after "
          "its daemon started")
    for h in site.hosts:   # nothing of the volume is left anywhere
        assert not os.path.exists(os.path.join(h.disk, "replicas", "gone"))
        assert not os.path.exists(os.path.join(h.home, "volumes", "gone"))


def test_etcd_member_lost_the_cluster_goes_on(site: Site) -> None:
    """One of the three etcd members killed: every node stays up (its daemon reaches the
    other members), a volume is created, attached, written and removed, also through the
    node whose local member died; the member then rejoins."""
    a = site.hosts[0]
    member = next(h for h in site.hosts[1:] if site.members.get(h.name) is not None)
    site.kill_etcd(member)
    t0 = time.monotonic()
    try:
        site.cli(member, "volume", "create", "em", "--size", "16MiB", "--replicas", "3")
        site.cli(member, "volume", "attach", "em", "--frontend", "none", "--node", a.name)
        written = write_pattern(site.show(a, "em")["endpoint"], seed=4, count=16)
        assert volume_sum(site.show(a, "em")["endpoint"]) == written
        assert site.healthy_on(a, "em", site.nodes_of(a, "em"))
        assert set(site.states(member).values()) == {"up"}, site.states(member)
        site.cli(member, "volume", "detach", "em")
        site.cli(member, "volume", "rm", "em")
        print(f"etcd member of {member.name} dead: create, attach, write, rm took "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        site.start_etcd(member)


def test_leader_killed_another_takes_over(site: Site) -> None:
    live = [h for h in site.hosts if site.states(site.hosts[0])[h.name] == "up"
            and h.proc is not None and h.proc.poll() is None]
    asker = live[-1]
    (leader,) = [n["name"] for n in site.json(asker, "node", "ls") if n["leader"]]
    if leader == asker.name:
        asker = live[0]
    t0 = time.monotonic()
    site.kill(site.host(leader))

    def new_leader() -> str | None:
        ns = site.json(asker, "node", "ls")
        lead = [n["name"] for n in ns if n["leader"]]
        down = {n["name"] for n in ns if n["state"] == "down"}
        return lead[0] if len(lead) == 1 and lead[0] != leader and leader in down else None
    took = wait_until(new_leader, 30, "another leader")
    print(f"leader {leader} killed: {took} leads after {time.monotonic() - t0:.1f} s")
