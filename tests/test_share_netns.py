"""Shares across "hosts" (network namespaces on one bridge): clients on two hosts share files
and a host outside the allow-list is refused; and failover: the host serving the share dies,
another one starts the share manager on the same volume and takes over the service address,
and a client, reaching the service address over the bridge, resumes.

The daemon is single-host, so this drives `blockhorn share serve` directly: both hosts see the
same device (a loop device; on real hosts the new host attaches the volume first) and the same
state directory (the recovery records: on real hosts they need shared storage, or clients get
no reclaim after a failover). `ip netns exec` gives each host its own mount namespace too, so
host A's mount dies with it and host B checks and mounts the filesystem itself.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from daemon_util import IS_ROOT, ROOT, wait_until
from netns_util import hosts_on_bridge
from test_share_nfs import MISSING

from blockhorn.sharemgr import device
from blockhorn.sharemgr.config import ShareConfig

pytestmark = pytest.mark.skipif(bool(MISSING) or not IS_ROOT,
                                reason="needs root, NFS-Ganesha and libnfs-utils")

# Names and subnet unique per run (two runs on one machine never meet): namespaces
# bs<tok>a..e, bridge bs<tok>br, a /24 in 10.192-199.x (support/cluster_site.py takes
# 10.128-191.x, t5_fault_link_cut 10.64-127.x, t2_sharemgr_address 10.200-249.x).
TOK = secrets.token_hex(2)
_rnd = random.Random(TOK)
NET = f"10.{_rnd.randrange(192, 200)}.{_rnd.randrange(256)}"
SERVICE = f"{NET}.100/24"
PORT = 20490
GRACE_S = 5        # seconds; the share's NFSv4 grace period after a failover (default 15)
# servers A and B, clients C and D, E outside the allow-list
A, B, C, D, E = (f"bs{TOK}{x}" for x in "abcde")
HOSTS = {A: f"{NET}.1/24", B: f"{NET}.2/24", C: f"{NET}.3/24", D: f"{NET}.4/24",
         E: f"{NET}.5/24"}
BRIDGE = f"bs{TOK}br"
MiB = 1 << 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[None]:
    """The namespaces, each with eth0 on one bridge in the root namespace."""
    with hosts_on_bridge(HOSTS, BRIDGE):
        yield


def serve(ns: str, config: str, log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "blockhorn",
                                 "share", "serve", "--config", config], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def status(cfg: ShareConfig) -> dict:   # type: ignore[type-arg]
    try:
        with open(cfg.status_file) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def url(name: str) -> str:
    return (f"nfs://{SERVICE.split('/')[0]}/vol/{name}?version=4&nfsport={PORT}"
            "&uid=1000&gid=1000")


def client(ns: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, timeout=20)


def client_put(name: str, data: bytes, tmp: str, ns: str = C) -> bool:
    src = os.path.join(tmp, f"src-{ns}")
    with open(src, "wb") as f:
        f.write(data)
    try:
        return client(ns, "nfs-cp", src, url(name)).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def volume(tmp_path: object) -> Iterator[tuple[ShareConfig, str]]:
    """A 64 MiB loop device as the volume and a share config for it: (config, config path);
    clients C and D allowed."""
    tmp = str(tmp_path)
    backing = os.path.join(tmp, "volume.img")
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                         capture_output=True, text=True).stdout.strip()
    cfg = ShareConfig(volume="vol", device=dev, mount_dir=os.path.join(tmp, "export"),
                      state_dir=os.path.join(tmp, "state"), port=PORT,
                      clients=[{"cidr": HOSTS[ns].split("/")[0] + "/32", "access": "rw"}
                               for ns in (C, D)],
                      mkfs_options=["-E", "root_owner=1000:1000"], minor_versions=[0, 1, 2],
                      service_address=SERVICE, interface="eth0",
                      # short (default 15 s): host B still waits it out for A's client
                      grace_s=GRACE_S)
    cfg.validate()
    path = os.path.join(tmp, "share.json")
    cfg.save(path)
    try:
        yield cfg, path
    finally:
        device.unmount(cfg.mount_dir)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass   # killed by the test (a dead host)
        p.wait(30)


def test_clients_on_two_hosts_share_files_third_host_refused(
        hosts: None, volume: tuple[ShareConfig, str], tmp_path: object) -> None:
    cfg, path = volume
    tmp = str(tmp_path)
    procs = [serve(A, path, os.path.join(tmp, "a.log"))]
    try:
        wait_until(lambda: status(cfg).get("state") == "serving", 60, "host A serving")
        assert client_put("from-c", b"client C", tmp, C)
        assert client_put("from-d", b"client D", tmp, D)
        for ns in (C, D):
            listing = client(ns, "nfs-ls", url("")).stdout.decode()
            assert "from-c" in listing and "from-d" in listing, listing
        assert client(C, "nfs-cat", url("from-d")).stdout == b"client D"
        assert client(D, "nfs-cat", url("from-c")).stdout == b"client C"
        # Host E reaches the service address over the same bridge but is not on the list.
        assert not client_put("from-e", b"client E", tmp, E)
        refused = client(E, "nfs-ls", url(""))
        assert refused.returncode != 0 and b"from-c" not in refused.stdout
    finally:
        stop(procs)


def test_failover_to_another_host_moves_service_address(
        hosts: None, volume: tuple[ShareConfig, str], tmp_path: object) -> None:
    cfg, path = volume
    tmp = str(tmp_path)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(serve(A, path, os.path.join(tmp, "a.log")))
        wait_until(lambda: status(cfg).get("state") == "serving", 60, "host A serving")
        assert client_put("before", b"written through host A", tmp)

        # Host A dies: its share manager and Ganesha are gone at once, and its network with
        # them (the namespace and so the service address on its eth0).
        ganesha_a = status(cfg)["ganesha_pid"]
        os.killpg(procs[0].pid, signal.SIGKILL)
        os.kill(ganesha_a, signal.SIGKILL)
        died = time.monotonic()
        from pyroute2 import netns
        netns.remove(A)

        procs.append(serve(B, path, os.path.join(tmp, "b.log")))
        wait_until(lambda: status(cfg).get("state") == "serving" and
                   status(cfg).get("pid") == procs[1].pid, 60, "host B serving")
        serving = time.monotonic() - died
        wait_until(lambda: client_put("after", b"written through host B", tmp), 90,
                   "a client write after the failover")
        outage = time.monotonic() - died
        print(f"\nfailover: host B serving after {serving:.1f} s, client writes again after "
              f"{outage:.1f} s (grace {cfg.grace_s} s)")
        assert serving < 20 and outage < 60
        got = client(C, "nfs-cat", url("before"))
        assert got.stdout == b"written through host A", got.stderr
    finally:
        stop(procs)
