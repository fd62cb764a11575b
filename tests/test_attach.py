"""Tier 4: a volume as a real block device — nbdfuse + loop + mkfs.ext4 + mount — through
detach and attach again, and a replica killed under fio with verification."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
from conftest import assert_replicas_identical, needs_root

from blockhorn.nbd.attach import attach_device, detach_device, is_mounted

pytestmark = needs_root()
MiB = 1 << 20


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_mkfs_mount_write_detach_attach_read_back(cluster, tmp_path) -> None:
    fuse_dir, mnt = str(tmp_path / "fuse"), str(tmp_path / "mnt")
    os.makedirs(mnt)
    att = attach_device(cluster.uri, fuse_dir, str(tmp_path / "nbdfuse.log"), "nbdfuse")
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
    assert not is_mounted(fuse_dir)
    assert att.device not in sh("losetup", "-a")
    assert_replicas_identical(cluster)

    cluster.stop_engine()
    cluster.start_engine()
    att = attach_device(cluster.uri, fuse_dir, str(tmp_path / "nbdfuse.log"), "nbdfuse")
    try:
        sh("fsck.ext4", "-n", att.device)
        sh("mount", att.device, mnt)
        with open(os.path.join(mnt, "data.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
        sh("umount", mnt)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        detach_device(att)


def test_detach_cleans_up_after_nbdfuse_crash(cluster, tmp_path) -> None:
    fuse_dir = str(tmp_path / "fuse")
    att = attach_device(cluster.uri, fuse_dir, str(tmp_path / "nbdfuse.log"), "nbdfuse")
    os.kill(att.pids["nbdfuse"], 9)
    time.sleep(0.2)
    detach_device(att)           # must not raise, must release the loop device and the mount
    assert not is_mounted(fuse_dir)
    assert att.device not in sh("losetup", "-a")
    att = attach_device(cluster.uri, fuse_dir, str(tmp_path / "nbdfuse.log"), "nbdfuse")
    detach_device(att)


@pytest.mark.timeout(240)
def test_ha_replica_killed_under_fio_verify(cluster, tmp_path) -> None:
    """fio writes with crc32c verification headers through the loop device while a replica
    dies; a second fio pass verifies every block after the fault."""
    fuse_dir = str(tmp_path / "fuse")
    att = attach_device(cluster.uri, fuse_dir, str(tmp_path / "nbdfuse.log"), "nbdfuse")
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
