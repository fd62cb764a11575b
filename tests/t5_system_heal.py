"""Whole system: self-healing through the real daemon and CLI, under a real NBD writer (libnbd).

- scenario 1 (issue 9): kill -9 one replica under writes: I/O goes on, the replica is restarted
  and resynced, the volume is healthy again;
- scenario 3 / review sequence 6: kill -9 every replica and the engine under a flushing writer:
  the volume comes back by itself and holds every acknowledged write;
- replenishment: a replica whose directory is unusable is replaced on another disk after
  `replica-replenishment-wait-interval`, resynced, and the old directory is kept aside.
- without a free disk nothing is replaced: the volume says what it waits for, stays degraded
  under writes, and the replica returns by itself when its directory does.

Each ends by comparing checksums of everything acknowledged with what is read back, and, after
a detach, checks that the replicas hold identical bytes.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbd
import pytest
from daemon_util import Env, wait_until
from support.recovery import report

from blockhorn.replica.store import Replica

MiB = 1 << 20
BLOCK = 4096            # bytes per write: one page, so a killed replica never tears one
SIZE = 32 * MiB
FLUSH_EVERY = 32        # writes between FLUSHes
RECOVERY_LIMIT_S = 60.0


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


ZERO = digest(bytes(BLOCK))


class Writer(threading.Thread):
    """Writes random 4 KiB blocks at random places (rewrites included) through one libnbd
    connection, one at a time, with a FLUSH every FLUSH_EVERY writes, until stopped or until
    a request fails. Records the digest of every acknowledged write (`acked`), what the last
    completed FLUSH covered (`flushed`), and the one write in flight when a request failed
    (`inflight`: its block may hold the old or the new data)."""

    def __init__(self, uri: str, size: int = SIZE) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.blocks = size // BLOCK
        self.acked: dict[int, bytes] = {}
        self.flushed: dict[int, bytes] = {}
        self.flushes = 0
        self.inflight: tuple[int, bytes] | None = None
        self.error: Exception | None = None
        self.stop = threading.Event()
        self.rng = random.Random(os.getpid())

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            n = 0
            while not self.stop.is_set():
                blk = self.rng.randrange(self.blocks)
                data = os.urandom(BLOCK)
                self.inflight = (blk, digest(data))
                h.pwrite(data, blk * BLOCK)
                self.acked[blk] = digest(data)
                self.inflight = None
                n += 1
                if n % FLUSH_EVERY == 0:
                    covered = dict(self.acked)
                    h.flush()
                    self.flushed = covered
                    self.flushes += 1
        except nbd.Error as e:
            self.error = e
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass   # the engine is gone: nothing to shut down cleanly

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "writer hung"

    def check(self, uri: str) -> int:
        """Read the whole volume back: every acknowledged block holds its last acknowledged
        data (the block in flight at a failure: old or new), every other block zeros.
        Returns the number of flushed blocks checked."""
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            image = h.pread(self.blocks * BLOCK, 0)
        finally:
            h.shutdown()
        bad = []
        for blk in range(self.blocks):
            got = digest(image[blk * BLOCK:(blk + 1) * BLOCK])
            allowed = {self.acked.get(blk, ZERO)}
            if self.inflight and self.inflight[0] == blk:
                allowed.add(self.inflight[1])
            if got not in allowed:
                bad.append(blk)
        assert not bad, (f"{len(bad)} blocks differ from what was acknowledged, first "
                         f"{bad[:5]} (flushed: {[b for b in bad if b in self.flushed][:5]})")
        return len(self.flushed)


def wait_writes(w: Writer, writes: int, flushes: int = 0, timeout: float = 30.0) -> None:
    wait_until(lambda: w.error or (len(w.acked) >= writes and w.flushes >= flushes), timeout,
               f"{writes} writes and {flushes} flushes")
    assert w.error is None, w.error


def healthy(env: Env, name: str, **want: Any) -> dict[str, Any] | None:
    s = env.show(name)
    # RW is set just before the join commit; a resync counts as finished once it says done.
    ok = s["robustness"] == "healthy" and all(
        r["mode"] == "RW" and (not r.get("rebuild") or r["rebuild"].get("state") == "done")
        for r in s["replicas"])
    return s if ok and all(pred(s) for pred in want.values()) else None


def detach_replicas_identical(env: Env, name: str = "v") -> None:
    """Detach `name`, then the invariant: every replica holds the same bytes, none is
    Rebuilding."""
    env.cli("volume", "detach", name)
    show = env.show(name)
    digests = set()
    for r in show["replicas"]:
        rep = Replica.open(r["path"])
        try:
            assert not rep.meta.get("Rebuilding"), r
            digests.add(digest(bytes(rep.read(0, show["size"]))))
        finally:
            rep.close()
    assert len(digests) == 1, show["replicas"]


def test_scenario1_replica_killed_under_writes(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "32MiB", "--replicas", "3")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    before = env.show("v")
    w = Writer(uri)
    w.start()
    wait_writes(w, 300, 2)
    victim = before["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    # Healthy again means restarted (new pid), resynced, and every replica RW.
    after = wait_until(lambda: healthy(env, "v", restarted=lambda s: s["replicas"][1]["pid"]
                                       not in (None, victim["pid"])), 30, "restart + resync")
    recovery = time.monotonic() - t0
    n = len(w.acked)
    wait_writes(w, n + 100)      # I/O went on all along and goes on now
    w.finish()
    assert w.error is None, w.error
    assert after["replicas"][1]["restarts"] == 1
    assert after["replicas"][1]["rebuild"]["state"] == "done"
    assert after["engine"]["pid"] == before["engine"]["pid"]
    w.check(uri)
    detach_replicas_identical(env)
    report("1 kill -9 one replica under writes -> healthy", recovery,
           "daemon: restart + resync")
    print(f"scenario 1: healthy {recovery:.1f} s after the kill, {len(w.acked)} blocks written")


def test_scenario3_everything_killed_comes_back(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "32MiB", "--replicas", "3")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    before = env.show("v")
    w = Writer(uri)
    w.start()
    wait_writes(w, 500, 4)
    # Every process of the volume at once, each with its process group (the engine's holds
    # nbdkit under its keeper): no orderly shutdown, no final flush.
    for pid in [r["pid"] for r in before["replicas"]] + [before["engine"]["pid"]]:
        os.killpg(pid, signal.SIGKILL)
    t0 = time.monotonic()
    w.join(30)
    assert w.error is not None and not w.is_alive()
    after = wait_until(lambda: healthy(env, "v", engine=lambda s: s["engine"]["pid"]
                                       not in (None, before["engine"]["pid"])),
                       RECOVERY_LIMIT_S, "the volume to come back by itself")
    recovery = time.monotonic() - t0
    assert recovery < RECOVERY_LIMIT_S
    # At least once each (a supervision pass that ran between the kills may start one early).
    assert all(r["restarts"] >= 1 for r in after["replicas"]) and after["engine"]["restarts"] >= 1
    flushed = w.check(after["endpoint"])
    assert flushed >= 100
    detach_replicas_identical(env)
    report("3 kill -9 every replica and the engine -> healthy", recovery,
           f"daemon: replicas, engine, start rule, resync; {flushed} flushed blocks checked")
    print(f"scenario 3: healthy {recovery:.1f} s after every process was killed; "
          f"{len(w.acked)} blocks acknowledged, {flushed} covered by the last FLUSH")


def test_failed_replica_is_replaced_on_another_disk(env: Env) -> None:
    disks = [os.path.join(env.root, f"d{i}") for i in range(3)]
    for d in disks:
        os.makedirs(d)
    env.cli("volume", "create", "v", "--size", "32MiB", "--replicas", "3",
            *[a for d in disks for a in ("--disk", d)])
    env.cli("setting", "set", "replica-replenishment-wait-interval", "2")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    before = env.show("v")
    w = Writer(uri)
    w.start()
    wait_writes(w, 300, 2)
    victim = before["replicas"][1]
    # Its disk "did not come back": the directory is no replica any more, so it cannot start.
    os.unlink(os.path.join(victim["path"], "volume.meta"))
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    spare = os.path.join(env.home.root, "replicas")
    after = wait_until(lambda: healthy(env, "v", moved=lambda s: s["replicas"][1]["path"]
                                       .startswith(spare + os.sep)), 30, "replacement + resync")
    recovery = time.monotonic() - t0
    n = len(w.acked)
    wait_writes(w, n + 100)
    w.finish()
    new = after["replicas"][1]
    assert new["name"] == victim["name"] and new["rebuild"]["state"] == "done"
    assert new["failed_since"] is None and "replaced by" in after["message"]
    assert not os.path.exists(victim["path"])
    kept = glob.glob(victim["path"] + ".replaced-*")
    assert len(kept) == 1 and os.path.exists(os.path.join(kept[0], "volume-head-000.img"))
    w.check(uri)
    detach_replicas_identical(env)
    report("replica unusable -> replaced on another disk, healthy", recovery,
           "replenishment wait 2 s included")
    print(f"replacement: healthy {recovery:.1f} s after the kill (wait interval 2 s)")


def test_unstartable_replica_without_a_free_disk_waits_for_its_disk(env: Env) -> None:
    # Both replicas in the home: no disk is free for a replacement.
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
    env.cli("setting", "set", "replica-replenishment-wait-interval", "1")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    victim = env.show("v")["replicas"][1]
    meta = os.path.join(victim["path"], "volume.meta")
    os.rename(meta, meta + ".away")       # its disk "is not mounted"
    os.kill(victim["pid"], signal.SIGKILL)
    w = Writer(uri, 16 * MiB)
    w.start()
    s = wait_until(lambda: (lambda s: s if "cannot be replaced: no free disk" in
                            (s["message"] or "") else None)(env.show("v")), 30,
                   "the volume to say it cannot replace the replica")
    assert s["message"].startswith("waiting for replica v-r1 to start")
    assert "holds no replica" in s["message"], s["message"]
    assert s["robustness"] == "degraded" and s["replicas"][1]["failed_since"]
    assert s["replicas"][1]["path"] == victim["path"]       # nothing was moved
    wait_writes(w, 200, 2)               # I/O goes on, degraded
    os.rename(meta + ".away", meta)      # the disk is back: the next try starts it
    t0 = time.monotonic()
    # The message is the daemon's record: cleared by the pass after the one that saw healthy.
    after = wait_until(lambda: healthy(env, "v", cleared=lambda s: s["message"] is None), 45,
                       "the replica to return")
    print(f"returned disk: healthy {time.monotonic() - t0:.1f} s after it came back")
    assert after["replicas"][1]["failed_since"] is None
    assert after["replicas"][1]["path"] == victim["path"]
    w.finish()
    assert w.error is None, w.error
    w.check(uri)
    detach_replicas_identical(env)
