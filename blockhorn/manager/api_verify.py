"""REST routes of the scrub (docs/API.md): start `verify` in an attached volume's engine, and
read its progress and report. The work runs in the engine (engine/verify.py); the daemon only
passes requests on, so a daemon restart does not stop a running verify."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.engine.control import ControlClient
from blockhorn.manager import process
from blockhorn.manager.settings import VERIFY_BANDWIDTH, Settings
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, InvalidArgument

Run = Callable[..., Awaitable[Any]]
CONTROL_TIMEOUT_S = 10.0   # seconds; starting a verify and reading its status are quick


def verify_routes(volumes: VolumeManager, run: Run, endpoint: Any, body: Any, only: Any,
                  prefix: str) -> list[Route]:
    settings = Settings(volumes.store)

    def engine(name: str) -> ControlClient:
        vol = volumes.store.volume(name)
        eng = volumes.store.engine(name)
        if vol.desired != "attached" or not process.alive(eng.process):
            raise BlockhornError(f"volume {name!r} is not attached: verify compares the "
                                 f"replicas through the running engine; `blockhorn volume "
                                 f"attach {name} --frontend none` first", errno.ENOTCONN)
        return ControlClient(eng.control_socket, timeout=CONTROL_TIMEOUT_S)

    def start(name: str, repair: bool, rate: float | None) -> dict[str, Any]:
        if rate is None:
            rate = settings.get_int(VERIFY_BANDWIDTH)
        return engine(name).call({"op": "verify", "repair": repair, "rate_mib_s": rate})

    def status(name: str) -> dict[str, Any]:
        return engine(name).call({"op": "verify_status"})

    @endpoint
    async def start_verify(request: Request) -> Any:
        data = only(await body(request), {"repair", "rate_mib_s"})
        repair = data.get("repair", False)
        rate = data.get("rate_mib_s")
        if not isinstance(repair, bool):
            raise InvalidArgument("repair must be true or false")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                 or rate < 0):
            raise InvalidArgument(f"invalid rate_mib_s {rate!r}: MiB/s >= 0, 0 for unlimited")
        result = await run(start, request.path_params["name"], repair, rate)
        return JSONResponse(result, status_code=202)

    @endpoint
    async def verify_status(request: Request) -> Any:
        return await run(status, request.path_params["name"])

    return [
        Route(f"{prefix}/volumes/{{name}}/verify", start_verify, methods=["POST"]),
        Route(f"{prefix}/volumes/{{name}}/verify", verify_status, methods=["GET"]),
    ]
