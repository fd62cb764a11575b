"""The nbdkit Python plugin: a thin shell around one `Engine`.

    nbdkit --foreground --unix SOCK python /path/to/blockhorn/nbd/plugin.py config=ENGINE.json

nbdkit embeds Debian's system python3, not the venv: the lines before the blockhorn imports put
this checkout (and its venv's site-packages, if any) on sys.path. The engine needs only the
standard library. nbdkit forks after `get_ready`, so the engine's threads start in `after_fork`.
"""

from __future__ import annotations

import errno
import functools
import glob
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
for _site in glob.glob(os.path.join(_ROOT, ".venv", "lib", "python3*", "site-packages")):
    if _site not in sys.path:
        sys.path.append(_site)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from blockhorn.config import EngineConfig  # noqa: E402
from blockhorn.engine.control import ControlServer  # noqa: E402
from blockhorn.engine.engine import Engine  # noqa: E402
from blockhorn.types import (  # noqa: E402
    BLOCK_SIZE,
    MAX_REQUEST,
    BlockhornError,
    InvalidArgument,
)

API_VERSION = 2

_config_path: str | None = None
_cfg: EngineConfig | None = None
_engine: Engine | None = None
_control: ControlServer | None = None


def thread_model() -> int:
    # The engine is thread-safe; requests from all connections run in parallel.
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    global _config_path
    if key != "config":
        raise ValueError(f"unknown parameter {key!r}: the only parameter is config=ENGINE.json")
    _config_path = value


def config_complete() -> None:
    if not _config_path:
        raise ValueError("missing config=ENGINE.json")


def get_ready() -> None:
    global _cfg
    assert _config_path is not None  # config_complete() checked it
    _cfg = EngineConfig.load(_config_path)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s engine[{_cfg.volume}] %(levelname)s %(message)s")


def after_fork() -> None:
    global _engine, _control
    assert _cfg is not None
    _engine = Engine(_cfg)
    _engine.start()
    _control = ControlServer(_engine, _cfg.control_socket)
    _control.start()


def cleanup() -> None:
    if _control is not None:
        _control.stop()
    if _engine is not None:
        _engine.close()


def _errors_to_nbdkit(fn: Callable[..., None]) -> Callable[..., None]:
    """The edge where blockhorn errors become NBD errors: set nbdkit's errno, then raise."""
    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except BlockhornError as e:
            nbdkit.set_error(e.errno)
            raise
    return wrapper


def open(readonly: bool) -> int:  # noqa: A001  (the name nbdkit calls)
    return 1


def get_size(h: int) -> int:
    assert _engine is not None
    return _engine.size


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fast_zero(h: int) -> bool:
    # Zeroing punches holes on a single-layer replica but writes zeros over snapshots: never
    # guaranteed fast, so every fast-zero request is refused at once with ENOTSUP (`zero`),
    # which is what the spec asks of a server that cannot promise speed. Advertising it
    # anyway is not a lie, and it is needed: nbdkit 1.32 does not reject the FAST_ZERO flag
    # of a client that ignores the handshake, and then aborts on an assertion (one request
    # from any client took the whole engine down: tests/t4_nbd_malformed.py).
    return True


def can_fua(h: int) -> int:
    # FUA is forwarded: each replica writes with RWF_DSYNC before answering.
    return nbdkit.FUA_NATIVE


def can_multi_conn(h: int) -> bool:
    # One engine serves every connection and FLUSH reaches every replica after all writes
    # acknowledged before it, whatever connection they came from.
    return True


def can_cache(h: int) -> int:
    return nbdkit.CACHE_NONE


def block_size(h: int) -> tuple[int, int, int]:
    # minimum 1: the engine handles unaligned requests itself (read-patch-write where needed);
    # preferred 4096, the layer map's unit; maximum MAX_REQUEST (32 MiB, what NBD requires to
    # work and what the replica protocol carries in one frame).
    return 1, BLOCK_SIZE, MAX_REQUEST


def _check_length(count: int) -> None:
    """Refuse a payload larger than the advertised maximum before it reaches the engine: a
    replica closes a connection whose frame exceeds its limit, so forwarding it would set
    every replica ERR — one client's oversized request would fault the volume."""
    if count > MAX_REQUEST:
        raise InvalidArgument(f"request of {count} bytes exceeds the maximum block size "
                              f"{MAX_REQUEST}")


@_errors_to_nbdkit
def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    _check_length(len(buf))
    _engine.pread(buf, offset)  # type: ignore[union-attr]


@_errors_to_nbdkit
def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    _check_length(len(buf))
    _engine.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))  # type: ignore[union-attr]


@_errors_to_nbdkit
def flush(h: int, flags: int) -> None:
    _engine.flush()  # type: ignore[union-attr]


@_errors_to_nbdkit
def trim(h: int, count: int, offset: int, flags: int) -> None:
    _engine.trim(offset, count, fua=bool(flags & nbdkit.FLAG_FUA))  # type: ignore[union-attr]


@_errors_to_nbdkit
def zero(h: int, count: int, offset: int, flags: int) -> None:
    if flags & nbdkit.FLAG_FAST_ZERO:
        raise BlockhornError("zeroing is not guaranteed to be fast", errno.ENOTSUP)
    _engine.zero(offset, count, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),  # type: ignore[union-attr]
                 fua=bool(flags & nbdkit.FLAG_FUA))
