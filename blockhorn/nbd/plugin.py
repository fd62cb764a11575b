"""The nbdkit Python plugin: a thin shell around one `Engine`.

    nbdkit --foreground --unix SOCK python /path/to/blockhorn/nbd/plugin.py config=ENGINE.json

nbdkit embeds Debian's system python3, not the venv: the lines before the blockhorn imports put
this checkout (and, before Debian's packages, its venv's site-packages, if any) on sys.path.
nbdkit forks after `get_ready`, so the engine's threads start in `after_fork`.
"""

from __future__ import annotations

import errno
import functools
import glob
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# The venv's packages come before Debian's, as they do for the venv's own interpreter: the
# frame MACs need its `cryptography` (>= 42; Debian's 38 computes a GMAC at a third of the
# speed: replica/proto.py `one_shot_gmac`).
for _site in glob.glob(os.path.join(_ROOT, ".venv", "lib", "python3*", "site-packages")):
    if _site not in sys.path:
        sys.path.insert(1, _site)

import nbdkit  # noqa: E402  (provided by nbdkit's embedded interpreter)

from blockhorn.config import EngineConfig  # noqa: E402
from blockhorn.engine.control import ControlServer  # noqa: E402
from blockhorn.engine.engine import Engine  # noqa: E402
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
from blockhorn.types import (  # noqa: E402
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


HANDOVER_DRAIN_S = 30.0   # seconds the requests running at a handover have to finish


class _Gate:
    """Counts the data requests inside the engine. Closed by a handover: from then on a request
    fails with ESHUTDOWN, which the TLS proxy's relay re-sends to the next engine, and
    the handover waits until the ones running have been answered."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self.closed = False

    def enter(self) -> None:
        with self._cond:
            if self.closed:
                raise BlockhornError("the engine is handing over to its successor",
                                     errno.ESHUTDOWN)
            self._running += 1

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            if self.closed:    # only a handover waits (closed is set before it waits)
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        with self._cond:
            self.closed = True
            if self._cond.wait_for(lambda: self._running == 0, timeout):
                return True
            self.closed = False   # not drained: serve on, the upgrade is abandoned
            return False


_gate = _Gate()
_handed_over = False


def _handover() -> dict[str, Any]:
    """Live upgrade behind the TCP proxy (manager/upgrade.py): nbdkit keeps running while it
    has a client (the proxy), so SIGTERM cannot stop it; instead new requests are refused, the
    running ones drained, and the engine closed as at a normal exit (final FLUSH, replicas
    closed cleanly at one revision). The daemon then SIGKILLs this nbdkit."""
    global _handed_over
    assert _engine is not None
    if not _gate.close(HANDOVER_DRAIN_S):
        raise BlockhornError(f"requests still running after {HANDOVER_DRAIN_S:g} s: the "
                             "engine goes on serving", errno.ETIMEDOUT)
    _handed_over = True
    _engine.close()
    return {"closed": True}


def after_fork() -> None:
    global _engine, _control
    assert _cfg is not None
    _engine = Engine(_cfg)
    _engine.start()
    _control = ControlServer(_engine, _cfg.control_socket, {"handover": _handover})
    _control.start()


def cleanup() -> None:
    if _control is not None:
        _control.stop()
    if _engine is not None and not _handed_over:
        _engine.close()


def _errors_to_nbdkit(fn: Callable[..., None]) -> Callable[..., None]:
    """The edge where blockhorn errors become NBD errors: set nbdkit's errno, then raise.
    Every data request passes the handover gate."""
    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            _gate.enter()
            try:
                fn(*args)
            finally:
                _gate.leave()
        except BlockhornError as e:
            nbdkit.set_error(e.errno)
            raise
    return wrapper


def open(readonly: bool) -> int:  # noqa: A001  (the name nbdkit calls)
    return 1


def get_size(h: int) -> int:
    assert _engine is not None
    return _engine.size


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
