"""Tier 3: a paused replica's old connection must not land a stale write after its resync.

The engine sends W1 to r2; r2 has received it but is paused (SIGSTOP) before executing it.
The engine times out, sets r2 ERR and writes W2 over the same block on r0 and r1. r2 is
continued and resynced through a new connection; only then does the old connection's thread
get to run W1 (tests/support/faulty_replica.py `hold_write_at` makes that order certain:
a thread not scheduled for that long, or one queued behind a slow disk, does the same).
W1 must be refused, not executed: else r2 silently holds older data than its siblings.
Ends by comparing the checksums of what was acknowledged with every replica's contents."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

import nbd
import pytest
from conftest import assert_replicas_identical
from support.faulty_replica import PROGRAM
from t3_engine_rebuild_crash import stopped
from t3_engine_review import _wait_rebuilt

from blockhorn.config import ReplicaRef
from blockhorn.engine.client import ReplicaClient
from blockhorn.keys import load_key

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 64 * 1024
HELD_AT = 5 * MiB          # where W1 (held on r2) and W2 (acknowledged) go


def side_control(rep, req: dict) -> dict:
    """One control op on a connection of its own (a connection opened before the engine's
    reconnection would be refused after it: that is the point of this test)."""
    c = ReplicaClient(ReplicaRef(rep.cfg.name, rep.cfg.listen), load_key(rep.cfg.key_file),
                      "vol")
    c.connect()
    try:
        return c.control(req, timeout=10)
    finally:
        c.close()


def poll(what: str, pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def data(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).digest() * (BLOCK // 32)


def replica_contents(rep, acked: dict[int, str]) -> dict[int, str]:
    with open(os.path.join(rep.cfg.directory, "volume-head-000.img"), "rb") as f:
        return {off: hashlib.sha256(os.pread(f.fileno(), BLOCK, off)).hexdigest()
                for off in acked}


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_write_queued_on_an_old_connection_never_lands_after_the_resync(
        cluster_factory, transport) -> None:
    c = cluster_factory(size=SIZE, transport=transport, timeout_s=1.0,
                        replica_program=PROGRAM)
    r2 = c.reps[2]
    h = nbd.NBD()
    h.connect_uri(c.uri)
    acked: dict[int, str] = {}
    for i in range(8):
        off = i * 2 * MiB
        h.pwrite(data(f"base-{i}"), off)
        acked[off] = hashlib.sha256(data(f"base-{i}")).hexdigest()
    h.flush()
    side_control(r2, {"op": "fault", "hold_write_at": HELD_AT})

    h.pwrite(data("W1"), HELD_AT)          # r2 receives it and pauses: ERR after 1 s
    assert stopped(r2.proc.pid)
    c.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "ERR"})
    h.pwrite(data("W2"), HELD_AT)          # acknowledged by r0 and r1
    h.flush()
    acked[HELD_AT] = hashlib.sha256(data("W2")).hexdigest()

    r2.kill(signal.SIGCONT)
    poll("r2 holding W1", lambda: side_control(r2, {"op": "held"})["held"].get("state")
         == "held")
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    _wait_rebuilt(c, "vol-r2")
    # The old connection's thread runs now, after the resync copied the block.
    side_control(r2, {"op": "release"})
    held = poll("W1 settled", lambda: (lambda s: s if s.get("state") == "done" else None)(
        side_control(r2, {"op": "held"})["held"]))

    check = nbd.NBD()
    check.connect_uri(c.uri)
    for off, digest in acked.items():
        assert hashlib.sha256(check.pread(BLOCK, off)).hexdigest() == digest, off
    check.shutdown()
    h.shutdown()
    for rep in c.reps:
        assert replica_contents(rep, acked) == acked, \
            f"{rep.cfg.name} differs from what was acknowledged (W1 held: {held})"
    assert held["status"] == errno.ESTALE, held
    assert c.modes() == {"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}
    assert_replicas_identical(c)
