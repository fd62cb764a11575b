"""A detached volume of a cluster whose replicas live on other nodes, attached for the
length of one operation (a *maintenance attach*).

On one host a detached volume's snapshots, expansion and restores work on its replica
directories directly. On a cluster those directories are on other nodes; the operation goes
through an engine instead: the node asked attaches the volume on itself with no device
(`frontend none`), the other nodes' supervisors start their replicas as for any attach, the
operation talks to the engine (its control socket, or its NBD socket for a restore), and the
volume is detached again, every node's replica stopped, before the call returns.

While it runs the volume is attached on this node with the message `maintenance on node N:
WHAT` and the mark `{"maintenance": WHAT, "node": N}` as its attachment (it has no device; the
message is replaced by what happens meanwhile, the mark stays until the detach); a user's
attach is refused naming it (`check_attachable`). A daemon that dies in the middle leaves
nothing worse than that attached volume: its supervisor restarts the engine when it starts
again, and `volume detach` ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from blockhorn.types import Busy

if TYPE_CHECKING:
    from blockhorn.control.store import VolumeRow
    from blockhorn.manager.volumes import VolumeManager

log = logging.getLogger("blockhorn.manager")

MAINTENANCE = "maintenance on node "   # the volume's message while one runs
STOP_WAIT_S = 30.0                     # seconds the other nodes get to stop their replicas
# Seconds the other nodes get to start theirs: a replica's restart back-off (supervisor.py;
# it ends when the volume is seen detached) can exceed what bring_up waits for one to
# answer, and an engine started without it would leave it stale or refuse to start.
START_WAIT_S = 45.0


def needed(vm: VolumeManager, name: str) -> bool:
    """A cluster volume with a replica on another node: its directories are not here."""
    return vm.cluster is not None and any(not vm.is_local(r) for r in vm.store.replicas(name))


def mark(vol: VolumeRow) -> dict[str, Any] | None:
    """The maintenance attach holding `vol`, if one does: {"maintenance": what, "node"}."""
    att = vol.attachment or {}
    return att if vol.desired == "attached" and "maintenance" in att else None


def check_attachable(vol: VolumeRow) -> None:
    """Refuse a user's attach while a maintenance attach holds the volume (clearer than
    "already attached": the operator did not attach it)."""
    m = mark(vol)
    if m is not None:
        raise Busy(f"volume {vol.name!r} is busy: {MAINTENANCE}{m.get('node') or vol.node}: "
                   f"{m['maintenance']}; attach it when that ends (if the daemon of node "
                   f"{vol.node} died meanwhile it stays attached there: `blockhorn volume "
                   f"detach {vol.name}` ends it)")


@contextmanager
def attached_here(vm: VolumeManager, name: str, what: str,
                  supervised: bool = False) -> Iterator[None]:
    """Attach detached volume `name` on this node with no device for the block, then detach
    it again (also when the block or the attach fails). The caller holds vm.locked(name);
    with `supervised` it does not, and the lock is held while attaching and while detaching
    only: the block needs this node's supervision pass, which leaves a locked volume alone
    (a drain's move: the pass asks the engine to migrate the replica, manager/moves.py).
    Meanwhile a user's attach is refused by the volume's mark, and a user's detach ends the
    maintenance attach early (the block sees the volume detached)."""
    def held() -> AbstractContextManager[Any]:
        return vm.locked(name) if supervised else nullcontext()

    with held():
        vol = vm.store.volume(name)
        if vol.desired == "attached":
            raise Busy(f"volume {name!r} is attached on node {vol.node}: ask that node")
        log.info("volume %s: maintenance attach on %s for %s", name, vm.me, what)
        epoch = vm.store.claim_attachment(name, vm.me, vol.node, detached=True,
                                          desired="attached", frontend="none", tcp_port=None,
                                          robustness=None,
                                          attachment={"maintenance": what, "node": vm.me},
                                          device_stale=False, salvage=None,
                                          message=f"{MAINTENANCE}{vm.me}: {what}")
        # At once (bring_up sets them too, later): a daemon that dies before must restart
        # the engine on this node's sockets, not on those of the node that ran it last.
        vm.store.set_engine_sockets(name, vm.home.nbd_socket(name),
                                    vm.home.control_socket(name))
    try:
        with held():
            _wait_remote_started(vm, name)
            vm.bring_up(name, "none", "rwo")   # no share: nobody mounts it meanwhile
        yield
    finally:
        with held():
            # Still this attachment (its epoch)? With `supervised` a user's detach may have
            # ended it meanwhile, and a user's attach after that is not ours to stop.
            now = vm.store.volume(name)
            ours = now.desired == "attached" and now.epoch == epoch
            errors = vm.stop_here(name, frontend=None) if ours else []
        if not ours:
            log.info("volume %s: the maintenance attach for %s was ended by a detach "
                     "meanwhile", name, what)
        elif errors:
            log.error("volume %s: detach after %s incomplete: %s", name, what,
                      "; ".join(errors))
        else:
            _wait_remote_stopped(vm, name)
        log.info("volume %s: maintenance for %s over", name, what)


@contextmanager
def restore_sink(vm: VolumeManager, name: str, what: str) -> Iterator[Any]:
    """Where a restore into detached volume `name` writes (a blockhorn.backup Sink, closed
    after): its replica directories when they are all here (one host), else its engine over
    NBD in a maintenance attach here (the engine writes every replica). The caller holds
    vm.locked(name)."""
    from blockhorn import backup as bk
    if not needed(vm, name):
        sink: Any = bk.ReplicaSink([r.directory for r in vm.store.replicas(name)])
        try:
            yield sink
        finally:
            sink.close()
        return
    with attached_here(vm, name, what):
        sink = bk.NbdSink(vm._uri(vm.store.engine(name).nbd_socket))
        try:
            yield sink
        finally:
            sink.close()


def _wait_remote_started(vm: VolumeManager, name: str) -> None:
    """Until every other node that is up recorded its replica process started."""
    assert vm.cluster is not None
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        up = vm.cluster.up_nodes()
        if all(r.process is not None for r in vm.store.replicas(name)
               if not vm.is_local(r) and r.node in up):
            return
        time.sleep(0.1)
    log.warning("volume %s: replicas of other nodes not started after %.0f s", name,
                START_WAIT_S)


def _wait_remote_stopped(vm: VolumeManager, name: str) -> None:
    """Until every other node that is up stopped its replica (its supervisor does, within a
    tick): the next attach must not find one still stopping."""
    assert vm.cluster is not None
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if vm.store.volume(name).desired == "attached":
            return   # attached again meanwhile (a user's attach): its replicas stay up
        up = vm.cluster.up_nodes()
        running = [r for r in vm.store.replicas(name) if not vm.is_local(r)
                   and r.process is not None and r.node in up]
        if not running:
            return
        time.sleep(0.1)
    log.warning("volume %s: replicas of other nodes still recorded running after %.0f s",
                name, STOP_WAIT_S)
