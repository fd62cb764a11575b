"""REST routes for DR standby volumes (docs/API.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.manager.standby import DEFAULT_INTERVAL_S, StandbyManager
from blockhorn.types import InvalidArgument

Run = Callable[..., Awaitable[Any]]


def standby_routes(standby: StandbyManager, run: Run, endpoint: Any, body: Any, only: Any,
                   prefix: str) -> list[Route]:
    @endpoint
    async def create(request: Request) -> Any:
        data = only(await body(request), {"source", "replicas", "disks", "transport",
                                          "interval_s"})
        if not data.get("source"):
            raise InvalidArgument("a standby volume needs a source: a backup volume URL")
        result = await run(standby.create, request.path_params["name"], str(data["source"]),
                           replicas=data.get("replicas", 3), disks=data.get("disks") or [],
                           transport=data.get("transport", "auto"),
                           interval_s=data.get("interval_s", DEFAULT_INTERVAL_S))
        return JSONResponse(result, status_code=201)

    @endpoint
    async def sync(request: Request) -> Any:
        return await run(standby.sync, request.path_params["name"])

    @endpoint
    async def activate(request: Request) -> Any:
        return await run(standby.activate, request.path_params["name"])

    p = f"{prefix}/volumes/{{name}}"
    return [
        Route(f"{p}/standby", create, methods=["POST"]),
        Route(f"{p}/standby/sync", sync, methods=["POST"]),
        Route(f"{p}/activate", activate, methods=["POST"]),
    ]
