"""Engine requests on any node of a cluster: forward them to the node that runs the engine.

Snapshots, verify, expand, clone, upgrade and backups talk to a volume's engine (its control
socket is a unix socket in the engine node's home), and only the engine knows the replicas'
modes and revisions. On a cluster, a daemon asked such a thing about a volume attached on
another node passes the request to that node's TCP API (its URL and CA in the node record;
`daemon run --api-listen`, on by default on a cluster; manager/remote.py) with the cluster
token, and returns its answer as it came. `volume show` is forwarded the same way so that it has the engine's replica
modes; when the engine's node cannot be reached, show falls back to what the store says.
`upgrade --all` (POST /v1/upgrade) goes to every node that is up, each upgrading the engines
it runs, and the answer reports per node.

A forwarded request carries FORWARDED_HEADER and is never forwarded again (two nodes whose
views of the store differ for a moment must not bounce it between them). A node that is down
or has no API endpoint gets a clear error (EHOSTDOWN), never a hang: connecting is bounded
by remote.PEER_CONNECT_TIMEOUT_S.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from typing import Any

import trio

from blockhorn.manager import remote
from blockhorn.manager.client import UPGRADE_ALL_TIMEOUT_S
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, NotFound

log = logging.getLogger("blockhorn.manager")

FORWARDED_HEADER = b"x-blockhorn-forwarded"
REQUEST_TIMEOUT_S = 180.0   # seconds; as the CLI's: an expand or a snapshot revert may take long
MAX_JOBS = 1000             # forwarded backup job ids remembered (for `backup job show`)

Scope = dict[str, Any]

# (method or None for any, path pattern) whose {name} is a volume whose engine answers.
_VOLUME_PATHS = [
    (None, re.compile(r"^/v1/volumes/([^/]+)/(snapshots(/.*)?|expand|clone|verify|upgrade)$")),
    ("GET", re.compile(r"^/v1/volumes/([^/]+)$")),
    ("GET", re.compile(r"^/v1/volumes/([^/]+)/share$")),   # its status is on the serving node
]
_BACKUP_CREATE = "/v1/backups"
UPGRADE_ALL = "/v1/upgrade"   # every node upgrades its engines (`_upgrade_everywhere`)
_BACKUP_JOB = re.compile(r"^/v1/backups/jobs/([^/]+)$")


class Forward:
    """ASGI middleware in front of the API app (behind BearerAuth)."""

    def __init__(self, app: Any, volumes: VolumeManager, token: str) -> None:
        self.app = app
        self.volumes = volumes
        self.token = token
        self.jobs: dict[str, str] = {}   # backup job id -> node it runs on

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.volumes.cluster is None \
                or FORWARDED_HEADER in dict(scope.get("headers") or []):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == UPGRADE_ALL:
            await self._upgrade_everywhere(scope, receive, send)
            return
        body = b""
        volume: str | None = None
        job_node: str | None = None
        for want, pattern in _VOLUME_PATHS:
            m = pattern.match(path)
            if m and want in (None, method):
                volume = m.group(1)
                break
        if method == "POST" and path == _BACKUP_CREATE:
            body = await _read(receive)
            try:
                volume = str(json.loads(body or b"{}").get("volume") or "") or None
            except (ValueError, AttributeError):
                volume = None   # the app answers the bad body
            receive = _replay(body, receive)
        m = _BACKUP_JOB.match(path)
        if m:
            job_node = self.jobs.get(m.group(1))
        node = job_node or (await trio.to_thread.run_sync(self._engine_node, volume)
                            if volume else None)
        if node is None:
            await self.app(scope, receive, send)
            return
        if not body and method in ("POST", "PUT", "PATCH", "DELETE"):
            body = await _read(receive)
        try:
            status, headers, answer = await trio.to_thread.run_sync(
                self._forward, node, method, path, scope.get("query_string", b""), body)
        except BlockhornError as e:
            if method == "GET" and volume and path.endswith(f"/volumes/{volume}"):
                # A show still answers from the store, without the engine's modes.
                log.info("show %s: %s; answering from the store", volume, e)
                await self.app(scope, receive, send)
                return
            await _send_error(send, e)
            return
        if method == "POST" and path == _BACKUP_CREATE and status == 202:
            try:
                self.jobs[str(json.loads(answer)["id"])] = node
                while len(self.jobs) > MAX_JOBS:
                    self.jobs.pop(next(iter(self.jobs)))
            except (ValueError, KeyError, TypeError):
                pass   # no job id in the answer: nothing to remember
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    def _engine_node(self, volume: str) -> str | None:
        """The other node that runs `volume`'s engine; None: this one, or none runs it."""
        try:
            vol = self.volumes.store.volume(volume)
        except NotFound:
            return None   # the app says so
        return self.volumes.engine_elsewhere(vol)

    async def _upgrade_everywhere(self, scope: Scope, receive: Any, send: Any) -> None:
        """`upgrade --all` on a cluster: every node upgrades the engines it runs, one node
        after the other (as one node upgrades its volumes one at a time), this one through
        the app, the others through their APIs. A node that fails or cannot be reached is
        reported and the next one goes on. The answer: `volumes`, every node's results with
        their `node`; `nodes`, per node its count or its error (or `skipped` when down)."""
        body = await _read(receive)
        nodes = await trio.to_thread.run_sync(self._nodes)
        volumes: list[dict[str, Any]] = []
        report: list[dict[str, Any]] = []
        for node, up in nodes:
            if not up:
                report.append({"node": node, "skipped": "down: its engines are not running"})
                continue
            try:
                if node == self.volumes.me:
                    status, answer = await _call(self.app, scope, _replay(body, receive))
                else:
                    status, _, answer = await trio.to_thread.run_sync(
                        self._forward, node, "POST", UPGRADE_ALL, b"", body,
                        f"node {node} runs engines to upgrade", UPGRADE_ALL_TIMEOUT_S)
                data = json.loads(answer or b"{}")
            except (BlockhornError, ValueError) as e:
                report.append({"node": node, "error": str(e)})
                continue
            if status != 200 or not isinstance(data.get("volumes"), list):
                err = (data.get("error") or {}).get("message") or f"HTTP {status}"
                report.append({"node": node, "error": str(err)})
                continue
            volumes += [{**r, "node": node} for r in data["volumes"]]
            report.append({"node": node, "volumes": len(data["volumes"]),
                           "failed": sum(1 for r in data["volumes"] if r.get("error"))})
        await _send_json(send, 200, {"volumes": volumes, "nodes": report})

    def _nodes(self) -> list[tuple[str, bool]]:
        cluster = self.volumes.cluster
        assert cluster is not None
        up = cluster.up_nodes()
        return [(n.name, n.name in up) for n in self.volumes.store.nodes()]

    def _forward(self, node: str, method: str, path: str, query: bytes, body: bytes,
                 where: str = "", timeout: float = REQUEST_TIMEOUT_S
                 ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        cluster = self.volumes.cluster
        assert cluster is not None
        where = where or f"the volume's engine runs on node {node}"
        if not cluster.is_up(node):
            raise BlockhornError(f"{where}, which is down: this request needs the engine; "
                                 "wait for the node, or detach the volume and attach it on "
                                 "a node that is up", errno.EHOSTDOWN)
        url = path + (f"?{query.decode()}" if query else "")
        with remote.Peer(self.volumes.store, node, self.token, timeout, where=where) as peer:
            r = peer.send(method, url, content=body or None,
                          headers={"Content-Type": "application/json"})
        keep = [(k.encode(), v.encode()) for k, v in r.headers.items()
                if k.lower() in ("content-type", "content-length")]
        log.info("%s %s forwarded to node %s: HTTP %d", method, path, node, r.status_code)
        return r.status_code, keep, r.content


async def _call(app: Any, scope: Scope, receive: Any) -> tuple[int, bytes]:
    """Ask `app` (this node's API) for the request of `scope`: (status, body)."""
    status = 500
    chunks: list[bytes] = []

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = int(msg["status"])
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))
    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _read(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that gives the app `body` (read already) once, then the client's events
    (a disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return dict(await receive())
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


async def _send_error(send: Any, e: BlockhornError) -> None:
    from blockhorn.manager.api import error_body
    await _send_json(send, 503, error_body(e.errno, str(e)))


async def _send_json(send: Any, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
