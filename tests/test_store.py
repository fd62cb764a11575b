"""Tier 1: the replica directory and layer chain, plain synchronous code over files."""

from __future__ import annotations

import errno
import json
import os

import pytest

from blockhorn.fsutil import atomic_write_json
from blockhorn.replica.store import Replica, layer_meta
from blockhorn.types import BlockhornError, InvalidArgument, NoSpace

MiB = 1 << 20


def test_create_layout_and_sparse_head(tmp_path) -> None:
    d = str(tmp_path / "r")
    r = Replica.create(d, 16 * MiB, "vol")
    assert sorted(os.listdir(d)) == ["revision.counter", "volume-head-000.img",
                                     "volume-head-000.img.meta", "volume.meta"]
    st = os.stat(os.path.join(d, "volume-head-000.img"))
    assert st.st_size == 16 * MiB and st.st_blocks == 0
    assert os.path.getsize(os.path.join(d, "revision.counter")) == 4096
    r.close()
    with pytest.raises(BlockhornError) as e:
        Replica.create(d, 16 * MiB)
    assert e.value.errno == errno.EEXIST


def test_bad_sizes_are_refused(tmp_path) -> None:
    for size in (0, 4095, 5000):
        with pytest.raises(InvalidArgument):
            Replica.create(str(tmp_path / f"r{size}"), size)


def test_write_read_unaligned_and_past_end(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), MiB)
    r.write(100, b"abc")
    r.write(4095, b"xy")
    assert bytes(r.read(98, 8)) == b"\0\0abc\0\0\0"
    assert bytes(r.read(4094, 4)) == b"\0xy\0"
    with pytest.raises(NoSpace):
        r.write(MiB - 1, b"zz")
    with pytest.raises(NoSpace):
        r.read(MiB, 1)
    assert r.revision == 2
    r.close()


def test_trim_and_zero_read_as_zeros_and_free_space(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), 4 * MiB)
    r.write(0, b"\xff" * (2 * MiB))
    before = os.fstat(r.head.fd).st_blocks
    r.trim(1000, MiB)
    assert bytes(r.read(1000, MiB)) == bytes(MiB)
    assert r.read(999, 1) == b"\xff" and r.read(1000 + MiB, 1) == b"\xff"
    assert os.fstat(r.head.fd).st_blocks < before
    r.zero(0, 10, may_trim=False)
    assert bytes(r.read(0, 11)) == bytes(10) + b"\xff"
    assert r.extents(0, 4 * MiB)[0][0] == 0
    r.close()


def test_revision_persisted_on_flush_and_dirty_flag(tmp_path) -> None:
    d = str(tmp_path / "r")
    r = Replica.create(d, MiB)
    r.write(0, b"a")
    assert json.load(open(os.path.join(d, "volume.meta")))["Dirty"] is True
    r.flush()
    # Simulate a crash: no close. The reopened replica is dirty and knows revision 1.
    r2 = Replica.open(d)
    assert r2.revision == 1 and r2.opened_dirty
    r2.write(1, b"b")
    r2.close()
    # An orderly close does not launder it: it may hold writes its counter never counted.
    r3 = Replica.open(d)
    assert r3.revision == 2 and r3.opened_dirty and r3.suspect
    r3.adopt()      # the engine chose it as the source: its content is the truth now
    r3.close()
    r4 = Replica.open(d)
    assert r4.revision == 2 and not r4.opened_dirty
    assert bytes(r4.read(0, 2)) == b"ab"
    r4.close()


def test_two_layer_chain_reads_newest_and_copies_up_partial_blocks(tmp_path) -> None:
    """A hand-made chain (snapshot under a head) as the snapshot issue will create it."""
    d = str(tmp_path / "r")
    r = Replica.create(d, MiB)
    r.write(0, b"S" * 8192)
    r.close()
    os.rename(os.path.join(d, "volume-head-000.img"), os.path.join(d, "volume-snap-s1.img"))
    os.unlink(os.path.join(d, "volume-head-000.img.meta"))
    atomic_write_json(os.path.join(d, "volume-snap-s1.img.meta"),
                      layer_meta("volume-snap-s1.img", "", user_created=True))
    head = os.path.join(d, "volume-head-001.img")
    with open(head, "wb") as f:
        f.truncate(MiB)
    atomic_write_json(head + ".meta", layer_meta("volume-head-001.img", "volume-snap-s1.img"))
    meta = json.load(open(os.path.join(d, "volume.meta")))
    atomic_write_json(os.path.join(d, "volume.meta"), dict(meta, Head="volume-head-001.img"))

    r = Replica.open(d)
    assert len(r.layers) == 2
    r.write(10, b"h")               # partial block held by the snapshot: copy-up
    r.write(5000, b"HH")
    assert bytes(r.read(8, 4)) == b"SShS"
    assert bytes(r.read(4999, 4)) == b"SHHS"
    assert bytes(r.read(8190, 4)) == b"SS\0\0"
    r.zero(0, 4096)                 # must hide the snapshot, not punch through to it
    assert bytes(r.read(0, 4096)) == bytes(4096)
    assert bytes(r.read(4096, 2)) == b"SS"
    r.close()
    snap = os.path.join(d, "volume-snap-s1.img")
    with open(snap, "rb") as f:
        assert f.read(8192) == b"S" * 8192, "the snapshot layer was modified"
