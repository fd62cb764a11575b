"""Tier 5: the fault cases of `node drain`'s replica move (manager/leader.py `start_move`,
manager/moves.py, engine/migrate.py; docs/DURABILITY.md, "Moving a replica"), on four
namespace hosts with their node daemons on etcd (tests/support/cluster_site.py), under
writes, each ending with every acknowledged write read back and `volume verify`:

- the move's target node dies mid-copy: the leader asks for the move to be given up, the
  engine drops its connection to the target (no socket left to the dead address, writes go
  on), the engine's node then gives the move up (the replica RW at the old directory), the
  volume stays healthy on its old replicas at every look, the drain fails saying the move
  was given up, and a second drain moves the replica to another node;
- the target node dies after the engine's swap, before the engine's node finished the move
  in the store (the window held open by BLOCKHORN_TEST_MOVE_FINISH_DELAY_S on that node's
  daemon), twice (test 2's docstring): with the engine killed too (the restarted engine
  resyncs the old directory, never trusting it; only then is the move given up), and with
  the other replica stopped, so that the target holds the only current copy: the move is
  finished on the down node instead of given up, and its directory survives the node's
  return (the leader used to give such a move up, and the node then removed the directory);
- the engine node's daemon killed (SIGKILL) mid-copy and started again within its lease:
  the migration goes on in the engine, the new daemon finishes the move, the old replica's
  process and directory go, one process per replica is left;
- a detached 1-replica volume drained: copied through a maintenance attach, every block
  read back after the next attach (moved at once, as before, it lost them all);
- a drain of a dead node: its replica replaced at once and rebuilt from the other one.

The cluster is module-scoped and the tests run in this order (each uses the hosts the one
before left up).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbd
import psutil
import pytest
from conftest import needs_root
from support.cluster_site import BLOCK, WRITE_SPAN, Host, Site, Writer, module_site, wait_until

from blockhorn import liveness
from blockhorn.config import REPLICA_TIMEOUT_S
from blockhorn.engine.control import ControlClient
from blockhorn.manager.paths import Home

pytestmark = needs_root()

MiB = 1 << 20
SLOW_COPY = "1"          # MiB/s: the rebuild bandwidth limit while a move must be caught
# Seconds the engine's node of test 2 waits between swap and finish (ended early once the
# leader asked for the move to be given up: the window the test holds open for it).
FINISH_DELAY_S = 30.0
# Seconds: the node leases. Longer than the site's default 4 s: test 3 restarts a daemon,
# which must renew its node's lease before the node's dead man's switch fences it (5.5 s
# after the last renewal, instead of 3.7 s).
NODE_TTL_S = 6


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with module_site("bhm", 4, node_ttl_s=NODE_TTL_S) as s:
        yield s


class Drain(threading.Thread):
    """`node drain NODE` asked of `asker`, in the background."""

    def __init__(self, site: Site, asker: Host, node: str) -> None:
        super().__init__(daemon=True)
        self.site, self.asker, self.node = site, asker, node
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self) -> None:
        self.result = self.site.cli(self.asker, "node", "drain", self.node, check=False,
                                    timeout=120)

    def outcome(self, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        self.join(timeout)
        assert self.result is not None, f"the drain of {self.node} did not end in {timeout} s"
        return self.result


def engine_status(h: Host, volume: str) -> dict[str, Any]:
    return dict(ControlClient(Home(h.home).control_socket(volume)).call({"op": "status"}))


def migration(st: dict[str, Any], replica: str) -> dict[str, Any]:
    r = next(x for x in st["replicas"] if x["name"] == replica)
    return dict(r.get("migration") or {})


def copying_for(st: dict[str, Any], replica: str) -> float:
    """Seconds the replica's migration has been copying (its progress counts only at the
    end of a copy this small: every chunk fits the copy window), or -1."""
    m = migration(st, replica)
    began = m.get("started_copy")
    return time.time() - began if m.get("state") == "running" and began else -1.0


def prefill(w: Writer, uri: str) -> None:
    """Write the writer's whole span (so the move has WRITE_SPAN bytes to copy) and count
    it as acknowledged."""
    rnd = random.Random(11)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for off in range(0, WRITE_SPAN, MiB):
            data = rnd.randbytes(MiB)
            h.pwrite(data, off)
            for b in range(0, MiB, BLOCK):
                w.acked[off + b] = data[b:b + BLOCK]
        h.flush()
    finally:
        h.shutdown()


def writing(site: Site, h: Host, volume: str, what: str) -> tuple[str, Writer]:
    """Attach `volume` on `h` (no device), prefill it and start writing: (NBD URI, writer)
    once 50 writes were acknowledged."""
    site.cli(h, "volume", "attach", volume, "--frontend", "none")
    uri = site.show(h, volume)["endpoint"]
    w = Writer(uri)
    prefill(w, uri)
    w.start()
    wait_until(lambda: w.count >= 50 or w.error, 20, f"writes before {what}")
    return uri, w


def sockets_to(pid: int, address: str) -> int:
    """How many descriptors of process `pid` (the engine's keeper) and its children (nbdkit,
    the engine) are TCP sockets connected to `address` (ip:port), read in their network
    namespace."""
    ip, port = address.rsplit(":", 1)
    host = int.from_bytes(bytes(int(x) for x in ip.split(".")), "little")
    want = f"{host:08X}:{int(port):04X}"
    inodes = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[2] == want:
                inodes.add(fields[9])
    n = 0
    for p in [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]:
        for fd in os.listdir(f"/proc/{p}/fd"):
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                n += 1
    return n


def replica_processes(site: Site, volume: str) -> list[tuple[str, int]]:
    """(host, pid) of every replica process of `volume` on any host."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "replica" in cmd and "serve" in cmd:
            cfg = cmd[cmd.index("--config") + 1] if "--config" in cmd else ""
            for h in site.hosts:
                if cfg.startswith(os.path.join(h.home, "volumes", volume) + "/"):
                    out.append((h.name, p.pid))
    return sorted(out)


class Stall:
    """The longest time the writer's count stood still, as seen by `look`."""

    def __init__(self, w: Writer) -> None:
        self.w, self.count, self.since, self.longest = w, w.count, time.monotonic(), 0.0

    def look(self) -> bool:
        now = time.monotonic()
        if self.w.count != self.count:
            self.count, self.since = self.w.count, now
        self.longest = max(self.longest, now - self.since)
        return True


class Looks:
    """What `volume show` (on the engine's node) says at each look during a move."""

    def __init__(self, site: Site, h: Host, volume: str) -> None:
        self.site, self.h, self.volume = site, h, volume
        self.seen: list[tuple[str, int, str | None]] = []

    def look(self) -> dict[str, Any]:
        v = self.site.show(self.h, self.volume)
        moving = next((r["moving"]["node"] for r in v["replicas"] if r["moving"]), None)
        self.seen.append((v["robustness"], sum(r["mode"] == "RW" for r in v["replicas"]),
                          moving))
        return v


def test_target_dies_mid_copy_move_given_up_then_drained_elsewhere(site: Site) -> None:
    a, b, c, d = site.hosts
    vol = "mv1"
    assert site.create_avoiding(a, vol, 2, [c, d]) == {a.name, b.name}
    # The target: d, not an etcd member (c is): with the site's short leases, an etcd
    # election could outlast a node's lease renewal and fence it (a real TTL is 15 s).
    site.cli(a, "node", "update", c.name, "--schedulable", "no")
    site.cli(a, "volume", "attach", vol, "--frontend", "none")
    uri = site.show(a, vol)["endpoint"]
    w = Writer(uri)
    prefill(w, uri)
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", SLOW_COPY)
    w.start()
    wait_until(lambda: w.count >= 50 or w.error, 20, "writes before the drain")
    looks = Looks(site, a, vol)
    replica = next(r["name"] for r in site.show(a, vol)["replicas"] if r["node"] == b.name)
    t0 = time.monotonic()
    drain = Drain(site, a, b.name)
    drain.start()
    wait_until(lambda: copying_for(engine_status(a, vol), replica) >= 1.0, 30,
               "the migration copying for a second")
    v = looks.look()
    target = next(r["moving"] for r in v["replicas"] if r["name"] == replica)
    assert target["node"] == d.name and target["migration"]["state"] == "running", target
    engine_pid = v["engine"]["pid"]
    assert sockets_to(engine_pid, target["address"]) == 1
    t_kill = time.monotonic()
    print(f"migration copying after {t_kill - t0:.1f} s: killing {d.name}, the target")
    site.kill(d)
    stall = Stall(w)
    while drain.is_alive() and time.monotonic() - t_kill < 60:
        looks.look()
        stall.look()
        drain.join(0.3)
    got = drain.outcome(5)
    t_given_up = time.monotonic() - t_kill
    print(f"drain ended {t_given_up:.1f} s after the kill: exit {got.returncode}: "
          f"{got.stderr.strip()}")
    assert got.returncode != 0 and f"was given up (node {d.name} is down)" in got.stderr, got
    assert f"blockhorn volume show {vol}" in got.stderr
    message = site.show(a, vol)["message"]
    assert f"its move to node {d.name} was given up (the node is down)" in message, message
    # The volume never ran short: its old replicas RW at every look.
    looks.look()
    assert all(s[:2] == ("healthy", 2) for s in looks.seen), looks.seen
    assert looks.seen[-1][2] is None and site.nodes_of(a, vol) == {a.name, b.name}
    # The engine dropped the target: the migration failed, no socket to the dead address
    # is left, and the writes go on.
    wait_until(lambda: stall.look() and migration(engine_status(a, vol), replica)["state"]
               == "failed", 20, "the engine dropping the migration")
    t_dropped = time.monotonic() - t_kill
    wait_until(lambda: sockets_to(engine_pid, target["address"]) == 0, 15,
               "the engine closing its connection to the dead target")
    n = w.count
    wait_until(lambda: stall.look() and (w.count >= n + 50 or w.error), 15,
               "writes after the move was given up")
    print(f"the engine dropped the target {t_dropped:.1f} s after the kill; the longest "
          f"pause of the writes: {stall.longest:.1f} s")
    # Writes wait for a dead target as for any replica (the replica timeout), no longer: a
    # sender blocked on the dead socket no longer holds them (engine/client.py close).
    assert stall.longest < REPLICA_TIMEOUT_S + 2, stall.longest
    # Drained again with c schedulable: the replica goes there.
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", "0")
    site.cli(a, "node", "update", c.name, "--schedulable", "yes")
    t1 = time.monotonic()
    again = site.cli(a, "node", "drain", b.name, check=False, timeout=120)
    print(f"second drain: {time.monotonic() - t1:.1f} s: {again.stdout.strip()}")
    assert again.returncode == 0 and f"moved to {c.name}" in again.stdout, again
    w.finish()
    assert site.healthy_on(a, vol, {a.name, c.name})
    wait_until(lambda: [h for h, _ in replica_processes(site, vol)] == sorted([a.name, c.name]),
               15, f"{b.name} stopping the old replica process")
    bad = w.check(site.show(a, vol)["endpoint"])
    assert bad == 0, f"{bad} of {len(w.acked)} acknowledged blocks read back different"
    verify = site.cli(a, "volume", "verify", vol, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"{w.count} writes, {len(w.acked)} blocks read back the same; verify clean")
    site.cli(a, "volume", "detach", vol)
    site.cli(a, "volume", "rm", vol)
    site.cli(a, "node", "update", b.name, "--schedulable", "yes")


def test_target_dies_after_the_swap_finished_there_never_swept(site: Site) -> None:
    """Twice on one volume, the target's node (d) killed after the engine's swap and before
    the engine's node (b) finished the move in the store (FINISH_DELAY_S holds that open):
    1. with the engine killed too: the restarted engine reads the move from its config
       (migrate.resolve_at_start), the old directory Rebuilding and the target unreachable,
       so the replica counts as unreachable, never as a source; it starts from the other
       replica with its generation record and resyncs the old directory; only then does b
       give the move up (the leader only asked: it cannot see whether the engine swapped);
    2. into the same target directory again, with the other replica stopped (SIGSTOP) after
       the swap, so that the target holds the only current copy when d dies: the leader
       asks for the move to be given up, but b sees the swap and finishes the move instead
       (the row points at d's directory: a replica on a down node). The old behaviour gave
       the move up, made the target directory a leftover of d and removed it when d came
       back: every write acknowledged after the other replica stopped was lost. Now d comes
       back with the directory, the engine restarted starts from it and every acknowledged
       write reads back."""
    a, b, c, d = site.hosts
    vol = "mv2"
    # b, the engine's node, finishes a move only FINISH_DELAY_S after it saw the swap: the
    # target's node (d, killed by the test before, back) dies inside that window.
    assert b.proc is not None
    b.proc.kill()
    b.proc.wait(10)
    b.env["BLOCKHORN_TEST_MOVE_FINISH_DELAY_S"] = str(FINISH_DELAY_S)
    site.start(b)
    site.revive(d)
    wait_until(lambda: site.states(a)[d.name] == "up", 30, f"{d.name} up again")
    # The directory of the move given up while d was down (a leftover): d removes it.
    wait_until(lambda: not os.path.exists(os.path.join(d.disk, "replicas", "mv1")), 15,
               f"{d.name} removing the target directory of the move given up")
    assert site.create_avoiding(b, vol, 2, [c, d]) == {a.name, b.name}
    site.cli(b, "node", "update", c.name, "--schedulable", "no")   # the target: d
    uri, w = writing(site, b, vol, "the drain")
    v = site.show(b, vol)
    old = next(r for r in v["replicas"] if r["node"] == a.name)
    other = next(r for r in v["replicas"] if r["node"] == b.name)
    engine_pid = v["engine"]["pid"]
    t0 = time.monotonic()
    drain = Drain(site, c, a.name)
    drain.start()

    def swapped() -> dict[str, Any] | None:
        r = next(x for x in engine_status(b, vol)["replicas"] if x["name"] == old["name"])
        return r if r["path"] != old["path"] else None
    now = wait_until(swapped, 30, "the engine's swap")
    target = next(r["moving"] for r in site.show(b, vol)["replicas"] if r["moving"])
    assert now["path"] == target["path"] and target["node"] == d.name
    # Writes acknowledged after the swap: on the target and the other replica only.
    n = w.count
    wait_until(lambda: w.count >= n + 30 or w.error, 10, "writes after the swap")
    w.finish()   # none in flight when the engine dies: each was acknowledged or not sent
    t_kill = time.monotonic()
    site.kill(d)
    os.kill(engine_pid, 9)
    print(f"swapped after {t_kill - t0:.1f} s, {w.count - n} writes acknowledged since: "
          f"killed {d.name} (the target) and the engine")
    got = drain.outcome(60)
    assert got.returncode != 0 and f"was given up (node {d.name} is down)" in got.stderr, got

    def restarted() -> str | None:
        v = site.show(b, vol)
        pid = v["engine"]["pid"]
        return v["endpoint"] if pid not in (None, engine_pid) and v["endpoint"] else None
    uri = wait_until(restarted, 30, "the engine restarted")
    t_up = time.monotonic() - t_kill
    log = os.path.join(b.home, "logs", f"{vol}-engine.log")
    wait_until(lambda: f"{old['name']}: the old directory was swapped out for"
               in open(log).read(), 20, "the restarted engine resolving the move")
    w2 = Writer(uri)
    w2.acked = dict(w.acked)
    w2.start()
    wait_until(lambda: site.healthy_on(b, vol, {a.name, b.name}), 60,
               "healthy on the old replicas again")
    t_healthy = time.monotonic() - t_kill
    v = site.show(b, vol)
    back = next(r for r in v["replicas"] if r["name"] == old["name"])
    assert back["path"] == old["path"] and back["moving"] is None, back
    assert f"its move to node {d.name} was given up (the node is down)" in v["message"], v
    st = next(x for x in engine_status(b, vol)["replicas"] if x["name"] == old["name"])
    assert st["path"] == old["path"] and st["rebuild"]["mode"] == "full", st
    assert [h for h, _ in replica_processes(site, vol)] == sorted([a.name, b.name])
    wait_until(lambda: w2.count >= 50 or w2.error, 20, "writes after the restart")
    print(f"the engine up again {t_up:.1f} s after the kills, the volume healthy on the old "
          f"directory {t_healthy:.1f} s after (resynced in full), the move given up then")

    # 2. The target holds the only current copy when its node dies.
    site.revive(d)
    wait_until(lambda: site.states(a)[d.name] == "up", 30, f"{d.name} up again")
    v = site.show(b, vol)
    engine_pid = v["engine"]["pid"]
    other_pid = next(r for r in v["replicas"] if r["name"] == other["name"])["pid"]
    drain = Drain(site, c, a.name)
    drain.start()
    wait_until(swapped, 30, "the engine's second swap")
    t_swap = time.monotonic()
    assert next(r["moving"] for r in site.show(b, vol)["replicas"]
                if r["moving"])["path"] == target["path"]    # the same directory again
    os.kill(other_pid, signal.SIGSTOP)
    try:
        def other_failed() -> bool:
            st = engine_status(b, vol)
            return next(x for x in st["replicas"] if x["name"] == other["name"])["mode"] \
                == "ERR"
        wait_until(other_failed, REPLICA_TIMEOUT_S + 10, "the engine failing the stopped "
                   "replica")
        n = w2.count
        wait_until(lambda: w2.count >= n + 30 or w2.error, 10, "writes on the target alone")
        w2.finish()
        st = engine_status(b, vol)
        modes = {x["path"]: x["mode"] for x in st["replicas"]}
        assert modes == {target["path"]: "RW", other["path"]: "ERR"}, modes
        t_kill = time.monotonic()
        site.kill(d)
        print(f"{t_kill - t_swap:.1f} s after the swap, {w2.count - n} writes acknowledged "
              f"by the target alone: killed {d.name}")
        # The leader asks for the move to be given up (the old leader gave it up here), which
        # ends b's finish delay; b, seeing the swap, finishes the move instead: the replica
        # is d's, on a down node. Finished before the delay ran out: only the ask ends it.
        got = drain.outcome(FINISH_DELAY_S + 30)
        assert time.monotonic() - t_swap < FINISH_DELAY_S, "finished without the ask"
        t_done = time.monotonic() - t_kill
        assert got.returncode == 0 and f"moved to {d.name}" in got.stdout, got
        v = site.show(b, vol)
        row = next(r for r in v["replicas"] if r["name"] == old["name"])
        assert (row["node"], row["path"], row["moving"]) == (d.name, target["path"], None), row
        # As the drain reported it (the volume's message is replaced by later events: the
        # engine failing the replica on the dead node, say).
        assert f"node {d.name} is down (it died after the engine's swap)" in got.stdout, got
        print(f"the move finished on the down node {t_done:.1f} s after the kill")
        site.revive(d)
        wait_until(lambda: site.states(a)[d.name] == "up", 30, f"{d.name} up again")
        wait_until(lambda: d.name in [h for h, _ in replica_processes(site, vol)], 20,
                   f"{d.name} starting the replica again")
    finally:
        os.kill(other_pid, signal.SIGCONT)
    # d's daemon swept its leftovers meanwhile: the directory is the replica's, kept.
    assert os.path.exists(os.path.join(target["path"], "volume.meta")), target
    # The running engine lost every replica in sync: restarted, it starts from the target
    # (the newest in-sync set is the target alone) and resyncs the other one.
    os.kill(engine_pid, 9)
    uri = wait_until(restarted, 30, "the engine restarted")
    wait_until(lambda: site.healthy_on(b, vol, {b.name, d.name}), 60,
               f"healthy on {b.name} and {d.name}")
    t_healthy = time.monotonic() - t_kill
    assert os.path.exists(target["path"])
    wait_until(lambda: not os.path.exists(old["path"]), 15, f"{a.name} removing {old['path']}")
    bad = w2.check(uri)
    assert bad == 0, f"{bad} of {len(w2.acked)} acknowledged blocks read back different"
    verify = site.cli(b, "volume", "verify", vol, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"healthy on {b.name} and {d.name} {t_healthy:.1f} s after the kill; "
          f"{w.count + w2.count} writes, {len(w2.acked)} blocks read back the same; verify "
          "clean")
    site.cli(b, "volume", "detach", vol)
    site.cli(b, "volume", "rm", vol)
    site.cli(b, "node", "update", a.name, "--schedulable", "yes")
    site.cli(b, "node", "update", c.name, "--schedulable", "yes")


def test_engine_node_daemon_killed_mid_move_resumed(site: Site) -> None:
    a, b, c, d = site.hosts   # d is down (killed by the test before)
    vol = "mv3"
    assert site.create_avoiding(a, vol, 2, [c]) == {a.name, b.name}
    site.cli(a, "volume", "attach", vol, "--frontend", "none")
    uri = site.show(a, vol)["endpoint"]
    w = Writer(uri)
    prefill(w, uri)
    # 2 MiB/s: the kill comes 1 s into a 4 s copy (the restart may outlast the copy: the new
    # daemon finishes the move either way).
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", "2")
    w.start()
    wait_until(lambda: w.count >= 50 or w.error, 20, "writes before the drain")
    v = site.show(a, vol)
    engine_pid = v["engine"]["pid"]
    old = next(r for r in v["replicas"] if r["node"] == b.name)
    drain = Drain(site, c, b.name)
    drain.start()
    wait_until(lambda: copying_for(engine_status(a, vol), old["name"]) >= 1.0, 30,
               "the migration copying for a second")
    # The engine's node's daemon killed and started again before its dead man's switch
    # would fence the node (the lease's TTL less a margin: blockhorn/liveness.py): the
    # engine runs on, the new daemon adopts it and finishes the move.
    assert a.proc is not None
    beat = liveness.beat_path(a.home)
    before = liveness.last_beat(beat)
    wait_until(lambda: liveness.last_beat(beat) != before, 10, f"a lease renewal of {a.name}")
    t_kill = time.monotonic()
    a.proc.kill()
    a.proc.wait(10)
    site.start(a)
    restart = time.monotonic() - t_kill
    budget = liveness.self_fence_after(NODE_TTL_S)
    print(f"the daemon of {a.name} killed and started again in {restart:.1f} s, mid-copy "
          f"(its switch fences {budget:.1f} s after the last renewal)")
    assert restart < budget, "the daemon started too slowly: its node fenced itself"
    got = drain.outcome(60)
    t_moved = time.monotonic() - t_kill
    assert got.returncode == 0 and f"moved to {c.name}" in got.stdout, got
    site.cli(a, "setting", "set", "replica-rebuilding-bandwidth-limit", "0")
    assert site.show(a, vol)["engine"]["pid"] == engine_pid   # adopted, not fenced
    wait_until(lambda: site.healthy_on(a, vol, {a.name, c.name}), 30, "healthy on a and c")
    st = next(x for x in engine_status(a, vol)["replicas"] if x["name"] == old["name"])
    assert st["path"].startswith(c.disk + "/") and st["migration"]["state"] == "done", st
    # One process per replica is left: b's old one stopped, its directory removed.
    wait_until(lambda: [h for h, _ in replica_processes(site, vol)] == sorted([a.name, c.name]),
               15, f"{b.name} stopping the old replica process")
    wait_until(lambda: not os.path.exists(old["path"]), 15, f"{b.name} removing {old['path']}")
    w.finish()
    bad = w.check(site.show(a, vol)["endpoint"])
    assert bad == 0, f"{bad} of {len(w.acked)} acknowledged blocks read back different"
    verify = site.cli(a, "volume", "verify", vol, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"moved {t_moved:.1f} s after the kill; {w.count} writes, {len(w.acked)} blocks "
          "read back the same; verify clean")
    site.cli(a, "volume", "detach", vol)
    site.cli(a, "volume", "rm", vol)


def test_detached_volume_drained_with_its_data(site: Site) -> None:
    """A detached volume's replica is copied before its node is emptied: the drain attaches
    the volume on the node asked for the move (a maintenance attach). Its only replica is
    the one drained, so the old way (the replica pointed at once at an empty directory on
    the new node, the old one removed as a leftover) lost every block; the engine refusing
    to start, or no room, would have failed the drain and changed nothing."""
    a, b, c, d = site.hosts   # d is down when run after test 2
    vol = "mv4"
    site.cli(a, "node", "update", b.name, "--schedulable", "yes")   # drained by test 3
    assert site.create_avoiding(a, vol, 1, [a, c, d]) == {b.name}
    site.cli(a, "volume", "attach", vol, "--frontend", "none")
    uri = site.show(a, vol)["endpoint"]
    w = Writer(uri)
    prefill(w, uri)
    site.cli(a, "volume", "detach", vol)
    (old,) = site.show(a, vol)["replicas"]
    t0 = time.monotonic()
    got = site.cli(c, "node", "drain", b.name, check=False, timeout=60)
    took = time.monotonic() - t0
    assert got.returncode == 0, got.stdout + got.stderr
    v = site.show(a, vol)
    (new,) = v["replicas"]
    assert new["node"] in {a.name, c.name} and new["path"] != old["path"], new
    assert v["state"] == "detached" and f"moved from node {b.name}" in (v["message"] or ""), v
    wait_until(lambda: not os.path.exists(old["path"]), 15, f"{b.name} removing {old['path']}")
    wait_until(lambda: not replica_processes(site, vol), 30, "the replica processes stopped")
    site.cli(a, "volume", "attach", vol, "--frontend", "none")
    bad = w.check(site.show(a, vol)["endpoint"])
    assert bad == 0, f"{bad} of {len(w.acked)} acknowledged blocks read back different"
    print(f"detached 1-replica volume drained from {b.name} to {new['node']} in {took:.1f} s; "
          f"{len(w.acked)} blocks read back the same after the attach")
    site.cli(a, "volume", "detach", vol)
    site.cli(a, "volume", "rm", vol)
    site.cli(a, "node", "update", b.name, "--schedulable", "yes")


def test_drain_of_a_dead_node_replaces_its_replica_at_once(site: Site) -> None:
    """A drain of a node that died: its replica of an attached volume cannot be copied, so it
    is replaced as the leader replaces a dead node's (pointed at a new node, rebuilt by the
    running engine from the other replica), without the replenishment wait (600 s here).
    Before, the drain began a move that waited for the dead replica to be in sync: 300 s,
    then it failed."""
    a, b, c, d = site.hosts
    vol = "mv5"
    for h in (b, d):
        site.cli(a, "node", "update", h.name, "--schedulable", "yes")
    assert site.create_avoiding(a, vol, 2, [a, b]) == {c.name, d.name}
    uri, w = writing(site, a, vol, "the kill")
    site.kill(d)   # not an etcd member
    t_kill = time.monotonic()
    try:
        wait_until(lambda: site.states(a)[d.name] == "down", 30, f"{d.name} down")
        got = site.cli(a, "node", "drain", d.name, check=False, timeout=60)
        t_drained = time.monotonic() - t_kill
        assert got.returncode == 0, got.stdout + got.stderr
        v = site.show(a, vol)
        new = {r["node"] for r in v["replicas"]}
        assert d.name not in new and c.name in new, v["replicas"]
        assert f"its node {d.name} is down; replaced on" in (v["message"] or ""), v
        wait_until(lambda: site.healthy_on(a, vol, new), 60, "healthy on the new nodes")
        t_healthy = time.monotonic() - t_kill
        w.finish()
        bad = w.check(uri)
        assert bad == 0, f"{bad} of {len(w.acked)} acknowledged blocks read back different"
        verify = site.cli(a, "volume", "verify", vol, check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        w.finish()
        site.revive(d)
    # Back, d removes its old directory: the replica is another node's now.
    wait_until(lambda: site.states(a)[d.name] == "up", 30, f"{d.name} up again")
    wait_until(lambda: not os.path.exists(os.path.join(d.disk, "replicas", vol)), 20,
               f"{d.name} removing its old directory of {vol}")
    print(f"dead node drained {t_drained:.1f} s after the kill, healthy on "
          f"{', '.join(sorted(new))} {t_healthy:.1f} s after; {w.count} writes, "
          f"{len(w.acked)} blocks read back the same; verify clean")
    site.cli(a, "volume", "detach", vol)
    site.cli(a, "volume", "rm", vol)
    site.cli(a, "node", "update", d.name, "--schedulable", "yes")
