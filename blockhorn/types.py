"""Shared vocabulary: replica modes, errors carrying errno, sizes and names.

Every layer raises `BlockhornError` (or a subclass) with an errno; the edges translate it
(nbdkit callbacks -> `nbdkit.set_error`, CLI -> message + exit code, wire -> status code).
"""

from __future__ import annotations

import enum
import errno
import re

BLOCK_SIZE = 4096                      # bytes; volume sizes and the layer map use this unit
MAX_REQUEST = 32 * 1024 * 1024         # bytes; NBD requires payloads up to 32 MiB to work
MAX_SIZE = (1 << 63) - BLOCK_SIZE      # bytes; NBD and nbdkit sizes are signed 64-bit
# Names enter file names, command lines and generated configs (ganesha.conf): they are checked
# with fullmatch, never match + `$` (which also accepts a trailing newline: "vol\n").
NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})")
LABEL_VALUE_MAX = 256   # characters


class ReplicaMode(enum.StrEnum):
    """RW: in sync, serves reads and writes. WO: rebuilding, gets writes but no reads.
    ERR: failed, gets nothing until it is rebuilt."""

    RW = "RW"
    WO = "WO"
    ERR = "ERR"


class Robustness(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAULTED = "faulted"


class BlockhornError(Exception):
    """An error with an errno; `str()` is a message a user can act on."""

    errno: int = errno.EIO

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class InvalidArgument(BlockhornError):
    errno = errno.EINVAL


class NotFound(BlockhornError):
    errno = errno.ENOENT


class AlreadyExists(BlockhornError):
    errno = errno.EEXIST


class Busy(BlockhornError):
    errno = errno.EBUSY


class NoSpace(BlockhornError):
    errno = errno.ENOSPC


class TooLarge(BlockhornError):
    """A size past what a disk's filesystem can hold in one file."""

    errno = errno.EFBIG


class AuthError(BlockhornError):
    errno = errno.EACCES


class ProtocolError(BlockhornError):
    errno = errno.EPROTO


class ReplicaUnavailable(BlockhornError):
    """Too few RW replicas remain to acknowledge I/O."""

    errno = errno.EIO


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE_RE = re.compile(r" *([0-9]+) *([A-Za-z]*) *")


def parse_size(text: str | int) -> int:
    """Parse `1073741824`, `512MiB`, `10G`... (binary units) into bytes, a multiple of 4096."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
        unit = m.group(2).upper() if m else ""
        if isinstance(text, str) and text.strip().startswith("-"):
            raise InvalidArgument(f"invalid size {text!r}: must be greater than zero")
        if not m or unit not in _UNITS:
            raise InvalidArgument(
                f"invalid size {text!r}: use bytes or a number with KiB, MiB, GiB or TiB")
        value = int(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be greater than zero")
    if value > MAX_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: larger than NBD allows (8 EiB)")
    if value % BLOCK_SIZE:
        raise InvalidArgument(f"invalid size {text!r}: {value} bytes is not a multiple of 4096")
    return value


def check_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-63 lowercase letters, digits, '-' or '.', "
            "starting with a letter or digit")
    return name


def check_labels(labels: object) -> dict[str, str]:
    """Snapshot labels: keys like Kubernetes label keys, values printable text."""
    if not isinstance(labels, dict):
        raise InvalidArgument("labels must be an object of strings: KEY=VALUE")
    for k, v in labels.items():
        if not isinstance(k, str) or not LABEL_KEY_RE.fullmatch(k):
            raise InvalidArgument(
                f"bad label key {k!r}: use 1-63 letters, digits, '.', '_', '/' or '-', "
                "starting with a letter or digit")
        if not isinstance(v, str) or len(v) > LABEL_VALUE_MAX or not v.isprintable():
            raise InvalidArgument(f"bad label value {v!r} for {k!r}: use up to "
                                  f"{LABEL_VALUE_MAX} printable characters")
    return dict(labels)


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
