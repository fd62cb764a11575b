"""Tier 5: a volume attached on a node that died or was cut off (issue 12; docs/DURABILITY.md,
"A volume attached on a node that died"), on the shared cluster site
(tests/support/cluster_site.py: four namespace hosts, one etcd, names unique per run).

- an engine's node dies (every process killed but the engine, which is frozen, and its link
  down): after the replenishment wait the leader attaches the volume on a live node under a
  new attach epoch, every acknowledged block reads back; the old engine, resumed with its
  link back, can neither write nor reconnect (the replicas refuse its epoch), and a's
  daemon, started again, kills it;
- an engine's node cut off (link down, its daemon running) fences itself: its daemon kills
  its engine before its lease can expire, then the volume comes up elsewhere, data intact;
- a dead node holding a replica of the newest in-sync set of a 2-replica volume: the move is refused by the
  generation rule with what is missing (the volume detached, nothing trusted that may be
  stale); `volume attach --salvage REPLICA` starts it from the replica left, once, and the
  dead node's replica, back, is resynced from it; the data reads the same.
- a dead node holding one of 3 replicas: the volume starts elsewhere by the commit quorum;
- 2 of 3 replicas of an attached volume silent (their processes stopped, their nodes up):
  writes fail with EIO, reads go on; one back and resynced: writes resume.

Module-scoped site; the tests run in this order and each leaves every host up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import nbd
import psutil
import pytest
from conftest import needs_root
from netns_util import set_link
from support.cluster_site import Host, Site, cluster_site, netns_pids, wait_until
from t5_cluster_hosts import volume_sum, write_pattern

from blockhorn.config import ReplicaRef
from blockhorn.engine.client import ReplicaClient
from blockhorn.keys import load_key
from blockhorn.manager.paths import Home
from blockhorn.manager.volumes import engine_status
from blockhorn.replica.proto import handshake_name
from blockhorn.types import AuthError

pytestmark = needs_root()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    import shutil
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    root = os.path.join("/tmp", f"bhk{os.getpid()}")   # short: sockets live under the homes
    try:
        with cluster_site(root, 4, {"replica-replenishment-wait-interval": "2"}) as s:
            yield s
    finally:
        if not os.environ.get("BLOCKHORN_KEEP_SITE"):   # logs for a post-mortem
            shutil.rmtree(root, ignore_errors=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def show_or_none(site: Site, h: Host, volume: str) -> dict[str, Any] | None:
    """`volume show`, or None while the daemon cannot answer (its store busy electing)."""
    r = site.cli(h, "volume", "show", volume, "--json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def detach_and_remove(site: Site, h: Host, volume: str) -> None:
    site.cli(h, "volume", "detach", volume)
    # Each node stops its replicas of a detached volume in its next supervision pass.
    wait_until(lambda: all(r["pid"] is None for r in site.show(h, volume)["replicas"]), 20,
               "every node stopped its replica")
    site.cli(h, "volume", "rm", volume)


def old_engine_write(uri: str) -> subprocess.CompletedProcess[str]:
    """One write + flush through the old engine's NBD socket, in a child with a deadline
    (a fenced engine fails it; it must not hang the test)."""
    code = ("import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
            "h.pwrite(b'X' * 65536, 0); h.flush(); print('written')")
    return subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True,
                          timeout=90)


def test_engine_node_dies_volume_moves_and_old_engine_is_fenced(site: Site) -> None:
    a, b, c, d = site.hosts
    # Replicas on b, c, d; the engine on a: a's death takes no replica of the newest set
    # with it, so the generation rule lets the volume start elsewhere by itself.
    assert site.create_avoiding(b, "fe", 3, [a]) == {b.name, c.name, d.name}
    site.cli(b, "volume", "attach", "fe", "--frontend", "none", "--node", a.name)
    v = site.show(a, "fe")
    old_uri, epoch = v["endpoint"], v["epoch"]
    assert v["node"] == a.name and epoch > 0
    before = write_pattern(old_uri, seed=5)   # flushed: every block acknowledged
    keeper = psutil.Process(v["engine"]["pid"])
    frozen = [keeper, *keeper.children(recursive=True)]   # the keeper and its nbdkit
    for p in frozen:
        p.suspend()
    try:
        t0 = time.monotonic()
        set_link(a.name, False)
        for pid in netns_pids(a.name):   # everything else of a dies (its daemon too)
            if pid not in {p.pid for p in frozen}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert a.proc is not None
        a.proc.wait(10)

        def moved() -> dict[str, Any] | None:
            w = show_or_none(site, b, "fe")
            return w if w and w["node"] not in (None, a.name) and w["endpoint"] \
                and w["state"] == "attached" else None
        w = wait_until(moved, 60, "the volume attached on another node")
        t_moved = time.monotonic() - t0
        assert w["epoch"] > epoch, w
        new = site.host(w["node"])
        wait_until(lambda: site.healthy_on(new, "fe", {b.name, c.name, d.name}), 30,
                   "healthy on the new node")
        assert volume_sum(site.show(new, "fe")["endpoint"]) == before
        # Each replica recorded the new epoch durably before it answered.
        for r in w["replicas"]:
            with open(os.path.join(r["path"], "fence.epoch")) as f:
                assert int(f.read()) == w["epoch"]
        # The old engine comes back: link up, resumed. Its writes fail.
        set_link(a.name, True)
        for p in frozen:
            p.resume()
        res = old_engine_write(old_uri)
        assert "written" not in res.stdout, res
        # Nor can it reconnect: a handshake with its epoch is refused by every replica.
        key = load_key(os.path.join(a.home, "cluster.key"))
        for r in w["replicas"]:
            with pytest.raises(AuthError, match="fenced"):
                ReplicaClient(ReplicaRef(r["name"], r["address"]), key,
                              handshake_name("fe", epoch)).connect()
        after = site.show(new, "fe")
        assert after["node"] == new.name and after["robustness"] == "healthy", after
        assert volume_sum(after["endpoint"]) == before
        print(f"engine node died: volume attached on {new.name} after {t_moved:.1f} s "
              f"(epoch {epoch} -> {w['epoch']}); the old engine's write failed: "
              f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        site.start(a)   # a's daemon again: it stops the engine of the volume that moved away
        wait_until(lambda: all(gone(p.pid) for p in frozen), 20, "a's old engine stopped")
    finally:
        for p in frozen:
            with contextlib.suppress(psutil.Error):
                p.kill()
        set_link(a.name, True)
    wait_until(lambda: site.states(b)[a.name] == "up", 20, f"{a.name} up again")
    detach_and_remove(site, b, "fe")


def test_partitioned_engine_node_fences_itself(site: Site) -> None:
    # The cut-off engine node is the host without an etcd member: cutting a member off
    # costs etcd an election that stalls every node's store for a moment, beside the point.
    c = next(h for h in site.hosts if h.name not in site.members)
    a, b, d = (h for h in site.hosts if h is not c)
    assert site.create_avoiding(a, "pf", 3, [c]) == {a.name, b.name, d.name}
    site.cli(a, "volume", "attach", "pf", "--frontend", "none", "--node", c.name)
    v = site.show(c, "pf")
    before = write_pattern(v["endpoint"], seed=6)
    keeper = psutil.Process(v["engine"]["pid"])
    engine = [keeper, *keeper.children(recursive=True)]
    t0 = time.monotonic()
    set_link(c.name, False)   # cut off; its daemon and engine run on
    try:
        # Its daemon kills the engine before the lease can expire (two failed beats).
        wait_until(lambda: all(gone(p.pid) for p in engine), 30, "c's engine self-fenced")
        t_fenced = time.monotonic() - t0
        w = wait_until(lambda: (lambda x: x if x and x["node"] not in (None, c.name)
                                and x["endpoint"] else None)(show_or_none(site, a, "pf")),
                       60, "the volume attached on another node")
        t_moved = time.monotonic() - t0
        new = site.host(w["node"])
        wait_until(lambda: site.healthy_on(new, "pf", {a.name, b.name, d.name}), 30,
                   "healthy on the new node")
        assert volume_sum(site.show(new, "pf")["endpoint"]) == before
        print(f"partitioned engine node: engine killed by its own daemon {t_fenced:.1f} s "
              f"after the cut, volume up on {new.name} after {t_moved:.1f} s")
        assert t_fenced < t_moved
    finally:
        set_link(c.name, True)
    wait_until(lambda: site.states(a)[c.name] == "up", 20, f"{c.name} up again")
    detach_and_remove(site, a, "pf")


def test_dead_node_with_a_newest_member_refused_then_salvaged(site: Site) -> None:
    """The dead node holds a replica of the newest in-sync set: it may hold writes the
    others lack (its engine may have dropped them), so no start elsewhere trusts the rest."""
    a, b, c, d = site.hosts
    assert site.create_avoiding(a, "nm", 2, [c, d]) == {a.name, b.name}
    site.cli(b, "volume", "attach", "nm", "--frontend", "none", "--node", a.name)
    v = site.show(a, "nm")
    (on_a,) = [r["name"] for r in v["replicas"] if r["node"] == a.name]
    before = write_pattern(v["endpoint"], seed=7)
    site.kill(a)
    try:
        v = wait_until(lambda: (lambda x: x if x and x["state"] == "detached"
                                and "unreachable" in (x["message"] or "") else None)(
                                    show_or_none(site, b, "nm")), 60, "the move refused")
        assert on_a in v["message"] and "may hold newer data" in v["message"], v
        # An operator asking for it gets the same answer, as an error (EIO, exit code).
        bad = site.cli(b, "volume", "attach", "nm", "--frontend", "none", "--node", c.name,
                       check=False)
        assert bad.returncode != 0 and "may hold newer data" in bad.stderr, bad.stderr
        assert "--salvage" in bad.stderr, bad.stderr      # the way out is named
        # The operator salvages from the replica left: a name that is not one is refused.
        (on_b,) = [r["name"] for r in v["replicas"] if r["node"] == b.name]
        bad = site.cli(b, "volume", "attach", "nm", "--frontend", "none", "--node", c.name,
                       "--salvage", "nm-nosuch", check=False)
        assert bad.returncode != 0 and "is not a replica" in bad.stderr, bad.stderr
        assert site.show(b, "nm")["state"] == "detached"
        site.cli(b, "volume", "attach", "nm", "--frontend", "none", "--node", c.name,
                 "--salvage", on_b)
        w = site.show(c, "nm")
        assert w["node"] == c.name and volume_sum(w["endpoint"]) == before
        # For that start only: the engine config of c no longer asks for it.
        with open(os.path.join(c.home, "volumes", "nm", "engine.json")) as f:
            assert json.load(f)["salvage"] == ""
    finally:
        site.revive(a)
    wait_until(lambda: site.states(b)[a.name] == "up", 20, f"{a.name} up again")
    # a's old replica (or its replacement) is resynced from the salvaged one.
    wait_until(lambda: (lambda x: x["robustness"] == "healthy" and len(x["replicas"]) == 2
                        and {r["mode"] for r in x["replicas"]} == {"RW"})(site.show(c, "nm")),
               60, "healthy again after the salvage")
    assert volume_sum(site.show(c, "nm")["endpoint"]) == before
    detach_and_remove(site, b, "nm")


def test_dead_node_with_a_member_three_replicas_moves_by_the_quorum(site: Site) -> None:
    """Three replicas, one on the engine's node (data locality): the commit quorum (its
    engine acknowledged nothing that a majority does not hold) lets the two others start
    the volume on another node by themselves; a's replica is then replaced."""
    a, b, c, d = site.hosts
    assert site.create_avoiding(b, "qm", 3, [d]) == {a.name, b.name, c.name}
    site.cli(b, "volume", "attach", "qm", "--frontend", "none", "--node", a.name)
    v = site.show(a, "qm")
    epoch = v["epoch"]
    before = write_pattern(v["endpoint"], seed=8)   # flushed: every block acknowledged
    t0 = time.monotonic()
    site.kill(a)
    try:
        def started() -> tuple[Host, str] | None:
            """(host, engine log) once an engine on another host than a decided."""
            for h in (b, c, d):
                path = os.path.join(h.home, "logs", "qm-engine.log")
                with contextlib.suppress(FileNotFoundError), open(path) as f:
                    log = f.read()
                    if "start rule" in log or "unreachable" in log:
                        return h, log
            return None
        new, log = wait_until(started, 60, "a new engine's start rule")
        t_started = time.monotonic() - t0
        w = wait_until(lambda: (lambda x: x if x and x["node"] not in (None, a.name)
                                and x["endpoint"] and x["state"] == "attached" else None)(
                                    show_or_none(site, b, "qm")), 60,
                       "the volume attached on another node")
        t_moved = time.monotonic() - t0
        assert w["node"] == new.name and w["epoch"] > epoch, w
        assert "quorum: 2 of 3 voters answered" in log, log[-3000:]
        # The dead node's replica is given a short try only (EngineConfig.down).
        waited = re.search(r"replicas answered in ([0-9.]+) s", log)
        assert waited and "on nodes known down" in log, log[-3000:]
        assert volume_sum(w["endpoint"]) == before
        # Writes go on (two of three in sync); after the wait a's replica moves to d.
        after = write_pattern(w["endpoint"], seed=9)
        wait_until(lambda: site.healthy_on(new, "qm", {b.name, c.name, d.name}), 60,
                   "healthy with a's replica replaced")
        assert volume_sum(site.show(new, "qm")["endpoint"]) == after
        print(f"node with a member died: the engine on {new.name} started by the quorum "
              f"path {t_started:.1f} s after the kill (its replicas answered in "
              f"{waited.group(1)} s), attached as shown after {t_moved:.1f} s")
    finally:
        site.revive(a)
    wait_until(lambda: site.states(b)[a.name] == "up", 20, f"{a.name} up again")
    detach_and_remove(site, b, "qm")


def nbd_blocks(uri: str, acked: dict[int, str], seed: str, count: int) -> None:
    """Write `count` 4 KiB blocks (offsets 0, 64 KiB, ...), flush; record what each holds."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for i in range(count):
            data = hashlib.sha512(f"{seed}-{i}".encode()).digest() * 64
            h.pwrite(data, i * 65536)
            acked[i * 65536] = hashlib.sha256(data).hexdigest()
        h.flush()
    finally:
        h.shutdown()


def nbd_sums(uri: str, offsets: list[int]) -> dict[int, str]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return {off: hashlib.sha256(h.pread(4096, off)).hexdigest() for off in offsets}
    finally:
        h.shutdown()


def test_two_of_three_replicas_silent_writes_fail_until_one_returns(site: Site) -> None:
    """The commit quorum on a running engine: 2 of the 3 replicas stop answering. Stopped
    (SIGSTOP), not killed or cut off: their nodes stay up, so no node daemon restarts them,
    no lease expires and no etcd member is lost (two of the three members' hosts cut off
    would stop the control plane and make every node fence itself); the engine sees what a
    cut link shows it — replicas that accept connections and never answer. A write then
    fails with EIO within the replica timeout (it reached one replica: never acknowledged),
    reads go on, the engine reports the quorum lost; one replica back is resynced (the
    engine's node daemon asks for it) and writes resume; every acknowledged block reads
    back the same, and once all are back the replicas agree (`volume verify`)."""
    a, b, c, d = site.hosts
    assert site.create_avoiding(a, "qs", 3, [d]) == {a.name, b.name, c.name}
    site.cli(a, "volume", "attach", "qs", "--frontend", "none")
    v = site.show(a, "qs")
    uri = v["endpoint"]
    control = Home(a.home).control_socket("qs")
    acked: dict[int, str] = {}
    nbd_blocks(uri, acked, "all", 16)
    silent = [psutil.Process(r["pid"]) for r in v["replicas"] if r["node"] in (b.name, c.name)]
    assert len(silent) == 2, v["replicas"]
    for p in silent:
        p.suspend()
    try:
        t0 = time.monotonic()
        code = ("import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
                "h.pwrite(b'M' * 4096, 4096); h.flush(); print('written')")
        res = subprocess.run([sys.executable, "-c", code, uri], capture_output=True,
                             text=True, timeout=90)
        t_failed = time.monotonic() - t0
        assert "written" not in res.stdout and "Input/output error" in res.stderr, res
        status = engine_status(control)
        assert status["quorum"] == {"in_sync": 1, "majority": 2, "writable": False}, status
        assert nbd_sums(uri, sorted(acked)) == acked      # reads go on (a's replica)
        # One back: the engine's node daemon asks for its resync; writes resume.
        silent[0].resume()
        wait_until(lambda: engine_status(control)["quorum"]["writable"], 60,
                   "writes allowed again after one replica's resync")
        t_back = time.monotonic() - t0
        nbd_blocks(uri, acked, "two", 16)
        assert nbd_sums(uri, sorted(acked)) == acked
    finally:
        for p in silent:
            with contextlib.suppress(psutil.Error):
                p.resume()
    wait_until(lambda: site.healthy_on(a, "qs", {a.name, b.name, c.name}), 60,
               "healthy with every replica back")
    assert nbd_sums(uri, sorted(acked)) == acked
    verify = site.cli(a, "volume", "verify", "qs", check=False)   # the replicas agree
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"2 of 3 replicas silent: a write failed with EIO after {t_failed:.1f} s; writes "
          f"resumed {t_back - t_failed:.1f} s after one came back")
    detach_and_remove(site, a, "qs")
