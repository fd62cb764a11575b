"""Nodes and disks: what the scheduler places replicas on (control/scheduler.py).

Vocabulary:
- *this node*: the host the daemon runs on, named by `daemon run --node NAME` (default: the
  host name) and reached at `--address IP` (default 127.0.0.1). The daemon registers it at
  start and then beats every HEARTBEAT_S: `heartbeat` in its node record, and the capacity and
  free space of its disks (only a node can measure its own disks).
- a node is `up` while it said so within NODE_DOWN_AFTER_S (the store's node_alive: on etcd
  a lease of that TTL, on SQLite a heartbeat time); this node always is: it answers.
  BLOCKHORN_NODE_TTL_S (seconds, at least 3) changes that TTL for every daemon started with it.
- a disk's `scheduled` bytes are the sizes of the volumes with a replica in it
  (`<disk>/replicas/<volume>/<replica>`, the layout of manager/paths.py), an expand in
  progress counting with its new size and a replica being moved on both its disks.

`place(size, count)` is what `volume create` without `--disk` calls: the scheduler over the
registered disks of every node with the settings' policy, this node preferred (data
locality); [] when no disk is registered, so a home without disks keeps placing replicas in
the home as before. A replica placed on another node is created and run by that node's
daemon (manager/supervisor.py), reached over TCP at the node's address.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from blockhorn.control.scheduler import Disk, Node, Placement, Policy, schedule
from blockhorn.control.store import DiskRow, NodeRow, StateStore
from blockhorn.liveness import HEARTBEAT_S, NODE_DOWN_AFTER_S, SELF_FENCE_AFTER_S
from blockhorn.manager.settings import (
    DATA_LOCALITY,
    MINIMAL_AVAILABLE,
    OVER_PROVISIONING,
    SOFT_ANTI_AFFINITY,
    ZONE_SOFT_ANTI_AFFINITY,
    Settings,
)
from blockhorn.types import Busy, InvalidArgument, parse_size

log = logging.getLogger("blockhorn.manager")

# NODE_DOWN_AFTER_S (the lease's TTL, BLOCKHORN_NODE_TTL_S), HEARTBEAT_S and
# SELF_FENCE_AFTER_S live in blockhorn/liveness.py: the share managers read them too.
WATCHDOG_S = 0.25   # seconds between the self-fencing checks
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")   # tags, zones, node names


def check_label(value: str, what: str) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise InvalidArgument(f"invalid {what} {value!r}: use 1-63 of a-z, 0-9, '.', '_', "
                              "'-', starting and ending with a letter or digit")
    return value


def parse_tags(tags: Any) -> list[str]:
    """A list of tags, or `a,b` text; '' or [] is none. Sorted, without repeats."""
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list):
        raise InvalidArgument("tags must be a list or comma-separated text")
    return sorted({check_label(t, "tag") for t in tags})


def default_node_name() -> str:
    return socket.gethostname().split(".")[0].lower() or "localhost"


class NodeService:
    def __init__(self, store: StateStore, name: str | None = None,
                 address: str = "127.0.0.1") -> None:
        self.store = store
        self.name = check_label(name or default_node_name(), "node name")
        self.address = address
        self.leader: str | None = None   # the leading node as of the last heartbeat
        # A cluster node's self-fencing (node/fence.py; docs/DURABILITY.md, "A volume
        # attached on a node that died"): called once when the heartbeat has failed for
        # SELF_FENCE_AFTER_S.
        self.on_lost: Callable[[], None] | None = None
        # Called with the time (monotonic) each successful renewal began: the dead man's
        # switch of a cluster daemon reads it (node/fence.py).
        self.on_beat: Callable[[float], None] | None = None
        self._last_ok = time.monotonic()   # when the last successful heartbeat began
        self._fenced = False
        # This node's TCP API (URL, CA PEM) for its peers to forward to (manager/forward.py);
        # set by the daemon on a cluster with --api-listen before register().
        self.api: tuple[str, str] | None = None

    # --- this node's life ------------------------------------------------------------------

    def register(self) -> None:
        """Register this node (first start) or refresh its address and heartbeat."""
        api: dict[str, str | None] = {"api": self.api[0], "api_ca": self.api[1]} \
            if self.api else {"api": None, "api_ca": None}
        if not self.store.put_node(NodeRow(self.name, self.address, heartbeat=time.time())):
            self.store.update_node(self.name, address=self.address, heartbeat=time.time())
        if self.api is not None or self.store.node(self.name).api is not None:
            # Listening now, or no longer: peers must not forward to a stale endpoint.
            self.store.update_node(self.name, **api)
        self.beat()

    @property
    def is_leader(self) -> bool:
        return self.leader == self.name

    def beat(self) -> None:
        began = time.monotonic()
        self.store.node_alive(self.name, NODE_DOWN_AFTER_S)
        self._last_ok = began   # the lease runs at least until began + its TTL
        self._fenced = False
        if self.on_beat is not None:
            self.on_beat(began)
        leader = self.store.try_lead(self.name, NODE_DOWN_AFTER_S)
        if leader != self.leader:
            log.info("leader: %s%s", leader, " (this node)" if leader == self.name else "")
            self.leader = leader
        for d in self.store.disks(self.name):
            cap, free = _usage(d.path)
            if (cap, free) != (d.capacity, d.available):
                self.store.update_disk(self.name, d.path, capacity=cap, available=free)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.on_lost is not None:
                nursery.start_soon(self._watchdog)
            next_at = trio.current_time() + HEARTBEAT_S
            while True:
                await trio.sleep_until(next_at)
                next_at = trio.current_time() + HEARTBEAT_S   # however long this beat takes
                try:
                    await trio.to_thread.run_sync(self.beat)
                except Exception as e:   # the store is away for a moment: the next beat retries
                    log.warning("node heartbeat failed: %s", e)

    async def _watchdog(self) -> None:
        """Separate from the heartbeat, which can hang on an unreachable store."""
        while True:
            await trio.sleep(WATCHDOG_S)
            silent = time.monotonic() - self._last_ok
            if silent > SELF_FENCE_AFTER_S and not self._fenced and self.on_lost is not None:
                self._fenced = True
                log.error("no heartbeat for %.1f s: this node's lease may expire, and its "
                          "volumes move elsewhere: fencing itself (stopping its engines and "
                          "shares)", silent)
                await trio.to_thread.run_sync(self.on_lost)

    # --- reading ---------------------------------------------------------------------------

    def _scheduled(self) -> dict[tuple[str, str], int]:
        """Bytes promised per (node, disk root) of replica directories `<disk>/replicas/...`
        (a replica without a node is on this one: a home made before nodes existed)."""
        out: dict[tuple[str, str], int] = {}
        # Two reads, not one per volume: the shorter a scheduling decision, the fewer
        # concurrent ones it has to be decided again after (control/store/base.py `guarded`).
        volumes = {v.name: v for v in self.store.volumes()}
        for r in self.store.all_replicas():
            vol = volumes.get(r.volume)
            if vol is not None:   # a volume created after the first read: the mark moved
                where = [(r.node, r.directory)]
                if r.moving is not None:   # the target is promised from start_move on
                    where.append((r.moving.node, r.moving.directory))
                for node, directory in where:
                    root = os.path.dirname(os.path.dirname(os.path.dirname(directory)))
                    key = (node or self.name, root)
                    out[key] = out.get(key, 0) + vol.promised
        return out

    def _disk(self, d: DiskRow, scheduled: dict[tuple[str, str], int]) -> dict[str, Any]:
        cap, free = _usage(d.path) if d.node == self.name else (d.capacity, d.available)
        return {"path": d.path, "capacity": cap, "available": free,
                "scheduled": scheduled.get((d.node, d.path), 0),
                "reserved": d.reserved, "tags": d.tags, "schedulable": d.schedulable}

    def _describe(self, n: NodeRow, disks: list[DiskRow], scheduled: dict[tuple[str, str], int],
                  live: set[str]) -> dict[str, Any]:
        up = n.name == self.name or n.name in live   # this node answers: it is up
        return {"name": n.name, "address": n.address, "state": "up" if up else "down",
                "schedulable": n.schedulable, "zone": n.zone, "tags": n.tags,
                "heartbeat": n.heartbeat, "leader": n.name == self.leader,
                "disks": [self._disk(d, scheduled) for d in disks if d.node == n.name]}

    def list_nodes(self) -> list[dict[str, Any]]:
        disks, scheduled = self.store.disks(), self._scheduled()
        live = self.store.live_nodes(NODE_DOWN_AFTER_S)
        return [self._describe(n, disks, scheduled, live) for n in self.store.nodes()]

    def show(self, name: str) -> dict[str, Any]:
        return self._describe(self.store.node(name), self.store.disks(name), self._scheduled(),
                              self.store.live_nodes(NODE_DOWN_AFTER_S))

    def disks(self) -> list[dict[str, Any]]:
        scheduled = self._scheduled()
        return [{"node": d.node, **self._disk(d, scheduled)} for d in self.store.disks()]

    # --- changing --------------------------------------------------------------------------

    def update(self, name: str, schedulable: Any = None, tags: Any = None,
               zone: Any = None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if schedulable is not None:
            if not isinstance(schedulable, bool):
                raise InvalidArgument("schedulable must be true or false")
            fields["schedulable"] = schedulable
        if tags is not None:
            fields["tags"] = parse_tags(tags)
        if zone is not None:
            fields["zone"] = check_label(zone, "zone") if zone != "" else None
        if not fields:
            raise InvalidArgument("nothing to change: give schedulable, tags or zone")
        self.store.update_node(name, **fields)
        return self.show(name)

    def add_disk(self, path: str, node: str | None = None, tags: Any = None,
                 reserve: Any = 0) -> dict[str, Any]:
        node = node or self.name
        if not isinstance(path, str) or not path:
            raise InvalidArgument("a disk needs a path")
        path = os.path.abspath(path)
        reserved = parse_size(reserve) if reserve not in (0, "0", None, "") else 0
        cap = free = 0
        if node == self.name:   # only this node can look at its own directories
            if not os.path.isdir(path):
                raise InvalidArgument(f"disk {path} is not a directory")
            cap, free = _usage(path)
            if reserved >= cap:
                raise InvalidArgument(f"reserve {reserved} bytes is not less than the disk's "
                                      f"capacity ({cap} bytes)")
        self.store.node(node)   # NotFound: "node 'x' does not exist"
        self.store.add_disk(DiskRow(node, path, parse_tags(tags or []), reserved, True, cap,
                                    free))
        log.info("disk %s of node %s added", path, node)
        return next(d for d in self.disks() if d["node"] == node and d["path"] == path)

    def remove_disk(self, path: str, node: str | None = None) -> None:
        node = node or self.name
        path = os.path.abspath(path)
        users = sorted(r.name for v in self.store.volumes()
                       for r in self.store.replicas(v.name) if (r.node or self.name) == node
                       and r.directory.startswith(os.path.join(path, "replicas") + "/"))
        if users:
            raise Busy(f"disk {path} holds replicas {', '.join(users)}: remove their "
                       "volumes first")
        self.store.remove_disk(node, path)
        log.info("disk %s of node %s removed", path, node)

    # --- placement -------------------------------------------------------------------------

    def policy(self) -> Policy:
        s = Settings(self.store)
        return Policy(s.get_bool(SOFT_ANTI_AFFINITY), s.get_bool(ZONE_SOFT_ANTI_AFFINITY),
                      s.get_int(OVER_PROVISIONING), s.get_int(MINIMAL_AVAILABLE),
                      str(s.get(DATA_LOCALITY)))

    def nodes_for_scheduling(self, exclude: frozenset[str] = frozenset()) -> list[Node]:
        """The scheduler's view of every node: disks with capacity and promised bytes, up or
        down by its lease; nodes named in `exclude` count as down (a drained node)."""
        rows = self.store.disks()
        scheduled = self._scheduled()
        live = self.up_nodes()
        nodes = []
        for n in self.store.nodes():
            disks = []
            for d in rows:
                if d.node == n.name:
                    info = self._disk(d, scheduled)
                    disks.append(Disk(d.path, info["capacity"], info["available"], d.reserved,
                                      info["scheduled"], frozenset(d.tags), d.schedulable))
            nodes.append(Node(n.name, tuple(disks), n.name in live and n.name not in exclude,
                              n.schedulable, n.zone, frozenset(n.tags)))
        return nodes

    def place(self, size: int, count: int, node_selector: list[str] | None = None,
              disk_selector: list[str] | None = None) -> list[Placement]:
        """Where `count` replicas of `size` bytes go (node and disk), from the scheduler with
        this node preferred (data locality); [] when no disk is registered and no selector
        given (replicas then go in the home). Selectors are tags every chosen node (disk)
        must carry."""
        if not self.store.disks() and not node_selector and not disk_selector:
            return []
        return schedule(size, count, self.nodes_for_scheduling(), self.policy(),
                        node_selector or (), disk_selector or (), prefer_node=self.name)

    def address_of(self, node: str) -> str:
        return self.address if node == self.name else self.store.node(node).address

    def is_up(self, node: str) -> bool:
        return node in self.up_nodes()

    def up_nodes(self) -> set[str]:
        """The nodes whose lease is live, this one included (one store read)."""
        return self.store.live_nodes(NODE_DOWN_AFTER_S) | {self.name}


def _usage(path: str) -> tuple[int, int]:
    """(capacity, available) bytes of the filesystem holding `path`; (0, 0) if it is gone."""
    try:
        u = shutil.disk_usage(path)
    except OSError:
        return 0, 0
    return u.total, u.free
