"""Tier 3, scenario 8: a crash at each step of a full rebuild and of an incremental resync.

The target runs tests/support/faulty_replica.py, which SIGSTOPs itself just before the step
(`FAULTY_STOP_AT`); the test then kill -9s the target (restarted, rebuilt again) or the engine
(restarted: its start resyncs the target). Each step ends converged: every acknowledged
write reads back, the replicas are identical and all RW."""

from __future__ import annotations

import hashlib
import random
import signal
import time

import nbd
import pytest
from conftest import assert_replicas_identical
from harness import proc_state
from support.faulty_replica import PROGRAM
from t3_engine_rebuild_resume import empty_replica, wait_for

MiB = 1 << 20
SIZE = 16 * MiB
HEALTHY = {"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}
STEPS = {
    "full": ["set_rebuilding", "reset_chain", "begin_copy", "WRITE_LAYER", "FLUSH",
             "finish_rebuild", "set_generation"],
    "resync": ["set_rebuilding", "begin_copy", "punch_layer", "WRITE_LAYER", "FLUSH",
               "finish_rebuild", "set_generation"],
}


class Volume:
    """The acknowledged content, written between crashes."""

    def __init__(self, c) -> None:
        self.c = c
        self.data = bytearray(SIZE)
        self.rng = random.Random(8)

    def write(self, blocks: int) -> None:
        h = nbd.NBD()
        h.connect_uri(self.c.uri)
        for _ in range(blocks):
            off = self.rng.randrange(SIZE // (64 * 1024)) * 64 * 1024
            data = self.rng.randbytes(64 * 1024)
            h.pwrite(data, off)
            self.data[off:off + len(data)] = data
        h.flush()
        h.shutdown()

    def check(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.c.uri)
        got = h.pread(SIZE, 0)
        h.shutdown()
        assert hashlib.sha256(got).digest() == hashlib.sha256(self.data).digest(), \
            "the volume differs from what was acknowledged"


def stopped(pid: int) -> bool:
    return proc_state(pid) == "T"


def converged(c) -> bool:
    st = c.status()["replicas"]
    return all(r["mode"] == "RW" and (r.get("rebuild") or {}).get("state") in (None, "done")
               for r in st)


@pytest.mark.parametrize("victim", ["target", "engine"])
@pytest.mark.parametrize("mode", ["full", "resync"])
def test_crash_at_each_step_converges(cluster_factory, monkeypatch, mode, victim) -> None:
    c = cluster_factory(size=SIZE, transport="unix", timeout_s=2.0, replica_program=PROGRAM)
    vol = Volume(c)
    vol.write(64)
    r2 = c.reps[2]
    try:
        crash_each_step(c, vol, monkeypatch, mode, victim)
    finally:
        r2.kill(signal.SIGCONT)       # a stopped replica would not stop at teardown


def crash_each_step(c, vol: Volume, monkeypatch, mode: str, victim: str) -> None:
    r2 = c.reps[2]
    for step in STEPS[mode]:
        monkeypatch.setenv("FAULTY_STOP_AT", step)
        if mode == "full":
            empty_replica(c, 2)
        else:
            r2.kill(signal.SIGKILL)
            vol.write(16)                  # what it misses while away
            r2.start()
        monkeypatch.delenv("FAULTY_STOP_AT")
        c.control().call({"op": "rebuild", "replica": "vol-r2"})
        assert r2.proc is not None
        wait_for(lambda: stopped(r2.proc.pid), f"{mode} step {step}")   # noqa: B023
        if victim == "target":
            r2.kill(signal.SIGKILL)
            r2.start()
            c.control().call({"op": "rebuild", "replica": "vol-r2"})
        else:
            c.stop_engine(signal.SIGKILL)
            r2.kill(signal.SIGCONT)        # it executes the step for a dead engine
            time.sleep(0.1)
            c.start_engine()
        wait_for(lambda: converged(c), f"convergence after a crash at {step}", timeout=30)
        vol.write(8)
        vol.check()
        assert_replicas_identical(c)
