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
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from blockhorn.keys import load_key
from blockhorn.manager import remote
from blockhorn.types import BlockhornError

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager

REQUEST_TIMEOUT_S = 60.0     # seconds for one block (16 MiB at most) or one block list
MAX_READ = 16 << 20          # bytes a peer sends per data request (the largest block size)


class PeerSnapshot:
    """Snapshot `snapshot` of `volume`, read from node `node`'s replica through its API."""

    def __init__(self, vm: VolumeManager, node: str, volume: str, snapshot: str) -> None:
        self.node = node
        self.name = snapshot
        self._path = f"/v1/volumes/{quote(volume, safe='')}/snapshots/{quote(snapshot, safe='')}"
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
        return self._peer.request("GET", f"{self._path}/{what}", params=params)

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
