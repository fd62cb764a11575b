"""A failover "site" for tests and `make bench`: hosts as network namespaces on one bridge,
etcd and three replica servers in the root namespace (the storage host, on the bridge's own
address), a volume defined in etcd, and `blockhorn share agent` started on hosts on demand.

Hosts A and B (namespaces bhxa, bhxb) run agents; C (bhxc) is the NFS client. libnfs 4.0 here
speaks NFSv4.0 only and writes at most about 2 KB per call (see test_share_nfs): files written
by `put` stay below CHUNK.

Those names are fixed (two runs interfere): only tests/test_share_failover.py uses this site,
for the agent; the node daemons' share moves run on tests/support/cluster_site.py, whose
names are unique per run (tests/t5_cluster_share.py, tests/t7_vm_failover.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from daemon_util import ROOT, wait_until
from harness import ReplicaProc, free_port
from netns_util import hosts_on_bridge

from blockhorn.cluster.agent import release_loop
from blockhorn.cluster.etcd import Etcd, EtcdError
from blockhorn.cluster.spec import recovery_key
from blockhorn.config import ReplicaConfig
from blockhorn.keys import ensure_key

CHUNK = 1800        # bytes; the largest file nfs-cp (libnfs 4.0, NFSv4) can write
VOLUME = "fvol"
MiB = 1 << 20


@dataclass(frozen=True)
class Net:
    """A site's names: namespace `<prefix><host>` per host (a, b, c), the bridge, a /24."""
    prefix: str = "bhx"
    subnet: str = "10.78.0"
    bridge: str = "bhxbr0"
    port: int = 20492          # Ganesha's (each host has its own port space)

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @property
    def storage(self) -> str:   # the bridge's address: etcd and the replicas
        return f"{self.subnet}.254"

    @property
    def service(self) -> str:
        return f"{self.subnet}.100/24"

    @property
    def hosts(self) -> dict[str, str]:
        return {self.ns(h): f"{self.subnet}.{i}/24" for i, h in enumerate("abc", 1)}


FIXED = Net()
NET, STORAGE, SERVICE, PORT = FIXED.subnet, FIXED.storage, FIXED.service, FIXED.port
HOSTS, BRIDGE = FIXED.hosts, FIXED.bridge


@dataclass
class Site:
    tmp: str
    etcd_url: str
    etcd: subprocess.Popen[bytes]
    replicas: list[ReplicaProc]
    agents: dict[str, subprocess.Popen[bytes]]
    net: Net = FIXED

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
                ["ip", "netns", "exec", self.net.ns(host), sys.executable, "-m", "blockhorn",
                 "--home", self.home(host), "share", "agent", VOLUME, "--etcd", self.etcd_url,
                 "--host-id", f"host-{host}",
                 "--key-file", os.path.join(self.tmp, "cluster.key")],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def serving(self, host: str) -> bool:
        if self.agents[host].poll() is not None:
            raise AssertionError(f"agent {host} exited: {self.log(host)}")
        st = self.agent_status(host)
        return st.get("role") == "owner" and st.get("state") == "serving"

    def records(self, match: str = "Libnfs") -> list[str]:
        """Ganesha's client records (one directory per client) as copied to etcd, of the
        clients whose record names `match` (libnfs's, or a kernel client's host name)."""
        with Etcd(self.etcd_url) as e:
            kv = e.get(recovery_key(VOLUME))
        return [d for d in json.loads(kv.value)["dirs"] if match in d] if kv else []

    def log(self, host: str) -> str:
        with open(os.path.join(self.tmp, f"agent-{host}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def kill_host(self, host: str) -> None:
        """Everything host `host` runs dies at once, and its network with it."""
        agent = self.agents[host]
        procs = [psutil.Process(agent.pid)]
        procs += procs[0].children(recursive=True)
        conns = fuse_connections(agent.pid, self.home(host))
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass   # exited meanwhile
        # The host's mount namespace (`ip netns exec` makes one) dies with its last process,
        # which unmounts the share's ext4: its final flush goes to the loop device, whose file
        # is served by the FUSE process dying there, and the exit hangs for ever (seen: a
        # zombie nbdfuse, then every `losetup -a` on the machine hung). A dead host's FUSE
        # connections go with it: abort them, and the flush fails instead.
        abort_fuse(conns)
        psutil.wait_procs(procs, timeout=10)
        agent.wait(10)
        from pyroute2 import netns
        netns.remove(self.net.ns(host))
        self.release_loops(host)

    def release_loops(self, host: str) -> None:
        """The loop device of a dead host's FUSE file: the kernel keeps it, global state on
        this one machine (a real dead host takes its loop devices along)."""
        release_loop(os.path.join(self.home(host), "agent", VOLUME))


def fuse_connections(pid: int, under: str) -> list[int]:
    """The FUSE connections (their numbers under /sys/fs/fuse/connections: the minor device
    number of the mount) of the FUSE mounts below `under` in the mount namespace of process
    `pid` (that namespace also holds copies of the machine's other mounts: not ours)."""
    conns: list[int] = []
    try:
        f = open(f"/proc/{pid}/mountinfo")
    except OSError:   # exited already
        return conns
    with f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if (fstype == "fuse" or fstype.startswith("fuse.")) \
                    and fields[4].startswith(under.rstrip("/") + "/"):
                conns.append(int(fields[2].split(":")[1]))
    return conns


def abort_fuse(conns: list[int]) -> None:
    for c in conns:
        with contextlib.suppress(OSError):   # gone already: nothing was stuck
            with open(f"/sys/fs/fuse/connections/{c}/abort", "w") as f:
                f.write("1")


def start_etcd(tmp: str, host: str = STORAGE) -> tuple[str, subprocess.Popen[bytes]]:
    """A one-member etcd with its data under `tmp`, clients on `host`: (URL, process)."""
    url = f"http://{host}:{free_port()}"
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


@contextlib.contextmanager
def failover_site(tmp: str, net: Net = FIXED,
                  nfs: dict[str, Any] | None = None) -> Iterator[Site]:
    """Bridge + hosts, etcd, three replicas and the volume defined in etcd (`nfs`: entries
    that replace those of the spec's nfs object); at exit every agent is stopped (SIGTERM,
    then SIGKILL) and everything else goes too."""
    with hosts_on_bridge(net.hosts, net.bridge, f"{net.storage}/24"):
        url, etcd = start_etcd(tmp, net.storage)
        key = ensure_key(os.path.join(tmp, "cluster.key"))
        reps = []
        s = Site(tmp, url, etcd, reps, {}, net)
        try:
            for i in range(3):
                name = f"{VOLUME}-r{i}"
                cfg = ReplicaConfig(VOLUME, name, os.path.join(tmp, name), 64 * MiB,
                                    f"{net.storage}:{free_port()}", key)
                path = os.path.join(tmp, f"{name}.json")
                cfg.save(path)
                rep = ReplicaProc(cfg, path, os.path.join(tmp, f"{name}.log"),
                                  members=[f"{VOLUME}-r{j}" for j in range(3)])
                rep.start()
                reps.append(rep)
            spec = {"size": "64MiB", "replicas": [f"{r.cfg.name}={r.cfg.listen}" for r in reps],
                    "nfs": {"clients": [net.hosts[net.ns("c")].split("/")[0] + "/32"],
                            "port": net.port, "service_address": net.service,
                            "interface": "eth0", "mkfs_options": ["-E", "root_owner=1000:1000"],
                            "minor_versions": [0, 1, 2], **(nfs or {})}}
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
                    conns = fuse_connections(agent.pid, s.home(host))
                    os.killpg(agent.pid, signal.SIGKILL)
                    abort_fuse(conns)   # as in kill_host
                    agent.wait(10)
                s.release_loops(host)
            try:
                for r in reps:
                    try:
                        r.stop()
                    except subprocess.TimeoutExpired:
                        r.kill()   # a connection it still serves (an engine left behind)
            finally:
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


@dataclass
class Failover:
    serving_s: float       # host death -> the heir's share manager serves (Ganesha accepts)
    write_s: float         # host death -> a client's write succeeds again (after NFS grace)
    acked: dict[str, str]  # every file a client wrote successfully -> its sha256


def write_acked(tmp: str, names: range, prefix: str, acked: dict[str, str]) -> None:
    for i in names:
        if not put(tmp, f"{prefix}-{i}", payload(i)):
            raise AssertionError(f"client write {prefix}-{i} failed")
        acked[f"{prefix}-{i}"] = hashlib.sha256(payload(i)).hexdigest()


def run_failover(site: Site, clients: int = 5, timeout: float = 90.0) -> Failover:
    """A serves and clients write; B stands by; A dies; measure until B serves and until a
    client write succeeds again, then write a few more. Checksums are the caller's to check."""
    site.start_agent("a")
    wait_until(lambda: site.serving("a"), 60, "host A serving")
    site.start_agent("b")
    wait_until(lambda: site.agent_status("b").get("role") == "standby", 30, "host B standby")
    acked: dict[str, str] = {}
    write_acked(site.tmp, range(clients), "before", acked)
    # A copies Ganesha's client records to etcd (within a second), so that B lets these
    # clients reclaim their state: B keeps its grace period for them.
    wait_until(lambda: len(site.records()) >= clients, 10, "host A's client records in etcd")

    site.kill_host("a")
    died = time.monotonic()
    wait_until(lambda: site.serving("b"), timeout, "host B serving")
    serving = time.monotonic() - died
    while not put(site.tmp, "after-0", payload(0)):
        if time.monotonic() - died > timeout:
            raise AssertionError(f"no client write succeeded; {site.log('b')}")
        time.sleep(0.5)
    written = time.monotonic() - died
    acked["after-0"] = hashlib.sha256(payload(0)).hexdigest()
    write_acked(site.tmp, range(1, 4), "after", acked)
    return Failover(serving, written, acked)
