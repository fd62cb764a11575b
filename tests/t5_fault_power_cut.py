"""Scenario 9 (issue 9): power cut of every replica under a flushing writer.

Each replica directory is a mount of tests/support/powercut_fs.py, a FUSE passthrough that
remembers what was not made durable (file data not fsynced/fdatasynced, directory entries not
fsynced) and drops exactly that at the cut, as dm-log-writes/CrashMonkey replay only what
reached the disk. The writer writes random 4 KiB blocks through the engine with a FLUSH every
16 writes. The cut: kill -9 of the engine and every replica, then every file system loses its
unsynced state. Then everything restarts; the engine's start rule picks a source and resyncs
the others. Every write acknowledged before the last completed FLUSH must read back (a block
written after it may hold any value written to it since), and the replicas must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import nbd
import pytest
from conftest import assert_replicas_identical, needs_root
from harness import Cluster
from support.recovery import report

pytestmark = needs_root()

MiB = 1 << 20
BLOCK = 4096
SIZE = 16 * MiB
FLUSH_EVERY = 16
HEALTHY = {"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}
FS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "powercut_fs.py")


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


ZERO = digest(bytes(BLOCK))


class PowerCutMount:
    """One powercut_fs process: BACKING (real) mounted at MOUNTPOINT (the replica directory)."""

    def __init__(self, backing: str, mountpoint: str, log: str) -> None:
        self.backing, self.mountpoint, self.log = backing, mountpoint, log
        self.ready = backing + ".ready"
        self.stats_file = backing + ".stats"
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(backing, exist_ok=True)
        os.makedirs(mountpoint, exist_ok=True)

    def start(self) -> None:
        for f in (self.ready, self.stats_file):
            if os.path.exists(f):
                os.unlink(f)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, FS, self.backing, self.mountpoint,
                                          self.ready, self.stats_file], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.ready) and os.path.ismount(self.mountpoint)):
            assert self.proc.poll() is None, open(self.log).read()
            assert time.monotonic() < deadline, "powercut_fs did not mount"
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> dict:
        """SIGUSR1: the power cut (unsynced state dropped); SIGTERM: a clean unmount."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True, timeout=30)
        assert self.proc.returncode == 0, open(self.log).read()
        with open(self.stats_file) as f:
            return dict(json.load(f))


class FlushingWriter(threading.Thread):
    """Random 4 KiB writes, a FLUSH every FLUSH_EVERY. `durable` is the state the last
    completed FLUSH covers; `since[blk]`: every value written to blk after that FLUSH was sent
    (acknowledged or in flight), any of which a cut may or may not have kept."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rng = random.Random(os.getpid())
        self.acked: dict[int, bytes] = {}
        self.durable: dict[int, bytes] = {}
        self.since: dict[int, set[bytes]] = {}
        self.flushes = 0
        self.unflushed = 0          # writes acknowledged since the last completed FLUSH
        self.error: Exception | None = None

    def run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        n = 0
        try:
            while True:
                blk = self.rng.randrange(SIZE // BLOCK)
                data = os.urandom(BLOCK)
                self.since.setdefault(blk, set()).add(digest(data))
                h.pwrite(data, blk * BLOCK)
                self.acked[blk] = digest(data)
                self.unflushed += 1
                n += 1
                if n % FLUSH_EVERY == 0:
                    covered = dict(self.acked)
                    h.flush()
                    self.durable = covered
                    self.since = {}
                    self.unflushed = 0
                    self.flushes += 1
        except nbd.Error as e:
            self.error = e

    def check(self, uri: str) -> int:
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            image = h.pread(SIZE, 0)
        finally:
            h.shutdown()
        bad = []
        for blk in range(SIZE // BLOCK):
            got = digest(image[blk * BLOCK:(blk + 1) * BLOCK])
            if got not in {self.durable.get(blk, ZERO), *self.since.get(blk, ())}:
                bad.append(blk)
        assert not bad, (f"{len(bad)} blocks hold neither what the last FLUSH covered nor a "
                         f"later write: {bad[:5]}")
        return len(self.durable)


@pytest.fixture
def mounts(tmp_path) -> Iterator[list[PowerCutMount]]:
    home = tmp_path / "c"
    home.mkdir()
    ms = [PowerCutMount(str(tmp_path / f"b{i}"), str(home / f"vol-r{i}"),
                        str(tmp_path / f"fs{i}.log")) for i in range(3)]
    try:
        for m in ms:
            m.start()
        yield ms
    finally:
        for m in ms:
            try:
                m.stop()
            except AssertionError:
                pass        # already reported by the test; the mount is gone either way


def test_power_cut_keeps_every_flushed_write(mounts, tmp_path) -> None:
    c = Cluster(str(tmp_path / "c"), size=SIZE, timeout_s=4.0)
    try:
        c.start()
        w = FlushingWriter(c.uri)
        w.start()
        deadline = time.monotonic() + 30
        # Cut between two FLUSHes, with acknowledged writes not yet flushed (what a cut drops),
        # far from the next FLUSH (a FLUSH the replicas already executed makes them durable).
        while (w.flushes < 20 or not 2 <= w.unflushed <= FLUSH_EVERY // 2) and w.error is None:
            assert time.monotonic() < deadline, "writer too slow"
            time.sleep(0.05)
        assert w.error is None, w.error
        # The cut: every process dies at once, then every disk loses what was not durable.
        c.stop_engine(signal.SIGKILL)
        for r in c.reps:
            r.kill(signal.SIGKILL)
        t0 = time.monotonic()
        dropped = [m.stop(signal.SIGUSR1) for m in mounts]
        w.join(30)
        assert not w.is_alive() and w.error is not None
        # The cut really dropped data (else this test could not catch a missing fsync).
        assert sum(d["blocks"] for d in dropped) > 0, dropped
        for m in mounts:
            m.start()
        for r in c.reps:
            r.start()
        c.start_engine()
        c.wait_modes(HEALTHY, timeout=60)
        deadline = time.monotonic() + 60
        while not all((r.get("rebuild") or {}).get("state") in (None, "done")
                      for r in c.status()["replicas"]):
            assert time.monotonic() < deadline, c.status()
            time.sleep(0.05)
        recovery = time.monotonic() - t0
        flushed = w.check(c.uri)
        h = nbd.NBD()
        h.connect_uri(c.uri)
        h.flush()
        h.shutdown()
        assert_replicas_identical(c)
        report("9 power cut of every replica -> healthy", recovery,
               f"remount, restart, start rule, resync; {flushed} flushed blocks checked")
        print(f"scenario 9: healthy {recovery:.2f} s after the power cut (remount, restart, "
              f"resync); {flushed} blocks covered by the last FLUSH, {len(w.acked)} acknowledged; "
              f"dropped per replica: {dropped}")
    finally:
        c.stop()
