"""Tier 4, the pyfuse3 frontend's fallocate: TRIM and write-zeroes from the loop device (and from
fallocate(2) on the volume file) reach every replica, which frees the space. Needs pyfuse3 built
with patches/pyfuse3-fallocate.patch (scripts/setup.sh); the first test fails if it is not."""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import mmap
import os
import subprocess

import pyfuse3
import pytest
from conftest import assert_replicas_identical, needs_root, wait_in_sync
from daemon_util import wait_until
from fuse_harness import FuseCluster

from blockhorn.fsutil import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    data_extents,
    fallocate,
)
from blockhorn.fuse.fs import FALLOCATE_CHUNK
from blockhorn.nbd.attach import Attachment
from blockhorn.types import BlockhornError

MiB = 1 << 20
FALLOC_FL_COLLAPSE_RANGE = 0x08
HEAD = "volume-head-000.img"


def counters(fc: FuseCluster) -> dict[str, int]:
    return {k: int(v) for k, v in fc.status()["counters"].items()}


def sha(data: bytes | mmap.mmap) -> str:
    return hashlib.sha256(data).hexdigest()


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read through O_DIRECT: what the engine returns now, not an old page cache."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
            assert n > 0, f"short read at {offset + done}"
            done += n
    finally:
        os.close(fd)
    return bytes(buf)


def write_direct(path: str, data: bytes, offset: int) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replica_files(fc: FuseCluster) -> list[str]:
    """The replicas' head files, once the engine holds every replica in sync."""
    wait_in_sync(fc)
    return [os.path.join(r.cfg.directory, HEAD) for r in fc.reps]


def replica_read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")   # a sparse tail reads short


def holds_data(path: str, offset: int, length: int) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, offset, length))
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    """Bytes the replica's file system has allocated for it (st_blocks)."""
    return os.stat(path).st_blocks * 512


def usage(fc: FuseCluster) -> list[int]:
    return [allocated(p) for p in replica_files(fc)]


def test_patched_pyfuse3_is_installed() -> None:
    """Stock pyfuse3 has no fallocate: a broken or skipped build must not pass silently."""
    assert hasattr(pyfuse3.Operations, "fallocate"), \
        "pyfuse3 without the fallocate handler: run `make setup` (scripts/setup.sh builds it)"
    assert "+blockhorn.fallocate" in importlib.metadata.version("pyfuse3")


@needs_root()
def test_loop_device_advertises_discard_and_write_zeroes(fc: FuseCluster,
                                                         loop: Attachment) -> None:
    queue = f"/sys/block/{os.path.basename(loop.device)}/queue"

    def limits() -> tuple[int, int]:
        return tuple(int(open(f"{queue}/{k}").read())   # type: ignore[return-value]
                     for k in ("discard_max_bytes", "write_zeroes_max_bytes"))

    assert all(limits()), limits()
    # The loop driver clears these after the first EOPNOTSUPP (what stock pyfuse3 answered):
    # one discard and one zeroout later, they must still be there.
    subprocess.run(["blkdiscard", "-o", "0", "-l", str(MiB), loop.device], check=True)
    subprocess.run(["blkdiscard", "-z", "-o", "0", "-l", str(MiB), loop.device], check=True)
    assert all(limits()), limits()


@needs_root()
@pytest.mark.parametrize("fc", [192 * MiB], indirect=True)
def test_blkdiscard_punches_every_replica(fc: FuseCluster, loop: Attachment) -> None:
    head, tail = os.urandom(32 * MiB), os.urandom(32 * MiB)
    write_direct(loop.device, head, 0)
    write_direct(loop.device, tail, 160 * MiB)
    before = counters(fc)["trims"]
    off, length = 8 * MiB, 160 * MiB          # all of both patterns but [0, 8) and [168, 192)
    subprocess.run(["blkdiscard", "-o", str(off), "-l", str(length), loop.device], check=True)

    assert read_direct(loop.device, off, length) == bytes(length)
    assert sha(read_direct(loop.device, 0, 8 * MiB)) == sha(head[:8 * MiB])
    assert sha(read_direct(loop.device, 168 * MiB, 24 * MiB)) == sha(tail[8 * MiB:])
    # One discard, split into bounded engine calls (FALLOCATE_CHUNK) by the FUSE handler.
    assert counters(fc)["trims"] - before == -(-length // FALLOCATE_CHUNK)
    for path in replica_files(fc):
        assert holds_data(path, off, length) == [], path   # a hole, not written zeros
        assert sha(replica_read(path, 0, 8 * MiB)) == sha(head[:8 * MiB])
        assert sha(replica_read(path, 168 * MiB, 24 * MiB)) == sha(tail[8 * MiB:])
        assert allocated(path) <= 33 * MiB, (path, allocated(path))   # 32 MiB kept + edges
    assert_replicas_identical(fc)


@needs_root()
def test_fallocate_on_the_volume_file(fc: FuseCluster) -> None:
    data = os.urandom(8 * MiB)
    write_direct(fc.image, data, 0)
    c0 = counters(fc)

    # util-linux fallocate(1), unaligned: partial blocks read as zeros, neighbours intact.
    subprocess.run(["fallocate", "--punch-hole", "-o", "4097", "-l", "1000000", fc.image],
                   check=True)
    subprocess.run(["fallocate", "--zero-range", "-o", str(3 * MiB + 5), "-l", str(MiB),
                    fc.image], check=True)
    want = bytearray(data)
    want[4097:4097 + 1000000] = bytes(1000000)
    want[3 * MiB + 5:4 * MiB + 5] = bytes(MiB)
    assert sha(read_direct(fc.image, 0, 8 * MiB)) == sha(bytes(want))
    c1 = counters(fc)
    assert (c1["trims"] - c0["trims"], c1["zeros"] - c0["zeros"]) == (1, 1)
    for path in replica_files(fc):
        assert sha(replica_read(path, 0, 8 * MiB)) == sha(bytes(want)), path
        # Whole blocks inside the punched range are holes; a zeroed range stays allocated.
        assert holds_data(path, 8192, 4096 * 242) == [], path
        assert holds_data(path, 3 * MiB + 8192, 4096) != [], path

    fd = os.open(fc.image, os.O_RDWR)
    try:
        def errno_of(mode: int, offset: int, length: int) -> int:
            try:
                fallocate(fd, mode, offset, length)
            except BlockhornError as e:
                return e.errno
            return 0

        keep, punch, zero = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
        # Preallocation inside the volume: accepted, nothing to do (thin provisioning).
        assert errno_of(0, 0, fc.size) == 0
        assert errno_of(keep, fc.size - 4096, 2 * MiB) == 0
        # The file cannot grow: its size is the volume's.
        assert errno_of(0, fc.size - 4096, 8192) == errno.EFBIG
        assert errno_of(zero, fc.size - 4096, 8192) == errno.EFBIG
        assert errno_of(FALLOC_FL_COLLAPSE_RANGE, 0, MiB) == errno.EOPNOTSUPP
        assert counters(fc)["zeros"] == c1["zeros"]   # the refused zero did not start
        # KEEP_SIZE past the end: the part inside is done.
        write_direct(fc.image, os.urandom(MiB), fc.size - MiB)
        assert errno_of(punch | keep, fc.size - 4096, MiB) == 0
        assert errno_of(zero | keep, fc.size - 2 * 4096, MiB) == 0
        assert os.path.getsize(fc.image) == fc.size
        # Errors above did not switch fallocate off (only ENOSYS would).
        assert errno_of(punch | keep, 0, 4096) == 0
    finally:
        os.close(fd)
    assert read_direct(fc.image, fc.size - 8192, 8192) == bytes(8192)
    assert read_direct(fc.image, 0, 4096) == bytes(4096)
    assert_replicas_identical(fc)


def _mount(device: str, mnt: str, *options: str) -> None:
    subprocess.run(["mount", *options, device, mnt], check=True)


@needs_root()
@pytest.mark.parametrize("fc", [128 * MiB], indirect=True)
def test_mkfs_and_fstrim_free_replica_space(fc: FuseCluster, loop: Attachment,
                                            tmp_path) -> None:
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    write_direct(loop.device, os.urandom(96 * MiB), 0)
    junk = usage(fc)
    assert min(junk) >= 96 * MiB, junk
    # mkfs.ext4 discards the whole device first (its default): the junk is gone everywhere.
    subprocess.run(["mkfs.ext4", "-q", "-F", loop.device], check=True)
    formatted = usage(fc)
    assert max(formatted) < 24 * MiB, formatted

    _mount(loop.device, mnt)
    files = {f"f{i}": os.urandom(8 * MiB) for i in range(6)}
    try:
        for name, data in files.items():
            with open(os.path.join(mnt, name), "wb") as f:
                f.write(data)
        os.sync()
        written = usage(fc)
        for name in ("f0", "f2", "f3", "f5"):
            os.unlink(os.path.join(mnt, name))
            del files[name]
        os.sync()
        removed = usage(fc)   # without discard, ext4 frees blocks only in its own bitmaps
        subprocess.run(["fstrim", mnt], check=True)
        trimmed = usage(fc)
    finally:
        subprocess.run(["umount", mnt], check=True)
    print(f"replica usage MiB: junk {[u / MiB for u in junk]}, after mkfs "
          f"{[u / MiB for u in formatted]}, 6 files written {[u / MiB for u in written]}, 4 "
          f"removed {[u / MiB for u in removed]}, after fstrim {[u / MiB for u in trimmed]}")
    assert min(written) - max(formatted) >= 48 * MiB, (formatted, written)
    for w, t in zip(written, trimmed, strict=True):
        assert w - t >= 30 * MiB, (written, trimmed)   # 4 files of 8 MiB, less edges

    # The files left are intact, read back from the replicas (a fresh mount, no page cache).
    subprocess.run(["e2fsck", "-fn", loop.device], check=True, capture_output=True)
    _mount(loop.device, mnt, "-o", "discard")
    try:
        for name, data in files.items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert sha(f.read()) == sha(data), name
        # ext4 `-o discard`: freed blocks are discarded at the journal commit, no fstrim.
        before = usage(fc)
        os.unlink(os.path.join(mnt, "f1"))
        os.sync()
        wait_until(lambda: all(b - u >= 7 * MiB for b, u in zip(before, usage(fc), strict=True)),
                   timeout=30, what="online discard to free f1's blocks on every replica")
    finally:
        subprocess.run(["umount", mnt], check=True)
    assert_replicas_identical(fc)
