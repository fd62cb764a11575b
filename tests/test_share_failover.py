"""Automatic failover of a share between hosts, with state in a real etcd.

Hosts are network namespaces on one bridge: A and B run `blockhorn share agent` (each in its
own network and mount namespace), C is an NFS client. The root namespace is the storage host:
etcd and three replica servers listen on the bridge's own address, so the engines on A and B
reach the replicas over TCP as they would on other machines.

- Host A dies (its agent and everything it started killed -9, its namespace deleted): B takes
  over by itself; the test measures when B serves and when a client write succeeds again, and
  ends by reading back every file a client had written (nfs-cp exit 0) and comparing checksums.
- Host A is cut off the network (etcd, replicas and clients unreachable): it fences itself —
  Ganesha and the engine killed, the service address dropped — before B can own the share;
  reconnected, it stays standby and does not take the address back.

libnfs 4.0 here speaks NFSv4.0 only and writes at most about 2 KB per call (see
test_share_nfs): files stay below CHUNK.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
from daemon_util import IS_ROOT, ROOT, wait_until
from harness import ReplicaProc, free_port
from netns_util import addresses, hosts_on_bridge, set_link
from test_share_nfs import CHUNK, MISSING

from blockhorn.cluster.agent import loops_on
from blockhorn.cluster.etcd import Etcd, EtcdError
from blockhorn.cluster.spec import owner_key, recovery_key
from blockhorn.config import ReplicaConfig
from blockhorn.keys import ensure_key

NEEDS = [*MISSING, *(c for c in ("etcd", "nbdkit", "nbdfuse") if not shutil.which(c))]
REASON = ("needs root, etcd, NFS-Ganesha, nbdkit/nbdfuse and libnfs-utils "
          "(apt-get install etcd-server nfs-ganesha nfs-ganesha-vfs libnfs-utils libnbd-bin)")
if os.environ.get("CI") and (NEEDS or not IS_ROOT):
    raise RuntimeError(f"CI cannot run the failover tests: {REASON}; missing {NEEDS}")
pytestmark = pytest.mark.skipif(bool(NEEDS) or not IS_ROOT, reason=REASON)

NET = "10.78.0"
STORAGE = f"{NET}.254"                # the bridge's address: etcd and the replicas
SERVICE = f"{NET}.100/24"
PORT = 20492
HOSTS = {"bhxa": f"{NET}.1/24", "bhxb": f"{NET}.2/24", "bhxc": f"{NET}.3/24"}
BRIDGE = "bhxbr0"
VOLUME = "fvol"
MiB = 1 << 20


@dataclass
class Site:
    tmp: str
    etcd_url: str
    etcd: subprocess.Popen[bytes]
    replicas: list[ReplicaProc]
    agents: dict[str, subprocess.Popen[bytes]]

    def home(self, host: str) -> str:
        return os.path.join(self.tmp, host)

    def agent_status(self, host: str) -> dict:   # type: ignore[type-arg]
        try:
            with open(os.path.join(self.home(host), "agent", VOLUME, "agent.json")) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def start_agent(self, host: str) -> None:
        with open(os.path.join(self.tmp, f"agent-{host}.log"), "ab") as log:
            self.agents[host] = subprocess.Popen(
                ["ip", "netns", "exec", f"bhx{host}", sys.executable, "-m", "blockhorn",
                 "--home", self.home(host), "share", "agent", VOLUME, "--etcd", self.etcd_url,
                 "--host-id", f"host-{host}",
                 "--key-file", os.path.join(self.tmp, "cluster.key")],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def serving(self, host: str) -> bool:
        if self.agents[host].poll() is not None:
            raise AssertionError(f"agent {host} exited: {self.log(host)}")
        st = self.agent_status(host)
        return st.get("role") == "owner" and st.get("state") == "serving"

    def records(self) -> list[str]:
        """Ganesha's client records (one directory per client) as copied to etcd."""
        with Etcd(self.etcd_url) as e:
            kv = e.get(recovery_key(VOLUME))
        return [d for d in json.loads(kv.value)["dirs"] if "Libnfs" in d] if kv else []

    def log(self, host: str) -> str:
        with open(os.path.join(self.tmp, f"agent-{host}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def kill_host(self, host: str) -> None:
        """Everything host `host` runs dies at once, and its network with it."""
        agent = self.agents[host]
        procs = [psutil.Process(agent.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass   # exited meanwhile
        psutil.wait_procs(procs, timeout=10)
        agent.wait(10)
        from pyroute2 import netns
        netns.remove(f"bhx{host}")
        self.release_loops(host)

    def release_loops(self, host: str) -> None:
        """The loop device of a dead host's FUSE file (the kernel keeps it, like a real host
        would keep nothing: it is global state on this one machine)."""
        for dev in loops_on(os.path.join(self.home(host), "agent", VOLUME, "fuse", "nbd")):
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def _start_etcd(tmp: str) -> tuple[str, subprocess.Popen[bytes]]:
    url = f"http://{STORAGE}:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    with open(os.path.join(tmp, "etcd.log"), "ab") as log:
        proc = subprocess.Popen(
            ["etcd", "--name", "bhx", "--data-dir", os.path.join(tmp, "etcd"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bhx={peer}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            with Etcd(url, timeout=1.0) as e:
                e.revision()
            return True
        except EtcdError:
            assert proc.poll() is None, "etcd exited; see etcd.log"
            return False
    wait_until(up, 30, "etcd")
    return url, proc


@pytest.fixture
def site(tmp_path: object) -> Iterator[Site]:
    tmp = str(tmp_path)
    with hosts_on_bridge(HOSTS, BRIDGE, f"{STORAGE}/24"):
        url, etcd = _start_etcd(tmp)
        key = ensure_key(os.path.join(tmp, "cluster.key"))
        reps = []
        s = Site(tmp, url, etcd, reps, {})
        try:
            for i in range(3):
                name = f"{VOLUME}-r{i}"
                cfg = ReplicaConfig(VOLUME, name, os.path.join(tmp, name), 64 * MiB,
                                    f"{STORAGE}:{free_port()}", key)
                path = os.path.join(tmp, f"{name}.json")
                cfg.save(path)
                rep = ReplicaProc(cfg, path, os.path.join(tmp, f"{name}.log"))
                rep.start()
                reps.append(rep)
            spec = {"size": "64MiB", "replicas": [f"{r.cfg.name}={r.cfg.listen}" for r in reps],
                    "nfs": {"clients": [HOSTS["bhxc"].split("/")[0] + "/32"], "port": PORT,
                            "service_address": SERVICE, "interface": "eth0",
                            "mkfs_options": ["-E", "root_owner=1000:1000"],
                            "minor_versions": [0, 1, 2]}}
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(spec, f)
            subprocess.run([sys.executable, "-m", "blockhorn", "share", "define", VOLUME,
                            "--etcd", url, "--spec", os.path.join(tmp, "spec.json")],
                           cwd=ROOT, check=True, capture_output=True)
            yield s
        finally:
            for agent in s.agents.values():   # graceful: Ganesha, unmount, detach, engine
                if agent.poll() is None:
                    agent.send_signal(signal.SIGTERM)
            for host, agent in s.agents.items():
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(agent.pid, signal.SIGKILL)
                    agent.wait(10)
                s.release_loops(host)
            for r in reps:
                r.stop()
            etcd.terminate()
            etcd.wait(10)


def url(name: str) -> str:
    return (f"nfs://{SERVICE.split('/')[0]}/{VOLUME}/{name}?version=4&nfsport={PORT}"
            "&uid=1000&gid=1000")


def put(tmp: str, name: str, data: bytes) -> bool:
    """One NFSv4 client on host C writes file `name`; True when nfs-cp reports success."""
    src = os.path.join(tmp, "client-src")
    with open(src, "wb") as f:
        f.write(data)
    try:
        return subprocess.run(["ip", "netns", "exec", "bhxc", "nfs-cp", src, url(name)],
                              capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def cat(name: str) -> bytes:
    got = subprocess.run(["ip", "netns", "exec", "bhxc", "nfs-cat", url(name)],
                         capture_output=True, timeout=20)
    assert got.returncode == 0, got.stderr
    return got.stdout


def payload(i: int) -> bytes:
    return hashlib.sha512(str(i).encode()).digest() * (CHUNK // 64)


def test_host_dies_other_host_takes_over(site: Site) -> None:
    site.start_agent("a")
    wait_until(lambda: site.serving("a"), 60, "host A serving")
    site.start_agent("b")
    wait_until(lambda: site.agent_status("b").get("role") == "standby", 30, "host B standby")
    acked: dict[str, str] = {}
    for i in range(5):
        assert put(site.tmp, f"before-{i}", payload(i)), site.log("a")
        acked[f"before-{i}"] = hashlib.sha256(payload(i)).hexdigest()

    # A copies Ganesha's client records to etcd (within a second), so that B can let these
    # clients reclaim: B then keeps its grace period for them.
    wait_until(lambda: len(site.records()) >= 5, 10, "host A's client records in etcd")

    site.kill_host("a")
    died = time.monotonic()
    wait_until(lambda: site.serving("b"), 60, "host B serving")
    serving = time.monotonic() - died
    i = 100
    while not put(site.tmp, f"after-{i}", payload(i)):
        assert time.monotonic() - died < 90, f"no client write succeeded; {site.log('b')}"
        time.sleep(0.5)
    outage = time.monotonic() - died
    acked[f"after-{i}"] = hashlib.sha256(payload(i)).hexdigest()
    for i in range(101, 104):
        assert put(site.tmp, f"after-{i}", payload(i))
        acked[f"after-{i}"] = hashlib.sha256(payload(i)).hexdigest()
    print(f"\nautomatic failover: host B serving {serving:.1f} s after host A died, "
          f"client writes again after {outage:.1f} s")
    with Etcd(site.etcd_url) as e:
        kv = e.get(owner_key(VOLUME))
        assert kv is not None and json.loads(kv.value)["host"] == "host-b"
    for name, digest in acked.items():
        assert hashlib.sha256(cat(name)).hexdigest() == digest, name
    assert serving < 20 and outage < 60


def test_owner_cut_off_fences_itself_before_another_host_serves(site: Site) -> None:
    site.start_agent("a")
    wait_until(lambda: site.serving("a"), 60, "host A serving")
    ganesha_a = site.agent_status("a")
    site.start_agent("b")
    wait_until(lambda: site.agent_status("b").get("role") == "standby", 30, "host B standby")
    assert put(site.tmp, "before", payload(1))
    assert SERVICE.split("/")[0] in addresses("bhxa")
    share_a = os.path.join(site.home("a"), "agent", VOLUME, "share", "status.json")
    with open(share_a) as f:
        ganesha_pid = json.load(f)["ganesha_pid"]

    set_link("bhxa", up=False)   # etcd, replicas and clients all unreachable from A
    cut = time.time()
    wait_until(lambda: site.agent_status("a").get("role") == "fenced", 30, "host A fenced")
    fenced = site.agent_status("a")
    assert not psutil.pid_exists(ganesha_pid) or \
        psutil.Process(ganesha_pid).status() == psutil.STATUS_ZOMBIE
    assert SERVICE.split("/")[0] not in addresses("bhxa")
    wait_until(lambda: site.serving("b"), 60, "host B serving")
    took = site.agent_status("b")
    print(f"\nfencing: host A fenced {fenced['fenced_at'] - cut:.1f} s after it was cut off, "
          f"host B owner after {took['owned_at'] - cut:.1f} s, serving after "
          f"{took['serving_since'] - cut:.1f} s")
    # No overlap: A had stopped serving before B could even own the share.
    assert fenced["fenced_at"] < took["owned_at"]
    assert fenced["fenced_at"] - ganesha_a["serving_since"] > 0

    set_link("bhxa", up=True)
    wait_until(lambda: site.agent_status("a").get("role") == "standby" and
               site.agent_status("a").get("owner") == "host-b", 30, "host A standby again")
    assert SERVICE.split("/")[0] not in addresses("bhxa")
    wait_until(lambda: put(site.tmp, "after", payload(2)), 60, "a client write through B")
    assert cat("before") == payload(1) and cat("after") == payload(2)
