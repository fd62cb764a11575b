"""REST routes for backup targets, backups, restores and their jobs (docs/API.md, "Backups").

A backup URL travels in the query string (`?url=...`) or the body, never in the path: it
holds its own `?` and `&`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from blockhorn.manager.backups import BackupService
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, InvalidArgument

Run = Callable[..., Awaitable[Any]]


def _url(request: Request) -> str:
    url = request.query_params.get("url", "")
    if not url:
        raise InvalidArgument("give the backup as ?url=TARGET?backup=NAME&volume=VOL "
                              "(URL-encoded)")
    return url


def backup_routes(volumes: VolumeManager, run: Run, endpoint: Any, body: Any, only: Any,
                  prefix: str, service: BackupService | None = None) -> list[Route]:
    svc = service or BackupService(volumes)

    @endpoint
    async def list_targets(request: Request) -> Any:
        return {"targets": await run(svc.targets)}

    @endpoint
    async def set_target(request: Request) -> Any:
        data = only(await body(request), {"url", "credential_file", "mount"})
        if not data.get("url"):
            raise InvalidArgument("a backup target needs a url")
        return await run(svc.set_target, request.path_params["name"], str(data["url"]),
                         data.get("credential_file"), data.get("mount"))

    @endpoint
    async def remove_target(request: Request) -> Any:
        await run(svc.remove_target, request.path_params["name"])
        return {"removed": request.path_params["name"]}

    @endpoint
    async def list_backups(request: Request) -> Any:
        q = request.query_params
        errors: dict[str, str] = {}
        backups = await run(svc.list_backups, q.get("volume") or None, q.get("target") or None,
                            errors)
        return {"backups": backups, "errors": errors}

    @endpoint
    async def create_backup(request: Request) -> Any:
        data = only(await body(request), {"volume", "snapshot", "target", "labels",
                                          "compression", "block_size"})
        if not data.get("volume"):
            raise InvalidArgument("a backup needs a volume")
        labels = data.get("labels") or {}
        if not isinstance(labels, dict):
            raise InvalidArgument("labels must be an object of strings")
        job = await run(svc.start_backup, str(data["volume"]), data.get("snapshot"),
                        data.get("target"), {str(k): str(v) for k, v in labels.items()} or None,
                        data.get("compression"), data.get("block_size"))
        return JSONResponse(job, status_code=202)

    @endpoint
    async def show_backup(request: Request) -> Any:
        return await run(svc.show, _url(request))

    @endpoint
    async def delete_backup(request: Request) -> Any:
        return await run(svc.remove, _url(request))

    @endpoint
    async def restore_backup(request: Request) -> Any:
        data = only(await body(request), {"url", "volume", "replicas", "disks"})
        if not data.get("url") or not data.get("volume"):
            raise InvalidArgument("a restore needs the backup url and a new volume name")
        job = await run(svc.start_restore, str(data["url"]), str(data["volume"]),
                        data.get("replicas", 3), data.get("disks") or [])
        return JSONResponse(job, status_code=202)

    @endpoint
    async def collect_garbage(request: Request) -> Any:
        data = only(await body(request), {"volume", "target"})
        if not data.get("volume"):
            raise InvalidArgument("garbage collection needs a volume")
        return await run(svc.collect_garbage, str(data["volume"]), data.get("target"))

    def _int(request: Request, key: str, default: int | None = None) -> int:
        raw = request.query_params.get(key)
        if raw is None and default is not None:
            return default
        try:
            return int(raw or "")
        except ValueError:
            raise InvalidArgument(f"{key} must be an integer") from None

    @endpoint
    async def snapshot_source(request: Request) -> Any:
        """This node's replica's snapshot, for another node's backup (backup_peer.py)."""
        q, p = request.query_params, request.path_params
        return await run(svc.snapshot_source, p["name"], p["snap"], q.get("blocks"),
                         q.get("since"), _int(request, "block_size", 0), q.get("replica"))

    @endpoint
    async def replica_state(request: Request) -> Any:
        """This node's replicas' own view of themselves, for another node's backup."""
        return await run(svc.replica_state, request.path_params["name"])

    async def snapshot_data(request: Request) -> Response:
        """Bytes of this node's replica's snapshot (raw, not JSON: `endpoint` sends JSON)."""
        p = request.path_params
        try:
            data = await run(svc.snapshot_data, p["name"], p["snap"], _int(request, "offset"),
                             _int(request, "length"), request.query_params.get("replica"))
        except BlockhornError as e:
            from blockhorn.manager.api import error_response
            return error_response(e)
        return Response(data, media_type="application/octet-stream")

    @endpoint
    async def list_jobs(request: Request) -> Any:
        return {"jobs": await run(svc.jobs)}

    @endpoint
    async def show_job(request: Request) -> Any:
        return await run(svc.job, request.path_params["id"])

    return [
        Route(f"{prefix}/backup-targets", list_targets, methods=["GET"]),
        Route(f"{prefix}/backup-targets/{{name}}", set_target, methods=["PUT"]),
        Route(f"{prefix}/backup-targets/{{name}}", remove_target, methods=["DELETE"]),
        Route(f"{prefix}/backups", list_backups, methods=["GET"]),
        Route(f"{prefix}/backups", create_backup, methods=["POST"]),
        Route(f"{prefix}/backups", delete_backup, methods=["DELETE"]),
        Route(f"{prefix}/backups/show", show_backup, methods=["GET"]),
        Route(f"{prefix}/backups/restore", restore_backup, methods=["POST"]),
        Route(f"{prefix}/backups/gc", collect_garbage, methods=["POST"]),
        Route(f"{prefix}/backups/jobs", list_jobs, methods=["GET"]),
        Route(f"{prefix}/backups/jobs/{{id}}", show_job, methods=["GET"]),
        Route(f"{prefix}/volumes/{{name}}/snapshots/{{snap}}/source", snapshot_source,
              methods=["GET"]),
        Route(f"{prefix}/volumes/{{name}}/snapshots/{{snap}}/data", snapshot_data,
              methods=["GET"]),
        Route(f"{prefix}/volumes/{{name}}/replica-state", replica_state, methods=["GET"]),
    ]
