"""Tier 2: a rebuild target's copy session over the wire (one real replica process): copies
into the head skip blocks a mutation reached; vector copies (FLAG_VECTOR) round-trip and a
malformed one is refused EINVAL, the server staying up."""

from __future__ import annotations

import errno
import secrets

import pytest
from test_replica_server import connect, replica  # noqa: F401  (the fixture)

from blockhorn.engine.client import Call
from blockhorn.replica.proto import FLAG_VECTOR, VECTOR_RANGE, Op
from blockhorn.types import BlockhornError

MiB = 1 << 20


def vector(name: str, ranges: list[tuple[int, int]], data: bytes = b"") -> bytes:
    body = len(name).to_bytes(2, "little") + name.encode() + len(ranges).to_bytes(4, "little")
    return body + b"".join(VECTOR_RANGE.pack(o, n) for o, n in ranges) + data


def request(c, op: int, length: int, payload: bytes, dest: bytearray | None = None) -> int:
    call = Call(1, dest=memoryview(dest) if dest is not None else None)
    c.submit(call, op, 0, length, payload, flags=FLAG_VECTOR)
    assert call.wait(10)
    return call.results[c.name]


def test_copy_session_and_vectors(replica) -> None:  # noqa: F811
    c = connect(replica)
    head = c.stat()["head"]
    c.control({"op": "set_rebuilding", "value": True})
    c.control({"op": "begin_copy"})
    newer = secrets.token_bytes(4096)
    c.request(Op.WRITE, 8192, 4096, newer)           # a mutation during the session
    copy = secrets.token_bytes(16384)
    ranges = [(0, 4096), (8192, 4096), (MiB, 8192)]  # the middle one was written meanwhile
    assert request(c, Op.WRITE_LAYER, 16384, vector(head, ranges, copy)) == 0
    got = bytearray(16384)
    assert request(c, Op.READ_LAYER, 16384, vector(head, ranges), got) == 0
    assert got[:4096] == copy[:4096] and got[4096:8192] == newer
    assert got[8192:] == copy[8192:]
    # Malformed: lengths that do not add up, a range past the end, too short a table.
    assert request(c, Op.READ_LAYER, 4096, vector(head, [(0, 8192)]), bytearray(4096)) \
        == errno.EINVAL
    assert request(c, Op.WRITE_LAYER, 4096, vector(head, [(8 * MiB, 4096)], bytes(4096))) \
        in (errno.EINVAL, errno.ENOSPC)
    assert request(c, Op.READ_LAYER, 4096, vector(head, [(0, 4096)])[:-4]) == errno.EINVAL
    c.control({"op": "set_rebuilding", "value": False})
    with pytest.raises(BlockhornError):               # no copies outside a rebuild
        c.control({"op": "punch_layer", "layer": head, "offset": 0, "length": 4096})
    assert c.stat()["size"] == 8 * MiB                # still serving
