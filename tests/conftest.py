from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuse_harness import FuseCluster  # noqa: E402
from harness import Cluster  # noqa: E402

from blockhorn.nbd.attach import Attachment, attach_device, detach_device  # noqa: E402


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


def assert_replicas_identical(c: Cluster, names: list[str] | None = None) -> None:
    """The invariant after every data test: RW replicas hold the same bytes."""
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
