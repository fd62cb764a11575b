"""Tier 5: an RWX volume's NFS share moves to another host when its host dies
(tests/support/cluster_site.py: four namespace hosts with node daemons, a three-member etcd).

The share is attached on the fourth host (no etcd member, no replica: the generation rule lets
a new engine start from the replicas on the live hosts), with a service address on the hosts'
`eth0`. Files are written over NFSv4 (libnfs `nfs-cp`, from the root namespace on the bridge)
until the node daemon has copied Ganesha's client records into etcd; then every process of the
host is killed and its link taken down. The leader moves the attachment as soon as the host's
lease is gone (no replenishment wait for a share); the new host restores the client records
before Ganesha starts and adds the service address. Measured: the time until the service
address accepts NFS connections again, and until a file reads back (after Ganesha's grace
period, which the dead clients' records keep running to its end). Every file reads back with
the checksum it was written with; when the dead host comes back, its daemon removes the
service address it still carried.

Then the share's host only cut off (link down, processes running): its daemon fences itself
before its lease expires — share manager, Ganesha and engine killed, the service address
removed, then the volume's mounts and loop device released — before another host serves the
share; the files read back the same. Only the host's node daemon killed: its dead man's
switch does the same. The daemon and its switch both killed: the share manager stops Ganesha
and drops the address itself at the same deadline.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from conftest import needs_root
from netns_util import addresses, set_link
from support.cluster_site import NODE_TTL_S, Host, Site, cluster_site, netns_pids, wait_until

from blockhorn.cluster.etcd import Etcd
from blockhorn.liveness import self_fence_after
from blockhorn.manager.process import accepts
from blockhorn.nbd.attach import IMAGE_NAMES, loops_on

pytestmark = needs_root()

CHUNK = 1800     # bytes; the largest file nfs-cp (libnfs, NFSv4) writes in one call
FILES = 6
GRACE_S = 5      # seconds; the share's NFSv4 grace period (the default is 15): short, still waited out
MOVE_TIMEOUT_S = 60.0   # seconds from the kill until a file must read back


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    missing = [c for c in ("etcd", "ganesha.nfsd", "nfs-cp", "nfs-cat") if not shutil.which(c)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    root = os.path.join("/tmp", f"bhs{os.getpid()}")   # short: sockets live under the homes
    try:
        with cluster_site(root, 4) as s:
            yield s
    finally:
        if not os.environ.get("BLOCKHORN_KEEP_SITE"):
            shutil.rmtree(root, ignore_errors=True)


def nfs(*argv: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=15)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(list(argv), 124, b"", str(e).encode())


def share_on(site: Site, volume: str, host: Host, last_octet: int,
             grace_s: int | None = None, interface: str = "eth0", replicas: int = 2,
             avoid: Host | None = None) -> tuple[str, int]:
    """Create RWX `volume` (`replicas`, none on `avoid`, by default `host`; `grace_s` None:
    the default grace period) with a service address on the hosts' eth0 (named `interface`:
    a name the hosts lack makes each pick eth0 by its subnet) and attach it on `host`;
    (service address, NFS port)."""
    a = site.hosts[0]
    subnet = a.ip.rsplit(".", 1)[0]
    service = f"{subnet}.{last_octet}"
    avoid = avoid or host
    site.cli(a, "node", "update", avoid.name, "--schedulable", "no")
    site.cli(a, "volume", "create", volume, "--size", "32MiB", "--replicas", str(replicas),
             "--access",
             "rwx", "--nfs-client", f"{subnet}.0/24",
             *(["--grace", str(grace_s)] if grace_s else []),
             "--nfs-minor-versions", "0,1,2",   # libnfs speaks NFSv4.0 only
             "--mkfs-options", "-E root_owner=1000:1000",   # the clients' user (root squashed)
             "--service-address", f"{service}/24", "--service-interface", interface)
    site.cli(a, "node", "update", avoid.name, "--schedulable", "yes")
    t0 = time.monotonic()
    site.cli(a, "volume", "attach", volume, "--node", host.name)
    v = site.show(a, volume)
    assert v["node"] == host.name and avoid.name not in {r["node"] for r in v["replicas"]}, v
    assert service in addresses(host.name)
    print(f"{volume} attached on {host.name}, serving at {service}:{v['share']['port']} after "
          f"{time.monotonic() - t0:.1f} s")
    return service, int(v["share"]["port"])


def url(service: str, port: int, volume: str, name: str) -> str:
    return f"nfs://{service}/{volume}/{name}?version=4&nfsport={port}&uid=1000&gid=1000"


def put_files(tmp: str, where: Callable[[str], str], count: int) -> dict[str, str]:
    """Write `count` files over NFS (nfs-cp); name -> sha256 of what each holds."""
    written: dict[str, str] = {}
    src = os.path.join(tmp, "src")
    for i in range(count):
        data = hashlib.sha512(f"file {i}".encode()).digest() * (CHUNK // 64)
        with open(src, "wb") as f:
            f.write(data)
        got = nfs("nfs-cp", src, where(f"f{i}"))
        assert got.returncode == 0, got.stderr
        written[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return written


def check_files(where: Callable[[str], str], written: dict[str, str]) -> None:
    for name, want in written.items():
        got = nfs("nfs-cat", where(name))
        assert got.returncode == 0, got.stderr
        assert hashlib.sha256(got.stdout).hexdigest() == want, name


def kill_and_measure(site: Site, volume: str, host: Host, service: str, port: int,
                     tmp: str, files: int = FILES) -> dict[str, float]:
    """Write `files` files over NFS to `volume` (served by `host`), wait until their clients'
    records are in etcd, kill `host` (every process, its link down) and measure, as a client
    sees it, seconds from the link going down until the service address accepts NFS again
    (`serving`) and until a file reads back (`readable`, after the grace period: libnfs's
    one-shot clients never reclaim); then read every file back (checksums)."""
    where = functools.partial(url, service, port, volume)
    written = put_files(tmp, where, files)
    # The clients' records (Ganesha's `fs` backend: one directory per client) reach etcd
    # (the daemon copies them each supervision pass) while their NFSv4 leases run: the next
    # host must let them reclaim.
    key = f"{site.prefix}share-records/{volume}"
    with Etcd(site.etcd) as etcd:
        def stored() -> int:
            kv = etcd.get(key)
            return 0 if kv is None else sum(p.startswith("v4recov/") and "Libnfs" in p
                                            for p in json.loads(kv.value)["dirs"])
        wait_until(stored, 10, "the NFS client records in etcd")

    # The client's view, timed from the link going down in a thread of its own: the kill
    # itself waits for every process of the host to be gone (a FUSE mount's can take
    # seconds), and the share may be back meanwhile.
    times: dict[str, float] = {}

    def client() -> None:
        deadline = t0 + MOVE_TIMEOUT_S
        while not accepts(f"{service}:{port}") and time.monotonic() < deadline:
            time.sleep(0.1)
        times["serving"] = time.monotonic() - t0
        while nfs("nfs-cat", where("f0")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        times["readable"] = time.monotonic() - t0

    set_link(host.name, False)
    t0 = time.monotonic()
    watcher = threading.Thread(target=client, daemon=True)
    watcher.start()
    site.kill(host)
    watcher.join(MOVE_TIMEOUT_S + 20)
    assert times.get("readable", MOVE_TIMEOUT_S) < MOVE_TIMEOUT_S, times
    node = site.show(site.hosts[0], volume)["node"]
    assert node != host.name and service in addresses(node)
    check_files(where, written)
    return times


def test_share_moves_with_its_address_when_its_host_dies(site: Site,
                                                         tmp_path: object) -> None:
    a, b, c, d = site.hosts
    service, port = share_on(site, "sh", d, 200, GRACE_S)
    t = kill_and_measure(site, "sh", d, service, port, str(tmp_path))
    print(f"{d.name} killed: served again after {t['serving']:.1f} s; the first file read "
          f"back after {t['readable']:.1f} s (grace {GRACE_S} s); every file the same")
    # `share show` asked of any node answers for the serving one (forwarded there).
    node = site.show(a, "sh")["node"]
    asker = next(h for h in (a, b, c) if h.name != node)
    share = site.json(asker, "share", "show", "sh")
    assert share["health"] == "healthy" and share["endpoint"] == f"nfs://{service}:{port}/sh", \
        share
    # The dead host comes back: its daemon kills nothing (all died with it) but removes the
    # service address its interface still carried, before clients could be sent there.
    site.revive(d)
    wait_until(lambda: service not in addresses(d.name), 20,
               f"{d.name} dropping the service address")
    site.cli(a, "volume", "detach", "sh")
    site.cli(a, "volume", "rm", "sh")


def test_share_host_holding_a_replica_moves_by_the_quorum(site: Site,
                                                          tmp_path: object) -> None:
    """Three replicas, one on the share's host: the commit quorum lets the two others start
    the engine on another host at once (docs/DURABILITY.md, "The commit quorum")."""
    a, b, c, d = site.hosts
    service, port = share_on(site, "sq", d, 203, GRACE_S, replicas=3, avoid=c)
    assert d.name in site.nodes_of(a, "sq")
    t = kill_and_measure(site, "sq", d, service, port, str(tmp_path), files=3)
    new = site.host(site.show(a, "sq")["node"])
    with open(os.path.join(new.home, "logs", "sq-engine.log")) as f:
        log = f.read()
    assert "quorum: 2 of 3 voters answered" in log, log[-3000:]
    # The dead host's replica had a short try only (EngineConfig.down): the new engine does
    # not wait for a connection to the dead host to time out.
    waited = re.search(r"2 of 3 replicas answered in ([0-9.]+) s \(on nodes known down", log)
    assert waited, log[-3000:]
    print(f"{d.name} (holding a replica) killed: served again on {new.name} after "
          f"{t['serving']:.1f} s by the quorum path (its replicas answered in "
          f"{waited.group(1)} s); files read back after {t['readable']:.1f} s")
    site.revive(d)
    wait_until(lambda: service not in addresses(d.name), 20,
               f"{d.name} dropping the service address")
    site.cli(a, "volume", "detach", "sq")
    site.cli(a, "volume", "rm", "sq")


def share_processes(h: Host, volume: str) -> list[psutil.Process]:
    """The share manager and Ganesha of `volume` on host `h` (by their config paths)."""
    marks = {os.path.join(h.home, "volumes", volume, "share.json"),
             os.path.join(h.home, "volumes", volume, "share", "ganesha.conf")}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marks.intersection(p.info.get("cmdline") or []):
            found.append(p)
    return found


def held(h: Host, volume: str) -> list[str]:
    """What host `h` still holds of `volume`'s device: mounts of its export or FUSE mount in
    the mount namespaces of h's processes, loop devices on its FUSE file."""
    fuse_dir = os.path.join(h.home, "run", volume, "fuse")
    points = {os.path.join(h.home, "export", volume), fuse_dir}
    found: set[str] = set()
    for pid in netns_pids(h.name):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/mounts") as f:
            found |= {line.split()[1] for line in f if line.split()[1] in points}
    return sorted(found) + [loop for image in IMAGE_NAMES
                            for loop in loops_on(os.path.join(fuse_dir, image))]


def fenced_then_moved(site: Site, volume: str, host: Host, last_octet: int,
                      cut: Callable[[], None], tmp: str, within: float = 30.0,
                      released: bool = True, interface: str = "eth0"
                      ) -> tuple[str, str, dict[str, str]]:
    """`volume` served by `host` with two files written; `cut()` takes the host's daemon out
    of the cluster. The share's processes on `host` must be gone and its service address
    removed within `within` seconds and before another host serves it (with `released`, the
    volume's mounts and loop device on `host` soon after); then the files read back the
    same. Returns (a line with the times, the service address, the files written)."""
    service, port = share_on(site, volume, host, last_octet, GRACE_S, interface)
    where = functools.partial(url, service, port, volume)
    written = put_files(tmp, where, 2)
    procs = share_processes(host, volume)
    assert len(procs) == 2, procs   # the share manager and its Ganesha
    # Checked before the cut: the release can be done within the poll that sees the share's
    # processes gone (0.2 s after them), so a check after it could find nothing left.
    assert not released or held(host, volume), "nothing to release: the test would prove nothing"
    t0 = time.monotonic()
    cut()
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in procs) and service not in addresses(host.name),
               within, f"{host.name} fencing its share")
    fenced = time.monotonic() - t0
    said = f"its share fenced after {fenced:.1f} s, "
    if released:
        # What the share's device held there is let go of too (fence.py `release`): no ext4
        # mount, no FUSE mount, no loop device of the volume left on the fenced host.
        wait_until(lambda: not held(host, volume), 15,
                   f"{host.name} releasing {volume}'s device")
        said += f"its device released after {time.monotonic() - t0:.1f} s, "
    wait_until(lambda: accepts(f"{service}:{port}"), MOVE_TIMEOUT_S,
               "the share served from another host")
    serving = time.monotonic() - t0
    node = site.show(site.hosts[0], volume)["node"]
    assert node != host.name and service in addresses(node)
    assert fenced < serving
    wait_until(lambda: nfs("nfs-cat", where("f0")).returncode == 0, MOVE_TIMEOUT_S,
               "a file to read back over NFS")
    check_files(where, written)
    return (f"{said}{node} serves after {serving:.1f} s",
            service, written)


def test_partitioned_share_node_fences_its_share_and_address(site: Site,
                                                             tmp_path: object) -> None:
    """The share's host cut off (its link down, its processes running): its daemon kills
    the share manager, Ganesha and the engine and removes the service address before its
    lease expires; the share is then served from another host and reads the same."""
    a, b, c, d = site.hosts
    try:
        said, service, written = fenced_then_moved(site, "pf", d, 201,
                                                   lambda: set_link(d.name, False),
                                                   str(tmp_path))
        print(f"{d.name} cut off: {said}")
    finally:
        set_link(d.name, True)
    wait_until(lambda: site.states(a)[d.name] == "up", 20, f"{d.name} up again")
    assert service not in addresses(d.name)
    # Back on the node that fenced itself (which released the old device): attached there
    # again, the share is exported from the new device and the files read the same.
    assert d.proc is not None
    export = os.path.join(d.home, "export", "pf")
    site.cli(a, "volume", "detach", "pf")
    site.cli(a, "volume", "attach", "pf", "--node", d.name)
    v = site.show(a, "pf")
    assert v["node"] == d.name and service in addresses(d.name)
    with open(f"/proc/{d.proc.pid}/mounts") as f:   # d's daemon's mount namespace
        assert [line.split()[0] for line in f if line.split()[1] == export] == [v["device"]]
    check_files(functools.partial(url, service, v["share"]["port"], "pf"), written)
    site.cli(a, "volume", "detach", "pf")
    site.cli(a, "volume", "rm", "pf")


def test_daemon_killed_its_switch_fences_the_share(site: Site, tmp_path: object) -> None:
    """Only the node daemon of the share's host killed (-9), the host up: its dead man's
    switch (node/fence.py) kills the share manager, Ganesha and the engine and removes
    the service address when the daemon's last lease renewal is about to run out, before
    the leader moves the share; the next host serves the same files. The daemon started
    again stops nothing more and adds nothing back."""
    a, b, c, d = site.hosts
    assert d.proc is not None
    daemon = d.proc

    def kill_daemon() -> None:   # the daemon alone: `ip netns exec` ran it in its own process
        daemon.kill()
        daemon.wait(10)
    said, service, _ = fenced_then_moved(site, "dm", d, 202, kill_daemon, str(tmp_path))
    print(f"{d.name}'s daemon killed: {said}")
    site.start(d)
    assert service not in addresses(d.name) and not share_processes(d, "dm")
    site.cli(a, "volume", "detach", "dm")
    site.cli(a, "volume", "rm", "dm")


def test_daemon_and_switch_killed_share_manager_stops_serving(site: Site,
                                                              tmp_path: object) -> None:
    """The node daemon of the share's host and its dead man's switch both killed (-9), the
    host up: nobody is left to fence the node, but the share manager watches the node's beat
    file itself and kills Ganesha and drops the service address when the last lease renewal
    is SELF_FENCE_AFTER_S old (within that of the kill, plus a margin), before the leader
    moves the share; the next host serves the same files. The daemon started again kills
    the engine left behind and releases the volume's mounts and loop device. The volume's
    service interface is a name the hosts lack: each host picks its interface by subnet."""
    a, b, c, d = site.hosts
    assert d.proc is not None
    daemon = d.proc
    switch = [p for p in psutil.process_iter(["cmdline"])
              if (p.info["cmdline"] or [])[-1:] == [d.home]
              and any(arg.endswith(".fence") for arg in p.info["cmdline"])]
    assert len(switch) == 1, switch

    def kill_both() -> None:
        switch[0].kill()
        daemon.kill()
        daemon.wait(10)
        switch[0].wait(10)
    deadline = self_fence_after(NODE_TTL_S) + 2.0   # seconds: the poll, the kill, a load
    # An interface name no host has: each picks eth0, whose subnet holds the address.
    said, service, _ = fenced_then_moved(site, "ds", d, 203, kill_both, str(tmp_path),
                                         within=deadline, released=False, interface="lan9")
    print(f"{d.name}'s daemon and switch killed: {said}")
    site.start(d)
    wait_until(lambda: not held(d, "ds"), 15, f"{d.name} releasing the moved volume")
    assert service not in addresses(d.name) and not share_processes(d, "ds")
    site.cli(a, "volume", "detach", "ds")
    site.cli(a, "volume", "rm", "ds")
