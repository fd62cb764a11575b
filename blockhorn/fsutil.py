"""File-system helpers with the durability rules of docs/DURABILITY.md built in.

`atomic_write` is the only way blockhorn writes metadata: temp file in the same directory,
fsync, `os.replace`, fsync the directory — so a crash leaves either the old or the new file,
never a torn one, and a completed call survives power loss.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

from blockhorn.types import BlockhornError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"   # threads of one process too
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


def atomic_write_json(path: str, obj: Any, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise BlockhornError(f"fallocate: {os.strerror(err)}", err)


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros with blocks allocated (falls back to writes)."""
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
    except BlockhornError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            offset += os.pwrite(fd, chunk[: end - offset], offset)


def data_extents(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """Yield (start, end) of the ranges holding data in [offset, offset+length), by
    SEEK_DATA/SEEK_HOLE: what the file system knows, nothing read."""
    end = offset + length
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:   # no data after pos
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, stop
        pos = stop


def preadv_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `fd` at `offset`; bytes past the end of file read as zeros."""
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            buf[done:] = bytes(total - done)
            return
        done += n


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int, flags: int = 0) -> None:
    view = memoryview(data)
    while view:
        n = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
