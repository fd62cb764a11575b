"""REST routes for snapshots, revert, expansion and clones (docs/API.md)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.manager.capacity import check_disk_room, expand_reservation
from blockhorn.manager.snapshots import SnapshotManager
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import (
    AlreadyExists,
    BlockhornError,
    InvalidArgument,
    check_labels,
    format_size,
    parse_size,
)

if TYPE_CHECKING:
    from blockhorn.manager.backups import BackupService

Run = Callable[..., Awaitable[Any]]


def snapshot_routes(volumes: VolumeManager, run: Run, endpoint: Any, body: Any, only: Any,
                    prefix: str, backups: BackupService | None = None) -> list[Route]:
    # A clone across a cluster's nodes reads the snapshot as a backup does.
    snaps = SnapshotManager(volumes.store, volumes,
                            backups.open_source if backups is not None else None)

    def locked(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        with volumes.locked(name):
            return fn(name, *args)

    def create_checked(name: str, snap: str | None, labels: dict[str, str]) -> Any:
        taken = (f"snapshot {snap!r} already exists on volume {name!r}: pick another name, "
                 f"or remove it first (`blockhorn snapshot rm {name} {snap}`)")
        # One maintenance attach for both steps on a cluster (snapshots.py `session`).
        with snaps.session(name, f"snapshot create {snap or ''}".strip()):
            if snap is not None and any(s["name"] == snap for s in snaps.list(name)):
                raise AlreadyExists(taken)
            try:
                return snaps.create(name, snap, labels)
            except BlockhornError as e:
                if e.errno != errno.EEXIST:
                    raise
                # Not listed, yet its layer file exists: removed, and not folded yet.
                raise AlreadyExists(f"snapshot {snap!r} of volume {name!r} was removed and "
                                    f"is still being folded: run `blockhorn snapshot purge "
                                    f"{name}` or pick another name") from None

    @endpoint
    async def list_snapshots(request: Request) -> Any:
        name = request.path_params["name"]
        return {"snapshots": await run(locked, name, snaps.list)}

    @endpoint
    async def create_snapshot(request: Request) -> Any:
        data = only(await body(request), {"name", "labels"})
        labels = check_labels(data.get("labels") or {})
        result = await run(locked, request.path_params["name"], create_checked,
                           data.get("name"), labels)
        return JSONResponse(result, status_code=201)

    @endpoint
    async def remove_snapshot(request: Request) -> Any:
        await run(locked, request.path_params["name"], snaps.remove, request.path_params["snap"])
        return {"removed": request.path_params["snap"]}

    @endpoint
    async def purge(request: Request) -> Any:
        return await run(locked, request.path_params["name"], snaps.purge)

    @endpoint
    async def revert(request: Request) -> Any:
        done = await run(locked, request.path_params["name"], snaps.revert,
                         request.path_params["snap"])
        return {"reverted": request.path_params["snap"], **done}

    def expand_checked(name: str, size: Any) -> int:
        """Refuse a size the replica disks cannot hold before any replica is touched: the
        engine would otherwise set every replica ERR on EFBIG (a faulted volume)."""
        new = parse_size(size)
        reps = volumes.store.replicas(name)
        # This node's disks only: another node's directory is not at the same path here.
        check_disk_room(new, [r.directory for r in reps if volumes.is_local(r)])
        # A cluster: every replica's disk as the store reports it, checked and promised
        # in one step (capacity.py), before any replica grows.
        with expand_reservation(volumes, name, new):
            return int(snaps.expand(name, new, volumes.write_configs))

    @endpoint
    async def expand(request: Request) -> Any:
        data = only(await body(request), {"size"})
        if "size" not in data:
            raise InvalidArgument("expand needs a size")
        size = await run(locked, request.path_params["name"], expand_checked, data["size"])
        return {"size": size, "note": "a fuse or fuse-nbd device is resized online; NBD clients "
                "(nbdfuse, nbd-client) see the new size after they reconnect"}

    @endpoint
    async def clone(request: Request) -> Any:
        """Create volume NAME as a full, independent copy of snapshot VOL/SNAP."""
        name = request.path_params["name"]
        data = only(await body(request), {"source", "replicas", "disks", "transport", "size"})
        source, sep, snap = str(data.get("source", "")).partition("/")
        if not sep or not source or not snap:
            raise InvalidArgument("clone source must be VOLUME/SNAPSHOT")
        src = volumes.store.volume(source)
        await run(snaps.check_clone_source, source, snap)   # before anything is created
        size = data.get("size") or src.size
        await run(volumes.create, name, size, replicas=data.get("replicas", 3),
                  disks=data.get("disks") or [], transport=data.get("transport", "auto"))

        def progress(done: int, total: int) -> None:
            volumes.store.update_volume(name, message=f"cloning from {source}/{snap}: "
                                        f"{format_size(done)} of {format_size(total)}")

        try:
            copied = await run(snaps.clone_into, source, snap, name, progress)
        except BaseException:
            await run(volumes.remove, name, force=True)   # a half clone is no volume
            raise
        volumes.store.update_volume(name, message=None)
        result = await run(volumes.show, name)
        result["cloned_bytes"] = copied
        return JSONResponse(result, status_code=201)

    p = f"{prefix}/volumes/{{name}}"
    return [
        Route(f"{p}/snapshots", list_snapshots, methods=["GET"]),
        Route(f"{p}/snapshots", create_snapshot, methods=["POST"]),
        Route(f"{p}/snapshots/purge", purge, methods=["POST"]),
        Route(f"{p}/snapshots/{{snap}}", remove_snapshot, methods=["DELETE"]),
        Route(f"{p}/snapshots/{{snap}}/revert", revert, methods=["POST"]),
        Route(f"{p}/expand", expand, methods=["POST"]),
        Route(f"{p}/clone", clone, methods=["POST"]),
    ]
