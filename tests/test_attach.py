"""Tier 4: a volume as a real block device — nbdfuse + loop, or the pyfuse3 frontend + loop —
then mkfs.ext4 + mount, through detach and attach again, and a replica killed under fio with
verification. Every test runs on both frontends."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import assert_replicas_identical, loop_bound_to, needs_root
from fuse_harness import FuseCluster
from harness import Cluster

from blockhorn.nbd.attach import Attachment, attach_device, detach_device, is_mounted

pytestmark = needs_root()
MiB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(params=["nbdfuse", "fuse"])
def frontend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster(tmp_path, frontend: str) -> Iterator[Cluster]:
    """nbdkit engine for nbdfuse; the engine inside `blockhorn fuse serve` for fuse."""
    home = tmp_path / "c"
    home.mkdir()
    c = FuseCluster(str(home)) if frontend == "fuse" else Cluster(str(home))
    try:
        yield c.start()
    finally:
        c.stop()


def fuse_dir(c: Cluster, tmp_path) -> str:
    return c.mount if isinstance(c, FuseCluster) else str(tmp_path / "fuse")


def attach(c: Cluster, tmp_path) -> Attachment:
    frontend = "fuse" if isinstance(c, FuseCluster) else "nbdfuse"
    return attach_device(c.uri, fuse_dir(c, tmp_path), str(tmp_path / "nbdfuse.log"), frontend)


def test_mkfs_mount_write_detach_attach_read_back(cluster, tmp_path) -> None:
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    att = attach(cluster, tmp_path)
    try:
        assert att.device.startswith("/dev/loop")
        assert int(sh("blockdev", "--getsize64", att.device)) == 64 * MiB
        sh("mkfs.ext4", "-q", "-F", att.device)
        sh("mount", att.device, mnt)
        payload = os.urandom(5 * MiB + 123)
        with open(os.path.join(mnt, "data.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        sh("umount", mnt)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        detach_device(att)
    assert not is_mounted(fuse_dir(cluster, tmp_path))
    assert not loop_bound_to(att.device, fuse_dir(cluster, tmp_path))
    cluster.stop_engine()   # the fuse engine exits after its unmount: wait for its last FLUSH
    assert_replicas_identical(cluster)

    cluster.start_engine()
    att = attach(cluster, tmp_path)
    try:
        sh("fsck.ext4", "-n", att.device)
        sh("mount", att.device, mnt)
        with open(os.path.join(mnt, "data.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
        sh("umount", mnt)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        detach_device(att)


def test_detach_cleans_up_after_frontend_crash(cluster, tmp_path) -> None:
    """The process behind the FUSE file dies (nbdfuse; for fuse the engine process itself):
    detach releases the loop device and the dead mount, and a new attach works."""
    att = attach(cluster, tmp_path)
    if isinstance(cluster, FuseCluster):
        cluster.engine.kill()  # type: ignore[union-attr]
        cluster.engine.wait(10)  # type: ignore[union-attr]
    else:
        os.kill(att.pids["nbdfuse"], 9)
    time.sleep(0.2)
    detach_device(att)           # must not raise, must release the loop device and the mount
    assert not is_mounted(fuse_dir(cluster, tmp_path))
    assert not loop_bound_to(att.device, fuse_dir(cluster, tmp_path))
    if isinstance(cluster, FuseCluster):
        cluster.start_engine()
    att = attach(cluster, tmp_path)
    detach_device(att)


@pytest.mark.timeout(240)
def test_ha_replica_killed_under_fio_verify(cluster, tmp_path) -> None:
    """fio writes with crc32c verification headers through the loop device while a replica
    dies; a second fio pass verifies every block after the fault."""
    att = attach(cluster, tmp_path)
    common = ["fio", "--name=v", f"--filename={att.device}", "--direct=1", "--bs=16k",
              "--size=48m", "--ioengine=psync", "--verify=crc32c", "--verify_backlog=0",
              "--randrepeat=1", "--rw=randwrite", "--verify_state_save=0"]
    try:
        writer = subprocess.Popen(common + ["--do_verify=0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        assert writer.poll() is None, "fio finished before the fault: make it write more"
        cluster.reps[2].kill()
        out, _ = writer.communicate(timeout=200)
        assert writer.returncode == 0, out
        check = subprocess.run(common + ["--verify_only"], capture_output=True, text=True,
                               timeout=200)
        assert check.returncode == 0 and "verify" not in check.stderr.lower(), check.stdout
        assert cluster.modes()["vol-r2"] == "ERR"
    finally:
        detach_device(att)
    assert_replicas_identical(cluster, ["vol-r0", "vol-r1"])
