"""Tier 3: an engine on a cluster node stops itself when its node's fence is due and nobody ran
it (engine/ping.py `fence_if_lease_lost`; docs/DURABILITY.md, "A partitioned node fences
itself"): real replica processes and nbdkit, the engine config's `beat_file` written as the
node daemon writes it (blockhorn/liveness.py).

- while the beat is renewed, the engine serves writes well past `fence_after_s`;
- once the beats stop (the daemon and its dead man's switch gone), every request fails with
  EIO from `fence_after_s` on (within a maintenance tick or two), and FENCED_EXIT_S later the
  engine kills itself; its log says why;
- every write it acknowledged before reads back from the replicas through the next engine.
"""

from __future__ import annotations

import errno
import threading
import time

import nbd
from harness import Cluster
from t3_engine_quorum import read_back, write

from blockhorn import liveness
from blockhorn.engine.ping import FENCED_EXIT_S

MiB = 1 << 20
FENCE_AFTER_S = 2.0
SLACK_S = 2.0   # the maintenance tick, a loaded machine


def test_an_engine_whose_node_lease_is_overdue_stops_itself(tmp_path) -> None:
    beat = str(tmp_path / "node.beat")
    liveness.record_beat(beat, time.monotonic())
    c = Cluster(str(tmp_path), size=16 * MiB, replicas=2)
    c.write_engine_config(beat_file=beat, fence_after_s=FENCE_AFTER_S)
    stop_beats = threading.Event()

    def beats() -> None:   # the node daemon's renewals (every HEARTBEAT_S, shortened)
        while not stop_beats.wait(0.3):
            liveness.record_beat(beat, time.monotonic())

    beater = threading.Thread(target=beats, daemon=True)
    beater.start()
    try:
        c.start()
        acked: dict[int, str] = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2 * FENCE_AFTER_S:   # renewed: it serves on
            write(c.uri, acked, f"renewed-{len(acked)}", 2)
            time.sleep(0.4)
        assert c.engine is not None and c.engine.poll() is None

        stop_beats.set()
        beater.join()
        last = time.monotonic()
        h = nbd.NBD()
        h.connect_uri(c.uri)
        fenced_at, first_error = 0.0, None
        try:
            deadline = last + FENCE_AFTER_S + FENCED_EXIT_S + SLACK_S + 5
            while c.engine.poll() is None and time.monotonic() < deadline:
                try:
                    h.pread(4096, 0)                      # served locally until fenced
                    h.pwrite(b"x" * 4096, 15 * MiB)       # not tracked: may land or not
                    h.flush()
                except nbd.Error as e:
                    if first_error is None:
                        fenced_at, first_error = time.monotonic(), e
                time.sleep(0.05)
            c.engine.wait(max(0.1, deadline - time.monotonic()))
        finally:
            del h   # closes the connection (libnbd has no close of its own)
        gone = time.monotonic() - last
        # Fenced at the deadline: requests fail with EIO (a share's Ganesha is not left
        # waiting on the device); FENCED_EXIT_S later the process is gone, SIGKILLed.
        assert first_error is not None and first_error.errnum == errno.EIO, first_error
        assert FENCE_AFTER_S - 0.5 <= fenced_at - last <= FENCE_AFTER_S + SLACK_S, fenced_at
        assert c.engine.returncode == -9, c.engine.returncode   # SIGKILL, as the fence
        assert FENCED_EXIT_S - 0.5 <= gone - (fenced_at - last) <= FENCED_EXIT_S + SLACK_S, gone
        with open(c.engine_log) as f:
            assert "the node's lease was last renewed" in f.read()

        # The next engine (here without a beat: one host) has every acknowledged write.
        c.stop_engine()   # dead: only its control socket is left to remove
        c.write_engine_config()
        c.start_engine()
        assert read_back(c.uri, acked) == acked
        print(f"\nengine fenced itself {fenced_at - last:.2f} s after the last renewal "
              f"(fence_after_s {FENCE_AFTER_S}), gone after {gone:.2f} s; {len(acked)} "
              "acknowledged blocks equal")
    finally:
        stop_beats.set()
        c.stop()
