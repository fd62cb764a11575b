"""What a blockhorn export advertises to NBD clients: the nbdkit capability callbacks that the
engine's plugin (nbd/plugin.py) and the TLS proxy's relay (nbd/relay.py) both serve, so that a
client sees the same device whichever of the two it reaches. nbdkit looks the callbacks up in
the plugin script's namespace, so each script imports them by name.

Imported only inside nbdkit's embedded interpreter, which provides the `nbdkit` module.
"""

from __future__ import annotations

import nbdkit

from blockhorn.types import BLOCK_SIZE, MAX_REQUEST


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
    # guaranteed fast, so every fast-zero request is refused at once with ENOTSUP (the
    # plugins' `zero`), which is what the spec asks of a server that cannot promise speed.
    # Advertising it anyway is not a lie, and it is needed: nbdkit 1.32 does not reject the
    # FAST_ZERO flag of a client that ignores the handshake, and then aborts on an assertion
    # (one request from any client took the whole engine down: tests/t4_nbd_malformed.py).
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
