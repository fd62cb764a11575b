"""A node's sweep of its leftover replica directories (manager/leftovers.py) when the replica
is moving to this node again: a drain's move given up (its target directory a leftover here)
and the same replica moved here once more take the same directory, and the new target's
process has the same name. The sweep keeps both; a leftover of a replica that is not moving
here is still stopped and removed. A real process stands in for the replica's (found by its
command line, as the sweep finds one an earlier daemon started); the store is a stub."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator

import psutil
import pytest

from blockhorn.control.store import LeftoverRow, MoveTarget, ReplicaRow
from blockhorn.manager import leftovers
from blockhorn.manager.paths import Home

ME, OTHER = "n2", "n1"


@pytest.fixture
def proc(tmp_path: object) -> Iterator[tuple[Home, subprocess.Popen[bytes]]]:
    """A stand-in for the replica process of v-r1 (its config path on its command line)."""
    home = Home(os.path.join(str(tmp_path), "home"))
    cfg = home.replica_config("v", "v-r1")
    os.makedirs(os.path.dirname(cfg))
    open(cfg, "w").close()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "replica",
                          "serve", "--config", cfg])
    try:
        yield home, p
    finally:
        p.kill()
        p.wait(10)


def vm_with(home: Home, rows: list[ReplicaRow]) -> types.SimpleNamespace:
    vol = types.SimpleNamespace(name="v", fresh=False, created="t0")
    store = types.SimpleNamespace(volume=lambda _name: vol, replicas=lambda _name: rows)
    return types.SimpleNamespace(
        home=home, store=store, started={"v-r1": ("v", None)},
        here=lambda node: node == ME, is_local=lambda r: r.node == ME)


def test_a_move_target_here_in_the_leftover_directory_is_kept(
        tmp_path: object, proc: tuple[Home, subprocess.Popen[bytes]]) -> None:
    home, p = proc
    disk = os.path.join(str(tmp_path), "disk")
    target = os.path.join(disk, "replicas", "v", "v-r1")
    os.makedirs(target)
    row = ReplicaRow("v-r1", "v", 1, "/other/disk/replicas/v/v-r1", "10.0.0.1:1", None,
                     node=OTHER, moving=MoveTarget(ME, target, "10.0.0.2:2"))
    vm = vm_with(home, [row])
    leftover = LeftoverRow(ME, "v-r1", "v", target, "t0")
    assert leftovers._remove(vm, leftover, {disk}) is True   # type: ignore[arg-type]
    assert psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE and p.poll() is None
    assert os.path.isdir(target) and vm.started == {"v-r1": ("v", None)}


def test_another_leftover_of_a_replica_moving_here_spares_the_target(
        tmp_path: object, proc: tuple[Home, subprocess.Popen[bytes]]) -> None:
    """The target on another disk of this node: the old directory goes, the target's
    process (same name) and config stay."""
    home, p = proc
    disks = [os.path.join(str(tmp_path), f"disk{i}") for i in range(2)]
    old, target = (os.path.join(d, "replicas", "v", "v-r1") for d in disks)
    os.makedirs(old)
    os.makedirs(target)
    row = ReplicaRow("v-r1", "v", 1, "/other/disk/replicas/v/v-r1", "10.0.0.1:1", None,
                     node=OTHER, moving=MoveTarget(ME, target, "10.0.0.2:2"))
    vm = vm_with(home, [row])
    assert leftovers._remove(vm, LeftoverRow(ME, "v-r1", "v", old, "t0"),  # type: ignore[arg-type]
                             set(disks)) is True
    assert p.poll() is None and not os.path.exists(old) and os.path.isdir(target)
    assert os.path.exists(home.replica_config("v", "v-r1"))


def test_a_leftover_of_a_replica_not_moving_here_is_stopped_and_removed(
        tmp_path: object, proc: tuple[Home, subprocess.Popen[bytes]]) -> None:
    home, p = proc
    disk = os.path.join(str(tmp_path), "disk")
    old = os.path.join(disk, "replicas", "v", "v-r1")
    os.makedirs(old)
    row = ReplicaRow("v-r1", "v", 1, "/other/disk/replicas/v/v-r1", "10.0.0.1:1", None,
                     node=OTHER)
    vm = vm_with(home, [row])
    leftover = LeftoverRow(ME, "v-r1", "v", old, "t0")
    assert leftovers._remove(vm, leftover, {disk}) is False   # type: ignore[arg-type]
    p.wait(10)   # stopped; the directory goes at the next look
    assert leftovers._remove(vm, leftover, {disk}) is True    # type: ignore[arg-type]
    assert not os.path.exists(old) and not os.path.exists(home.replica_config("v", "v-r1"))
