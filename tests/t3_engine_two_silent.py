"""Tier 3: two of three replicas go silent (SIGSTOP) at about the same time; the writer stalls
about one timeout, not two.

r1 stops; a write W goes out; r2 answers W and stops right after. W waits for r1 (timeout),
then the commit that excludes r1 goes to r0 and r2 — and r2 is silent. The engine pings
every replica on its own clock, and a commit stops waiting for a member whose ping is already
unanswered for the timeout, so W is acknowledged about one timeout (+ a ping interval) after
r2 stopped; it waited two timeouts before (the commit gave r2 a timeout of its own). Ends
with both back, resynced, and checksums of what was acknowledged on every replica."""

from __future__ import annotations

import hashlib
import signal
import threading
import time

import nbd
from conftest import assert_replicas_identical
from support.recovery import report
from t3_engine_review import _wait_rebuilt
from t3_engine_stale_connection import BLOCK, data, poll, replica_contents, side_control

MiB = 1 << 20
TIMEOUT_S = 4.0


def test_two_replicas_silent_at_once_stall_one_timeout(cluster_factory) -> None:
    c = cluster_factory(size=16 * MiB, timeout_s=TIMEOUT_S)
    r1, r2 = c.reps[1], c.reps[2]
    h = nbd.NBD()
    h.connect_uri(c.uri)
    acked: dict[int, str] = {}
    for i in range(4):
        h.pwrite(data(f"before-{i}"), i * MiB)
        acked[i * MiB] = hashlib.sha256(data(f"before-{i}")).hexdigest()
    h.flush()
    revision = side_control(r2, {"op": "stat"})["revision"]

    try:
        run(c, h, acked, revision)
    finally:     # a stopped replica would ignore the teardown's SIGTERM
        for rep in (r1, r2):
            rep.kill(signal.SIGCONT)


def run(c, h: nbd.NBD, acked: dict[int, str], revision: int) -> None:
    r1, r2 = c.reps[1], c.reps[2]
    r1.kill(signal.SIGSTOP)
    took: list[float] = []
    failed: list[BaseException] = []

    def write() -> None:
        t0 = time.monotonic()
        try:
            h.pwrite(data("W"), 8 * MiB)
        except BaseException as e:   # asserted below, with what it was
            failed.append(e)
        took.append(time.monotonic() - t0)

    writer = threading.Thread(target=write)
    writer.start()
    poll("r2 executing W", lambda: side_control(r2, {"op": "stat"})["revision"] > revision)
    r2.kill(signal.SIGSTOP)
    stopped_at = time.monotonic()
    writer.join(4 * TIMEOUT_S)
    assert not writer.is_alive(), "the write never finished"
    assert not failed, f"the write failed: {failed[0]!r}"
    stall = time.monotonic() - stopped_at
    acked[8 * MiB] = hashlib.sha256(data("W")).hexdigest()
    report("two replicas silent at once: the write waiting on them acknowledged", stall,
           f"timeout {TIMEOUT_S:g} s")
    assert c.modes() == {"vol-r0": "RW", "vol-r1": "ERR", "vol-r2": "ERR"}
    # One timeout plus up to one ping interval (2 s) and scheduling; two timeouts before.
    assert stall < 2 * TIMEOUT_S - 0.5, f"the write stalled {stall:.1f} s after r2 stopped"

    for rep in (r1, r2):
        rep.kill(signal.SIGCONT)
    for rep in (r1, r2):
        c.control().call({"op": "rebuild", "replica": rep.cfg.name})
    for rep in (r1, r2):
        _wait_rebuilt(c, rep.cfg.name)
    check = nbd.NBD()
    check.connect_uri(c.uri)
    for off, digest in acked.items():
        assert hashlib.sha256(check.pread(BLOCK, off)).hexdigest() == digest, off
    check.shutdown()
    h.flush()
    h.shutdown()
    for rep in c.reps:
        assert replica_contents(rep, acked) == acked, rep.cfg.name
    assert_replicas_identical(c)
