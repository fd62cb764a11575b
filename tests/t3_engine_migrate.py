"""Tier 3: `migrate_replica` (engine/migrate.py) in a real engine against real replica processes.

A drain's move of an in-sync replica, without the daemon: a target replica process (same name,
another directory and address, created empty and Rebuilding) is rebuilt beside the replica
under writes and swapped in; the replica stays RW all the time, so the volume never runs short
of its replica count. Kill points: the target dies during its rebuild (dropped, nothing lost);
the engine is killed during the rebuild (the next start never trusts the target); the engine
is killed after the swap but before the daemon would have pointed the store at the new
directory (the old one is marked Rebuilding: the start resyncs it, writes acknowledged after
the swap are on the others). Every case ends by comparing what was acknowledged with what
reads back."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator

import nbd
import pytest
from conftest import assert_replicas_identical
from harness import Cluster, ReplicaProc, free_port

from blockhorn.config import ReplicaConfig, ReplicaRef
from blockhorn.engine.limits import write_limits
from blockhorn.fsutil import read_json
from blockhorn.replica.store import Replica

MiB = 1 << 20
SIZE = 16 * MiB
WAIT_S = 30.0        # seconds any one state change may take


class Writer:
    """Random writes from a thread until stopped; `model` holds what was acknowledged."""

    def __init__(self, c: Cluster, model: bytearray, seed: int) -> None:
        self.c, self.model, self.rng = c, model, random.Random(seed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.c.uri)
            while not self.stop.is_set():
                n = self.rng.choice((4096, 65536, 3000))
                off = self.rng.randrange(0, SIZE - n)
                data = self.rng.randbytes(n)
                h.pwrite(data, off)
                self.model[off:off + n] = data
                self.count += 1
            h.flush()
            h.shutdown()
        except BaseException as e:   # reported by `join`
            self.error = e

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "writer hung"
        assert self.error is None, self.error


def fill(c: Cluster, seed: int) -> bytearray:
    model = bytearray(random.Random(seed).randbytes(SIZE))
    h = nbd.NBD()
    h.connect_uri(c.uri)
    h.pwrite(bytes(model), 0)
    h.flush()
    h.shutdown()
    return model


def read_all(c: Cluster) -> bytes:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    data = h.pread(SIZE, 0)
    h.shutdown()
    return bytes(data)


_targets: list[ReplicaProc] = []   # every move target a test started: stopped after it


@pytest.fixture(autouse=True)
def _stop_targets() -> Iterator[None]:
    """A test that fails half-way must not leave its move targets' processes running."""
    yield
    while _targets:
        _targets.pop().stop()


def target(c: Cluster, tmp: str, name: str, tag: str) -> ReplicaProc:
    """What the target node's daemon does for a move: an empty, Rebuilding replica of the
    same name in a new directory, at a new address, its process running."""
    directory = os.path.join(tmp, tag, name)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    cfg = ReplicaConfig(c.volume, name, directory, c.size, f"127.0.0.1:{free_port()}",
                        c.key_file)
    path = os.path.join(tmp, f"{name}-{tag}.json")
    cfg.save(path)
    if not os.path.exists(directory):
        Replica.create(directory, c.size, c.volume, {"Rebuilding": True}).close()
    p = ReplicaProc(cfg, path, os.path.join(tmp, f"{name}-{tag}.log"))
    _targets.append(p)
    p.start()
    return p


def migrate(c: Cluster, p: ReplicaProc) -> None:
    c.control().call({"op": "migrate_replica", "replica": p.cfg.name,
                      "address": p.cfg.listen, "path": p.cfg.directory})


def poll(c: Cluster, until: Callable[[dict], bool], what: str,
         rw_seen: list[int] | None = None) -> dict:
    """Poll the engine's status until `until(status)`; `rw_seen` gets the RW count of every
    status read on the way (the volume must never run short during a migration)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        st = c.status()
        if rw_seen is not None:
            rw_seen.append(sum(r["mode"] == "RW" for r in st["replicas"]))
            assert st["robustness"] == "healthy", st
        if until(st):
            return st
        assert time.monotonic() < deadline, f"{what}: {st}"
        time.sleep(0.02)


def rep(st: dict, name: str) -> dict:
    return next(r for r in st["replicas"] if r["name"] == name)


def meta(directory: str) -> dict:
    return read_json(os.path.join(directory, "volume.meta"))


def restart_engine(c: Cluster, reps: list[ReplicaProc], quorum: bool,
                   moving: ReplicaProc | None = None) -> None:
    """Kill the engine and start it again from a config naming `reps` (what the store
    names) and the move target `moving` (the daemon writes it before it asks the engine)."""
    c.stop_engine(signal.SIGKILL)
    c.reps = reps
    extra: dict[str, object] = {"quorum": True} if quorum else {}
    if moving is not None:
        extra["moving"] = [ReplicaRef(moving.cfg.name, moving.cfg.listen,
                                      moving.cfg.directory)]
    c.write_engine_config(**extra)
    c.start_engine()


def test_migrate_under_writes_never_short_then_swapped(cluster_factory, tmp_path) -> None:
    """2 replicas: the target is rebuilt under writes and swapped in; both replicas stay RW
    throughout. The old directory is marked Rebuilding at the swap, the new one joined. An
    engine started with the new directory (the store after finish_move) reads the same."""
    c = cluster_factory(size=SIZE, replicas=2)
    model = fill(c, 1)
    old = c.reps[1]
    new = target(c, str(tmp_path), old.cfg.name, "moved")
    rw: list[int] = []
    t0 = time.monotonic()
    with Writer(c, model, 2) as w:
        migrate(c, new)
        migrate(c, new)          # asked again (a daemon's next pass): the same migration
        st = poll(c, lambda s: rep(s, "vol-r1")["path"] == new.cfg.directory, "swap", rw)
        took = time.monotonic() - t0
        assert (rep(st, "vol-r1")["migration"] or {}).get("to") == new.cfg.directory
        n = w.count
        poll(c, lambda s: w.count > n + 20, "writes after the swap", rw)
    assert min(rw) == 2, rw
    st = c.status()
    assert rep(st, "vol-r1")["migration"]["state"] == "done", st
    assert rep(st, "vol-r1")["address"] == new.cfg.listen
    assert read_all(c) == bytes(model)
    assert meta(old.cfg.directory)["Rebuilding"] is True       # never trusted again
    assert meta(new.cfg.directory)["Rebuilding"] is False
    assert "vol-r1" in meta(new.cfg.directory)["Members"]
    print(f"migration of {SIZE >> 20} MiB under {w.count} writes: swapped after {took:.2f} s")
    # The engine dies before the daemon pointed the store at the new directory. Restarted
    # with the target unreachable, the old directory must not answer for vol-r1.
    new.stop()
    restart_engine(c, c.reps, quorum=False, moving=new)
    st = c.status()
    assert rep(st, "vol-r1")["mode"] == "ERR" and "unreachable" in rep(st, "vol-r1")["error"]
    assert read_all(c) == bytes(model)
    # With the target back, the start takes it for vol-r1 (swapped in before) and resyncs
    # it (its last commit is older than the start that ran without it).
    new.start()
    restart_engine(c, c.reps, quorum=False, moving=new)
    assert rep(c.status(), "vol-r1")["path"] == new.cfg.directory
    assert read_all(c) == bytes(model)
    c.wait_modes({"vol-r0": "RW", "vol-r1": "RW"})
    assert rep(c.status(), "vol-r1")["path"] == new.cfg.directory
    c.stop_engine()
    old.stop()
    c.reps = [c.reps[0], new]
    assert_replicas_identical(c)


def test_migrate_kill_points_quorum(cluster_factory, tmp_path) -> None:
    """3 replicas, commit quorum. The target killed during its rebuild: dropped, the replica
    RW. The engine killed during the rebuild: the start from the old config ignores the
    target. Resumed, swapped, writes acknowledged, the engine killed before finish_move: the
    start from the old config resyncs the old directory and reads every acknowledged write."""
    limits = str(tmp_path / "limits.json")
    write_limits(limits, 4, 5)            # MiB/s: the copy takes a few seconds
    c = cluster_factory(size=SIZE, replicas=3, rebuild_limits=limits)
    c.write_engine_config(quorum=True)
    restart_engine(c, c.reps, quorum=True)
    model = fill(c, 3)
    old = c.reps[2]
    name = old.cfg.name

    def copying(s: dict) -> bool:
        # The copy's progress settles in windows of 16 MiB: the time since it began tells.
        m = rep(s, name)["migration"] or {}
        return m.get("state") == "running" and time.time() - m.get("started_copy", 1e12) > 1

    # 1. The target dies mid-copy: the migration fails, reported; nothing else changes.
    new = target(c, str(tmp_path), name, "moved")
    rw: list[int] = []
    with Writer(c, model, 4):
        migrate(c, new)
        poll(c, copying, "copy running", rw)
        new.kill()
        st = poll(c, lambda s: rep(s, name)["migration"]["state"] == "failed", "failed", rw)
        assert rep(st, name)["path"] == old.cfg.directory
        assert rep(st, name)["migration"]["error"], st
    assert min(rw) == 3, rw
    assert read_all(c) == bytes(model)

    # 2. Again (a new target: the daemon cancelled that move); the engine is killed mid-copy.
    # The store still names the old directory.
    new.stop()
    new = target(c, str(tmp_path), name, "moved2")
    with Writer(c, model, 5):
        migrate(c, new)
        poll(c, copying, "copy running", rw)
    assert rep(c.status(), name)["path"] == old.cfg.directory
    c.stop_engine(signal.SIGKILL)
    assert meta(new.cfg.directory)["Rebuilding"] is True
    restart_engine(c, c.reps, quorum=True, moving=new)     # the target is never trusted
    assert rep(c.status(), name)["path"] == old.cfg.directory
    assert read_all(c) == bytes(model)
    c.wait_modes({f"vol-r{i}": "RW" for i in range(3)})

    # 3. Asked again (the daemon's next pass): it resumes, swaps; writes are acknowledged
    # after the swap; the engine dies before the store was pointed at the new directory.
    write_limits(limits, 0, 5)
    with Writer(c, model, 6) as w:
        migrate(c, new)
        poll(c, lambda s: rep(s, name)["path"] == new.cfg.directory, "swap", rw)
        n = w.count
        poll(c, lambda s: w.count > n + 20, "writes after the swap", rw)
    assert min(rw) == 3, rw
    assert meta(old.cfg.directory)["Rebuilding"] is True
    # Started without the move target (a config from before the move): the old directory,
    # marked at the swap, is resynced, never trusted.
    restart_engine(c, c.reps, quorum=True)
    assert read_all(c) == bytes(model)
    c.wait_modes({f"vol-r{i}": "RW" for i in range(3)})
    assert read_all(c) == bytes(model)
    c.stop_engine()
    new.stop()
    assert_replicas_identical(c)
