"""REST routes for recurring jobs and volume groups (docs/API.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.manager.jobs import JobScheduler, check_groups, check_spec
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import InvalidArgument

Run = Callable[..., Awaitable[Any]]


def job_routes(volumes: VolumeManager, sched: JobScheduler, run: Run, endpoint: Any,
               body: Any, only: Any, prefix: str) -> list[Route]:
    jobs = sched.jobs

    @endpoint
    async def list_jobs(request: Request) -> Any:
        return {"jobs": [sched.describe(r) for r in await run(jobs.all)]}

    @endpoint
    async def create_job(request: Request) -> Any:
        data = only(await body(request), {"name", "cron", "task", "retain", "volume", "group",
                                          "target"})
        spec = await run(check_spec, data, volumes.store, sched.check_target)
        row = await run(jobs.add, spec, sched.clock())
        sched.wake()
        return JSONResponse(await run(sched.describe, row), status_code=201)

    @endpoint
    async def show_job(request: Request) -> Any:
        row = await run(jobs.get, request.path_params["name"])
        return await run(sched.describe, row, 20)

    @endpoint
    async def remove_job(request: Request) -> Any:
        await run(jobs.remove, request.path_params["name"])
        sched.wake()
        return {"removed": request.path_params["name"]}

    @endpoint
    async def run_job(request: Request) -> Any:
        wait = request.query_params.get("wait", "true").lower() not in ("0", "false", "no")
        return await sched.run_now(request.path_params["name"], wait)

    @endpoint
    async def run_for_volume(request: Request) -> Any:
        """Another node's run of a job, for a volume whose engine runs here: the job's steps
        for that volume, here (job_tasks.JobTasks.one); its result."""
        if sched.run_volume is None:
            raise InvalidArgument("this daemon runs no job steps for other nodes")
        row = await run(jobs.get, request.path_params["name"])
        return await run(sched.run_volume, row.spec, request.path_params["volume"], True)

    @endpoint
    async def set_groups(request: Request) -> Any:
        """Add and remove recurring-job groups of a volume: {"add": [...], "remove": [...]}."""
        name = request.path_params["name"]
        data = only(await body(request), {"add", "remove"})
        add, rm = data.get("add") or [], data.get("remove") or []
        if not all(isinstance(x, list) for x in (add, rm)):
            raise InvalidArgument("add and remove must be lists of group names")

        def change() -> list[str]:
            with volumes.locked(name):
                have = volumes.store.volume(name).groups
                groups = check_groups([g for g in have + [str(g) for g in add]
                                       if g not in {str(r) for r in rm}])
                volumes.store.update_volume(name, groups=groups)
                return groups

        return {"name": name, "groups": await run(change)}

    return [
        Route(f"{prefix}/jobs", list_jobs, methods=["GET"]),
        Route(f"{prefix}/jobs", create_job, methods=["POST"]),
        Route(f"{prefix}/jobs/{{name}}", show_job, methods=["GET"]),
        Route(f"{prefix}/jobs/{{name}}", remove_job, methods=["DELETE"]),
        Route(f"{prefix}/jobs/{{name}}/run", run_job, methods=["POST"]),
        Route(f"{prefix}/jobs/{{name}}/volumes/{{volume}}/run", run_for_volume,
              methods=["POST"]),
        Route(f"{prefix}/volumes/{{name}}/groups", set_groups, methods=["POST"]),
    ]
