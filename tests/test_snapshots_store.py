"""Tier 1: the snapshot tree on one replica directory — snapshot, revert, remove + purge,
expand — with a crash injected before every step of every transition."""

from __future__ import annotations

import os
import random

import pytest

from blockhorn.replica import snapshots as snaps
from blockhorn.replica.store import Replica
from blockhorn.types import AlreadyExists, InvalidArgument, NotFound

MiB = 1 << 20
SIZE = 4 * MiB


class Crash(Exception):
    pass


def image(r: Replica) -> bytes:
    return bytes(r.read(0, r.size))


def scribble(r: Replica, rng: random.Random, n: int = 20) -> None:
    for _ in range(n):
        off = rng.randrange(0, r.size - 9000)
        r.write(off, rng.randbytes(rng.choice([1, 100, 4096, 8192])))


def test_tree_of_snapshots_across_branches_every_snapshot_checked(tmp_path) -> None:
    """>= 12 snapshots on >= 4 branches made by reverts; every snapshot's content checked by
    reverting to it."""
    r = Replica.create(str(tmp_path / "r"), SIZE)
    rng = random.Random(7)
    expected: dict[str, bytes] = {}
    n = 0
    for _branch in range(4):
        if expected:
            base = rng.choice(sorted(expected))
            snaps.revert(r, base)
            assert image(r) == expected[base]
        for _ in range(3):
            scribble(r, rng)
            name = f"s{n}"
            n += 1
            snaps.create_snapshot(r, name)
            expected[name] = image(r)
            assert len(r.layers) >= 2
    listed = snaps.list_snapshots(r)
    assert len(listed) == 12
    assert len({s["parent"] for s in listed}) >= 4
    for name, data in expected.items():
        snaps.revert(r, name)
        assert image(r) == data, name
    r.close()
    r = Replica.open(str(tmp_path / "r"))
    assert image(r) == expected["s11"]
    r.close()


def test_remove_and_purge_fold_without_changing_reads(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), SIZE)
    rng = random.Random(3)
    for i in range(5):
        scribble(r, rng)
        snaps.create_snapshot(r, f"s{i}")
    scribble(r, rng)
    before = image(r)
    s4 = bytes(r.read(0, SIZE))
    for name in ("s1", "s2", "s4"):
        snaps.mark_removed(r, name)
    assert [s["name"] for s in snaps.list_snapshots(r)] == ["s0", "s3"]
    folded = snaps.purge(r)
    assert set(folded) == {"s1", "s2"}           # s4 is the head's parent: punched, stays
    assert image(r) == before
    files = sorted(f for f in os.listdir(r.directory) if f.endswith(".img"))
    assert "volume-snap-s1.img" not in files and "volume-snap-s2.img" not in files
    r.close()
    r = Replica.open(str(tmp_path / "r"))
    assert image(r) == before == s4
    snaps.revert(r, "s3")
    r.close()


def test_expand_and_refusals(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), SIZE)
    r.write(0, b"a" * 4096)
    snaps.create_snapshot(r, "s")
    with pytest.raises(AlreadyExists):
        snaps.create_snapshot(r, "s")
    with pytest.raises(InvalidArgument):
        snaps.create_snapshot(r, "Bad Name")
    snaps.expand(r, 2 * SIZE)
    r.write(2 * SIZE - 4096, b"z" * 4096)
    assert bytes(r.read(SIZE - 1, 2)) == b"\0\0" and r.read(2 * SIZE - 1, 1) == b"z"
    with pytest.raises(InvalidArgument):
        snaps.expand(r, SIZE)
    with pytest.raises(NotFound):
        snaps.revert(r, "nope")
    r.close()
    r = Replica.open(str(tmp_path / "r"))
    assert r.size == 2 * SIZE and r.read(0, 1) == b"a"
    r.close()


def crash_at(r: Replica, step: str) -> None:
    def hook(name: str) -> None:
        if name == step:
            raise Crash(step)
    r.crash_hook = hook


SNAPSHOT_STEPS = ["snapshot:new-head", "snapshot:link", "snapshot:commit", "snapshot:cleanup"]
REVERT_STEPS = ["revert:new-head", "revert:commit", "revert:cleanup"]
PURGE_STEPS = ["purge:copy", "purge:journal", "purge:rename", "purge:reparent",
               "purge:cleanup"]
EXPAND_STEPS = ["expand:truncate", "expand:commit"]


@pytest.mark.parametrize("step", SNAPSHOT_STEPS + REVERT_STEPS + PURGE_STEPS + EXPAND_STEPS)
def test_crash_at_every_step_leaves_a_consistent_replica(tmp_path, step) -> None:
    d = str(tmp_path / "r")
    r = Replica.create(d, SIZE)
    rng = random.Random(1)
    scribble(r, rng)
    a_image = image(r)
    snaps.create_snapshot(r, "a")
    scribble(r, rng)
    snaps.create_snapshot(r, "b")
    scribble(r, rng)
    r.flush()
    before = image(r)
    crash_at(r, step)
    with pytest.raises(Crash):
        if step.startswith("snapshot"):
            snaps.create_snapshot(r, "c")
        elif step.startswith("revert"):
            snaps.revert(r, "a")
        elif step.startswith("purge"):
            snaps.mark_removed(r, "a")
            snaps.purge(r)
        else:
            snaps.expand(r, 2 * SIZE)
    # The process "dies" here: no close. Reopen and check.
    r2 = Replica.open(d)
    names = {s["name"] for s in snaps.list_snapshots(r2)}
    after = image(r2)
    if step.startswith("revert"):
        # Before the commit nothing happened; after it the volume reads as snapshot a.
        assert after == (a_image if step == "revert:cleanup" else before)
    elif step.startswith("expand"):
        assert after[:SIZE] == before
        assert r2.size in (SIZE, 2 * SIZE)
    else:
        assert after[:SIZE] == before
    if step.startswith("snapshot"):
        assert names in ({"a", "b"}, {"a", "b", "c"})
        assert ("c" in names) == (step == "snapshot:cleanup")
    if step.startswith("purge"):
        assert names == {"b"}
    leftovers = [f for f in os.listdir(d) if ".tmp." in f]
    assert not leftovers
    # Still fully usable: another snapshot and purge work after recovery.
    snaps.create_snapshot(r2, "d")
    snaps.purge(r2)
    assert image(r2)[:SIZE] == after[:SIZE]
    r2.close()


def test_trim_frees_space_where_no_snapshot_holds_data(tmp_path) -> None:
    r = Replica.create(str(tmp_path / "r"), SIZE)
    r.write(0, b"S" * MiB)                     # held by the snapshot below
    snaps.create_snapshot(r, "s")
    r.write(0, b"H" * (2 * MiB))               # head over the snapshot and beyond it
    blocks = os.fstat(r.head.fd).st_blocks
    r.trim(0, 2 * MiB)
    assert bytes(r.read(0, 2 * MiB)) == bytes(2 * MiB)
    # The second MiB had nothing beneath: punched. The first hides the snapshot: zeros.
    assert os.fstat(r.head.fd).st_blocks <= blocks - (MiB // 512)
    snaps.revert(r, "s")
    assert bytes(r.read(0, MiB)) == b"S" * MiB
    r.close()
