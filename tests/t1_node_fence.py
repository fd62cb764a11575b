"""Tier 1: a cluster daemon's dead man's switch (blockhorn/node/fence.py), the real helper
process against stand-in processes that carry an engine's and a Ganesha's config paths in
their command lines (no root, no store).

- the daemon gone (its pipe closed) and no renewal after its last one: the helper kills both
  once that renewal is SELF_FENCE_AFTER_S old — not before — and exits, and the release of
  the volume's devices runs after it (nothing to release here: t5_cluster_share has them);
- the daemon gone but a newer renewal recorded (a daemon started again in time): the helper
  stands down and kills nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from daemon_util import ROOT, wait_until

from blockhorn.liveness import self_fence_after
from blockhorn.manager.paths import Home
from blockhorn.node import fence
from blockhorn.sharemgr.control import fence_marks

TTL_S = 3                          # BLOCKHORN_NODE_TTL_S for the helper
FENCE_AFTER_S = self_fence_after(TTL_S)   # SELF_FENCE_AFTER_S for that TTL


@pytest.fixture
def home(tmp_path: object) -> Home:
    h = Home(str(tmp_path))
    os.makedirs(os.path.join(h.root, "volumes", "v"))
    os.makedirs(os.path.dirname(h.log("x")), exist_ok=True)
    return h


@pytest.fixture
def stand_ins(home: Home) -> Iterator[list[subprocess.Popen[bytes]]]:
    """An 'engine' and a 'Ganesha' of volume v: sleepers with their config paths as argv."""
    _, ganesha = fence_marks(home, "v")
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", path])
             for path in (home.engine_config("v"), *ganesha)]
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


def start_switch(home: Home) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ, BLOCKHORN_NODE_TTL_S=str(TTL_S))
    read_end, write_end = os.pipe()
    helper = subprocess.Popen([sys.executable, "-m", "blockhorn.node.fence", home.root],
                              stdin=read_end, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    os.close(read_end)
    return helper, write_end


def test_daemon_gone_switch_fences_at_the_deadline(
        home: Home, stand_ins: list[subprocess.Popen[bytes]]) -> None:
    began = time.monotonic()
    fence.record_beat(home, began)
    helper, pipe = start_switch(home)
    os.close(pipe)   # the daemon died right after its renewal
    wait_until(lambda: all(p.poll() is not None for p in stand_ins), FENCE_AFTER_S + 5,
               "the switch killing the engine and Ganesha")
    killed_at = time.monotonic() - began
    assert killed_at >= FENCE_AFTER_S - 0.1, killed_at   # not before the daemon would have
    assert helper.wait(10) == 0
    assert b"fenced, 2 process(es) killed" in helper.stderr.read()   # type: ignore[union-attr]

    def released() -> bool:   # the release after the kill ran, in a process of its own
        with open(home.log("fence.log")) as f:
            return "released after fencing v: nothing was left" in f.read()
    wait_until(released, 10, "the release after the fence")


def test_restarted_daemon_makes_the_switch_stand_down(
        home: Home, stand_ins: list[subprocess.Popen[bytes]]) -> None:
    fence.record_beat(home, time.monotonic())
    helper, pipe = start_switch(home)
    os.close(pipe)
    deadline = time.monotonic() + FENCE_AFTER_S + 5
    while helper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        fence.record_beat(home, time.monotonic())   # the next daemon renews the lease
    assert helper.wait(1) == 0
    assert b"standing down" in helper.stderr.read()   # type: ignore[union-attr]
    assert all(p.poll() is None for p in stand_ins)
