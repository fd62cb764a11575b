"""Tier 1: chunk digests of one replica directory (blockhorn/replica/digest.py) compare what a
read returns, whatever the layer history: hole = written zeros, snapshot layer = head."""

from __future__ import annotations

import pytest

from blockhorn.replica import digest
from blockhorn.replica import snapshots as snaps
from blockhorn.replica.store import Replica
from blockhorn.types import InvalidArgument, NoSpace

MiB = 1 << 20
SIZE = 4 * MiB + 8192           # not a multiple of the chunk: the last chunk is short


def test_digests_follow_content_not_layout(tmp_path) -> None:
    a = Replica.create(str(tmp_path / "a"), SIZE)
    b = Replica.create(str(tmp_path / "b"), SIZE)
    data = bytes(range(256)) * 16 * 64            # 256 KiB
    # a: data in a snapshot layer, zeros written over a hole; b: everything in the head.
    a.write(MiB + 4096, data)
    snaps.create_snapshot(a, "s1")
    a.zero(3 * MiB, MiB, may_trim=False)
    b.write(MiB + 4096, data)
    da = digest.chunk_digests(a, 0, SIZE)
    db = digest.chunk_digests(b, 0, SIZE)
    assert len(da) == 5 and da == db
    assert da[0] == digest.zero_digest(MiB) and da[4] == digest.zero_digest(8192)
    assert da[1] != da[0]
    # One flipped byte in one chunk changes that chunk's digest only.
    b.write(2 * MiB + 17, b"\xff")
    db = digest.chunk_digests(b, 0, SIZE)
    assert [i for i in range(5) if da[i] != db[i]] == [2]
    # A sub-range with a smaller chunk lines up with the same bytes.
    assert digest.chunk_digests(b, MiB, 2 * MiB, chunk=MiB) == db[1:3]
    a.close()
    b.close()


def test_digest_rejects_bad_ranges(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), SIZE)
    with pytest.raises(InvalidArgument):
        digest.chunk_digests(r, 100, MiB)
    with pytest.raises(InvalidArgument):
        digest.chunk_digests(r, 0, digest.MAX_DIGEST_SPAN + 4096)
    with pytest.raises(NoSpace):
        digest.chunk_digests(r, SIZE, MiB)
    r.close()
