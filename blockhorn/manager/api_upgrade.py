"""REST routes of the live engine upgrade (docs/API.md): replace the engine of one attached
volume, or of every attached volume one at a time, by one running the installed code
(manager/upgrade.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from blockhorn.manager import upgrade
from blockhorn.manager.volumes import VolumeManager

Run = Callable[..., Awaitable[Any]]


def upgrade_routes(volumes: VolumeManager, run: Run, endpoint: Any, body: Any, only: Any,
                   prefix: str) -> list[Route]:
    @endpoint
    async def upgrade_volume(request: Request) -> Any:
        only(await body(request), set())
        return await run(upgrade.upgrade, volumes, request.path_params["name"])

    @endpoint
    async def upgrade_all(request: Request) -> Any:
        only(await body(request), set())
        return {"volumes": await run(upgrade.upgrade_all, volumes)}

    return [
        Route(f"{prefix}/volumes/{{name}}/upgrade", upgrade_volume, methods=["POST"]),
        Route(f"{prefix}/upgrade", upgrade_all, methods=["POST"]),
    ]
