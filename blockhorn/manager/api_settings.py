"""REST routes for settings (docs/API.md): list, get, set, reset."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from blockhorn.manager.settings import (
    COMMIT_QUORUM,
    ENGINE_REPLICA_TIMEOUT,
    REBUILD_LIMIT_SETTINGS,
    Settings,
    write_rebuild_limits,
)
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import InvalidArgument, NotFound

log = logging.getLogger("blockhorn.manager")

Run = Callable[..., Awaitable[Any]]
# Settings written into each volume's engine config (manager/volumes.py write_configs): a
# change rewrites every config, so engines started later (attach, a supervisor restart) use it.
ENGINE_CONFIG_SETTINGS = {ENGINE_REPLICA_TIMEOUT, COMMIT_QUORUM}


def setting_routes(volumes: VolumeManager, run: Run, endpoint: Any, body: Any, only: Any,
                   prefix: str) -> list[Route]:
    settings = Settings(volumes.store)

    def changed(name: str) -> None:
        if name in REBUILD_LIMIT_SETTINGS:
            write_rebuild_limits(settings, volumes.home.rebuild_limits)
            log.info("setting %s changed: rebuild limits rewritten", name)
        if name not in ENGINE_CONFIG_SETTINGS:
            return
        for vol in volumes.store.volumes():
            with volumes.locked(vol.name):
                try:
                    volumes.write_configs(vol.name)
                except NotFound:
                    continue   # removed meanwhile
        log.info("setting %s changed: engine configs rewritten", name)

    def set_value(name: str, value: Any) -> dict[str, Any]:
        result = settings.set(name, value)
        changed(name)
        return result

    def reset(name: str) -> dict[str, Any]:
        result = settings.reset(name)
        changed(name)
        return result

    @endpoint
    async def list_settings(request: Request) -> Any:
        return {"settings": await run(settings.list)}

    @endpoint
    async def get_setting(request: Request) -> Any:
        return await run(settings.describe, request.path_params["setting"])

    @endpoint
    async def put_setting(request: Request) -> Any:
        data = only(await body(request), {"value"})
        if "value" not in data:
            raise InvalidArgument('setting a value needs a body {"value": ...}')
        return await run(set_value, request.path_params["setting"], data["value"])

    @endpoint
    async def reset_setting(request: Request) -> Any:
        return await run(reset, request.path_params["setting"])

    return [
        Route(f"{prefix}/settings", list_settings, methods=["GET"]),
        Route(f"{prefix}/settings/{{setting}}", get_setting, methods=["GET"]),
        Route(f"{prefix}/settings/{{setting}}", put_setting, methods=["PUT"]),
        Route(f"{prefix}/settings/{{setting}}", reset_setting, methods=["DELETE"]),
    ]
