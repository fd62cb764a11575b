"""REST routes for nodes and disks (docs/API.md): node list/show/update/drain, disk
list/add/remove."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blockhorn.manager.nodes import NodeService
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import InvalidArgument

Run = Callable[..., Awaitable[Any]]


def node_routes(nodes: NodeService, run: Run, endpoint: Any, body: Any, only: Any,
                prefix: str, volumes: VolumeManager | None = None) -> list[Route]:
    """`volumes`: this node's, for a drain's maintenance attach of a detached volume."""
    @endpoint
    async def list_nodes(request: Request) -> Any:
        return {"nodes": await run(nodes.list_nodes), "this": nodes.name}

    @endpoint
    async def show_node(request: Request) -> Any:
        return await run(nodes.show, request.path_params["name"])

    @endpoint
    async def update_node(request: Request) -> Any:
        data = only(await body(request), {"schedulable", "tags", "zone"})
        return await run(nodes.update, request.path_params["name"], **data)

    @endpoint
    async def drain_node(request: Request) -> Any:
        from blockhorn.manager.leader import drain
        only(await body(request), set())
        return await run(drain, nodes, request.path_params["name"], volumes)

    @endpoint
    async def list_disks(request: Request) -> Any:
        return {"disks": await run(nodes.disks)}

    @endpoint
    async def add_disk(request: Request) -> Any:
        data = only(await body(request), {"path", "node", "tags", "reserve"})
        if not data.get("path"):
            raise InvalidArgument("a disk needs a path")
        return JSONResponse(await run(nodes.add_disk, data["path"], data.get("node"),
                                      data.get("tags"), data.get("reserve", 0)),
                            status_code=201)

    @endpoint
    async def remove_disk(request: Request) -> Any:
        path = request.query_params.get("path")
        if not path:
            raise InvalidArgument("which disk? give ?path=PATH (and &node=NAME)")
        await run(nodes.remove_disk, path, request.query_params.get("node"))
        return {"removed": path}

    return [
        Route(f"{prefix}/nodes", list_nodes, methods=["GET"]),
        Route(f"{prefix}/nodes/{{name}}", show_node, methods=["GET"]),
        Route(f"{prefix}/nodes/{{name}}", update_node, methods=["PATCH"]),
        Route(f"{prefix}/nodes/{{name}}/drain", drain_node, methods=["POST"]),
        Route(f"{prefix}/disks", list_disks, methods=["GET"]),
        Route(f"{prefix}/disks", add_disk, methods=["POST"]),
        Route(f"{prefix}/disks", remove_disk, methods=["DELETE"]),
    ]
