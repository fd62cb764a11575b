"""Tier 3: the engine inside real nbdkit, two TCP replicas, one of them behind an on-path
attacker (tests/support/mitm.py) that flips one bit of a frame in flight. The replica refuses
the frame and drops the connection; the engine sets it ERR and the write still succeeds on the
other; nothing forged lands; the engine reconnects and rebuilds it, after which both replicas
hold the same bytes."""

from __future__ import annotations

import json
import os

import nbd
from conftest import assert_replicas_identical
from harness import Cluster
from support.mitm import FlipNext, Mitm

from blockhorn.config import parse_address
from blockhorn.nbd.attach import wait_for

MiB = 1 << 20


def test_forged_frame_sets_the_replica_err_and_nothing_lands(tmp_path) -> None:
    c = Cluster(str(tmp_path), replicas=2, size=8 * MiB)
    hook = FlipNext()
    host, port = parse_address(c.reps[1].cfg.listen)
    mitm = Mitm((str(host), int(port)), c2s=hook)
    with open(c.engine_config) as f:
        cfg = json.load(f)
    cfg["replicas"][1]["address"] = mitm.address        # the engine reaches r1 through it
    with open(c.engine_config, "w") as f:
        json.dump(cfg, f)
    try:
        c.start()
        h = nbd.NBD()
        h.connect_uri(c.uri)
        first = os.urandom(MiB)
        h.pwrite(first, 0)
        c.wait_modes({"vol-r0": "RW", "vol-r1": "RW"})
        hook.armed.set()
        forged_target = os.urandom(MiB)
        h.pwrite(forged_target, MiB)                     # acknowledged by r0 alone
        assert hook.fired.is_set()
        c.wait_modes({"vol-r0": "RW", "vol-r1": "ERR"}, timeout=10)
        wait_for(lambda: "failed authentication" in open(c.reps[1].log_path).read(),
                 "the replica's log of the refused frame", timeout=10)
        with open(os.path.join(c.reps[1].cfg.directory, "volume-head-000.img"), "rb") as f:
            f.seek(MiB)
            assert f.read(MiB) != forged_target          # r1 never executed that write
        assert h.pread(MiB, MiB) == forged_target and h.pread(MiB, 0) == first
        # The engine retries ERR replicas (every 10 s): reconnect through the now quiet
        # proxy, rebuild, RW again.
        c.wait_modes({"vol-r0": "RW", "vol-r1": "RW"}, timeout=40)
        h.flush()
        h.shutdown()
        c.stop_engine()
        assert_replicas_identical(c)
    finally:
        c.stop()
        mitm.close()
