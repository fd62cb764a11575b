"""The records a state store holds: plain dataclasses, the same whichever store runs.

Vocabulary:
- *desired* state of a volume: `attached` or `detached`, what the operator asked for; the
  supervisor keeps the processes of attached volumes running.
- a *process record* (pid, create_time) names one replica, engine or share-manager process. A
  pid alone is not an identity (pids are reused); pid + psutil's create_time is, and that is
  what lets a restarted daemon adopt the processes its predecessor started.
- a replica's *failed_since* (wall-clock seconds) is when it was first seen failed (ERR in its
  engine, or its process could not be started) without having been RW since (a resync that
  fails does not reset it): the supervisor replaces it once that is longer ago than
  `replica-replenishment-wait-interval`. Stored, so the wait survives a daemon restart.
- a replica's *node* is the host it lives on (its directory is a path there, its address one
  of that host's); a volume's *node* is the host its engine runs on while attached. A process
  record is meaningful on that node only. None (a home made before nodes existed): this host.
- a replica's *moving* target (`MoveTarget`): a drain moves a replica of an attached volume
  by rebuilding a copy elsewhere before the old one is dropped; until the engine swapped it
  in and the engine's node called `finish_move`, the row still points at the old one.
- a volume is *fresh* from `create` until its first attach: only then may a node create its
  replicas as empty members of the in-sync set (a replica directory missing later is lost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float


@dataclass
class MoveTarget:
    """Where a replica of an attached volume is being moved (`node drain`: manager/leader.py).
    The replica keeps its name; its node runs a second replica process (the *shadow*) in
    `directory` at `address`, which the engine rebuilds and swaps in for the old one
    (engine/migrate.py). `process` is the shadow's, recorded by `node`."""

    node: str
    directory: str
    address: str
    process: ProcessRecord | None = None
    started: float = 0.0        # wall-clock seconds: when the move was asked for
    # Why the move is to be given up (its target's node died, the drain's wait ran out), or
    # None. Set by the leader or the drain (`give_up_move`), carried out only by the engine's
    # node, which alone knows whether the engine swapped the target in (manager/moves.py).
    give_up: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "directory": self.directory, "address": self.address,
                "pid": self.process.pid if self.process else None,
                "create_time": self.process.create_time if self.process else None,
                "started": self.started, "give_up": self.give_up}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MoveTarget | None:
        if not d:
            return None
        proc = (ProcessRecord(int(d["pid"]), float(d.get("create_time") or 0.0))
                if d.get("pid") is not None else None)
        return cls(str(d["node"]), str(d["directory"]), str(d["address"]), proc,
                   float(d.get("started") or 0.0),
                   str(d["give_up"]) if d.get("give_up") else None)


@dataclass
class ReplicaRow:
    name: str
    volume: str
    idx: int
    directory: str
    address: str
    process: ProcessRecord | None
    restarts: int = 0
    failed_since: float | None = None
    node: str | None = None     # the node it lives on; None: this host (a single-host home)
    moving: MoveTarget | None = None   # a move in progress (start_move .. finish_move)


@dataclass
class EngineRow:
    volume: str
    nbd_socket: str
    control_socket: str
    process: ProcessRecord | None
    restarts: int = 0


@dataclass
class VolumeRow:
    name: str
    size: int
    replica_count: int
    access_mode: str
    desired: str
    frontend: str | None
    attachment: dict[str, Any] | None
    robustness: str | None
    message: str | None
    tcp_port: int | None
    created: str
    device_stale: bool = False
    groups: list[str] = field(default_factory=list)
    standby: dict[str, Any] | None = None
    node: str | None = None     # the node its engine runs on while attached (None: this host)
    fresh: bool = False         # never attached: its replicas are in sync at generation 0
    # Tags a node (disk) must carry to hold one of the volume's replicas: `volume create
    # --node-selector/--disk-selector`, passed to control/scheduler.py's schedule().
    node_selector: list[str] = field(default_factory=list)
    disk_selector: list[str] = field(default_factory=list)
    # The attach epoch (a cluster's; 0 on one host): bumped by every change of the node its
    # engine runs on (`claim_attachment`), presented by that engine to the replicas, which
    # refuse every connection of a lower one (replica/fencing.py, docs/DURABILITY.md).
    epoch: int = 0
    # An operator's salvage for the next engine start (`volume attach --salvage REPLICA`):
    # {"replica": name, "id": token}; cleared once an engine started from it (the engine
    # also records the token, so a restart before the clear does not salvage twice).
    salvage: dict[str, Any] | None = None
    # The size (bytes) an expand in progress grows the volume to: promised on its replicas'
    # disks from the room check on (`reserve_expand`) until the size reaches it or the
    # expand ends (`end_expand`); None: no expand in progress.
    expanding: int | None = None

    @property
    def promised(self) -> int:
        """Bytes each of its replicas' disks promises it (the scheduler's `scheduled`)."""
        return max(self.size, self.expanding or 0)


# What update_volume may change.
VOLUME_FIELDS = frozenset({"desired", "frontend", "attachment", "robustness", "message",
                           "tcp_port", "access_mode", "device_stale", "size", "groups",
                           "standby", "node", "fresh", "node_selector", "disk_selector",
                           "salvage"})


@dataclass
class ShareRow:
    """A volume's share settings (blockhorn.sharemgr.config.share_options()) and its share
    manager process."""

    volume: str
    options: dict[str, Any]
    process: ProcessRecord | None
    restarts: int = 0


@dataclass
class JobRow:
    """A recurring job as stored: `spec` is JobSpec.to_dict(); times are unix seconds;
    `last_slot` is the latest cron slot handled (run or skipped)."""

    name: str
    spec: dict[str, Any]
    created: float
    last_slot: float
    runs: int = 0
    failures: int = 0


@dataclass
class RunRow:
    """One run of a job: `state` is running, ok, failed or interrupted; `slot` is None for a
    `job run`; `result` says what the run made and removed, per volume."""

    id: int
    job: str
    slot: float | None
    started: float
    finished: float | None
    state: str
    message: str | None
    result: dict[str, Any] | None
    node: str | None = None     # the node that runs it (a cluster; None: this host)


@dataclass
class BackupTargetRow:
    name: str
    url: str
    credential_file: str | None
    mount: str | None
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "credential_file": self.credential_file,
                "mount": self.mount, "created": self.created}


@dataclass
class NodeRow:
    """A host of the cluster. `heartbeat` (unix seconds) is when its daemon last said it is
    alive; `up` or `down` is derived from it by the reader."""

    name: str
    address: str
    schedulable: bool = True
    zone: str | None = None
    tags: list[str] = field(default_factory=list)
    heartbeat: float | None = None
    # A cluster node's TCP API (`daemon run --api-listen`): its URL and the PEM of the CA
    # its certificate is verified with. Peers forward engine requests there
    # (manager/forward.py); None: not listening (nothing can be forwarded to it).
    api: str | None = None
    api_ca: str | None = None


NODE_FIELDS = frozenset({"address", "schedulable", "zone", "tags", "heartbeat", "api",
                         "api_ca"})


@dataclass
class DiskRow:
    """A directory on a node that replicas may be placed in. `capacity`/`available` (bytes)
    are the filesystem's, as last measured by the node's daemon (0: never measured)."""

    node: str
    path: str
    tags: list[str] = field(default_factory=list)
    reserved: int = 0
    schedulable: bool = True
    capacity: int = 0
    available: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "path": self.path, "tags": list(self.tags),
                "reserved": self.reserved, "schedulable": self.schedulable,
                "capacity": self.capacity, "available": self.available}


@dataclass
class LeftoverRow:
    """A replica directory on `node` that is no longer the store's: its volume was removed,
    or the replica moved to another directory or node. Written in the same step as that
    change (etcd), so a node that was down meanwhile still learns of it; the node's daemon
    stops the replica's process, removes the directory and then forgets the record
    (manager/leftovers.py). `volume_created` tells a volume re-created under the same name
    (whose replica may have the same directory) from the one removed."""

    node: str
    replica: str
    volume: str
    directory: str
    volume_created: str = ""


DISK_FIELDS = frozenset({"tags", "reserved", "schedulable", "capacity", "available"})
