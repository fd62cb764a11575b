"""The state-store interface: what the daemon keeps, whichever store holds it.

Two implementations: `SqliteStore` (control/store/sqlite.py, the embedded default, one file in
the home) and `EtcdStore` (control/store/etcd.py, for many hosts). Nothing outside this package
knows which one runs: the daemon gets one from `open_store()` and calls these methods only.

Contract (tests/t2_control_store.py runs the same suite against both):
- every method is one atomic step: a reader sees a change whole or not at all;
- a missing volume/job is NotFound, a second volume/job of one name AlreadyExists; updates of
  a replica/engine/share that does not exist are no-ops (it was removed meanwhile);
- removing a volume removes its replicas, engine record, share and ports with it;
- every method may be called from any thread;
- a change that promises disk room (a new replica, a volume growing, a replica moved or
  being moved to another disk) moves the store's *scheduling mark*, and one made with
  `guard=mark` is refused (Stale, nothing written) when the mark moved since `mark` was read:
  the room decision and its write are one atomic step across nodes (`guarded`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from blockhorn.control.store.records import (
    BackupTargetRow,
    DiskRow,
    EngineRow,
    JobRow,
    LeftoverRow,
    NodeRow,
    ProcessRecord,
    ReplicaRow,
    RunRow,
    ShareRow,
    VolumeRow,
)
from blockhorn.types import AlreadyExists, Busy, NoSpace


class SlotTaken(AlreadyExists):
    """A job's slot was claimed already (`start_run`): another node of a cluster runs it."""


class Stale(Busy):
    """A guarded scheduling change (`guard=`) found the scheduling mark moved since the
    decision read it: another create, expand or move promised room meanwhile. Nothing was
    written; `guarded` decides again on fresh state."""


SCHEDULE_ATTEMPTS = 20      # decisions re-run after losing to concurrent ones, then Busy
SCHEDULE_BACKOFF_S = 0.05   # at most this many seconds (random) between two attempts

T = TypeVar("T")
R = TypeVar("R")


def guarded(store: StateStore, decide: Callable[[], T], commit: Callable[[T, int], R],
            what: str) -> R:
    """Where a decision about disk room and the write that promises it must be one step
    (create, expand, a replica's move): read the store's scheduling mark, then `decide` on
    what the store says now (it raises when there is no room: Unschedulable, NoSpace), then
    `commit(decision, mark)`, which writes with `guard=mark`. A Stale commit (someone else
    promised room in between, on any node) decides again from fresh state: a placement
    elsewhere, or the decision's own clear refusal. The mark is read before the decision's
    reads, so every change it does not see moves the mark. Busy after SCHEDULE_ATTEMPTS."""
    for attempt in range(SCHEDULE_ATTEMPTS):
        mark = store.schedule_mark()
        decision = decide()
        try:
            return commit(decision, mark)
        except Stale:
            # Concurrent deciders would otherwise collide again in lockstep.
            time.sleep(random.uniform(0, SCHEDULE_BACKOFF_S * min(attempt + 1, 4) / 4))
    raise Busy(f"{what}: other creates, expansions or moves kept changing the disks' "
               f"promised room while this one decided ({SCHEDULE_ATTEMPTS} attempts); "
               "try again")


PORT_RANGE = (10000, 20000)  # [first, last) TCP ports handed to replica servers
MOVE_PORT = "~move"   # suffix of the port owner of a replica's move target (start_move)


def move_port_owner(replica: str) -> str:
    """The `ports` owner of replica `replica`'s move target: its own port stays held by the
    old replica until `finish_move` hands the target's over."""
    return replica + MOVE_PORT

# (name, directory, address, [node]): address None is `127.0.0.1:PORT` with a port allocated,
# `HOST:0` is `HOST:PORT` (a replica on another node); node None: this host.
NewReplica = tuple[str, str, str | None] | tuple[str, str, str | None, str | None]


def unpack_new(rep: NewReplica) -> tuple[str, str, str | None, str | None]:
    """(name, directory, host to allocate a port on or None for a fixed address, node)"""
    name, directory, address = rep[0], rep[1], rep[2]
    node = rep[3] if len(rep) > 3 else None
    return name, directory, address, node


def port_host(address: str | None) -> str | None:
    """The host a port must be allocated on for `address` (None: the address is fixed)."""
    if address is None:
        return "127.0.0.1"
    if address.endswith(":0") and not address.startswith("unix:"):
        return address[:-2]
    return None


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pick_port(taken: set[int], is_free: Callable[[int], bool], owner: str) -> int:
    """A port of PORT_RANGE not in `taken` that `is_free` accepts. The scan starts at a random
    point so that two homes on one host (tests, hand-run setups) rarely pick the same port
    before either binds it."""
    first, last = PORT_RANGE
    span = last - first
    start = random.randrange(span)
    for i in range(span):
        port = first + (start + i) % span
        if port not in taken and is_free(port):
            return port
    raise NoSpace(f"no free TCP port in {first}-{last - 1} for {owner}")


class StateStore(Protocol):
    # --- scheduling (the module docstring; `guarded`) ---------------------------------------
    def schedule_mark(self) -> int:
        """The scheduling mark now: moved by every change that promises disk room
        (add_volume, reserve_expand, a size grown by update_volume, move_replica,
        start_move, set_replica_directory), guarded or not. Opaque: compare, never compute."""
    def reserve_expand(self, name: str, size: int, guard: int | None = None,
                       node: str | None = None) -> None:
        """Promise the room for volume `name` growing to `size` bytes before any replica
        grows (the volume's `expanding`, counted as scheduled until the size reaches it or
        `end_expand`), for an expand that the daemon of `node` runs; Stale when `guard` is
        not the mark, NotFound without the volume."""
    def end_expand(self, name: str, size: int) -> None:
        """Drop the promise of `reserve_expand(name, size)` (the expand is over, done or not;
        a newer reservation of another size is left alone; no-op without the volume)."""
    def end_expands_of(self, node: str | None) -> list[str]:
        """Drop the promises of every expand that the daemon of `node` ran (the volumes'
        names): called as that daemon starts, when none of them runs any more — one that
        died during an expand left its promise behind. One host (SQLite): every promise."""

    # --- volumes ---------------------------------------------------------------------------
    def add_volume(self, name: str, size: int, replicas: list[NewReplica],
                   engine: tuple[str, str], is_free: Callable[[int], bool],
                   guard: int | None = None) -> VolumeRow:
        """Insert a volume with its replicas [(name, directory, address)] and its engine
        (nbd_socket, control_socket), atomically. A replica address of None gets
        `127.0.0.1:PORT` with a port allocated in the same step. `guard`: the scheduling
        mark the placement was decided at (Stale, nothing written, when it moved)."""
    def volume(self, name: str) -> VolumeRow: ...
    def volumes(self) -> list[VolumeRow]: ...
    def update_volume(self, name: str, **fields: Any) -> None: ...
    def delete_volume(self, name: str) -> None: ...
    def claim_attachment(self, name: str, node: str | None, expect: str | None,
                         *, detached: bool = False, **fields: Any) -> int:
        """Attach volume `name` on `node` in one compare-and-swap: only while its engine's
        node is still `expect` and, with `detached`, while it is detached (Busy otherwise:
        someone else moved or attached it — two attaches of a detached volume on different
        nodes, or one and a maintenance attach, both read it detached), with `fields`
        (update_volume's) and the engine's process record cleared in the same step; bumps
        and returns the attach epoch. On one host
        (SQLite) the epoch stays 0: one daemon runs one engine, no fencing needed."""

    # --- replicas and engines --------------------------------------------------------------
    def replicas(self, volume: str) -> list[ReplicaRow]: ...
    def all_replicas(self) -> list[ReplicaRow]:
        """Every volume's replicas in one read (by volume, then index): what a scheduling
        decision counts, without one read per volume."""
    def set_replica_process(self, name: str, proc: ProcessRecord | None,
                            restarted: bool = False) -> None: ...
    def set_replica_address(self, name: str, address: str) -> None: ...
    def set_replica_failed_since(self, name: str, when: float | None) -> None:
        """Record when replica `name` was first seen failed (None: it is fine again).
        An earlier time already stored is kept: the wait counts from the first failure."""
    def clear_failed(self, volume: str) -> None: ...
    def set_replica_directory(self, name: str, directory: str) -> None:
        """Point replica `name` at a new directory (a replacement); its failure is over."""
    def move_replica(self, name: str, node: str, directory: str, address: str,
                     guard: int | None = None) -> None:
        """Replica `name` now lives on `node` in `directory` at `address` (a replacement on
        another node): its process record and failure are cleared in the same step, and a
        move in progress is given up (as `cancel_move`). `guard`: as add_volume's."""
    def start_move(self, name: str, node: str, directory: str, address: str,
                   guard: int | None = None) -> None:
        """Begin moving replica `name` (of an attached volume) to `node`, `directory`,
        `address`: the row keeps pointing at the old replica and gets a `moving` target
        (records.MoveTarget; its disk counts as scheduled from now). Busy when it is moving
        elsewhere already; the same target again is a no-op. `guard`: as add_volume's."""
    def set_move_process(self, name: str, proc: ProcessRecord | None) -> None:
        """The process of replica `name`'s move target (no-op when it is not moving)."""
    def finish_move(self, name: str) -> None:
        """The engine swapped the move target in: in one step the row points at it (its
        process record too), `moving` is cleared, the target's port becomes the replica's
        and the old directory is left behind like `move_replica`'s. No-op when not moving."""
    def give_up_move(self, name: str, reason: str) -> None:
        """Ask for the move of replica `name` to be given up (`reason`: why), by the engine's
        node: it cancels the move when the engine certainly did not swap the target in, else
        finishes it (manager/moves.py). The first reason is kept; no-op when not moving."""
    def cancel_move(self, name: str) -> None:
        """Give the move up (only the engine's node: `give_up_move`): `moving` cleared, the target's port released, its directory
        left behind (etcd: a leftover record of the target node). No-op when not moving."""
    def engine(self, volume: str) -> EngineRow: ...
    def set_engine_sockets(self, volume: str, nbd_socket: str, control_socket: str) -> None:
        """The engine's sockets on the node it now runs on (paths in that node's home)."""
    def set_engine_process(self, volume: str, proc: ProcessRecord | None,
                           restarted: bool = False) -> None: ...

    # --- settings (typed and validated by manager/settings.py; values are JSON text) --------
    def setting_values(self) -> dict[str, str]: ...
    def put_setting(self, name: str, value: str) -> None: ...
    def delete_setting(self, name: str) -> None: ...

    # --- ports -----------------------------------------------------------------------------
    def allocate_port(self, volume: str, owner: str, is_free: Callable[[int], bool]) -> int:
        """Record and return a TCP port that no volume holds and `is_free` accepts; it
        replaces the port `owner` held before (used when a stored port was taken meanwhile)."""
    def ports(self, volume: str) -> dict[str, int]: ...

    # --- shares (RWX) ----------------------------------------------------------------------
    def add_share(self, volume: str, options: dict[str, Any]) -> None: ...
    def share(self, volume: str) -> ShareRow: ...
    def set_share_process(self, volume: str, proc: ProcessRecord | None,
                          restarted: bool = False) -> None: ...
    def share_records(self, volume: str) -> dict[str, Any] | None:
        """Ganesha's client recovery records of the share as its node last copied them
        (sharemgr/ganesha.py `snapshot_records`), or None: the next node to serve the share
        restores them before Ganesha starts, so NFSv4 clients reclaim their state."""
    def put_share_records(self, volume: str, records: dict[str, Any] | None,
                          epoch: int) -> bool:
        """Store (None: drop) the share's recovery records, only while the volume's attach
        epoch is still `epoch` (a node the volume moved away from must not overwrite the
        new node's records); False, nothing changed, otherwise or when the volume is gone.
        SQLite (one host) has one epoch: 0."""

    # --- recurring jobs and their runs -----------------------------------------------------
    def add_job(self, name: str, spec: dict[str, Any], now: float) -> JobRow:
        """A new job; its last_slot is `now`: the first run is the first slot after it."""
    def job(self, name: str) -> JobRow: ...
    def jobs(self) -> list[JobRow]: ...
    def remove_job(self, name: str) -> None:
        """Remove a job and its runs."""
    def start_run(self, name: str, slot: float | None, now: float, state: str,
                  message: str | None, keep: int, node: str = "") -> int:
        """Record a run (and, for a scheduled one, raise the job's last_slot to `slot`) in one
        step; keep the job's newest `keep` runs. Returns the run's id (ids only grow). A
        scheduled slot is claimed once: SlotTaken when last_slot is `slot` or later already
        (on a cluster every node's scheduler sees the slot due; the first claim runs it).
        `node`: the node that runs it (a cluster's: `interrupt_running`)."""
    def finish_run(self, run_id: int, state: str, message: str | None,
                   result: dict[str, Any] | None, now: float) -> None:
        """End a run and count it in its job (no-op if the job was removed meanwhile)."""
    def interrupt_running(self, now: float, node: str = "") -> int:
        """Mark every `running` run of `node` (and runs that name no node) `interrupted`;
        how many there were. One host: every running run."""
    def job_runs(self, name: str, limit: int) -> list[RunRow]:
        """The job's newest runs, newest first."""
    def job_run(self, run_id: int) -> RunRow | None: ...

    # --- backup targets --------------------------------------------------------------------
    def put_backup_target(self, row: BackupTargetRow) -> None: ...
    def backup_targets(self) -> list[BackupTargetRow]: ...
    def delete_backup_target(self, name: str) -> bool:
        """False if there was none of that name."""

    # --- nodes and disks -------------------------------------------------------------------
    def put_node(self, row: NodeRow) -> bool:
        """Register a node; False (and nothing changed) if one of that name exists."""
    def node(self, name: str) -> NodeRow: ...
    def nodes(self) -> list[NodeRow]: ...
    def update_node(self, name: str, **fields: Any) -> None:
        """Change NODE_FIELDS of a node (NotFound if there is none)."""
    def node_alive(self, name: str, ttl_s: int) -> None:
        """Node `name` says it is alive for the next `ttl_s` seconds (its daemon calls this
        every few seconds). SQLite: its heartbeat time; etcd: a key under a lease of ttl_s,
        so liveness does not depend on the hosts' clocks agreeing."""
    def live_nodes(self, ttl_s: int) -> set[str]:
        """The nodes that said they are alive within the last `ttl_s` seconds (etcd: whose
        lease has not expired; `ttl_s` is the one they were granted with)."""
    def add_disk(self, row: DiskRow) -> None:
        """Register a disk (NotFound without its node, AlreadyExists for a second one of
        the same node and path)."""
    def disks(self, node: str | None = None) -> list[DiskRow]:
        """Every disk (of `node`), by node and path."""
    def update_disk(self, node: str, path: str, **fields: Any) -> None: ...
    def remove_disk(self, node: str, path: str) -> None: ...

    def shared_key(self, candidate: bytes) -> bytes:
        """The cluster key every node uses: the stored one, or `candidate` stored first if
        there is none (etcd: create-if-absent). SQLite (one host): `candidate` itself."""
    def try_lead(self, node: str, ttl_s: int) -> str | None:
        """Campaign for leadership (etcd: `leader` created under node's lease if absent);
        returns the current leader's name (SQLite: always `node`)."""

    # --- replica directories to remove (a cluster's: manager/leftovers.py) ------------------
    def leftovers(self, node: str) -> list[LeftoverRow]:
        """The replica directories on `node` that `delete_volume` or `move_replica` left
        behind (etcd). SQLite (one host): none, `volume rm` removes every directory itself."""
    def forget_leftover(self, row: LeftoverRow) -> None:
        """`row`'s directory is gone: drop the record (no-op if there is none)."""

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None] | None:
        """Call `on_change` (from a thread of the store's) soon after a change, made on any
        node, of what supervision acts on: volumes, replicas, node liveness. Returns what
        stops it; None where the store has no such feed (SQLite: this daemon makes every
        change itself). Only a hastener: callers still poll."""

    def close(self) -> None: ...
