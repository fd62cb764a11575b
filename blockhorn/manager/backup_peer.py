"""A snapshot backed up from another node's replica (a cluster's backup, asked of a node
that holds no replica of the volume).

Data locality is best effort: the engine's node may hold none of the volume's replicas, and
a detached volume's backup may be asked of any node. The backup then reads the snapshot
from a node that holds a replica, through that node's API (TLS, the cluster token, as
manager/forward.py forwards engine requests): `GET .../snapshots/SNAP/source` for its size,
creation time and block lists, `GET .../snapshots/SNAP/data?offset=&length=` for its bytes.
The peer reads its own replica directory offline, as a backup on one host does (snapshot
layers never change in place: blockhorn/backup/volumes.py), so nothing there has to be
attached. A PeerSnapshot is a blockhorn.backup Source; the backup's worker threads share
its HTTP client.

Only a replica in sync is read (`readable_replicas`): a Rebuilding one may hold snapshot layers
copied in part, and an ERR or stale one (away while the snapshot was removed and made again
under the same name) an older snapshot. Attached, the engine's view decides: a replica in mode
RW (`volume show` on the engine's node). Detached, the engine start's rule does
(engine/generation.py `choose`, no record: the next attachment's epoch has none): each node
reports what its replicas' files say (`GET .../replica-state`), and only the replicas a start
would open RW are read; when the rule cannot decide (a member of the newest set unreachable)
the backup is refused with its reason. The serving node refuses too: a replica that is
Rebuilding or in error, and a read (a block list or a block) during which a rebuild began or
that replica's generation changed (EAGAIN: the reader asks again, a few times).
"""

from __future__ import annotations

import dataclasses
import errno
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from blockhorn.control.store import ReplicaRow
from blockhorn.engine import generation
from blockhorn.keys import load_key
from blockhorn.manager import remote
from blockhorn.types import BlockhornError, ReplicaUnavailable

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager

REQUEST_TIMEOUT_S = 60.0     # seconds for one block (16 MiB at most) or one block list
STATE_TIMEOUT_S = 10.0       # seconds for a node to report its replicas' state
MAX_READ = 16 << 20          # bytes a peer sends per data request (the largest block size)
READ_ATTEMPTS = 3            # tries of a request refused with EAGAIN (a commit during the read)


def _quoted(volume: str) -> str:
    return f"/v1/volumes/{quote(volume, safe='')}"


def seen_to_json(s: generation.Seen) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["members"] = sorted(s.members)
    d["voters"] = None if s.voters is None else sorted(s.voters)
    return d


def seen_from_json(d: dict[str, Any]) -> generation.Seen:
    return generation.Seen(str(d["name"]), int(d["generation"]), frozenset(d["members"]),
                           bool(d["rebuilding"]), bool(d["error"]), int(d["revision"]),
                           bool(d["suspect"]),
                           None if d.get("voters") is None else frozenset(d["voters"]))


def readable_replicas(vm: VolumeManager, volume: str) -> list[ReplicaRow]:
    """The replicas of `volume` in sync, which a backup may read (module docstring);
    ReplicaUnavailable naming every replica and why when there is none."""
    vol = vm.store.volume(volume)
    reps = vm.store.replicas(volume)
    if vol.desired == "attached":
        modes, why = _engine_modes(vm, volume, vol.node)
        ok = [r for r in reps if modes.get(r.name) == "RW"]
        if not ok:
            raise ReplicaUnavailable(
                f"no replica of {volume!r} is in sync to back up from"
                + (f" ({why})" if why else "") + ": " + "; ".join(
                    f"{r.name} on node {r.node or vm.me}: "
                    f"{modes.get(r.name) or 'no mode in the engine'}" for r in reps))
        return ok
    seen: list[generation.Seen] = []
    away: list[str] = []
    token = remote.cluster_token(load_key(vm.home.key)) if vm.cluster is not None else ""
    live = vm.cluster.up_nodes() if vm.cluster is not None else set()
    for node in sorted({r.node or "" for r in reps}):
        mine = [r for r in reps if (r.node or "") == node]
        if vm.here(node or None):
            got = [generation.seen_on_disk(r.name, r.directory) for r in mine]
            seen += [s for s in got if s is not None]
            away += [f"{r.name} on node {node or vm.me}: its files are unreadable"
                     for r, s in zip(mine, got, strict=True) if s is None]
            continue
        if node not in live:
            away += [f"{r.name} on node {node}: the node is down" for r in mine]
            continue
        try:
            with remote.Peer(vm.store, node, token, STATE_TIMEOUT_S) as peer:
                answer = peer.request("GET", f"{_quoted(volume)}/replica-state").json()
            got_remote = {d["name"]: seen_from_json(d) for d in answer.get("replicas") or []}
        except (BlockhornError, ValueError, KeyError, TypeError) as e:
            away += [f"{r.name} on node {node}: {e}" for r in mine]
            continue
        for r in mine:
            if r.name in got_remote:
                seen.append(got_remote[r.name])
            else:
                away.append(f"{r.name} on node {node}: its files are unreadable there")
    from blockhorn.manager.settings import Settings, commit_quorum
    quorum = commit_quorum(Settings(vm.store), vm.cluster is not None, len(reps))
    try:
        decision = generation.choose([r.name for r in reps], seen, None, quorum)
    except ReplicaUnavailable as e:
        raise ReplicaUnavailable(
            f"cannot tell which replica of detached {volume!r} is in sync, so none is read "
            f"for a backup: {e}" + (f" (not heard from: {'; '.join(away)})" if away else "")
            ) from None
    return [r for r in reps if r.name in decision.rw]


def _engine_modes(vm: VolumeManager, volume: str, node: str | None
                  ) -> tuple[dict[str, str], str]:
    """({replica: mode} as the engine sees them, why there are none)."""
    try:
        if vm.here(node):
            shown = vm.show(volume)
        else:
            token = remote.cluster_token(load_key(vm.home.key))
            with remote.Peer(vm.store, str(node), token, STATE_TIMEOUT_S) as peer:
                shown = peer.request("GET", _quoted(volume)).json()
    except BlockhornError as e:
        return {}, f"the engine's view is unavailable: {e}"
    modes = {str(r["name"]): str(r["mode"]) for r in shown.get("replicas") or []
             if r.get("mode")}
    return modes, str(shown.get("message") or "")


class PeerSnapshot:
    """Snapshot `snapshot` of `volume`, read from node `node`'s replica through its API."""

    def __init__(self, vm: VolumeManager, node: str, volume: str, snapshot: str,
                 replica: str | None = None) -> None:
        self.node = node
        self.name = snapshot
        self.replica = replica   # the one replica of that node to read (None: any there)
        self._path = f"{_quoted(volume)}/snapshots/{quote(snapshot, safe='')}"
        self._peer = remote.Peer(vm.store, node, remote.cluster_token(load_key(vm.home.key)),
                                 REQUEST_TIMEOUT_S)
        try:
            info = self._get_json("source", {})
        except BaseException:
            self._peer.close()
            raise
        self.created = str(info.get("created") or "")
        self._size = int(info["size"])

    @property
    def size(self) -> int:
        return self._size

    def _get(self, what: str, params: dict[str, Any]) -> Any:
        if self.replica is not None:
            params = {**params, "replica": self.replica}
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._peer.request("GET", f"{self._path}/{what}", params=params)
            except BlockhornError as e:   # EAGAIN: the replica changed during that read
                if e.errno != errno.EAGAIN or attempt == READ_ATTEMPTS - 1:
                    raise

    def _get_json(self, what: str, params: dict[str, Any]) -> dict[str, Any]:
        data = self._get(what, params).json()
        if not isinstance(data, dict):
            raise BlockhornError(f"node {self.node} sent no snapshot description", errno.EIO)
        return data

    def changed_blocks(self, since: str | None, block_size: int) -> list[int] | None:
        params: dict[str, Any] = {"blocks": "changed", "block_size": block_size}
        if since is not None:
            params["since"] = since
        blocks = self._get_json("source", params).get("blocks")
        return None if blocks is None else [int(b) for b in blocks]

    def allocated_blocks(self, block_size: int) -> list[int]:
        return [int(b) for b in self._get_json(
            "source", {"blocks": "all", "block_size": block_size}).get("blocks") or []]

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            n = min(MAX_READ, length - len(out))
            data = self._get("data", {"offset": offset + len(out), "length": n}).content
            if len(data) != n:
                raise BlockhornError(f"node {self.node} sent {len(data)} bytes of {n} at "
                                     f"{offset + len(out)}", errno.EIO)
            out += data
        return bytes(out)

    def close(self) -> None:
        self._peer.close()
