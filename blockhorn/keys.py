"""The cluster key: 32 random bytes (hex in a 0600 file) shared by engines and replicas."""

from __future__ import annotations

import os
import secrets
import stat

from blockhorn.fsutil import atomic_write
from blockhorn.types import AuthError, NotFound


def ensure_key(path: str) -> str:
    """Create the key file if missing; return its path."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, secrets.token_hex(32).encode() + b"\n", mode=0o600)
    return path


def adopt_key(path: str, key: bytes) -> None:
    """Make `path` hold `key` (the cluster's, from the state store) unless it does already."""
    if os.path.exists(path) and load_key(path) == key:
        return
    atomic_write(path, key.hex().encode() + b"\n", mode=0o600)


def load_key(path: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"cluster key {path} does not exist") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise AuthError(f"cluster key {path} is readable by others: chmod 600 {path}")
    with open(path, "rb") as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        raise AuthError(f"cluster key {path} is not hex") from None
    if len(key) < 16:
        raise AuthError(f"cluster key {path} is too short")
    return key
