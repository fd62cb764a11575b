"""Volumes across nodes (a cluster, `daemon run --etcd`): the parts of the volume lifecycle
where one node asks another to act, through the state store.

Every node's daemon reconciles its own share of the desired state (manager/supervisor.py):
- `volume create` on node A writes the store and creates A's replicas; node B's daemon
  creates B's (`create_missing_replicas`) when it sees them, before the first attach.
- `volume attach NAME --node B` asked of A: A records desired `attached`, the volume's `node`
  B, and the message "attaching on B"; B's supervisor sees it, brings the volume up
  (`realize_attach`: its replicas, the others' over TCP, engine, device) and clears the
  message, or records why it failed and sets the volume detached again. A waits for either.
- the replicas of an attached volume run wherever they live: each node starts (and restarts)
  its own; the engine's node waits for them to answer before it starts the engine.
- `volume detach` asked of another node than the engine's: desired `detached`; the engine's
  node tears its part down and clears the engine's process record, which the asker waits for;
  every node stops its replicas of a detached volume.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

from blockhorn.control.store import ProcessRecord, ReplicaRow, StateStore, VolumeRow
from blockhorn.fsutil import atomic_write
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.manager.volumes import FRONTENDS, VolumeManager, check_system
from blockhorn.node.fence import fence
from blockhorn.types import BlockhornError, Busy, InvalidArgument, NotFound, check_name

log = logging.getLogger("blockhorn.manager")

REMOTE_WAIT_S = 90.0       # seconds an attach/detach on another node may take (its daemon
                           # notices within a supervision tick, then starts or stops processes)
ATTACHING = "attaching on "  # volume message while another node's daemon attaches it


def attach_requested(vm: VolumeManager, vol: VolumeRow) -> bool:
    """An attach asked of this node by another that this node has not done yet."""
    return (vm.cluster is not None and vol.desired == "attached" and vol.node == vm.me
            and (vol.message or "").startswith(ATTACHING)
            and vm.store.engine(vol.name).process is None)


def create_missing_replicas(vm: VolumeManager, vol: VolumeRow,
                            reps: list[ReplicaRow] | None = None) -> None:
    """Create this node's replicas that have no directory yet: of a volume made on another
    node (`volume create` writes only the store there), or moved here (manager/leader.py).
    While the volume is fresh (never attached) a replica is created as a member of the
    in-sync set at generation 0, like the creating node's; afterwards it is created empty
    and `Rebuilding`, so no engine trusts it before its first resync. Only on a disk that
    is there (mounted): a missing disk must not be filled in underneath its mount point.

    Not a replica this node held in that very directory before (its note, Home.replica_made)
    and whose directory is gone (a disk lost, not mounted, or wiped), unless an engine has
    started since the volume was attached (robustness reported; its start commit left the
    gone replica out): otherwise the empty one would answer under the name the start rule
    asks for (a member of the newest in-sync set, which may be the only one holding the
    newest writes) and the rule would start from an older replica and resync the empty one
    from it, losing acknowledged writes. The start then names the replica to bring back, or
    an explicit salvage decides (docs/DURABILITY.md, "Generations"). `reps`: the volume's
    replicas when the caller read them already."""
    if vm.cluster is None:
        return   # one host: `create` made every replica; a missing one is replenishment's
    from blockhorn.manager.replenish import disk_of
    from blockhorn.replica.store import Replica
    if reps is None:
        reps = vm.store.replicas(vol.name)
    for r in reps:
        if not vm.is_local(r):
            continue
        note = vm.home.replica_made(vol.name, r.name)
        if os.path.exists(os.path.join(r.directory, "volume.meta")):
            _note_made(note, r.directory)
            continue
        if r.process is not None or os.path.exists(r.directory):
            continue
        disk = disk_of(r.directory)
        if disk is None or not os.path.isdir(disk):
            continue
        if not vol.fresh and _made_here(note) == r.directory and not (
                vol.desired == "attached" and vol.robustness is not None):
            if (vol.name, r.name) not in _warned:
                _warned.add((vol.name, r.name))
                log.error("replica %s of %s is gone from %s (a disk lost or not mounted?): "
                          "not made again empty while the volume's start may need it; the "
                          "next attach names it as missing (bring it back, or salvage)",
                          r.name, vol.name, r.directory)
            continue
        os.makedirs(os.path.dirname(r.directory), mode=0o700, exist_ok=True)
        meta = {"Members": [x.name for x in reps]} if vol.fresh else {"Rebuilding": True}
        Replica.create(r.directory, vol.size, vol.name, meta).close()
        _note_made(note, r.directory)
        _warned.discard((vol.name, r.name))
        vm.write_replica_config(vol.name, vol.size, r)
        log.info("created replica %s of %s in %s%s", r.name, vol.name, r.directory,
                 "" if vol.fresh else " (empty, to be rebuilt)")


_warned: set[tuple[str, str]] = set()   # (volume, replica) logged as gone: once each


def _made_here(note: str) -> str | None:
    try:
        with open(note) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _note_made(note: str, directory: str) -> None:
    if _made_here(note) != directory:
        os.makedirs(os.path.dirname(note), mode=0o700, exist_ok=True)
        atomic_write(note, directory.encode() + b"\n")


def stop_strays(vm: VolumeManager) -> None:
    """Stop replica processes this daemon started that are no longer this node's (moved to
    another node by the leader or a drain) or no longer exist (volume removed elsewhere)."""
    for name, (volume, rec) in list(vm.started.items()):
        rows = [r for r in vm.store.replicas(volume) if r.name == name] \
            if _exists(vm, volume) else []
        if rows and vm.is_local(rows[0]) and rows[0].process == rec:
            continue
        m = rows[0].moving if rows else None
        if m is not None and vm.here(m.node) and m.process == rec:
            continue   # the target of a move to this node (manager/moves.py)
        vm.started.pop(name, None)
        if process.alive(rec):
            log.warning("replica %s of %s is no longer this node's: stopping pid %d", name,
                        volume, rec.pid)
            process.terminate([rec])


def adopt_started(vm: VolumeManager) -> None:
    """At daemon start: count every replica process of this home as started here (found by
    its `--config <home>/volumes/<vol>/<replica>.json`), so that `stop_strays` also stops
    one whose replica was moved away while no daemon ran."""
    if vm.cluster is None:
        return
    for volume, name, rec in replica_processes(vm.home):
        vm.started[name] = (volume, rec)


def replica_processes(home: Home) -> list[tuple[str, str, ProcessRecord]]:
    """(volume, replica, process) of every replica process of `home`, found by its command
    line's `--config <home>/volumes/<vol>/<replica>.json`: also one an earlier daemon started."""
    import psutil
    prefix = os.path.join(home.root, "volumes") + os.sep
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info.get("cmdline") or []
        if "replica" not in cmd or "--config" not in cmd[:-1]:
            continue
        cfg = cmd[cmd.index("--config") + 1]
        if cfg.startswith(prefix) and cfg.endswith(".json"):
            volume = cfg[len(prefix):].split(os.sep)[0]
            name = os.path.basename(cfg)[:-len(".json")]
            found.append((volume, name, ProcessRecord(p.pid, p.info["create_time"])))
    return found


def stop_moved_engines(vm: VolumeManager) -> int:
    """At daemon start: kill this home's engines and shares of volumes now attached on
    another node (moved while this daemon was dead; the replicas refuse them already, by
    epoch) and remove their service addresses (node/fence.py)."""
    if vm.cluster is None:
        return 0
    moved = [v.name for v in vm.store.volumes()
             if vm.engine_elsewhere(v)]
    return fence(vm.home, moved, "the volume moved to another node") if moved else 0


def _exists(vm: VolumeManager, volume: str) -> bool:
    try:
        vm.store.volume(volume)
    except NotFound:   # only a store that answers "no such volume": never an unreachable one
        return False
    return True


def wait_remote_replicas(vm: VolumeManager, name: str) -> None:
    """Wait until the replicas on other nodes that are up accept connections (their
    daemons start them once they see the volume attached). One that does not come is
    left to the engine, which starts if the generation rule lets it."""
    if vm.cluster is None:
        return
    deadline = time.monotonic() + process.READY_TIMEOUT_S
    for r in vm.store.replicas(name):
        if vm.is_local(r) or not vm.cluster.is_up(r.node or ""):
            continue
        while not process.accepts(r.address):
            if time.monotonic() > deadline:
                log.warning("replica %s of %s on node %s does not answer at %s", r.name,
                            name, r.node, r.address)
                break
            time.sleep(0.1)


def attach_on(vm: VolumeManager, name: str, frontend: str, node: str,
              salvage: dict[str, str] | None = None) -> dict[str, Any]:
    """Ask node `node`'s daemon to attach the volume (the store says so; its supervisor
    does it) and wait until it did or failed."""
    assert vm.cluster is not None
    check_name(name)
    if frontend not in FRONTENDS:
        raise InvalidArgument(f"invalid frontend {frontend!r}: use one of "
                              f"{', '.join(FRONTENDS)}")
    with vm.locked(name):
        vol = vm.store.volume(name)
        vm.store.node(node)   # NotFound: "node 'x' does not exist"
        if not vm.cluster.is_up(node):
            raise Busy(f"node {node!r} is down: attach the volume on a node that is up")
        if vol.standby:
            raise Busy(f"volume {name!r} is a DR standby: activate it first")
        if vol.desired == "attached":
            old = vol.node or vm.me or ""
            if vm.cluster.is_up(old) or vol.access_mode == "rwx":
                from blockhorn.manager.maintenance import check_attachable
                check_attachable(vol)   # attached there for a snapshot/expand/restore
                raise Busy(f"volume {name!r} is already attached (on node {old}): detach it "
                           "first" + (" (an RWX share moves by itself)"
                                      if vol.access_mode == "rwx" else ""))
            # Its node is down: move it (docs/DURABILITY.md, "A volume attached on a node
            # that died"); the new epoch fences the old engine.
            move_attachment(vm.store, vol, node, "asked by an operator", frontend, salvage)
        else:
            vm.store.claim_attachment(name, node, vol.node, detached=True, desired="attached",
                                      frontend=frontend, tcp_port=None, robustness=None,
                                      attachment=None, device_stale=False,
                                      message=ATTACHING + node, salvage=salvage)
    deadline = time.monotonic() + REMOTE_WAIT_S
    while time.monotonic() < deadline:
        vol = vm.store.volume(name)
        if vol.desired != "attached":
            raise BlockhornError(vol.message or f"the attach of {name!r} on {node} failed",
                                 errno.EIO)
        if not (vol.message or "").startswith(ATTACHING):
            log.info("volume %s attached on node %s", name, node)
            return vm.show(name)
        time.sleep(0.2)
    raise BlockhornError(f"node {node} did not attach {name!r} within "
                         f"{REMOTE_WAIT_S:.0f} s (is its daemon running?); it still may: "
                         "see `blockhorn volume show`", errno.ETIMEDOUT)


def move_attachment(store: StateStore, vol: VolumeRow, node: str, why: str,
                    frontend: str | None = None, salvage: dict[str, str] | None = None) -> int:
    """Move the attachment of `vol`, whose engine's node is down, to `node` (whose daemon
    then brings it up: `realize_attach`) in one compare-and-swap that bumps the attach
    epoch: the new engine presents it, and every replica it reaches refuses the old engine
    from then on. Busy when someone else moved it first. Returns the new epoch."""
    old = vol.node
    more: dict[str, Any] = {"frontend": frontend} if frontend else {}   # else the same kind
    epoch = store.claim_attachment(vol.name, node, old, desired="attached", tcp_port=None,
                                   **more,
                                   robustness=None, attachment=None, device_stale=False,
                                   message=ATTACHING + node, salvage=salvage)
    log.warning("volume %s: its engine's node %s is down; attachment moved to %s (epoch %d, "
                "%s)", vol.name, old, node, epoch, why)
    return epoch


def realize_attach(vm: VolumeManager, name: str) -> None:
    """On the node an attach was asked for (the caller holds the volume's lock): bring
    the volume up; on failure undo it and say why in the volume's message."""
    vol = vm.store.volume(name)
    from blockhorn.nbd.attach import choose_frontend
    try:
        check_system(vol.frontend or "auto")
        frontend = choose_frontend(vol.frontend or "auto")
        vm.store.update_volume(name, frontend=frontend)
        vm.bring_up(name, frontend, vol.access_mode)
    except (BlockhornError, OSError) as e:
        log.error("attach of %s on this node failed: %s; undoing", name, e)
        vm._teardown(name)
        vm.store.update_volume(name, desired="detached", frontend=None, salvage=None,
                               message=f"attach on {vm.me} failed: {e}")
        return
    vm.store.update_volume(name, message=None)
    log.info("attached volume %s (frontend %s), as asked from another node", name, frontend)


def wait_detached(vm: VolumeManager, name: str, node: str) -> dict[str, Any]:
    deadline = time.monotonic() + REMOTE_WAIT_S
    while vm.store.engine(name).process is not None:
        if vm.cluster is not None and not vm.cluster.is_up(node):
            vm.store.update_volume(name, message=f"detached while node {node} was down: "
                                   "its engine stops when it comes back")
            break
        if time.monotonic() > deadline:
            raise BlockhornError(f"node {node} did not stop the engine of {name!r} within "
                                 f"{REMOTE_WAIT_S:.0f} s", errno.ETIMEDOUT)
        time.sleep(0.2)
    log.info("detached volume %s (its engine ran on node %s)", name, node)
    return vm.show(name)

