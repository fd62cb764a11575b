"""Scenario 6 (issue 9): a replica's disk fills up, then every replica's disk, under a writer.

Each replica directory that should fill lives on its own small ext4 (a 64 MiB image on a loop
device, tests/support/loopfs.py); a filler file takes the rest of the space. What a storage
user may expect (docs/DURABILITY.md, "Out of space"):

- one replica's disk full: the writer sees nothing (the other replicas have the write); that
  replica goes ERR and leaves the in-sync set; reads keep working; once space returns it is
  resynced and holds the same bytes as the others;
- every replica's disk full: the writer gets ENOSPC for writes that need new space (never a
  hang, never a silent loss), the volume does not fault: reads and writes into space already
  allocated keep working, and once space returns new writes succeed again, no resync needed.

Both end by reading back every acknowledged block (checksums) and comparing the replicas.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator

import nbd
import pytest
from conftest import assert_replicas_identical, needs_root
from harness import Cluster
from support.loopfs import fill, free, loop_ext4
from support.recovery import report

pytestmark = needs_root()

MiB = 1 << 20
BLOCK = 64 * 1024               # bytes per write
SIZE = 128 * MiB                # volume; larger than a replica's 64 MiB file system
FLUSH_EVERY = 16                # writes between FLUSHes
ALL_RW = {"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


ZERO = digest(bytes(BLOCK))


class Writer(threading.Thread):
    """Writes fresh 64 KiB blocks (holes: each needs new space on the replicas) in random
    order, with a FLUSH every FLUSH_EVERY writes, and goes on after a failed request. Keeps
    the digest of every acknowledged block and, per block whose write failed, the data that
    may or may not have landed. `pause` holds it between requests."""

    def __init__(self, uri: str, blocks: list[int]) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.todo = list(blocks)
        random.Random(os.getpid()).shuffle(self.todo)
        self.acked: dict[int, bytes] = {}
        self.failed: dict[int, set[bytes]] = {}
        self.errors: list[str] = []  # errno names (libnbd gives names)
        self.last_ok = 0.0              # monotonic time of the last acknowledged write
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.idle = threading.Event()

    def run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            n = 0
            while not self.stop.is_set() and self.todo:
                if not self.running.is_set():
                    self.idle.set()
                    self.running.wait(1)
                    continue
                self.idle.clear()
                blk = self.todo.pop()
                data = os.urandom(BLOCK)
                try:
                    h.pwrite(data, blk * BLOCK)
                except nbd.Error as e:
                    self.errors.append(str(e.errno))
                    self.failed.setdefault(blk, set()).add(digest(data))
                    self.todo.insert(0, blk)        # tried again later
                    continue
                self.acked[blk] = digest(data)
                self.last_ok = time.monotonic()
                n += 1
                if n % FLUSH_EVERY == 0:
                    h.flush()
        finally:
            self.idle.set()
            h.shutdown()

    def hold(self) -> None:
        self.running.clear()
        assert self.idle.wait(30), "writer did not pause"

    def finish(self) -> None:
        self.stop.set()
        self.running.set()
        self.join(30)
        assert not self.is_alive(), "writer hung"


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return value


def check(uri: str, acked: dict[int, bytes], failed: dict[int, set[bytes]]) -> None:
    """Every acknowledged block holds its data; a block whose write failed and was never
    acknowledged holds zeros or that failed data (a disk may tear a failed write)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        bad = []
        for blk in sorted(set(acked) | set(failed)):
            got = digest(h.pread(BLOCK, blk * BLOCK))
            allowed = {acked[blk]} if blk in acked else {ZERO, *failed[blk]}
            if got not in allowed:
                bad.append(blk)
    finally:
        h.shutdown()
    assert not bad, f"{len(bad)} blocks differ from what was acknowledged: {bad[:5]}"


def base_data(c: Cluster) -> dict[int, bytes]:
    """4 MiB acknowledged and flushed before anything fills (the first 64 blocks)."""
    h = nbd.NBD()
    h.connect_uri(c.uri)
    acked = {}
    for blk in range(64):
        data = os.urandom(BLOCK)
        h.pwrite(data, blk * BLOCK)
        acked[blk] = digest(data)
    h.flush()
    h.shutdown()
    return acked


def read_ok(c: Cluster, acked: dict[int, bytes], blocks: range) -> None:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    try:
        for blk in blocks:
            assert digest(h.pread(BLOCK, blk * BLOCK)) == acked[blk], blk
    finally:
        h.shutdown()


def wait_resynced(c: Cluster, name: str, timeout: float = 30.0) -> dict:
    def done() -> dict | None:
        st = {r["name"]: r for r in c.status()["replicas"]}[name]
        rb = st.get("rebuild") or {}
        if rb.get("state") == "failed":
            raise AssertionError(f"resync of {name} failed: {rb}")
        return rb if st["mode"] == "RW" and rb.get("state") == "done" else None
    return wait_for(done, timeout, f"{name} resynced")


@pytest.fixture
def home(tmp_path) -> Iterator[str]:
    h = tmp_path / "c"
    h.mkdir()
    yield str(h)


def test_one_replica_disk_full_then_space_returns(home, tmp_path) -> None:
    mnt = os.path.join(home, "vol-r1")        # r1's replica directory is the file system
    with loop_ext4(str(tmp_path / "r1.img"), mnt):
        c = Cluster(home, size=SIZE, timeout_s=4.0)
        try:
            c.start()
            base = base_data(c)
            w = Writer(c.uri, list(range(64, SIZE // BLOCK)))
            w.start()
            wait_for(lambda: len(w.acked) >= 50, 20, "writes before the fill")
            fill(mnt)
            # r1 refuses the next write that needs space: ERR, out of the in-sync set.
            wait_for(lambda: c.modes()["vol-r1"] == "ERR", 20, "r1 ERR")
            c.wait_modes({"vol-r0": "RW", "vol-r1": "ERR", "vol-r2": "RW"})
            n = len(w.acked)
            wait_for(lambda: len(w.acked) >= n + 100 or w.errors, 20, "writes go on")
            assert not w.errors, f"the writer saw errors with one replica full: {w.errors}"
            read_ok(c, base, range(64))
            with open(c.record) as f:
                assert "vol-r1" not in f.read()     # committed out of the in-sync set
            # While the disk is still full a resync fails and r1 stays ERR (no hang).
            c.control().call({"op": "rebuild", "replica": "vol-r1"})
            wait_for(lambda: ({r["name"]: r for r in c.status()["replicas"]}["vol-r1"]
                              .get("rebuild") or {}).get("state") in ("failed", "done"),
                     30, "the resync on a full disk to end")
            assert c.modes()["vol-r1"] == "ERR"
            free(mnt)
            t0 = time.monotonic()
            c.control().call({"op": "rebuild", "replica": "vol-r1"})
            progress = wait_resynced(c, "vol-r1")
            recovery = time.monotonic() - t0
            n = len(w.acked)
            wait_for(lambda: len(w.acked) >= n + 50 or w.errors, 20, "writes after the resync")
            w.finish()
            assert not w.errors, w.errors
            check(c.uri, {**base, **w.acked}, w.failed)
            h = nbd.NBD()
            h.connect_uri(c.uri)
            h.flush()
            h.shutdown()
            c.wait_modes(ALL_RW)
            assert_replicas_identical(c)
            report("6 one replica's disk full: space back -> replica RW", recovery,
                   f"{progress.get('mode')} resync of {progress.get('total')} bytes")
            print(f"scenario 6 (one disk full): r1 RW again {recovery:.2f} s after space "
                  f"returned ({progress.get('mode')} resync, {progress.get('total')} bytes); "
                  f"{len(w.acked)} blocks acknowledged")
        finally:
            c.stop()


def test_every_replica_disk_full_then_space_returns(home, tmp_path) -> None:
    mnts = [os.path.join(home, f"vol-r{i}") for i in range(3)]
    with loop_ext4(str(tmp_path / "r0.img"), mnts[0]), \
            loop_ext4(str(tmp_path / "r1.img"), mnts[1]), \
            loop_ext4(str(tmp_path / "r2.img"), mnts[2]):
        c = Cluster(home, size=SIZE, timeout_s=4.0)
        try:
            c.start()
            base = base_data(c)
            w = Writer(c.uri, list(range(64, SIZE // BLOCK)))
            w.start()
            wait_for(lambda: len(w.acked) >= 50, 20, "writes before the fill")
            # All disks fill "at once": the writer waits between two requests meanwhile, so
            # no write lands on some replicas and not on others because of the fill order.
            w.hold()
            for m in mnts:
                fill(m)
            w.running.set()
            wait_for(lambda: len(w.errors) >= 5, 30, "the writer to get errors")
            assert set(w.errors) == {errno.errorcode[errno.ENOSPC]}, w.errors
            # The volume stays up: nothing diverged, so no replica left the in-sync set.
            assert c.modes() == ALL_RW, c.modes()
            read_ok(c, base, range(64))
            # Rewriting space already allocated needs no new blocks and succeeds.
            h = nbd.NBD()
            h.connect_uri(c.uri)
            data = os.urandom(BLOCK)
            h.pwrite(data, 3 * BLOCK)
            base[3] = digest(data)
            h.flush()
            h.shutdown()
            assert c.modes() == ALL_RW, c.modes()
            before = len(w.acked)
            w.hold()          # space returns on all at once too (else the first freed wins)
            for m in mnts:
                free(m)
            t0 = time.monotonic()
            w.running.set()
            wait_for(lambda: len(w.acked) > before, 30, "a write to succeed again")
            recovery = w.last_ok - t0
            n = len(w.acked)
            wait_for(lambda: len(w.acked) >= n + 50, 20, "writes after space returned")
            w.finish()
            check(c.uri, {**base, **w.acked}, w.failed)
            assert c.modes() == ALL_RW, c.modes()
            assert_replicas_identical(c)
            report("6 every disk full: space back -> writes succeed", recovery,
                   f"{len(w.errors)} ENOSPC to the writer meanwhile, no replica ERR")
            print(f"scenario 6 (every disk full): writes succeed {recovery:.2f} s after space "
                  f"returned; {len(w.errors)} ENOSPC to the writer, {len(w.acked)} blocks "
                  "acknowledged")
        finally:
            c.stop()
