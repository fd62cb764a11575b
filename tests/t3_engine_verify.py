"""Tier 3: the scrub (`verify`) in a real engine (nbdkit) against real replica processes.

Bytes are flipped in one replica's layer file on disk, behind the replica's back (written
through the file, so the replica's page cache sees them); verify must name exactly those
chunks on exactly that replica, --repair must fix them from the majority, and what a client
wrote must read back unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time

import nbd
import pytest
from conftest import assert_replicas_identical
from support import recovery

from blockhorn.engine.control import ControlClient
from blockhorn.types import BlockhornError

MiB = 1 << 20
VERIFY_TIMEOUT_S = 60.0


def verify(c, repair: bool = False, rate_mib_s: float = 0) -> dict:
    ctl = ControlClient(c.control_socket, timeout=VERIFY_TIMEOUT_S + 5)
    st = ctl.call({"op": "verify", "repair": repair, "rate_mib_s": rate_mib_s,
                   "wait": VERIFY_TIMEOUT_S})
    assert st["verify"]["state"] == "done", st
    return st["report"]


def flip(c, replica: int, offset: int, n: int = 3) -> None:
    """Invert n bytes at `offset` of replica `replica`'s head file."""
    path = os.path.join(c.reps[replica].cfg.directory, "volume-head-000.img")
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, n, offset)
        os.pwrite(fd, bytes(b ^ 0xFF for b in old), offset)
    finally:
        os.close(fd)


def chunks_of(report: dict) -> dict[int, tuple[list[str] | None, list[str]]]:
    return {d["offset"] // MiB: (d["majority"], d["minority"]) for d in report["differences"]}


def test_verify_finds_flipped_bytes_and_repair_fixes_them(cluster_factory) -> None:
    c = cluster_factory(size=32 * MiB)
    h = nbd.NBD()
    h.connect_uri(c.uri)
    rng = random.Random(9)
    model = bytearray(c.size)
    for off, n in [(0, 12 * MiB), (20 * MiB + 4096, 300 * 1024), (31 * MiB, MiB)]:
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    h.flush()
    r0, r1, r2 = (r.cfg.name for r in c.reps)
    assert verify(c)["differing_chunks"] == 0
    # r1: two data chunks; r2: one data chunk and one never-written chunk (a hole).
    flip(c, 1, 3 * MiB + 5)
    flip(c, 1, 11 * MiB + MiB - 1, 1)
    flip(c, 2, 20 * MiB + 4096 + 777)
    flip(c, 2, 25 * MiB + 12345)
    report = verify(c)
    expected = {3: ([r0, r2], [r1]), 11: ([r0, r2], [r1]),
                20: ([r0, r1], [r2]), 25: ([r0, r1], [r2])}
    assert chunks_of(report) == expected
    assert report["ok"] is False and report["remaining_chunks"] == 4
    assert report["by_replica"][r1]["differing_chunks"] == 2
    assert report["by_replica"][r2]["differing_chunks"] == 2
    assert report["by_replica"][r0]["differing_chunks"] == 0
    assert report["bytes_compared"] == c.size

    t0 = time.monotonic()
    report = verify(c, repair=True)
    recovery.report("7 flipped bytes: verify --repair -> replicas agree",
                    time.monotonic() - t0, f"32 MiB volume, {report['repaired_chunks']} chunks "
                    "repaired")
    assert chunks_of(report) == expected
    assert all(d["repaired"] for d in report["differences"])
    assert report["repaired_chunks"] == 4 and report["remaining_chunks"] == 0
    assert report["ok"] is True

    report = verify(c)
    assert report["differing_chunks"] == 0 and report["ok"] is True
    assert c.modes() == {r0: "RW", r1: "RW", r2: "RW"}
    h.flush()
    # Every acknowledged byte reads back, from every replica.
    assert hashlib.sha256(h.pread(c.size, 0)).digest() == hashlib.sha256(model).digest()
    h.shutdown()
    assert_replicas_identical(c)


def test_verify_without_strict_majority_refuses_to_guess(cluster_factory) -> None:
    c = cluster_factory(size=8 * MiB, replicas=2)
    h = nbd.NBD()
    h.connect_uri(c.uri)
    data = os.urandom(4 * MiB)
    h.pwrite(data, 0)
    h.flush()
    flip(c, 1, 2 * MiB + 100)
    report = verify(c, repair=True)
    assert chunks_of(report) == {2: (None, [])}
    assert report["unresolved_chunks"] == 1 and report["repaired_chunks"] == 0
    assert report["ok"] is False
    # Nothing was rewritten: r1 still holds its flipped bytes, r0 the data.
    assert verify(c)["differing_chunks"] == 1
    h.shutdown()


class Writer(threading.Thread):
    """Random 4 KiB writes into the first `span` bytes; remembers every acknowledged block."""

    def __init__(self, c, span: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(c.uri)
        self.span, self.rng = span, random.Random(seed)
        self.acked: dict[int, bytes] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            off = self.rng.randrange(self.span // 4096) * 4096
            data = self.rng.randbytes(4096)
            try:
                self.h.pwrite(data, off)
            except nbd.Error as e:
                self.errors.append(str(e))
                return
            self.acked[off] = hashlib.sha256(data).digest()


def test_verify_under_concurrent_writes_reports_no_false_difference(cluster_factory) -> None:
    c = cluster_factory(size=16 * MiB)
    writers = [Writer(c, 8 * MiB, seed) for seed in range(3)]
    for w in writers:
        w.start()
    try:
        # Rate-limited so that each run lasts about a second, with writes landing in the
        # chunks being digested all along.
        reports = [verify(c, rate_mib_s=16) for _ in range(3)]
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(10)
    assert all(not w.errors for w in writers), [w.errors for w in writers]
    assert sum(len(w.acked) for w in writers) > 100    # the writes really ran beside
    for report in reports:
        assert report["elapsed_s"] >= 0.9 and report["rate_limit_mib_s"] == 16
        assert report["differing_chunks"] == 0, report["differences"]
        assert report["ok"] is True
    h = writers[0].h
    h.flush()
    # Later writers' blocks win where they overlap: read back per writer's last view is
    # ambiguous, so check the blocks only one writer wrote.
    owners: dict[int, list[int]] = {}
    for i, w in enumerate(writers):
        for off in w.acked:
            owners.setdefault(off, []).append(i)
    for off, who in owners.items():
        if len(who) == 1:
            assert hashlib.sha256(h.pread(4096, off)).digest() == writers[who[0]].acked[off]
    for w in writers:
        w.h.shutdown()
    assert_replicas_identical(c)


def test_verify_finds_and_repairs_a_flip_in_a_snapshot_layer(cluster_factory) -> None:
    """Digests follow what reads return through the layer chain: bytes flipped in a snapshot
    layer (not hidden by the head) are found; the repair rewrites them in the head."""
    c = cluster_factory(size=8 * MiB)
    h = nbd.NBD()
    h.connect_uri(c.uri)
    data = os.urandom(6 * MiB)
    h.pwrite(data, 0)
    h.flush()
    c.control().call({"op": "snapshot", "name": "s1"})
    h.pwrite(b"n" * 4096, 0)         # the head hides the snapshot's first block only
    model = bytearray(data)
    model[:4096] = b"n" * 4096
    snap = os.path.join(c.reps[0].cfg.directory, "volume-snap-s1.img")
    fd = os.open(snap, os.O_RDWR)
    os.pwrite(fd, b"\x00\x01\x02", 4 * MiB + 10)
    os.close(fd)
    r0, r1, r2 = (r.cfg.name for r in c.reps)
    assert chunks_of(verify(c)) == {4: ([r1, r2], [r0])}
    report = verify(c, repair=True)
    assert report["repaired_chunks"] == 1 and report["ok"]
    assert verify(c)["differing_chunks"] == 0
    # r0 serves the engine's local reads: what it returns is the written data again.
    assert hashlib.sha256(h.pread(6 * MiB, 0)).digest() == hashlib.sha256(model).digest()
    h.shutdown()


def test_verify_drops_a_replica_that_dies_during_the_run(cluster_factory) -> None:
    c = cluster_factory(size=16 * MiB)
    h = nbd.NBD()
    h.connect_uri(c.uri)
    data = os.urandom(16 * MiB)
    h.pwrite(data, 0)
    h.flush()
    ctl = ControlClient(c.control_socket)
    st = ctl.call({"op": "verify", "rate_mib_s": 8})     # about 2 s
    assert st["verify"]["state"] == "running"
    with pytest.raises(BlockhornError) as e:
        ctl.call({"op": "verify"})
    assert e.value.errno == errno.EBUSY and "already running" in str(e.value)
    c.reps[2].kill()
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    while (st := ctl.call({"op": "verify_status"}))["verify"]["state"] == "running":
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    report = st["report"]
    assert st["verify"]["state"] == "done", st
    assert list(report["failed_replicas"]) == [c.reps[2].cfg.name]
    assert report["differing_chunks"] == 0 and report["ok"] is False
    assert report["bytes_compared"] == c.size
    assert hashlib.sha256(h.pread(16 * MiB, 0)).digest() == hashlib.sha256(data).digest()
    h.shutdown()
