"""The REST API (starlette), served by the daemon on its unix socket. See docs/API.md.

Every lifecycle call runs in a worker thread (it starts processes and waits for sockets), so the
event loop keeps serving `GET`s while an attach is in progress. Errors are JSON:
`{"error": {"code": "EEXIST", "errno": 17, "message": "..."}}` with an HTTP status chosen from
the errno; clients map the code back to an exception, never parse the message.
"""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.manager.api_backups import backup_routes
from blockhorn.manager.api_jobs import job_routes
from blockhorn.manager.api_nodes import node_routes
from blockhorn.manager.api_settings import setting_routes
from blockhorn.manager.api_snapshots import snapshot_routes
from blockhorn.manager.api_standby import standby_routes
from blockhorn.manager.api_upgrade import upgrade_routes
from blockhorn.manager.api_verify import verify_routes
from blockhorn.manager.backups import BackupService
from blockhorn.manager.jobs import JobScheduler
from blockhorn.manager.nodes import NodeService
from blockhorn.manager.standby import StandbyManager
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, InvalidArgument

log = logging.getLogger("blockhorn.manager")

API_PREFIX = "/v1"

HTTP_STATUS = {
    errno.EINVAL: 400,
    errno.EACCES: 403,
    errno.ENOENT: 404,
    errno.EEXIST: 409,
    errno.EBUSY: 409,
    errno.ENOSPC: 507,
    errno.ETIMEDOUT: 504,
    errno.ENOTCONN: 409,       # e.g. the share of a detached volume
    errno.EMEDIUMTYPE: 409,    # a device holding a foreign filesystem
    errno.EADDRINUSE: 409,     # the TCP port asked for is taken
    errno.EFBIG: 400,          # a size past what the replica disks' filesystems can hold
}


def error_body(err: int, message: str) -> dict[str, Any]:
    return {"error": {"code": errno.errorcode.get(err, "EIO"), "errno": err,
                      "message": message}}


def error_response(e: BlockhornError) -> JSONResponse:
    return JSONResponse(error_body(e.errno, str(e)), status_code=HTTP_STATUS.get(e.errno, 500))


def _version() -> str:
    try:
        return importlib.metadata.version("blockhorn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


Handler = Callable[[Request], Awaitable[Any]]


def endpoint(fn: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
    """Turn a handler's return value into JSON and its BlockhornError into an error reply."""
    @functools.wraps(fn)
    async def wrapper(request: Request) -> JSONResponse:
        try:
            result = await fn(request)
        except BlockhornError as e:
            log.info("%s %s: %s", request.method, request.url.path, e)
            return error_response(e)
        except Exception as e:   # a bug: log the traceback, tell the client something useful
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse(error_body(errno.EIO, f"internal error: {e!r} (see daemon.log)"),
                                status_code=500)
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse(result)
    return wrapper


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidArgument("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def _only(data: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = set(data) - allowed
    if unknown:
        raise InvalidArgument(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def make_app(volumes: VolumeManager, shutdown: Callable[[], None],
             jobs: JobScheduler | None = None,
             standby: StandbyManager | None = None,
             backups: BackupService | None = None,
             nodes: NodeService | None = None) -> Starlette:
    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    @endpoint
    async def health(request: Request) -> Any:
        return {"status": "ok", "pid": os.getpid(), "home": volumes.home.root,
                "version": _version()}

    @endpoint
    async def list_volumes(request: Request) -> Any:
        return {"volumes": await run(volumes.list_volumes)}

    @endpoint
    async def create_volume(request: Request) -> Any:
        data = _only(await _body(request), {"name", "size", "replicas", "disks", "transport",
                                            "access", "share", "node_selector",
                                            "disk_selector"})
        if "name" not in data or "size" not in data:
            raise InvalidArgument("a volume needs a name and a size")
        result = await run(volumes.create, str(data["name"]), data["size"],
                           replicas=data.get("replicas", 3), disks=data.get("disks") or [],
                           transport=data.get("transport", "auto"),
                           access=data.get("access", "rwo"), share=data.get("share"),
                           node_selector=data.get("node_selector"),
                           disk_selector=data.get("disk_selector"))
        return JSONResponse(result, status_code=201)

    @endpoint
    async def show_share(request: Request) -> Any:
        return await run(volumes.share, request.path_params["name"])

    @endpoint
    async def show_volume(request: Request) -> Any:
        return await run(volumes.show, request.path_params["name"])

    @endpoint
    async def delete_volume(request: Request) -> Any:
        force = request.query_params.get("force", "false").lower() in ("1", "true", "yes")
        await run(volumes.remove, request.path_params["name"], force=force)
        return {"removed": request.path_params["name"]}

    @endpoint
    async def attach_volume(request: Request) -> Any:
        data = _only(await _body(request), {"frontend", "tcp_port", "tcp_address", "tls",
                                            "node", "salvage"})
        port = data.get("tcp_port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise InvalidArgument("tcp_port must be an integer")
        if not isinstance(data.get("salvage", ""), str):
            raise InvalidArgument("salvage must be a replica name")
        return await run(volumes.attach, request.path_params["name"],
                         frontend=data.get("frontend", "auto"), tcp_port=port,
                         tcp_address=data.get("tcp_address"), tls=data.get("tls"),
                         node=data.get("node"), salvage=data.get("salvage"))

    @endpoint
    async def detach_volume(request: Request) -> Any:
        return await run(volumes.detach, request.path_params["name"])

    @endpoint
    async def stop_daemon(request: Request) -> Any:
        shutdown()
        return {"stopping": os.getpid()}

    routes = [
        Route(f"{API_PREFIX}/health", health, methods=["GET"]),
        Route(f"{API_PREFIX}/volumes", list_volumes, methods=["GET"]),
        Route(f"{API_PREFIX}/volumes", create_volume, methods=["POST"]),
        Route(f"{API_PREFIX}/volumes/{{name}}", show_volume, methods=["GET"]),
        Route(f"{API_PREFIX}/volumes/{{name}}", delete_volume, methods=["DELETE"]),
        Route(f"{API_PREFIX}/volumes/{{name}}/attach", attach_volume, methods=["POST"]),
        Route(f"{API_PREFIX}/volumes/{{name}}/detach", detach_volume, methods=["POST"]),
        Route(f"{API_PREFIX}/volumes/{{name}}/share", show_share, methods=["GET"]),
        Route(f"{API_PREFIX}/daemon/stop", stop_daemon, methods=["POST"]),
    ]
    backups = backups or BackupService(volumes)
    routes += snapshot_routes(volumes, run, endpoint, _body, _only, API_PREFIX, backups)
    routes += verify_routes(volumes, run, endpoint, _body, _only, API_PREFIX)
    routes += upgrade_routes(volumes, run, endpoint, _body, _only, API_PREFIX)
    routes += setting_routes(volumes, run, endpoint, _body, _only, API_PREFIX)
    if jobs is not None:
        routes += job_routes(volumes, jobs, run, endpoint, _body, _only, API_PREFIX)
    if standby is not None:
        routes += standby_routes(standby, run, endpoint, _body, _only, API_PREFIX)
    routes += backup_routes(volumes, run, endpoint, _body, _only, API_PREFIX, backups)
    if nodes is not None:
        routes += node_routes(nodes, run, endpoint, _body, _only, API_PREFIX, volumes)
    return Starlette(routes=routes)
