"""A client of the daemon's REST API over its unix socket, used by the CLI (and tests).

`connect(home)` returns a client of a running daemon, starting one first (detached, in its own
session) when nothing answers on the socket. With `$BLOCKHORN_API` (the CLI's `--api URL`) it
is a client of a daemon's TCP API instead (manager/remote.py): TLS verified against
`$BLOCKHORN_CA` (`--ca-file`; else the system's CAs), the token from `$BLOCKHORN_TOKEN`, and
no daemon is started. Error replies become the BlockhornError subclass
their errno names, so callers handle them like local errors.
"""

from __future__ import annotations

import errno
import os
import ssl
import subprocess
import sys
import time
from typing import Any

import httpx

from blockhorn.manager.paths import Home
from blockhorn.manager.process import log_tail
from blockhorn.types import (
    AlreadyExists,
    AuthError,
    BlockhornError,
    Busy,
    InvalidArgument,
    NoSpace,
    NotFound,
    TooLarge,
)

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 180.0   # seconds; an attach starts N+1 processes and a device
START_TIMEOUT_S = 30.0      # seconds a freshly started daemon has to answer
# Seconds `upgrade --all` may take, and one node of a cluster for its part (manager/forward.py):
# every engine one after the other, each a pause of about a second (more with a fuse-nbd
# holder to drain).
UPGRADE_ALL_TIMEOUT_S = 3600.0

_BY_ERRNO: dict[int, type[BlockhornError]] = {
    errno.EINVAL: InvalidArgument, errno.ENOENT: NotFound, errno.EEXIST: AlreadyExists,
    errno.EBUSY: Busy, errno.ENOSPC: NoSpace, errno.EACCES: AuthError, errno.EFBIG: TooLarge,
}


class DaemonUnavailable(BlockhornError):
    errno = errno.ECONNREFUSED


def error_from_reply(status: int, body: Any) -> BlockhornError:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return BlockhornError(f"daemon answered HTTP {status} without an error description")
    code = int(err.get("errno") or errno.EIO)
    cls = _BY_ERRNO.get(code, BlockhornError)
    message = str(err.get("message") or errno.errorcode.get(code, "error"))
    return cls(message) if cls is not BlockhornError else BlockhornError(message, code)


API_ENV, TOKEN_ENV, CA_ENV = "BLOCKHORN_API", "BLOCKHORN_TOKEN", "BLOCKHORN_CA"


class Client:
    def __init__(self, home: Home, timeout: float = REQUEST_TIMEOUT_S, api: str | None = None,
                 token: str | None = None, ca_file: str | None = None) -> None:
        self.home = home
        limits = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
        if api:
            if not api.startswith("https://"):
                raise InvalidArgument(f"invalid API URL {api!r}: the TCP API is "
                                      "https://HOST:PORT (TLS only)")
            if ca_file and not os.path.exists(ca_file):
                raise InvalidArgument(f"CA file {ca_file} does not exist")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self.where = api
            self.http = httpx.Client(base_url=api.rstrip("/"), timeout=limits, headers=headers,
                                     verify=ssl.create_default_context(cafile=ca_file))
        else:
            self.where = home.socket
            self.http = httpx.Client(transport=httpx.HTTPTransport(uds=home.socket),
                                     base_url="http://blockhorn", timeout=limits)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                params: dict[str, str] | None = None) -> Any:
        try:
            r = self.http.request(method, "/v1" + path, json=body, params=params)
        except httpx.TransportError as e:
            raise DaemonUnavailable(f"no blockhorn daemon answers on {self.where}: {e}") \
                from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            raise error_from_reply(r.status_code, data)
        return data

    def ping(self) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", "/health"))
        except DaemonUnavailable:
            return None

    # --- volumes ---------------------------------------------------------------------------

    def create(self, name: str, size: int | str, replicas: int = 3,
               disks: list[str] | None = None, transport: str = "auto", access: str = "rwo",
               share: dict[str, Any] | None = None, node_selector: list[str] | None = None,
               disk_selector: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "size": size, "replicas": replicas,
                                "disks": disks or [], "transport": transport, "access": access}
        if share is not None:
            body["share"] = share
        # Sent only when given, so a daemon of the previous release still takes the request.
        for key, tags in (("node_selector", node_selector), ("disk_selector", disk_selector)):
            if tags:
                body[key] = tags
        return dict(self.request("POST", "/volumes", body))

    def share(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/volumes/{name}/share"))

    def attach(self, name: str, frontend: str = "auto", tcp_port: int | None = None,
               tcp_address: str | None = None, tls: str | None = None,
               node: str | None = None, salvage: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"frontend": frontend}
        for key, value in (("tcp_port", tcp_port), ("tcp_address", tcp_address), ("tls", tls),
                           ("node", node), ("salvage", salvage)):
            if value is not None:
                body[key] = value
        return dict(self.request("POST", f"/volumes/{name}/attach", body))

    def detach(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/volumes/{name}/detach"))

    def show(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/volumes/{name}"))

    def list(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/volumes")["volumes"])

    def remove(self, name: str, force: bool = False) -> None:
        self.request("DELETE", f"/volumes/{name}", params={"force": "true" if force else "false"})

    def stop_daemon(self) -> None:
        self.request("POST", "/daemon/stop")


def start_daemon(home: Home) -> subprocess.Popen[bytes]:
    """Start `blockhorn daemon` for `home`, detached from the caller (own session)."""
    try:
        home.ensure()
    except OSError as e:
        raise BlockhornError(f"cannot create home {home.root}: {e.strerror}", e.errno) from None
    out = open(home.log("daemon.out"), "ab")   # start-up crashes land here
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "blockhorn", "--home", home.root, "daemon", "--quiet"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    finally:
        out.close()


def connect(home: Home, autostart: bool = True, timeout: float = REQUEST_TIMEOUT_S) -> Client:
    api = os.environ.get(API_ENV)
    if api:   # a daemon's TCP API (maybe on another host): never started from here
        client = Client(home, timeout=timeout, api=api, token=os.environ.get(TOKEN_ENV),
                        ca_file=os.environ.get(CA_ENV))
        if client.ping() is None:
            client.close()
            raise DaemonUnavailable(f"no blockhorn daemon answers on {api}")
        return client
    client = Client(home, timeout=timeout)
    if client.ping() is not None:
        return client
    if not autostart:
        client.close()
        raise DaemonUnavailable(f"no blockhorn daemon answers on {home.socket}: "
                                f"start one with `blockhorn --home {home.root} daemon`")
    proc = start_daemon(home)
    deadline = time.monotonic() + START_TIMEOUT_S
    exited_at: float | None = None
    while time.monotonic() < deadline:
        if client.ping() is not None:
            return client
        if exited_at is None and proc.poll() is not None:
            # Lost a start-up race to another daemon (it holds the lock) or crashed: give a
            # competitor a moment to answer, then report.
            exited_at = time.monotonic()
        if exited_at is not None and time.monotonic() - exited_at > 3.0:
            break
        time.sleep(0.05)
    client.close()
    tail = log_tail(home.log("daemon.out")) or log_tail(home.log("daemon.log"))
    raise DaemonUnavailable(f"the blockhorn daemon for {home.root} did not start; "
                            f"see {os.path.join(home.logs, 'daemon.log')}:\n{tail}")
