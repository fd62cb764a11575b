from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuse_harness import FuseCluster  # noqa: E402
from harness import Cluster, proc_state  # noqa: E402

from blockhorn.nbd.attach import Attachment, attach_device, detach_device  # noqa: E402
from blockhorn.types import BlockhornError  # noqa: E402


def needs_root() -> pytest.MarkDecorator:
    """Root-only tests (FUSE, loop, mount). CI runs as root, so there they always run."""
    if os.environ.get("CI") and os.geteuid() != 0:
        raise RuntimeError("CI must run as root: root tests may not be skipped there")
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE, loop and mount")


def start_etcd(tmp: str, host: str) -> tuple[str, subprocess.Popen[bytes]]:
    """A one-member etcd with its data under `tmp`, clients on `host`: (URL, process)."""
    from daemon_util import wait_until
    from harness import free_port

    from blockhorn.cluster.etcd import Etcd, EtcdError
    url = f"http://{host}:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    with open(os.path.join(tmp, "etcd.log"), "ab") as log:
        proc = subprocess.Popen(
            ["etcd", "--name", "bht", "--data-dir", os.path.join(tmp, "etcd"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bht={peer}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            with Etcd(url, timeout=1.0) as e:
                e.revision()
            return True
        except EtcdError:
            assert proc.poll() is None, f"etcd exited; see {tmp}/etcd.log"
            return False
    wait_until(up, 30, "etcd")
    return url, proc


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One etcd on 127.0.0.1 per test module (its client URL)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    url, proc = start_etcd(str(tmp_path_factory.mktemp("etcd")), "127.0.0.1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator:
    made: list[Cluster] = []

    def make(**kw) -> Cluster:
        home = tmp_path / f"c{len(made)}"
        home.mkdir()
        c = Cluster(str(home), **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def cluster(cluster_factory) -> Cluster:
    return cluster_factory()


def head_digest(directory: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(directory, "volume-head-000.img"), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _running(proc: subprocess.Popen[bytes] | None) -> bool:
    """Alive and not stopped (a test's SIGSTOP)."""
    if proc is None or proc.poll() is not None:
        return False
    try:
        return proc_state(proc.pid) not in "TtZ"
    except OSError:
        return False


def wait_in_sync(c: Cluster, names: list[str] | None = None, timeout: float = 90.0) -> None:
    """Before comparing replica files: wait until the engine holds each of them RW. On a loaded
    machine (CI: two workers beside QEMU guests) a replica can miss the answer timeout and go
    ERR; the engine resyncs it by itself (every ping.REBUILD_RETRY_S), and until then its file
    is behind, which the engine knows: it reads and acknowledges without it. Such a replica is
    reported (stderr) with the engine's reason. Not waited for: an engine that is not running
    or not answering, a replica whose process is gone or stopped (the test's own fault)."""
    if not _running(c.engine):
        return
    procs = {r.cfg.name: r.proc for r in c.reps}
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    while True:
        try:
            status = c.status()
        except BlockhornError:
            return       # no control socket: the engine is going away (a detach stops it)
        behind = [r for r in status["replicas"]
                  if (names is None or r["name"] in names) and r["mode"] != "RW"
                  and _running(procs.get(r["name"]))]
        if not behind:
            return
        for r in behind:
            if r["name"] not in reported:
                reported.add(r["name"])
                print(f"replica {r['name']} is {r['mode']} ({r['error']}), rebuild "
                      f"{r['rebuild']}: waiting for the engine's resync", file=sys.stderr)
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas not back in sync within {timeout:g} s: {status}")
        time.sleep(0.2)


def assert_replicas_identical(c: Cluster, names: list[str] | None = None) -> None:
    """The invariant after every data test: RW replicas hold the same bytes (once a replica
    the engine set ERR under load is resynced: `wait_in_sync`)."""
    wait_in_sync(c, names)
    digests = {r.cfg.name: head_digest(r.cfg.directory) for r in c.reps
               if names is None or r.cfg.name in names}
    assert len(set(digests.values())) == 1, f"replicas differ: {digests}"


# The fuse tests' fixtures: a started FuseCluster (size by indirect parametrization, default
# 64 MiB) and a loop device on its file.
@pytest.fixture
def fc(tmp_path, request) -> Iterator[FuseCluster]:
    c = FuseCluster(str(tmp_path), size=getattr(request, "param", 64 << 20))
    try:
        yield c.start()   # type: ignore[misc]
    finally:
        c.stop()


@pytest.fixture
def loop(fc: FuseCluster, tmp_path) -> Iterator[Attachment]:
    att = attach_device(fc.uri, fc.mount, str(tmp_path / "attach.log"), "fuse")
    try:
        yield att
    finally:
        detach_device(att)


def any_shared_mount() -> bool:
    """Whether any mount of this mount namespace propagates (a `shared:N` tag)."""
    with open("/proc/self/mountinfo") as f:
        return any(" shared:" in line.split(" - ", 1)[0] for line in f)


made_shared = pytest.StashKey[bool]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Mount propagation as on a systemd host, where `/` is recursively shared. A process a test
    runs in a network namespace (`ip netns exec`: a cluster site's daemons, an etcd) gets a
    mount namespace of its own holding a copy of every mount, a slave of it. With every mount
    private (this machine has no systemd to share `/` at boot), another test's ext4 or FUSE
    mount copied into one of them outlives that test's umount: its loop device stays "in use"
    (e2fsck and resize2fs refuse it: stop 22's CI) until the namespaced process ends. Shared,
    the umount reaches the copies too. Undone at the end of the run when this run did it."""
    if os.geteuid() != 0 or any_shared_mount():
        return
    subprocess.run(["mount", "--make-rshared", "/"], check=True, capture_output=True)
    session.config.stash[made_shared] = not hasattr(session.config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole run (with pytest-xdist: in the controller, once every worker is done,
    so no test is half-way through a teardown): a FUSE connection that nothing mounts any more
    is a dead FUSE file, usually with a loop device still on it, left by some test's cleanup.
    It is said, with the devices, and released — aborted and detached — so that no later
    `sync` on this machine waits for it for ever."""
    if hasattr(session.config, "workerinput") or os.geteuid() != 0:
        return
    if session.config.stash.get(made_shared, False):
        subprocess.run(["mount", "--make-rprivate", "/"], check=False, capture_output=True)
    from support.cluster_site import orphaned_fuse, release_fuse
    left = orphaned_fuse(set())
    if not left:
        return
    loops = [dev for dev, on in loop_devices() if on is None or on in left]
    release_fuse(left)   # aborted (its detach by losetup's BACK-MAJ:MIN misses these)
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    msg = (f"LEFT BEHIND by a test: FUSE connection(s) {left} with no mount, loop device(s) "
           f"{loops or 'none'} on them: released now")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(msg, yellow=True)
    else:
        print(msg, file=sys.stderr)


LOOP_GET_STATUS64 = 0x4C05   # <linux/loop.h>; struct loop_info64 is 232 bytes, lo_device first


def loop_devices() -> list[tuple[str, int | None]]:
    """(device, FUSE connection of its file) of every bound loop device whose file is on a
    FUSE mount (major 0), from the kernel: the connection is the minor of the file's device,
    None when the kernel answers ENOTCONN (its FUSE server is dead). Not losetup's
    BACK-MAJ:MIN, which stats the file's path: a lazily unmounted FUSE file has none
    ("/volume")."""
    out: list[tuple[str, int | None]] = []
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith("loop"):
            continue
        try:
            fd = os.open(f"/dev/{name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(232))
            dev = struct.unpack_from("=Q", raw)[0]
            if os.major(dev) == 0:
                out.append((f"/dev/{name}", os.minor(dev)))
        except OSError as e:   # ENXIO: not bound
            if e.errno == errno.ENOTCONN:
                out.append((f"/dev/{name}", None))
        finally:
            os.close(fd)
    return out


def loop_bound_to(dev: str, fuse_dir: str) -> bool:
    """Whether loop device `dev` is still bound to a file of FUSE mount directory `fuse_dir`,
    or, that mount gone, to what the kernel then names its file ("/volume", "/nbd": a dead
    FUSE file). Not whether the name `dev` is bound at all: a test running beside this one
    (pytest-xdist) may have taken the freed name for a file of its own."""
    from blockhorn.nbd.attach import IMAGE_NAMES, loops_on
    return any(dev in loops_on(os.path.join(fuse_dir, n)) or dev in loops_on(f"/{n}")
               for n in IMAGE_NAMES)
