"""Tier 3: the full rebuild under load, resumed after a kill of its target, its source or the
engine (issue 9: resumable rebuild; scenario 2). Real replica processes and a real nbdkit
engine; each test ends by reading back every acknowledged write and comparing the replicas."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import nbd
from conftest import assert_replicas_identical
from harness import ROOT

from blockhorn.engine.limits import write_limits

MiB = 1 << 20
SIZE = 64 * MiB


def connect(c) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    return h


class Model:
    """What the volume must read as: every acknowledged write applied in order."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)

    def write(self, h: nbd.NBD, data: bytes, off: int) -> None:
        h.pwrite(data, off)
        self.data[off:off + len(data)] = data

    def fill(self, h: nbd.NBD, seed: int, step: int, length: int) -> int:
        rng = random.Random(seed)
        for off in range(0, SIZE, step):
            self.write(h, rng.randbytes(length), off)
        h.flush()
        return SIZE // step * length

    def check(self, h: nbd.NBD) -> None:
        for off in range(0, SIZE, 4 * MiB):
            got = hashlib.sha256(h.pread(4 * MiB, off)).hexdigest()
            assert got == hashlib.sha256(self.data[off:off + 4 * MiB]).hexdigest(), \
                f"data at {off} differs from what was acknowledged"


class Writer(threading.Thread):
    """Small writes (aligned and not) all over the volume while a rebuild copies."""

    def __init__(self, c, model: Model) -> None:
        super().__init__(daemon=True)
        self.h = connect(c)
        self.model = model
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.count = 0

    def run(self) -> None:
        rng = random.Random(5)
        try:
            while not self.halt.is_set():
                size = rng.choice([4096, 8192, 1000])
                off = min(rng.randrange(SIZE // 512) * 512, SIZE - size)
                self.model.write(self.h, rng.randbytes(size), off)
                self.count += 1
        except BaseException as e:      # reported by finish()
            self.error = e

    def finish(self) -> None:
        self.halt.set()
        self.join(10)
        assert self.error is None, self.error
        self.h.flush()
        self.h.shutdown()


def empty_replica(c, i: int) -> None:
    """What the daemon's replacement does: a new, empty, Rebuilding replica in its place."""
    r = c.reps[i]
    r.kill(signal.SIGKILL)
    shutil.rmtree(r.cfg.directory)
    subprocess.run([sys.executable, "-m", "blockhorn", "replica", "create", "--config",
                    r.config_path], cwd=ROOT, check=True, capture_output=True, timeout=30)
    r.start()


def replica_status(c, name: str) -> dict:
    return {r["name"]: r for r in c.status()["replicas"]}[name]


def wait_for(pred, what: str, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def wait_rebuilt(c, name: str, timeout: float = 20.0) -> dict:
    def done() -> dict | None:
        st = replica_status(c, name)
        rb = st.get("rebuild") or {}
        return rb if st["mode"] == "RW" and rb.get("state") == "done" else None
    return wait_for(done, f"the rebuild of {name}", timeout)


def node_limits(tmp_path, mib_s: int, per_node: int = 5) -> str:
    path = str(tmp_path / "rebuild-limits.json")
    write_limits(path, mib_s, per_node)
    return path


def test_full_rebuild_under_writes_is_exact(cluster_factory, tmp_path) -> None:
    """The pipelined copy takes no lock per chunk: writes racing it land on the target, and
    the copy skips the blocks they reached. Ends identical, with every acknowledged write."""
    path = node_limits(tmp_path, 16)    # slow enough that the writer races the whole copy
    c = cluster_factory(size=SIZE, transport="unix", rebuild_limits=path)
    model = Model()
    h = connect(c)
    data = model.fill(h, 1, 2 * MiB, MiB)       # 32 MiB of data, 32 MiB of holes
    empty_replica(c, 2)
    w = Writer(c, model)
    w.start()
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    rb = wait_rebuilt(c, "vol-r2")
    w.finish()
    assert rb["mode"] == "full" and rb["copied"] >= data and w.count > 100, (rb, w.count)
    model.check(h)
    h.shutdown()
    assert_replicas_identical(c)


def test_rebuild_resumes_after_its_target_is_killed(cluster_factory, tmp_path) -> None:
    """A target killed mid-copy keeps a durable cursor; the next rebuild compares digests
    below it and copies only what is above (equal chunks are not copied)."""
    path = node_limits(tmp_path, 16)
    c = cluster_factory(size=SIZE, transport="unix", rebuild_limits=path)
    model = Model()
    h = connect(c)
    data = model.fill(h, 2, MiB, MiB)           # 64 MiB of data: 4 s at 16 MiB/s
    empty_replica(c, 2)
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    cursor = wait_for(lambda: (replica_status(c, "vol-r2").get("rebuild") or {})
                      .get("cursor", [0, 0])[1] >= 16 * MiB, "a durable cursor")
    assert cursor
    c.reps[2].kill(signal.SIGKILL)
    wait_for(lambda: replica_status(c, "vol-r2")["mode"] == "ERR", "the target to fail")
    write_limits(path, 0, 5)
    c.reps[2].start()
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    rb = wait_rebuilt(c, "vol-r2")
    assert rb["mode"] == "resume", rb
    assert rb["cursor"][1] >= 16 * MiB and rb["copied"] <= data - rb["cursor"][1], rb
    assert rb["done"] == rb["total"] == data, rb
    model.check(h)
    h.shutdown()
    assert_replicas_identical(c)


def test_scenario2_target_then_source_killed_during_rebuilds(cluster_factory, tmp_path) -> None:
    """Scenario 2: kill -9 a replica during its rebuild, then the rebuild's source, under
    writes. Both rebuilds finish; every acknowledged write reads back; replicas identical."""
    path = node_limits(tmp_path, 16)
    c = cluster_factory(size=SIZE, transport="unix", rebuild_limits=path, timeout_s=2.0)
    model = Model()
    h = connect(c)
    model.fill(h, 3, MiB, MiB)
    empty_replica(c, 2)
    w = Writer(c, model)
    w.start()
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    wait_for(lambda: (replica_status(c, "vol-r2").get("rebuild") or {}).get("done", 0)
             >= 8 * MiB, "the copy to start")
    c.reps[2].kill(signal.SIGKILL)                       # the target, mid-copy
    wait_for(lambda: replica_status(c, "vol-r2")["mode"] == "ERR", "the target to fail")
    c.reps[2].start()
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    wait_for(lambda: (replica_status(c, "vol-r2").get("rebuild") or {}).get("state")
             == "running" and replica_status(c, "vol-r2")["mode"] == "WO", "the resume")
    c.reps[0].kill(signal.SIGKILL)                       # now its source
    wait_for(lambda: replica_status(c, "vol-r0")["mode"] == "ERR", "the source to fail")
    wait_for(lambda: replica_status(c, "vol-r2")["mode"] == "ERR"
             or (replica_status(c, "vol-r2").get("rebuild") or {}).get("state") == "done",
             "the rebuild to notice")
    write_limits(path, 0, 5)
    c.control().call({"op": "rebuild", "replica": "vol-r2"})    # from vol-r1 now
    wait_rebuilt(c, "vol-r2")
    c.reps[0].start()
    c.control().call({"op": "rebuild", "replica": "vol-r0"})
    wait_rebuilt(c, "vol-r0")
    w.finish()
    assert w.count > 100, w.count
    model.check(h)
    h.shutdown()
    assert_replicas_identical(c)


def test_rebuild_resumes_after_the_engine_is_killed(cluster_factory, tmp_path) -> None:
    """kill -9 of the engine mid-copy: the next engine's start finds the target Rebuilding
    with a cursor and resumes it."""
    path = node_limits(tmp_path, 16)
    c = cluster_factory(size=SIZE, transport="unix", rebuild_limits=path)
    model = Model()
    h = connect(c)
    data = model.fill(h, 4, MiB, MiB)
    h.shutdown()
    empty_replica(c, 2)
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    wait_for(lambda: (replica_status(c, "vol-r2").get("rebuild") or {})
             .get("cursor", [0, 0])[1] >= 16 * MiB, "a durable cursor")
    c.stop_engine(signal.SIGKILL)
    write_limits(path, 0, 5)
    c.start_engine()
    rb = wait_rebuilt(c, "vol-r2")
    assert rb["mode"] == "resume" and rb["copied"] <= data - rb["cursor"][1], rb
    h = connect(c)
    model.check(h)
    h.shutdown()
    assert_replicas_identical(c)
