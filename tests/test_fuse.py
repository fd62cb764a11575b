"""Tier 4, the pyfuse3 frontend: the volume file itself, O_DIRECT and unaligned I/O through the
loop device, fsync reaching the replicas, concurrent I/O, the process lifecycle, and the daemon
attaching with `--frontend fuse`. (The end-to-end suite in test_attach.py runs on it too.)"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess

import pytest
from conftest import assert_replicas_identical, loop_bound_to, needs_root, wait_in_sync
from daemon_util import Env, wait_until
from fuse_harness import FuseCluster

from blockhorn.nbd.attach import Attachment, is_mounted

pytestmark = needs_root()
MiB = 1 << 20


def replica_bytes(fc: FuseCluster, offset: int, length: int) -> bytes:
    """What the first replica's head file holds, once the engine holds every replica in sync."""
    wait_in_sync(fc)
    with open(os.path.join(fc.reps[0].cfg.directory, "volume-head-000.img"), "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")   # a sparse tail reads short


def aligned(data: bytes) -> mmap.mmap:
    """A page-aligned buffer holding `data`, for O_DIRECT."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def flushes(fc: FuseCluster) -> int:
    return int(fc.status()["counters"]["flushes"])


def test_volume_file_unaligned_io_reaches_every_replica(fc: FuseCluster) -> None:
    assert os.path.getsize(fc.image) == fc.size
    assert os.listdir(fc.mount) == ["volume"]
    writes = [(0, os.urandom(1)), (4095, os.urandom(2)), (12345, os.urandom(70001)),
              (fc.size - 777, os.urandom(777))]
    fd = os.open(fc.image, os.O_RDWR)
    try:
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
        for off, data in writes:
            assert os.pread(fd, len(data), off) == data
        assert os.pread(fd, 100, fc.size - 10) == writes[-1][1][-10:]   # short read at EOF
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 10, fc.size - 5)   # past the end of the volume
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, fc.size * 2)   # the size is the volume's
        assert e.value.errno == errno.EPERM
        os.fsync(fd)
    finally:
        os.close(fd)
    for off, data in writes:
        assert replica_bytes(fc, off, len(data)) == data
    assert_replicas_identical(fc)


def test_reads_not_in_the_page_cache_take_the_blocking_path(fc: FuseCluster) -> None:
    """Reads are served inline only from the page cache (RWF_NOWAIT); evicted data comes
    through the engine's blocking `pread` in a worker thread, with the same bytes."""
    data = os.urandom(256 << 10)
    fd = os.open(fc.image, os.O_RDWR)
    try:
        os.pwrite(fd, data, 4 * MiB)
        os.fsync(fd)   # clean pages can be evicted
        for r in fc.reps:
            head = os.open(os.path.join(r.cfg.directory, "volume-head-000.img"), os.O_RDONLY)
            os.posix_fadvise(head, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(head)
        before = fc.status()["counters"]["reads"]
        assert os.pread(fd, len(data), 4 * MiB) == data
        assert fc.status()["counters"]["reads"] > before
        assert os.pread(fd, len(data), 4 * MiB) == data   # now cached: the inline path
    finally:
        os.close(fd)


def test_loop_o_direct_and_unaligned_io(fc: FuseCluster, loop: Attachment) -> None:
    direct = [(0, os.urandom(4096)), (5 * 4096, os.urandom(64 << 10)),
              (3 * MiB, os.urandom(MiB + 4096))]
    fd = os.open(loop.device, os.O_RDWR | os.O_DIRECT)
    try:
        for off, data in direct:
            assert os.pwritev(fd, [aligned(data)], off) == len(data)
        for off, data in direct:
            buf = aligned(bytes(len(data)))
            assert os.preadv(fd, [buf], off) == len(data)
            assert bytes(buf) == data
    finally:
        os.close(fd)
    # Unaligned through the page cache of the block device: the kernel reads the blocks
    # around it, merges, and writes whole blocks back on fsync.
    odd = [(8192 + 123, os.urandom(1000)), (8 * MiB - 7, os.urandom(4099))]
    fd = os.open(loop.device, os.O_RDWR)
    try:
        for off, data in odd:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(loop.device, os.O_RDONLY | os.O_DIRECT)
    try:
        for off, data in odd:
            start = off // 4096 * 4096
            buf = aligned(bytes((off + len(data) - start + 4095) // 4096 * 4096))
            os.preadv(fd, [buf], start)
            assert bytes(buf)[off - start:off - start + len(data)] == data
    finally:
        os.close(fd)
    for off, data in direct + odd:
        assert replica_bytes(fc, off, len(data)) == data
    assert_replicas_identical(fc)


def test_fsync_reaches_the_replicas(fc: FuseCluster, loop: Attachment) -> None:
    """fsync on the device -> loop FLUSH -> fsync of the FUSE file -> engine FLUSH, which
    every replica answers only after fdatasync (docs/DURABILITY.md)."""
    before = flushes(fc)
    fd = os.open(loop.device, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwritev(fd, [aligned(os.urandom(4096))], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert flushes(fc) > before
    before = flushes(fc)
    fd = os.open(loop.device, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        os.pwritev(fd, [aligned(os.urandom(4096))], 4096)   # FUA: write, then a FLUSH
    finally:
        os.close(fd)
    assert flushes(fc) > before


@pytest.mark.timeout(200)
def test_concurrent_io_verified(fc: FuseCluster, loop: Attachment) -> None:
    """Many requests in flight at once (libaio QD32, two jobs on separate halves), every block
    verified afterwards."""
    common = ["fio", f"--filename={loop.device}", "--direct=1", "--ioengine=libaio",
              "--iodepth=32", "--bs=4k", "--size=24m", "--numjobs=2", "--offset_increment=24m",
              "--rw=randwrite", "--verify=crc32c", "--verify_state_save=0", "--name=c",
              "--group_reporting"]
    out = subprocess.run(common + ["--do_verify=0"], capture_output=True, text=True,
                         timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    check = subprocess.run(common + ["--verify_only"], capture_output=True, text=True,
                           timeout=150)
    assert check.returncode == 0 and "verify" not in check.stderr.lower(), check.stdout
    assert_replicas_identical(fc)


def test_sigterm_unmounts_and_closes(fc: FuseCluster) -> None:
    assert is_mounted(fc.mount)
    fc.engine.send_signal(signal.SIGTERM)   # type: ignore[union-attr]
    assert fc.engine.wait(20) == 0   # type: ignore[union-attr]
    assert not is_mounted(fc.mount)
    assert not os.path.exists(fc.control_socket)


def test_start_cleans_a_stale_mount(fc: FuseCluster) -> None:
    fc.engine.kill()   # type: ignore[union-attr]
    fc.engine.wait(10)   # type: ignore[union-attr]
    assert is_mounted(fc.mount)   # dead: stat answers ENOTCONN
    with pytest.raises(OSError) as e:
        os.stat(fc.image)
    assert e.value.errno == errno.ENOTCONN
    fc.start_engine()
    assert os.path.getsize(fc.image) == fc.size


def test_daemon_attach_fuse_frontend(tmp_path) -> None:
    with Env() as env:
        env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
        dev = env.cli("volume", "attach", "v", "--frontend", "fuse").stdout.strip()
        assert dev.startswith("/dev/loop")
        show = env.show("v")
        assert show["frontend"] == "fuse" and show["endpoint"] is None
        assert show["robustness"] == "healthy"
        data = os.urandom(MiB)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [aligned(data)], 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert env.show("v")["counters"]["flushes"] >= 1
        env.cli("volume", "detach", "v")
        assert not is_mounted(env.home.fuse_dir("v"))
        assert not loop_bound_to(dev, env.home.fuse_dir("v"))

        dev = env.cli("volume", "attach", "v", "--frontend", "fuse").stdout.strip()
        with open(dev, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(MiB) == data
        # The FUSE process is the engine: killed, it is restarted and the device reported.
        os.kill(env.show("v")["engine"]["pid"], signal.SIGKILL)
        try:
            show = wait_until(lambda: (lambda s: s if "engine restarted" in (s["message"] or "")
                                       else None)(env.show("v")), 30, "engine restart")
        except AssertionError:
            with open(env.home.log("v-engine.log")) as f:
                raise AssertionError(f"{env.show('v')['message']}\n{f.read()[-2000:]}") from None
        assert "detach and attach" in show["message"]
        env.cli("volume", "detach", "v")
        assert not is_mounted(env.home.fuse_dir("v"))
        # The dead engine's loop device went with its mount: none is left holding the dead
        # FUSE connection (its backing file would read "/volume").
        assert not loop_bound_to(dev, env.home.fuse_dir("v"))


def test_expand_grows_the_file_and_the_loop_device(fc: FuseCluster, loop: Attachment) -> None:
    """`expand` through the control socket: the file grows; `losetup -c` grows the device."""
    new = fc.size + 8 * MiB
    fc.control().call({"op": "expand", "size": new})
    wait_until(lambda: os.path.getsize(fc.image) == new, 10, "the file to grow")
    subprocess.run(["losetup", "-c", loop.device], check=True)
    size = subprocess.run(["blockdev", "--getsize64", loop.device], check=True,
                          capture_output=True, text=True).stdout
    assert int(size) == new
    fd = os.open(loop.device, os.O_RDWR | os.O_DIRECT)
    try:
        data = os.urandom(MiB)
        os.pwritev(fd, [aligned(data)], new - MiB)   # in the new part
        buf = aligned(bytes(MiB))
        os.preadv(fd, [buf], new - MiB)
        assert bytes(buf) == data
    finally:
        os.close(fd)
