"""A small etcd v3 client over etcd's HTTP/JSON gateway (grpc-gateway, etcd >= 3.4: `/v3/...`).

Only what the etcd state store (control/store/etcd.py) needs: range (one key or a prefix), put, delete, a transaction,
and leases (grant, one keepalive round, revoke). Keys and values are bytes on the wire in
base64; 64-bit numbers come back as JSON strings. Every request has a bounded timeout, and with
several endpoints (`http://a:2379,http://b:2379`) a request that cannot reach one tries the next.

Errors: `EtcdUnavailable` when no endpoint answers (connection refused, timeout), `LeaseNotFound`
when a lease has expired or was revoked, `EtcdError` for any other refusal by etcd. A read
refused because the members are electing a leader is tried again for a few seconds first.

A watch would need the gateway's streaming endpoint; callers poll instead (`range` is cheap),
which bounds how late they see a change by their poll interval.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from blockhorn.types import BlockhornError, InvalidArgument

log = logging.getLogger("blockhorn.etcd")

TIMEOUT_S = 2.0         # seconds per request (read, write)
# Seconds to connect to a member. A live member's kernel completes the handshake at once,
# however busy etcd is; a dead host's address (its link down) answers nothing, and a request
# then waited the whole 2 s there before trying the next member. A node's heartbeat that met
# a member in election (2 s) and then the dead one (2 s more) came back after its node's
# dead man's switch had fenced it (`make demo-cluster`, 6 s leases).
CONNECT_TIMEOUT_S = 0.5
WATCH_RETRY_S = 1.0     # seconds between a broken watch stream and the next try
GRPC_NOT_FOUND = 5      # gRPC status codes in the gateway's error body
GRPC_UNAVAILABLE = 14   # "leader changed", "no leader": the members are electing a leader
ELECTION_RETRY_S = 5.0  # seconds a read is retried through a leader election
ELECTION_POLL_S = 0.2   # seconds between two rounds of tries meanwhile


class EtcdError(BlockhornError):
    errno = errno.EIO


class EtcdUnavailable(EtcdError):
    errno = errno.EHOSTUNREACH


class LeaseNotFound(EtcdError):
    errno = errno.ENOENT


class _Electing(EtcdError):
    """etcd answered UNAVAILABLE: no leader at the moment (Etcd._call)."""


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(_dec(kv.get("key")), _dec(kv.get("value")),
                   int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                   int(kv.get("version", 0)), int(kv.get("lease", 0)))


def _enc(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _dec(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's convention)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def parse_endpoints(urls: str) -> list[str]:
    """`http://10.0.0.1:2379,http://10.0.0.2:2379` -> a list; clear error for anything else."""
    out = []
    for url in (u.strip() for u in urls.split(",")):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"bad etcd URL {url!r}: use http://HOST:PORT "
                                  "(comma-separated for several)")
        try:
            parts.port   # noqa: B018 (raises on a bad port)
        except ValueError:
            raise InvalidArgument(f"bad etcd URL {url!r}: bad port") from None
        out.append(url.rstrip("/"))
    if not out:
        raise InvalidArgument("no etcd URL given")
    return out


# Transaction building blocks (the JSON the gateway takes).

def cmp_create(key: bytes | str, revision: int) -> dict[str, Any]:
    """Compare: the key's create_revision equals `revision` (0: the key does not exist)."""
    return {"key": _enc(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(revision)}


def cmp_mod(key: bytes | str, revision: int) -> dict[str, Any]:
    """Compare: the key's mod_revision equals `revision` (0: the key does not exist), i.e.
    nobody changed it since it was read at that revision: a compare-and-swap."""
    return {"key": _enc(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": str(revision)}


def op_put(key: bytes | str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_range(key: bytes | str) -> dict[str, Any]:
    return {"request_range": {"key": _enc(key)}}


def op_delete(key: bytes | str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _enc(key)}}


class Etcd:
    """One client (a pooled HTTP connection per endpoint); thread-safe like httpx.Client."""

    def __init__(self, urls: str | list[str], timeout: float = TIMEOUT_S) -> None:
        self.endpoints = parse_endpoints(urls) if isinstance(urls, str) else list(urls)
        self.timeout = timeout
        self._http = httpx.Client(timeout=httpx.Timeout(timeout,
                                                         connect=min(timeout, CONNECT_TIMEOUT_S)))
        self._order = threading.Lock()   # guards the order of self.endpoints

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request, to the first endpoint that answers. A read that meets a leader
        election (a member died) is tried again for up to ELECTION_RETRY_S: it changes
        nothing, and a caller polling the store (a drain waiting for its move) must not fail
        on a blip. A write is not: it may have been applied before the leader changed, and
        its caller decides (the store's transactions re-read and compare)."""
        deadline = time.monotonic() + ELECTION_RETRY_S
        while True:
            try:
                return self._call_once(path, body)
            except _Electing as e:
                if path != "/v3/kv/range" or time.monotonic() > deadline:
                    raise EtcdError(str(e)) from None
                log.info("%s; trying again", e)
                time.sleep(ELECTION_POLL_S)

    def _call_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        # A copy: other threads reorder the list meanwhile (iterating it while they do
        # tried one endpoint three times and never the others).
        with self._order:
            order = list(self.endpoints)
        for base in order:
            try:
                r = self._http.post(base + path, json=body)
            except httpx.TransportError as e:
                errors.append(f"{base}: {e or type(e).__name__}")
                continue
            try:
                data = r.json()
            except ValueError:
                raise EtcdError(f"{base}{path}: HTTP {r.status_code}, not etcd's JSON "
                                "(is this URL an etcd client URL?)") from None
            if r.status_code != 200 or "error" in data:
                message = data.get("message") or data.get("error") or f"HTTP {r.status_code}"
                if data.get("code") == GRPC_NOT_FOUND and "lease" in message:
                    raise LeaseNotFound(f"etcd: {message}")
                if data.get("code") == GRPC_UNAVAILABLE:
                    raise _Electing(f"etcd {base}{path}: {message}")
                raise EtcdError(f"etcd {base}{path}: {message}")
            if base != order[0]:   # this one answered: try it first next time
                with self._order:
                    if base in self.endpoints:
                        self.endpoints.remove(base)
                        self.endpoints.insert(0, base)
            return dict(data)
        raise EtcdUnavailable(f"etcd is unreachable ({'; '.join(errors)}): is etcd running "
                              f"and the URL right (--etcd)?")

    # --- keys --------------------------------------------------------------------------------

    def get(self, key: bytes | str) -> KeyValue | None:
        kvs = self._call("/v3/kv/range", {"key": _enc(key)}).get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    def get_prefix(self, prefix: bytes | str) -> list[KeyValue]:
        p = prefix.encode() if isinstance(prefix, str) else prefix
        data = self._call("/v3/kv/range", {"key": _enc(p), "range_end": _enc(prefix_end(p))})
        return [KeyValue.from_json(kv) for kv in data.get("kvs") or []]

    def put(self, key: bytes | str, value: bytes | str, lease: int = 0) -> int:
        """Put; returns the store revision after it."""
        data = self._call("/v3/kv/put", op_put(key, value, lease)["request_put"])
        return int(data["header"]["revision"])

    def delete(self, key: bytes | str, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        body = {"key": _enc(key)}
        if prefix:
            body["range_end"] = _enc(prefix_end(key.encode() if isinstance(key, str) else key))
        return int(self._call("/v3/kv/deleterange", body).get("deleted", 0))

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, list[dict[str, Any]]]:
        """One transaction: (whether every compare held, the responses of the branch taken)."""
        data = self._call("/v3/kv/txn", {"compare": compare, "success": success,
                                         "failure": failure or []})
        return bool(data.get("succeeded")), list(data.get("responses") or [])

    def create(self, key: bytes | str, value: bytes | str,
               lease: int = 0) -> tuple[bool, KeyValue | None]:
        """Put `key` only if it does not exist. (True, the new key) or (False, the holder's
        key; None if it vanished between the compare and the read)."""
        won, responses = self.txn([cmp_create(key, 0)], [op_put(key, value, lease)],
                                  [op_range(key)])
        if won:
            return True, self.get(key)
        kvs = responses[0].get("response_range", {}).get("kvs") if responses else None
        return False, KeyValue.from_json(kvs[0]) if kvs else None

    # --- leases ------------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL in seconds)."""
        data = self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"]), int(data["TTL"])

    def keepalive(self, lease: int) -> int:
        """Renew `lease` once; its TTL from now. LeaseNotFound when it has expired."""
        data = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        ttl = int(data.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            raise LeaseNotFound(f"etcd lease {lease:x} has expired")
        return ttl

    def revoke(self, lease: int) -> None:
        """Revoke `lease` (its keys are deleted); an expired lease is not an error."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFound:
            pass   # expired already: its keys are gone, which is what revoking wanted

    def watch(self, prefix: bytes | str, on_change: Callable[[list[bytes]], None],
              stop: threading.Event) -> None:
        """Call `on_change` with the keys of every batch of changes under `prefix`, until
        `stop` is set; runs in the calling thread (give it one of its own). Never raises: a
        broken stream (a member died, its link went down) is opened again on the next
        endpoint after WATCH_RETRY_S, and every new stream starts with `on_change([])`,
        since changes made meanwhile were not seen. A stream that only goes silent (a
        partition) is not detected here: a watch only hastens what the caller also polls."""
        p = prefix.encode() if isinstance(prefix, str) else prefix
        body = {"create_request": {"key": _enc(p), "range_end": _enc(prefix_end(p))}}
        # Its own client: the stream's read waits as long as nothing changes.
        with httpx.Client(timeout=httpx.Timeout(self.timeout, read=None, connect=min(
                self.timeout, CONNECT_TIMEOUT_S))) as client:
            tries = 0
            while not stop.is_set():
                with self._order:
                    base = self.endpoints[tries % len(self.endpoints)]
                tries += 1
                try:
                    with client.stream("POST", base + "/v3/watch", json=body) as r:
                        if r.status_code != 200:
                            raise EtcdError(f"HTTP {r.status_code}")
                        for line in r.iter_lines():
                            if stop.is_set():
                                return
                            if not line.strip():
                                continue
                            result = json.loads(line).get("result") or {}
                            keys = [_dec(e["kv"]["key"]) for e in result.get("events") or ()]
                            if keys or result.get("created"):
                                on_change(keys)
                except (httpx.HTTPError, ValueError, KeyError, EtcdError) as e:
                    log.debug("etcd watch of %r on %s broke: %s", p, base, e)
                stop.wait(WATCH_RETRY_S)

    def revision(self) -> int:
        """The current store revision (also a reachability check)."""
        data = self._call("/v3/kv/range", {"key": _enc(b"\0"), "count_only": True})
        return int(data["header"]["revision"])


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
