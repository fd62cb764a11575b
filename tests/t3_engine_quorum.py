"""Tier 3: the commit quorum (docs/DURABILITY.md, "The commit quorum") through real replica
processes and nbdkit: an engine in quorum mode with 3 replicas.

- two replicas killed: writes fail with EIO (nothing acknowledged by one replica), reads go
  on, the engine's log names the reason; both back and resynced: writes resume;
- the engine killed and the replica holding a member of the newest set gone with it (its
  node died), no generation record (the next engine runs on another node): the next engine
  starts from the two others by the quorum path, and every acknowledged block reads back;
- one replica left of three: the start is refused (a majority must answer);
- a replica the manager marks down (its node's lease expired) is given a short try at start
  (EngineConfig.down), not a connection timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time

import nbd
import pytest
from harness import Cluster
from t3_engine_review import _wait_rebuilt
from t3_engine_stale_connection import BLOCK, data, poll, replica_contents

from blockhorn.engine.client import CONNECT_TIMEOUT_S
from blockhorn.engine.engine import DOWN_CONNECT_TIMEOUT_S
from blockhorn.nbd.attach import start_engine

MiB = 1 << 20
TIMEOUT_S = 4.0


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write(uri: str, acked: dict[int, str], seed: str, blocks: int) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        base = len(acked)
        for i in range(blocks):
            off = (base + i) * BLOCK * 7
            h.pwrite(data(f"{seed}-{i}"), off)
            acked[off] = sha(data(f"{seed}-{i}"))
        h.flush()
    finally:
        h.shutdown()


def read_back(uri: str, acked: dict[int, str]) -> dict[int, str]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return {off: sha(h.pread(BLOCK, off)) for off in acked}
    finally:
        h.shutdown()


def log_text(c: Cluster) -> str:
    with open(c.engine_log) as f:
        return f.read()


@pytest.fixture
def qc(tmp_path):
    c = Cluster(str(tmp_path), size=16 * MiB, timeout_s=TIMEOUT_S)
    c.write_engine_config(quorum=True)
    try:
        yield c.start()
    finally:
        c.stop()


def test_writes_need_a_majority_and_a_majority_starts(qc: Cluster) -> None:
    c = qc
    r0, r1, r2 = c.reps
    acked: dict[int, str] = {}
    write(c.uri, acked, "all", 8)

    # Two of three gone: a write reaches r0 only and is not acknowledged.
    r1.kill()
    r2.kill()
    h = nbd.NBD()
    h.connect_uri(c.uri)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(data("minority"), 0)
    assert "Input/output error" in str(err.value), err.value
    assert sha(h.pread(BLOCK, 7 * BLOCK)) == acked[7 * BLOCK]      # reads go on
    h.shutdown()
    assert "1 of 3 replicas in sync, a majority (2) is needed" in log_text(c)
    assert c.status()["quorum"] == {"in_sync": 1, "majority": 2, "writable": False}

    # Both back and resynced: writes resume.
    r1.start()
    r2.start()
    for r in (r1, r2):
        c.control().call({"op": "rebuild", "replica": r.cfg.name})
        _wait_rebuilt(c, r.cfg.name)
    # The write that failed landed on r0 and so on every replica (not acknowledged: it may
    # or may not be there); the block it hit is written again now.
    acked.pop(0, None)
    write(c.uri, acked, "again", 8)
    assert "replicas in sync again: writes resume" in log_text(c)
    assert c.status()["quorum"] == {"in_sync": 3, "majority": 2, "writable": True}

    # r0's node dies with the engine: no record there (the next engine runs elsewhere).
    c.stop_engine(signal.SIGKILL)
    r0.kill()
    os.unlink(c.record)
    c.start_engine()
    assert "quorum: 2 of 3 voters answered" in log_text(c), log_text(c)
    assert read_back(c.uri, acked) == acked
    for r in (r1, r2):
        assert replica_contents(r, acked) == acked

    # One replica of three: refused.
    c.stop_engine(signal.SIGKILL)
    r1.kill()
    os.unlink(c.record)
    proc = start_engine(c.engine_config, c.nbd_socket, c.engine_log)
    try:
        poll("the start refused", lambda: "1 of 3 replicas answered, a majority (2) is needed"
             in log_text(c), 30)
        time.sleep(0.2)
        with pytest.raises(nbd.Error):
            h = nbd.NBD()
            h.connect_uri(c.uri)
            h.pwrite(data("refused"), 0)
    finally:
        proc.kill()
        proc.wait(10)
    if os.path.exists(c.control_socket):
        os.unlink(c.control_socket)


def test_a_start_gives_a_replica_of_a_down_node_a_short_try(qc: Cluster) -> None:
    """A replica the manager marks down (`EngineConfig.down`: its node's lease expired) is
    tried only briefly at start: a silent host (here a stopped process, whose kernel accepts
    the connection and never answers) does not hold the start for a connection timeout. The
    rule decides without it (the quorum path, as if it were gone); it is resynced later."""
    c = qc
    r0, r1, r2 = c.reps
    acked: dict[int, str] = {}
    write(c.uri, acked, "before", 8)
    c.stop_engine(signal.SIGKILL)
    os.unlink(c.record)          # the next engine runs on another node
    r2.kill(signal.SIGSTOP)
    try:
        c.write_engine_config(quorum=True, down=[r2.cfg.name])
        c.start_engine()
        log = log_text(c)
        m = re.search(r"2 of 3 replicas answered in ([0-9.]+) s \(on nodes known down: "
                      + re.escape(r2.cfg.name), log)
        assert m, log[-3000:]
        assert "its node was down when the engine was configured" in log, log[-3000:]
        assert "quorum: 2 of 3 voters answered" in log, log[-3000:]
        waited = float(m.group(1))
        print(f"start with a replica of a down node: its replicas answered after {waited} s "
              f"(a short try of {DOWN_CONNECT_TIMEOUT_S} s, not {CONNECT_TIMEOUT_S} s)")
        assert waited < CONNECT_TIMEOUT_S - 1.0
        write(c.uri, acked, "after", 8)      # two of three in sync: writes go on
    finally:
        r2.kill(signal.SIGCONT)
    c.control().call({"op": "rebuild", "replica": r2.cfg.name})
    _wait_rebuilt(c, r2.cfg.name)
    assert read_back(c.uri, acked) == acked
    for r in c.reps:
        assert replica_contents(r, acked) == acked
