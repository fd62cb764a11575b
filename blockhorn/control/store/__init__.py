"""The daemon's state store: one interface (base.StateStore), two implementations.

`open_store(db_path, etcd=None)` picks one: SQLite in the home by default, etcd when URLs are
given (`blockhorn daemon run --etcd URL[,URL...]`). Nothing outside this package knows which.
"""

from __future__ import annotations

from blockhorn.control.store.base import (
    PORT_RANGE,
    NewReplica,
    SlotTaken,
    Stale,
    StateStore,
    guarded,
    move_port_owner,
    now_rfc3339,
)
from blockhorn.control.store.records import (
    BackupTargetRow,
    DiskRow,
    EngineRow,
    JobRow,
    LeftoverRow,
    MoveTarget,
    NodeRow,
    ProcessRecord,
    ReplicaRow,
    RunRow,
    ShareRow,
    VolumeRow,
)
from blockhorn.control.store.sqlite import SqliteStore

DEFAULT_ETCD_PREFIX = "/blockhorn/"


def open_store(db_path: str, etcd: str | None = None,
               prefix: str = DEFAULT_ETCD_PREFIX) -> StateStore:
    """The SQLite store at `db_path`, or with `etcd` (comma-separated client URLs) the etcd
    store under `prefix` (the SQLite file is then not touched)."""
    if etcd:
        from blockhorn.control.store.etcd import EtcdStore
        return EtcdStore(etcd, prefix)
    return SqliteStore(db_path)


__all__ = ["DEFAULT_ETCD_PREFIX", "PORT_RANGE", "BackupTargetRow", "DiskRow", "EngineRow", "LeftoverRow",
           "JobRow", "MoveTarget", "NewReplica", "NodeRow", "ProcessRecord", "ReplicaRow", "RunRow",
           "ShareRow", "SlotTaken", "SqliteStore", "Stale", "StateStore", "VolumeRow", "guarded",
           "move_port_owner", "now_rfc3339", "open_store"]
