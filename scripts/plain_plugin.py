"""The ceiling of any nbdkit Python plugin on this machine: plain pread/pwrite on one file.

`make bench` serves it as target (p) with the same thread count as blockhorn's engine, so the
table shows how much of the gap to nbdkit's C `file` plugin is the Python plugin interface
itself (GIL, per-request callbacks) rather than replication.

    nbdkit --unix SOCK --threads N python scripts/plain_plugin.py file=PATH
"""

import os

import nbdkit

API_VERSION = 2
_fd = -1


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    global _fd
    if key != "file":
        raise ValueError(f"unknown parameter {key!r}; use file=PATH")
    _fd = os.open(value, os.O_RDWR)


def open(readonly: bool) -> int:  # noqa: A001  (the name nbdkit calls)
    return 1


def get_size(h: int) -> int:
    return os.fstat(_fd).st_size


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    os.preadv(_fd, [buf], offset)


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    os.pwrite(_fd, buf, offset)


def flush(h: int, flags: int) -> None:
    os.fdatasync(_fd)
