"""A small ext4 file system on a loop device, mounted for a test (disk-full faults).

`loop_ext4(image, mountpoint)` makes the image (sparse), `mkfs.ext4`, attaches it with
`losetup --find` (a free device: unique per run) and mounts it; at exit, even after a failure,
it unmounts (lazily if a process still holds a file there), detaches and removes the image.
`fill(mountpoint)` writes a filler file until the file system is full; removing it returns the
space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator

MiB = 1 << 20
FILLER = "filler"


@contextlib.contextmanager
def loop_ext4(image: str, mountpoint: str, size: int = 64 * MiB) -> Iterator[str]:
    with open(image, "wb") as f:
        f.truncate(size)
    # No lazy init threads writing behind the test's back; root's 5 % reserve kept (replicas
    # run as root, as in production, and may use it: the filler does too).
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    image], check=True, capture_output=True, timeout=60)
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True,
                         capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        os.makedirs(mountpoint, exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", dev, mountpoint], check=True,
                       capture_output=True, timeout=30)
        try:
            yield mountpoint
        finally:
            if subprocess.run(["umount", mountpoint], capture_output=True,
                              timeout=30).returncode:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=30)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        os.unlink(image)


def fill(mountpoint: str) -> int:
    """Write a filler file until ENOSPC, down to 4 KiB pieces, and sync it: afterwards no block
    is free, even for root. Returns the bytes written."""
    path = os.path.join(mountpoint, FILLER)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for piece in (MiB, 4096):
            buf = bytes(piece)
            while True:
                try:
                    written += os.write(fd, buf)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def free(mountpoint: str) -> None:
    """Space returns: the filler goes (and the freeing reaches the disk)."""
    os.unlink(os.path.join(mountpoint, FILLER))
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        os.fsync(fd)       # ext4: commits the journal that frees the blocks
    finally:
        os.close(fd)
