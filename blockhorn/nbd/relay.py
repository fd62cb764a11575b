"""The TLS proxy's nbdkit plugin: every request of a TCP client, forwarded to the engine's unix
socket over NBD with libnbd — reconnecting and re-sending when the engine goes away.

    nbdkit --tls=require ... python /path/to/blockhorn/nbd/relay.py socket=ENGINE.sock

The forwarding is the fuse-nbd holder's (`fuse.holder.NbdBackend`): one engine connection per
nbdkit worker thread; a request whose connection is lost (kill -9 of the engine, a crash) or
refused with ESHUTDOWN (the handover of a live upgrade, nbd/plugin.py) is sent again on a new
connection as soon as an engine listens on the socket again — polled every 5-50 ms, for up
to 60 s, then EIO. nbdkit's retry filter, which this replaces, waits whole seconds between
attempts (nbdkit 1.32: at least 1 s), which was most of a live upgrade's pause as a kernel
nbd-client saw it. Why re-sending is safe: docs/DURABILITY.md ("Which frontend survives
what"). An error the engine *answers* (EIO, ENOSPC, EINVAL) goes to the client at once.

Like nbd/plugin.py this runs in nbdkit's embedded system python3: the lines before the
blockhorn imports put this checkout on sys.path. Needs Debian's python3-libnbd.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbd  # noqa: E402  (Debian's python3-libnbd: the flags forwarded with each request)
import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from blockhorn.fuse.holder import NbdBackend  # noqa: E402  (standard library + libnbd only)
from blockhorn.nbd.exports import (  # noqa: E402,F401  (nbdkit looks them up here)
    block_size,
    can_cache,
    can_fast_zero,
    can_flush,
    can_fua,
    can_multi_conn,
    can_trim,
    can_write,
    can_zero,
)
from blockhorn.types import BlockhornError  # noqa: E402

API_VERSION = 2

_socket = ""
_backend: NbdBackend | None = None
_lock = threading.Lock()


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL   # libnbd drops the GIL while it waits


def config(key: str, value: str) -> None:
    global _socket
    if key != "socket":
        raise ValueError(f"unknown parameter {key!r}: the only parameter is socket=ENGINE.sock")
    _socket = value


def config_complete() -> None:
    if not _socket:
        raise ValueError("missing socket=ENGINE.sock")


def _errors_to_nbdkit(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except BlockhornError as e:
            nbdkit.set_error(e.errno)
            raise
    return wrapper


@_errors_to_nbdkit
def open(readonly: bool) -> int:  # noqa: A001  (the name nbdkit calls)
    """The first client connects to the engine (waiting for one, as for a request); a later
    one asks it for the size again (an expand since: a client learns it at its handshake)."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = NbdBackend(_socket)
        else:
            _backend.refresh_size()
    return 1


def _b() -> NbdBackend:
    assert _backend is not None   # open() made it before any request
    return _backend


def get_size(h: int) -> int:
    return _b().size


def _fua(flags: int) -> int:
    return nbd.CMD_FLAG_FUA if flags & nbdkit.FLAG_FUA else 0


@_errors_to_nbdkit
def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    _b().pread(buf, offset)


@_errors_to_nbdkit
def pwrite(h: int, buf: Any, offset: int, flags: int) -> None:
    _b().pwrite(buf, offset, _fua(flags))


@_errors_to_nbdkit
def flush(h: int, flags: int) -> None:
    _b().flush()


@_errors_to_nbdkit
def trim(h: int, count: int, offset: int, flags: int) -> None:
    _b().trim(offset, count, _fua(flags))


@_errors_to_nbdkit
def zero(h: int, count: int, offset: int, flags: int) -> None:
    if flags & nbdkit.FLAG_FAST_ZERO:
        raise BlockhornError("a fast zero is never promised", errno.ENOTSUP)
    no_hole = 0 if flags & nbdkit.FLAG_MAY_TRIM else nbd.CMD_FLAG_NO_HOLE
    _b().zero(offset, count, _fua(flags) | no_hole)
