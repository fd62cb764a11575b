"""Snapshots, revert, expansion and clones as the daemon runs them.

While a volume is attached, the engine coordinates every replica (blockhorn.engine); while it
is detached no process holds the replica directories, and the daemon works on them directly
with the same store code. Revert needs the volume detached: the data under a mounted file
system cannot change beneath it.

On a cluster a detached volume's replica directories may be on other nodes: snapshot create,
list, rm, purge and expand then run through a maintenance attach on the node asked
(manager/maintenance.py). A clone then reads the snapshot from an in-sync replica, here or on
a node that holds one (the backup reader, manager/backup_peer.py), and writes the new volume's
replicas here or through a maintenance attach of it (maintenance.restore_sink). A revert
goes through a maintenance attach too: the engine reverts every in-sync replica and commits
those that did; the others are rebuilt from them (engine/revert.py). No other node's
directory is ever opened by its path here: the same path on this node is not it.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from blockhorn.control.store import StateStore
from blockhorn.engine import generation
from blockhorn.engine.control import ControlClient
from blockhorn.manager import maintenance, process
from blockhorn.replica import snapshots as store_snaps
from blockhorn.replica.store import Replica
from blockhorn.types import (
    BlockhornError,
    Busy,
    InvalidArgument,
    NotFound,
    check_name,
    parse_size,
)

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager

log = logging.getLogger("blockhorn.manager")

CONTROL_TIMEOUT_S = 120.0    # snapshot/purge/expand through the engine may take this long
CLONE_CHUNK = 4 << 20        # bytes copied per step of a clone
REVERT_RETRY_S = 0.5         # a revert waiting for a resync right after the attach asks again


class SnapshotManager:
    def __init__(self, store: StateStore, volumes: VolumeManager | None = None,
                 open_source: Callable[[str, str], Any] | None = None) -> None:
        """`volumes`: the daemon's, for a cluster's maintenance attach (None: every replica
        directory is on this host, as on one host). `open_source(volume, snapshot)`: the
        snapshot as a backup source from an in-sync replica on any node (BackupService's),
        for a clone across nodes (None: such a clone is refused)."""
        self.store = store
        self.volumes = volumes
        self.open_source = open_source
        self._maintained: set[str] = set()   # volumes in a maintenance attach (session)

    # --- where the work happens ----------------------------------------------------------

    def _engine(self, name: str) -> ControlClient | None:
        """The engine's control client when the volume is attached, else None."""
        vol = self.store.volume(name)
        eng = self.store.engine(name)
        vm = self.volumes
        if vm is not None and vm.engine_elsewhere(vol):
            # Forwarded to the engine's node normally (manager/forward.py); this one came in
            # while the volume moved. Its pid is another node's: never probe it here.
            raise Busy(f"volume {name!r} is attached on node {vol.node}: ask that node")
        if vol.desired == "attached" and process.alive(eng.process):
            return ControlClient(eng.control_socket, timeout=CONTROL_TIMEOUT_S)
        return None

    @contextmanager
    def session(self, name: str, what: str) -> Iterator[ControlClient | None]:
        """The engine to talk to for `what`, or None: work on the replica directories here.
        A detached cluster volume with replicas on other nodes is attached here for the
        block (maintenance.attached_here); calls inside it find that engine. The caller
        holds the volume's lock."""
        eng = self._engine(name)
        if eng is not None or self.volumes is None \
                or not maintenance.needed(self.volumes, name):
            yield eng
            return
        with maintenance.attached_here(self.volumes, name, what):
            self._maintained.add(name)
            try:
                yield self._engine(name)
            finally:
                self._maintained.discard(name)

    def _local_only(self, name: str, what: str, instead: str) -> None:
        """Refuse `what` on a cluster volume with replicas on other nodes."""
        vm = self.volumes
        if vm is None or not maintenance.needed(vm, name):
            return
        nodes = sorted({r.node or "" for r in self.store.replicas(name) if not vm.is_local(r)})
        raise InvalidArgument(f"{what} works on the replica directories and needs every "
                              f"replica of {name!r} on the node asked; it has replicas on "
                              f"node(s) {', '.join(nodes)}: {instead}")

    def _offline(self, name: str) -> list[Replica]:
        """Open every replica directory of a detached volume (no replica process may run)."""
        reps = self.store.replicas(name)
        if any(process.alive(r.process) for r in reps):
            raise Busy(f"volume {name!r} has running replica processes: detach it first")
        return [Replica.open(r.directory) for r in reps]

    def _each_offline(self, name: str, fn: Callable[[Replica], Any]) -> list[Any]:
        out = []
        for rep in self._offline(name):
            try:
                out.append(fn(rep))
            finally:
                rep.close()
        return out

    # --- operations ------------------------------------------------------------------------

    def create(self, name: str, snap: str | None, labels: dict[str, str] | None) -> dict[str, Any]:
        snap = snap or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        check_name(snap, "snapshot")
        for k in labels or {}:
            if not k or "=" in k:
                raise InvalidArgument(f"bad label key {k!r}")
        with self.session(name, f"snapshot create {snap}") as eng:
            if eng is not None:
                eng.call({"op": "snapshot", "name": snap, "labels": labels or {}})
            else:
                self._each_offline(name, lambda r: store_snaps.create_snapshot(r, snap, True,
                                                                               labels))
            log.info("snapshot %s of %s created", snap, name)
            return self.find(name, snap)

    def list(self, name: str) -> list[dict[str, Any]]:
        with self.session(name, "snapshot ls") as eng:
            if eng is not None:
                tree: list[dict[str, Any]] = eng.call({"op": "snapshots"})["snapshots"]
                return tree
            return self._each_offline(name, store_snaps.list_snapshots)[0]

    def find(self, name: str, snap: str) -> dict[str, Any]:
        for s in self.list(name):
            if s["name"] == snap:
                return s
        raise NotFound(f"volume {name!r} has no snapshot {snap!r}")

    def remove(self, name: str, snap: str) -> None:
        with self.session(name, f"snapshot rm {snap}") as eng:
            self.find(name, snap)
            if eng is not None:
                eng.call({"op": "snapshot_rm", "name": snap})
                if name in self._maintained:
                    # Folded before the detach, as a detached volume's rm does on one host.
                    eng.call({"op": "purge", "wait": True})
            else:
                def rm(r: Replica) -> None:
                    store_snaps.mark_removed(r, snap)
                    store_snaps.purge(r)
                self._each_offline(name, rm)
        log.info("snapshot %s of %s removed", snap, name)

    def purge(self, name: str) -> dict[str, Any]:
        with self.session(name, "snapshot purge") as eng:
            if eng is not None:
                return eng.call({"op": "purge", "wait": True})
            folded = self._each_offline(name, store_snaps.purge)
            return {"folded": folded[0] if folded else []}

    def revert(self, name: str, snap: str) -> dict[str, Any]:
        """Revert detached volume `name` to `snap`. Returns {"replicas": reverted,
        "left_out": {replica: why}} (left out: rebuilt from the others at the next attach).
        On a cluster with replicas elsewhere, through a maintenance attach here: the engine
        reverts every in-sync replica and commits those that did (engine/revert.py)."""
        # The store's attachment (etcd on a cluster: every node's), not only this node's
        # engine; a user's attach while the maintenance attach runs is refused by
        # maintenance.check_attachable.
        if self._engine(name) is not None or self.store.volume(name).desired == "attached":
            raise Busy(f"volume {name!r} is attached: unmount and detach it, then revert "
                       f"(its data would change under the file system)")
        if self.volumes is not None and maintenance.needed(self.volumes, name):
            return self._revert_across(name, snap)
        self.find(name, snap)
        # Each replica counts the revert as a mutation (store_snaps.revert): a daemon that
        # dies between two replicas leaves the reverted ones at a higher revision, which the
        # next start trusts, rebuilding the others (docs/DURABILITY.md, "Revert").
        self._each_offline(name, lambda r: store_snaps.revert(r, snap))
        log.info("volume %s reverted to snapshot %s", name, snap)
        return {"replicas": sorted(r.name for r in self.store.replicas(name)), "left_out": {}}

    def _revert_across(self, name: str, snap: str) -> dict[str, Any]:
        with self.session(name, f"snapshot revert {snap}") as eng:
            if eng is None:   # pragma: no cover - session attaches it here
                raise Busy(f"volume {name!r}: no engine for the revert")
            self.find(name, snap)
            deadline = time.monotonic() + CONTROL_TIMEOUT_S
            while True:
                try:
                    reply = eng.call({"op": "revert", "name": snap})
                    break
                except BlockhornError as e:
                    # Replicas that came up stale are being resynced right after the
                    # attach (EBUSY while one is): the revert waits for them.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(REVERT_RETRY_S)
        left = dict(reply.get("left_out") or {})
        log.info("volume %s reverted to snapshot %s on %s%s", name, snap,
                 ", ".join(reply["reverted"]),
                 "".join(f"; {n} left out ({why}): rebuilt at the next attach"
                         for n, why in sorted(left.items())))
        return {"replicas": list(reply["reverted"]), "left_out": left}

    def expand(self, name: str, size: int | str, write_configs: Callable[[str], None]) -> int:
        new = parse_size(size)
        vol = self.store.volume(name)
        if new < vol.size:
            raise InvalidArgument(f"shrinking is not supported: {name!r} has {vol.size} bytes, "
                                  f"asked for {new}")
        if new == vol.size:
            return new
        with self.session(name, f"expand to {new} bytes") as eng:
            if eng is not None:
                eng.call({"op": "expand", "size": new})
            else:
                self._each_offline(name, lambda r: store_snaps.expand(r, new))
            self.store.update_volume(name, size=new)
            write_configs(name)
        log.info("volume %s expanded to %d bytes", name, new)
        vol = self.store.volume(name)
        if eng is not None and vol.desired == "attached" and vol.attachment \
                and "maintenance" not in vol.attachment:   # a device (maintenance.py: none)
            from blockhorn.nbd.attach import Attachment, refresh_size
            if refresh_size(Attachment.from_dict(vol.attachment), new):
                log.info("device of %s resized online", name)
        return new

    def _across(self, *names: str) -> bool:
        """Does a clone of these volumes need other nodes (a cluster volume with replicas
        elsewhere)?"""
        vm = self.volumes
        return vm is not None and any(maintenance.needed(vm, n) for n in names)

    def check_clone_source(self, source: str, snap: str, target: str | None = None) -> None:
        """Before anything is created: the snapshot can be read. Across nodes, through
        `open_source`; without it, a clone needing other nodes is refused."""
        if not self._across(source, *([target] if target else [])):
            self.find(source, snap)
            return
        if self.open_source is None:
            for name in [source] + ([target] if target else []):
                self._local_only(name, "clone", "ask the daemon's API (a node) to clone")
            return
        self.open_source(source, snap).close()

    def clone_into(self, source: str, snap: str, target: str,
                   progress: Callable[[int, int], None] | None = None) -> int:
        """Copy snapshot `snap` of `source` into every replica of the new, detached volume
        `target` (sparse: only ranges holding data are copied). Returns bytes copied."""
        if self._across(source, target):
            return self._clone_across(source, snap, target, progress)
        self.find(source, snap)
        view = None
        # Only replicas the start rule trusts: a rebuilding or stale one may read as zeros.
        for directory in generation.trusted_on_disk(
                [(r.name, r.directory) for r in self.store.replicas(source)]):
            try:
                view = store_snaps.snapshot_view(directory, snap)
                break
            except (NotFound, OSError, BlockhornError):
                continue
        if view is None:
            raise NotFound(f"no replica of {source!r} holds snapshot {snap!r}")
        try:
            extents = view.extents(0, view.size)
            total = sum(n for _, n in extents)
            targets = self._offline(target)
            try:
                if targets and targets[0].size < view.size:
                    raise InvalidArgument(f"volume {target!r} is smaller than the snapshot")
                done = 0
                for start, length in extents:
                    for pos in range(start, start + length, CLONE_CHUNK):
                        n = min(CLONE_CHUNK, start + length - pos)
                        data = view.read(pos, n)
                        for t in targets:
                            t.write(pos, data)
                        done += n
                        if progress:
                            progress(done, total)
                for t in targets:
                    t.flush()
            finally:
                for t in targets:
                    t.close()
        finally:
            for layer in view.layers:
                os.close(layer.fd)
        return done

    def _clone_across(self, source: str, snap: str, target: str,
                      progress: Callable[[int, int], None] | None) -> int:
        """A clone on a cluster: the snapshot read from an in-sync replica (here or another
        node's, `open_source`), written to the target's replicas here or through a
        maintenance attach of it; blocks of zeros are left as holes (the target is new)."""
        assert self.volumes is not None
        if self.open_source is None:
            self.check_clone_source(source, snap, target)   # refuses
        assert self.open_source is not None
        src = self.open_source(source, snap)
        try:
            blocks = src.allocated_blocks(CLONE_CHUNK)
            total = min(len(blocks) * CLONE_CHUNK, src.size)
            done = 0
            with self.volumes.locked(target), maintenance.restore_sink(
                    self.volumes, target, f"clone from {source}/{snap}") as sink:
                if sink.size < src.size:
                    raise InvalidArgument(f"volume {target!r} is smaller than the snapshot")
                for offset in blocks:
                    n = min(CLONE_CHUNK, src.size - offset)
                    data = src.read(offset, n)
                    if data.count(0) != n:
                        sink.write(offset, data)
                    done += n
                    if progress:
                        progress(done, total)
                sink.flush()
        finally:
            src.close()
        log.info("volume %s cloned from %s/%s across nodes: %d bytes", target, source, snap,
                 done)
        return done
