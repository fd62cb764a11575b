"""Snapshots, revert, expansion and clones as the daemon runs them.

While a volume is attached, the engine coordinates every replica (blockhorn.engine); while it
is detached no process holds the replica directories, and the daemon works on them directly
with the same store code. Revert is offline only: the data under a mounted file system cannot
change beneath it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from blockhorn.control.store import StateStore
from blockhorn.engine import generation
from blockhorn.engine.control import ControlClient
from blockhorn.manager import process
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

log = logging.getLogger("blockhorn.manager")

CONTROL_TIMEOUT_S = 120.0    # snapshot/purge/expand through the engine may take this long
CLONE_CHUNK = 4 << 20        # bytes copied per step of a clone


class SnapshotManager:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    # --- where the work happens ----------------------------------------------------------

    def _engine(self, name: str) -> ControlClient | None:
        """The engine's control client when the volume is attached, else None."""
        vol = self.store.volume(name)
        eng = self.store.engine(name)
        if vol.desired == "attached" and process.alive(eng.process):
            return ControlClient(eng.control_socket, timeout=CONTROL_TIMEOUT_S)
        return None

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
        eng = self._engine(name)
        if eng is not None:
            eng.call({"op": "snapshot", "name": snap, "labels": labels or {}})
        else:
            self._each_offline(name, lambda r: store_snaps.create_snapshot(r, snap, True, labels))
        log.info("snapshot %s of %s created", snap, name)
        return self.find(name, snap)

    def list(self, name: str) -> list[dict[str, Any]]:
        eng = self._engine(name)
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
        self.find(name, snap)
        eng = self._engine(name)
        if eng is not None:
            eng.call({"op": "snapshot_rm", "name": snap})
        else:
            def rm(r: Replica) -> None:
                store_snaps.mark_removed(r, snap)
                store_snaps.purge(r)
            self._each_offline(name, rm)
        log.info("snapshot %s of %s removed", snap, name)

    def purge(self, name: str) -> dict[str, Any]:
        eng = self._engine(name)
        if eng is not None:
            return eng.call({"op": "purge", "wait": True})
        folded = self._each_offline(name, store_snaps.purge)
        return {"folded": folded[0] if folded else []}

    def revert(self, name: str, snap: str) -> None:
        if self._engine(name) is not None or self.store.volume(name).desired == "attached":
            raise Busy(f"volume {name!r} is attached: unmount and detach it, then revert "
                       f"(its data would change under the file system)")
        self.find(name, snap)
        self._each_offline(name, lambda r: store_snaps.revert(r, snap))
        log.info("volume %s reverted to snapshot %s", name, snap)

    def expand(self, name: str, size: int | str, write_configs: Callable[[str], None]) -> int:
        new = parse_size(size)
        vol = self.store.volume(name)
        if new < vol.size:
            raise InvalidArgument(f"shrinking is not supported: {name!r} has {vol.size} bytes, "
                                  f"asked for {new}")
        if new == vol.size:
            return new
        eng = self._engine(name)
        if eng is not None:
            eng.call({"op": "expand", "size": new})
        else:
            self._each_offline(name, lambda r: store_snaps.expand(r, new))
        self.store.update_volume(name, size=new)
        write_configs(name)
        log.info("volume %s expanded to %d bytes", name, new)
        if eng is not None and vol.attachment:
            from blockhorn.nbd.attach import Attachment, refresh_size
            if refresh_size(Attachment.from_dict(vol.attachment), new):
                log.info("device of %s resized online", name)
        return new

    def clone_into(self, source: str, snap: str, target: str,
                   progress: Callable[[int, int], None] | None = None) -> int:
        """Copy snapshot `snap` of `source` into every replica of the new, detached volume
        `target` (sparse: only ranges holding data are copied). Returns bytes copied."""
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
