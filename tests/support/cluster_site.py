"""Namespace hosts running node daemons on one etcd: a blockhorn cluster on one machine.

`cluster_site(tmp, n)` makes `n` hosts (network namespaces on a bridge, tests/netns_util.py),
each with its own home, one disk and a node daemon (`daemon run --etcd ... --node hN
--address IP`), and one etcd in the root namespace on the bridge's address (one member: a
three-member etcd costs three more processes and its elections on a 2-core machine, and the
etcd cluster's own failover is etcd's, not ours to test here). Every name (namespaces, bridge,
veths, the etcd key prefix) and the subnet are unique per run, so two runs never meet; at exit
every process of every host is killed (found by its network namespace, so nothing a daemon
started is missed), FUSE mounts under the site are unmounted and the namespaces removed, also
when the body failed.

Used by tests/t5_cluster_*.py, scripts/demo_cluster.py and scripts/bench_cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from daemon_util import wait_until  # noqa: E402
from netns_util import hosts_on_bridge, set_link  # noqa: E402

from blockhorn.cluster.etcd import Etcd, EtcdError  # noqa: E402

NODE_TTL_S = 4            # seconds: node leases in the site (BLOCKHORN_NODE_TTL_S)
BLOCK = 4096
WRITE_SPAN = 8 << 20      # bytes: the writer's blocks, small enough to read back whole
START_TIMEOUT_S = 30.0    # seconds for a daemon to answer on its socket
API_PORT = 9443           # each host's TCP API, a cluster node's default (its own address)
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380   # on each member host's own address
ETCD_MEMBERS = 3


class Writer(threading.Thread):
    """4 KiB writes (libnbd) at random offsets of the first WRITE_SPAN bytes, a FLUSH every
    16; keeps what each block was last acknowledged with, for `check`."""

    def __init__(self, uri: str, pause_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.acked: dict[int, bytes] = {}
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        import nbd
        rnd = random.Random(7)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                off = rnd.randrange(WRITE_SPAN // BLOCK) * BLOCK
                data = rnd.randbytes(BLOCK)
                h.pwrite(data, off)
                self.acked[off] = data
                self.count += 1
                if self.count % 16 == 0:
                    h.flush()
                time.sleep(self.pause_s)
        except BaseException as e:   # reported by the caller
            self.error = e
        finally:
            with contextlib.suppress(Exception):
                h.shutdown()

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        if self.error is not None:
            raise AssertionError(f"a write failed: {self.error}")

    def check(self, uri: str) -> int:
        """Read back every acknowledged block; how many differ."""
        import nbd
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            return sum(h.pread(BLOCK, off) != data for off, data in self.acked.items())
        finally:
            h.shutdown()


@dataclass
class Host:
    name: str           # node name and network namespace
    ip: str
    home: str
    disk: str
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)   # extra variables of its daemon


@dataclass
class Site:
    root: str
    etcd: str             # every member's client URL, comma-separated (daemon run --etcd)
    prefix: str
    hosts: list[Host] = field(default_factory=list)
    members: dict[str, subprocess.Popen[bytes] | None] = field(default_factory=dict)
    initial_cluster: str = ""
    node_ttl_s: int = NODE_TTL_S   # seconds: the daemons' node leases

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("BLOCKHORN_HOME", "NOTIFY_SOCKET", "BLOCKHORN_ETCD", "BLOCKHORN_NODE"):
            env.pop(k, None)
        env["BLOCKHORN_NODE_TTL_S"] = str(self.node_ttl_s)
        return env

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # --- the CLI of one host (runs in the root namespace: the API is a unix socket) --------

    def cli(self, h: Host, *args: str, check: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "blockhorn", "--home", h.home, *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env(),
                              cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{h.name}] blockhorn {' '.join(args)} exited "
                                 f"{proc.returncode}:\n{proc.stdout}{proc.stderr}"
                                 + self.log_tail(h)
                                 + (self.tracebacks() if "internal error" in proc.stderr
                                    else ""))
        return proc

    @staticmethod
    def log_lines(h: Host, name: str = "daemon.log") -> tuple[str, list[str]]:
        """(path, lines) of log `name` in `h`'s home; no lines when it cannot be read."""
        path = os.path.join(h.home, "logs", name)
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            return path, f.readlines()
        return path, []

    def log_tail(self, h: Host, lines: int = 30) -> str:
        """The last lines of `h`'s daemon log: what its daemon did up to a refusal."""
        path, log = self.log_lines(h)
        return f"\n--- {h.name}: {path}\n" + "".join(log[-lines:]) if log else ""

    def tracebacks(self, lines: int = 40) -> str:
        """The last traceback in each host's daemon log: an "internal error" says only "see
        daemon.log", and a CI run keeps nothing but its output."""
        out = []
        for h in self.hosts:
            path, log = self.log_lines(h)
            starts = [i for i, x in enumerate(log) if x.startswith("Traceback")]
            if starts:
                first = max(0, starts[-1] - 1)   # the line that logged it
                out.append(f"--- {h.name}: {path}\n" + "".join(log[first:first + lines]))
        return "\n" + "\n".join(out) if out else ""

    def json(self, h: Host, *args: str) -> Any:
        return json.loads(self.cli(h, *args, "--json").stdout)

    def show(self, h: Host, volume: str) -> dict[str, Any]:
        return dict(self.json(h, "volume", "show", volume))

    def nodes_of(self, h: Host, volume: str) -> set[str]:
        """The nodes holding `volume`'s replicas, as `volume show` on `h` gives them."""
        return {r["node"] for r in self.show(h, volume)["replicas"]}

    def create_avoiding(self, h: Host, volume: str, replicas: int,
                        avoid: list[Host]) -> set[str]:
        """Create a 32 MiB `volume` through `h` with no replica on the hosts `avoid` (made
        unschedulable for the create, schedulable again after); returns its replicas' nodes."""
        for x in avoid:
            self.cli(h, "node", "update", x.name, "--schedulable", "no")
        self.cli(h, "volume", "create", volume, "--size", "32MiB", "--replicas", str(replicas))
        for x in avoid:
            self.cli(h, "node", "update", x.name, "--schedulable", "yes")
        return self.nodes_of(h, volume)

    def states(self, h: Host) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.json(h, "node", "ls")}

    def healthy_on(self, h: Host, volume: str, nodes: set[str]) -> bool:
        """The volume (attached on `h`) is healthy with its replicas on `nodes`, all RW."""
        v = self.show(h, volume)
        return (v["robustness"] == "healthy" and {r["node"] for r in v["replicas"]} == nodes
                and {r["mode"] for r in v["replicas"]} == {"RW"})

    def kill_and_heal(self, engine: Host, volume: str, victim: Host,
                      say: Callable[[str], None] = lambda _text: None,
                      partition: bool = False) -> dict[str, float]:
        """Kill `victim` (a node holding a replica of `volume`, attached on `engine`, not the
        engine's node) under writes — or with `partition` only take its link down, its
        processes running on — and wait until the volume is healthy again on other nodes.
        Returns seconds from the kill: `down` (node ls says so), `moved` (the store points
        the replica at another node), `healthy`; and `writes`. Checks every acknowledged
        write."""
        before = {r["node"] for r in self.show(engine, volume)["replicas"]}
        assert victim.name in before and engine.name != victim.name
        w = Writer(self.show(engine, volume)["endpoint"])
        w.start()
        wait_until(lambda: w.count >= 100 or w.error, 20, "writes before the kill")
        t0 = time.monotonic()
        if partition:
            say(f"taking the link of {victim.name} down (its processes run on)")
            set_link(victim.name, False)
        else:
            say(f"killing every process of {victim.name} and taking its link down")
            self.kill(victim)
        with self.post_mortem(volume, engine):
            wait_until(lambda: self.states(engine)[victim.name] == "down", 60, "the node down")
        down = time.monotonic() - t0
        say(f"{victim.name} is down after {down:.1f} s")

        def moved() -> set[str] | None:
            now = {r["node"] for r in self.show(engine, volume)["replicas"]}
            return now if victim.name not in now else None
        with self.post_mortem(volume, engine):
            after = wait_until(moved, 120, "the replica moved")
        t_moved = time.monotonic() - t0
        say(f"the leader placed the replacement on {', '.join(sorted(after - before))} after "
            f"{t_moved:.1f} s")
        with self.post_mortem(volume, engine):
            wait_until(lambda: self.healthy_on(engine, volume, after), 180, "healthy again")
        healthy = time.monotonic() - t0
        say(f"{volume} is healthy again after {healthy:.1f} s")
        w.finish()
        bad = w.check(self.show(engine, volume)["endpoint"])
        assert bad == 0, f"{bad} acknowledged blocks read back different"
        say(f"{w.count} writes went on meanwhile; every acknowledged block reads back the same")
        return {"down": down, "moved": t_moved, "healthy": healthy, "writes": float(w.count)}

    @contextlib.contextmanager
    def post_mortem(self, volume: str, engine: Host, lines: int = 25) -> Iterator[None]:
        """A wait that times out says why: the volume as `engine` shows it, and the last
        `lines` lines naming `volume` of every live host's daemon log and of the engine's
        log (a CI run keeps nothing but its output)."""
        try:
            yield
        except AssertionError as e:
            parts = [str(e)]
            with contextlib.suppress(Exception):
                parts.append("volume show: " + json.dumps(self.show(engine, volume)))
            for h in self.hosts:
                for log in ("daemon.log", f"{volume}-engine.log"):
                    path, got = self.log_lines(h, log)
                    tail = [x for x in got if volume in x or log != "daemon.log"][-lines:]
                    if tail:
                        parts.append(f"--- {h.name}: {path}\n" + "".join(tail))
            raise AssertionError("\n".join(parts)) from None

    # --- daemons ---------------------------------------------------------------------------

    def start(self, h: Host) -> None:
        log = open(os.path.join(self.root, f"{h.name}-daemon.out"), "ab")
        h.proc = subprocess.Popen(
            ["ip", "netns", "exec", h.name, sys.executable, "-m", "blockhorn", "--home", h.home,
             "daemon", "run", "--quiet", "--etcd", self.etcd, "--etcd-prefix", self.prefix,
             "--node", h.name, "--address", h.ip],   # the API on h.ip:API_PORT by default
            stdout=log, stderr=log, cwd=ROOT, env=self.env() | h.env, start_new_session=True)
        log.close()

        def up() -> bool:
            assert h.proc is not None
            if h.proc.poll() is not None:
                raise AssertionError(f"daemon of {h.name} exited {h.proc.returncode}; see "
                                     f"{self.root}/{h.name}-daemon.out")
            return os.path.exists(os.path.join(h.home, "daemon.sock")) and self.cli(
                h, "daemon", "status", check=False).returncode == 0
        wait_until(up, START_TIMEOUT_S, f"the daemon of {h.name}")

    # --- etcd members (one in each of the first ETCD_MEMBERS hosts) ---------------------------

    def start_etcd(self, h: Host, wait: bool = True) -> None:
        url = f"http://{h.ip}:{ETCD_CLIENT_PORT}"
        peer = f"http://{h.ip}:{ETCD_PEER_PORT}"
        with open(os.path.join(self.root, f"{h.name}-etcd.log"), "ab") as log:
            self.members[h.name] = subprocess.Popen(
                ["ip", "netns", "exec", h.name, "etcd", "--name", h.name,
                 "--data-dir", os.path.join(self.root, "etcd", h.name),
                 "--listen-client-urls", url, "--advertise-client-urls", url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", self.initial_cluster,
                 "--initial-cluster-token", self.prefix.strip("/")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_etcd(h)

    def wait_etcd(self, h: Host) -> None:
        url = f"http://{h.ip}:{ETCD_CLIENT_PORT}"

        def up() -> bool:
            proc = self.members[h.name]
            assert proc is not None and proc.poll() is None, \
                f"etcd member of {h.name} exited; see {self.root}/{h.name}-etcd.log"
            try:
                with Etcd(url, timeout=1.0) as e:
                    e.revision()
                return True
            except EtcdError:
                return False
        wait_until(up, 30, f"the etcd member of {h.name}")

    def kill_etcd(self, h: Host) -> None:
        proc = self.members.get(h.name)
        if proc is not None:
            proc.kill()
            proc.wait(10)
            self.members[h.name] = None

    def kill(self, h: Host, link_down: bool = True) -> int:
        """Kill every process of host `h` (SIGKILL, found by network namespace) and, with
        `link_down`, take its link down: a host that died. Returns how many were killed."""
        if link_down:
            set_link(h.name, False)
        conns = host_fuse_connections(h)
        n = kill_netns(h.name)   # its etcd member too
        release_fuse(conns)
        if h.proc is not None:
            h.proc.wait(10)
        if h.name in self.members:
            self.kill_etcd(h)
        return n

    def revive(self, h: Host) -> None:
        set_link(h.name, True)
        if h.name in self.members and self.members[h.name] is None:
            self.start_etcd(h)
        self.start(h)


def netns_pids(ns: str) -> list[int]:
    try:
        want = os.stat(f"/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return []
    out = []
    for p in psutil.pids():
        try:
            if os.stat(f"/proc/{p}/ns/net").st_ino == want and p != os.getpid():
                out.append(p)
        except OSError:
            continue   # exited meanwhile, or a kernel thread
    return out


def host_fuse_connections(h: Host) -> list[int]:
    """The FUSE connections (numbers under /sys/fs/fuse/connections: the minor device number
    of the mount) of the FUSE mounts under `h`'s home, seen in the mount namespaces of its
    processes (`ip netns exec` gives each host one of its own)."""
    conns: set[int] = set()
    for pid in netns_pids(h.name):
        try:
            f = open(f"/proc/{pid}/mountinfo")
        except OSError:   # exited already
            continue
        with f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if (fstype == "fuse" or fstype.startswith("fuse.")) \
                        and fields[4].startswith(h.home.rstrip("/") + "/"):
                    conns.add(int(fields[2].split(":")[1]))
    return sorted(conns)


def release_fuse(conns: list[int]) -> None:
    """A killed host's FUSE connections and the loop devices on their files. The host's mount
    namespace dies with its last process, which unmounts the ext4 on its loop device: that
    final flush goes to a FUSE file whose server is dead, and without an abort the kernel waits
    for ever (a jbd2 thread and every later `sync` of the machine stuck in D state). A real
    dead host takes its kernel along; here the kernel is this machine's: abort, then detach."""
    for c in conns:
        with contextlib.suppress(OSError):   # gone already: nothing was stuck
            with open(f"/sys/fs/fuse/connections/{c}/abort", "w") as f:
                f.write("1")
    out = subprocess.run(["losetup", "-J", "-O", "NAME,BACK-MAJ:MIN"], capture_output=True,
                         text=True, check=False).stdout
    backs = {f"0:{c}" for c in conns}
    for dev in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
        if (dev.get("back-maj:min") or "").strip() in backs:
            subprocess.run(["losetup", "-d", dev["name"]], capture_output=True, check=False)


def fuse_connections() -> set[int]:
    with contextlib.suppress(OSError):
        return {int(c) for c in os.listdir("/sys/fs/fuse/connections") if c.isdigit()}
    return set()


def orphaned_fuse(since: set[int]) -> list[int]:
    """FUSE connections made after `since` that no process has mounted any more: a host's
    whose mount namespace is gone while a loop device still holds its file (a host killed
    with a share's ext4 on it; a fenced node releases its devices itself)."""
    mounted: set[int] = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                major, _, minor = line.split()[2].partition(":")
                if major == "0":
                    mounted.add(int(minor))
    return sorted(fuse_connections() - since - mounted)


KILL_WAIT_S = 10.0        # seconds for the processes of a killed host to be gone


def dead(pid: int) -> bool:
    """Gone or a zombie: a zombie holds no file, socket or mount any more. A killed daemon's
    children (its dead man's switch) are reaped by init, and this machine's init reaps late
    (~2 s): waiting for the reaping cost each host of a site's teardown that long."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_netns(ns: str) -> int:
    """SIGKILL every process of namespace `ns` and wait until each is gone or a zombie (a
    zombie holds no file, socket or lock; init reaps the orphans late, ~2 s here)."""
    pids = netns_pids(ns)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while not all(dead(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(pids)   # our own children among them (daemon, etcd) are reaped by their waits


def _unmount_under(root: str) -> None:
    for part in psutil.disk_partitions(all=True):
        if part.mountpoint.startswith(root + "/"):
            subprocess.run(["umount", "-l", part.mountpoint], capture_output=True, check=False)


def _detach_loops(root: str) -> None:
    out = subprocess.run(["losetup", "-J"], capture_output=True, text=True, check=False).stdout
    for dev in json.loads(out or '{"loopdevices": []}').get("loopdevices", []):
        if (dev.get("back-file") or "").startswith(root + "/"):
            subprocess.run(["losetup", "-d", dev["name"]], capture_output=True, check=False)


@contextlib.contextmanager
def cluster_site(root: str, n: int = 3, settings: dict[str, str] | None = None,
                 node_ttl_s: int = NODE_TTL_S) -> Iterator[Site]:
    """`n` hosts with daemons up, each with one disk registered; `settings` set once;
    node leases of `node_ttl_s` seconds."""
    tok = secrets.token_hex(2)
    rnd = random.Random(tok)
    subnet = f"10.{rnd.randrange(128, 192)}.{rnd.randrange(256)}"
    names = {f"bc{tok}h{i}": f"{subnet}.{10 + i}/24" for i in range(n)}
    os.makedirs(root, exist_ok=True)
    before = fuse_connections()
    with hosts_on_bridge(names, f"bc{tok}b", f"{subnet}.1/24"):
        os.makedirs(os.path.join(root, "etcd"), exist_ok=True)
        site = Site(root, "", f"/bh-{tok}/", node_ttl_s=node_ttl_s)
        try:
            for i, ns in enumerate(names):
                base = os.path.join(root, f"h{i}")
                h = Host(ns, names[ns].split("/")[0], os.path.join(base, "home"),
                         os.path.join(base, "disk"))
                os.makedirs(h.disk)
                site.hosts.append(h)
            members = site.hosts[:ETCD_MEMBERS]
            site.initial_cluster = ",".join(f"{h.name}=http://{h.ip}:{ETCD_PEER_PORT}"
                                            for h in members)
            site.etcd = ",".join(f"http://{h.ip}:{ETCD_CLIENT_PORT}" for h in members)
            for h in members:   # all at once: a member waits for the others to elect
                site.start_etcd(h, wait=False)
            for h in members:
                site.wait_etcd(h)
            for h in site.hosts:
                site.start(h)
                site.cli(h, "disk", "add", h.disk)
            # The hosts' disks are directories of this machine's one file system, whose free
            # space other work changes: placement must not depend on it (default 25 %).
            for k, v in ({"storage-minimal-available-percentage": "0"} | (settings or {})).items():
                site.cli(site.hosts[0], "setting", "set", k, v)
            yield site
        finally:
            for h in site.hosts:
                conns = host_fuse_connections(h)
                kill_netns(h.name)
                release_fuse(conns)
                if h.proc is not None and h.proc.poll() is None:
                    h.proc.kill()
                    h.proc.wait(10)
            for proc in site.members.values():   # killed with their hosts; reap them
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.kill()
                        proc.wait(10)
            _unmount_under(root)
            _detach_loops(root)
            release_fuse(orphaned_fuse(before))


@contextlib.contextmanager
def module_site(tag: str, n: int = 3, settings: dict[str, str] | None = None,
                tools: tuple[str, ...] = ("etcd",), node_ttl_s: int = NODE_TTL_S
                ) -> Iterator[Site]:
    """A test module's cluster_site under a short /tmp root (replica and engine sockets live
    under the homes), skipped when a tool is missing; the root is removed after, unless
    BLOCKHORN_KEEP_SITE keeps its logs for a post-mortem."""
    import shutil

    import pytest
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    root = os.path.join("/tmp", f"{tag}{os.getpid()}")
    try:
        with cluster_site(root, n, settings, node_ttl_s) as s:
            yield s
    finally:
        if not os.environ.get("BLOCKHORN_KEEP_SITE"):
            shutil.rmtree(root, ignore_errors=True)
