"""Chunk digests of a replica's data, for the scrub (`blockhorn volume verify`).

A digest covers what a read of the chunk returns (the newest layer holding each byte, zeros
elsewhere), not how it is stored: a hole and written zeros digest alike, and so does a chunk
whose data sits in a snapshot layer on one replica and in the head on another. That is what
makes digests of replicas with different layer histories comparable.

xxh3-128 (xxhash): about 50 GB/s per core here, so reading the chunk, not hashing it, bounds a
scrub; 128 bits make an accidental match of two different chunks out of the question. It is not
a cryptographic hash, and need not be: replicas are compared with each other, not with an
adversary's data.
"""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from blockhorn.fsutil import data_extents, preadv_full
from blockhorn.replica.store import Replica
from blockhorn.types import BLOCK_SIZE, InvalidArgument, NoSpace

CHUNK_SIZE = 1 << 20          # bytes per digest (the default; a multiple of 4096)
MAX_DIGEST_SPAN = 64 << 20    # bytes one request may cover: bounds how long it holds the replica
ALGORITHM = "xxh3_128"


def zero_digest(length: int) -> str:
    return xxhash.xxh3_128_hexdigest(bytes(length))


def chunk_digests(replica: Replica, offset: int, length: int,
                  chunk: int = CHUNK_SIZE) -> list[str]:
    """Hex digests of [offset, offset+length) cut into `chunk`-byte pieces (the last one may be
    shorter). Chunks without data in any layer are not read: their digest is that of zeros."""
    length = _check(replica, offset, length, chunk)
    return _digests(replica.extents(offset, length), replica.read_into, offset, length, chunk)


def layer_digests(replica: Replica, fd: int, offset: int, length: int,
                  chunk: int = CHUNK_SIZE) -> list[str]:
    """The same for one layer file of the chain (a resumed rebuild compares layer by layer)."""
    length = _check(replica, offset, length, chunk)
    extents = [(s, e - s) for s, e in data_extents(fd, offset, length)]
    return _digests(extents, lambda view, pos: preadv_full(fd, view, pos), offset, length,
                    chunk)


def _check(replica: Replica, offset: int, length: int, chunk: int) -> int:
    if chunk <= 0 or chunk % BLOCK_SIZE or offset % BLOCK_SIZE:
        raise InvalidArgument(f"digest: chunk {chunk} and offset {offset} must be multiples "
                              f"of {BLOCK_SIZE}")
    if length <= 0 or length > MAX_DIGEST_SPAN:
        raise InvalidArgument(f"digest: length {length} must be 1 to {MAX_DIGEST_SPAN} bytes")
    if offset >= replica.size:
        raise NoSpace(f"digest: offset {offset} is past the end ({replica.size})")
    return min(length, replica.size - offset)


def _digests(extent_list: list[tuple[int, int]], read_into: Callable[[memoryview, int], None],
             offset: int, length: int, chunk: int) -> list[str]:
    extents = [(s, s + n) for s, n in extent_list]
    buf = bytearray(chunk)
    zeros: dict[int, str] = {}
    out = []
    pos, end = offset, offset + length
    while pos < end:
        n = min(chunk, end - pos)
        if any(s < pos + n and e > pos for s, e in extents):
            view = memoryview(buf)[:n]
            read_into(view, pos)
            out.append(xxhash.xxh3_128_hexdigest(view))
        else:
            if n not in zeros:
                zeros[n] = zero_digest(n)
            out.append(zeros[n])
        pos += n
    return out
