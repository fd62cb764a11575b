"""The daemon's state store: SQLite in WAL mode, one short transaction per change.

Vocabulary:
- *desired* state of a volume: `attached` or `detached`, what the operator asked for; the
  supervisor keeps the processes of attached volumes running.
- a *process record* (pid, create_time) names one replica or engine process. A pid alone is not
  an identity (pids are reused); pid + psutil's create_time is, and that is what lets a restarted
  daemon adopt the processes its predecessor started.
- a replica's *failed_since* (wall-clock seconds) is when it was first seen failed (ERR in its
  engine, or its process could not be started) without having been RW since (a resync that
  fails does not reset it): the supervisor replaces it once that is longer ago than
  `replica-replenishment-wait-interval`. Stored, so the wait survives a daemon restart.

The store is used from several threads (API requests run lifecycle steps in worker threads; the
supervisor has its own): every call opens its own connection, which SQLite makes cheap, so no
connection is ever shared between threads.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from blockhorn.types import AlreadyExists, NoSpace, NotFound

SCHEMA_VERSION = 3   # 2: replicas.failed_since or volumes.groups/standby + jobs; 3: both
BUSY_TIMEOUT_S = 10.0       # seconds a writer waits for another writer's transaction
PORT_RANGE = (10000, 20000)  # [first, last) TCP ports handed to replica servers

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name          TEXT PRIMARY KEY,
    size          INTEGER NOT NULL,
    replica_count INTEGER NOT NULL,
    access_mode   TEXT NOT NULL DEFAULT 'rwo',
    desired       TEXT NOT NULL DEFAULT 'detached',
    frontend      TEXT,
    attachment    TEXT,            -- JSON of blockhorn.nbd.attach.Attachment.to_dict()
    robustness    TEXT,            -- last robustness seen from the engine
    message       TEXT,            -- last problem worth telling the operator
    tcp_port      INTEGER,         -- NBD TCP port of the engine, if asked for
    device_stale  INTEGER NOT NULL DEFAULT 0,  -- 1: the engine under the device restarted
    created       TEXT NOT NULL,
    groups        TEXT,            -- JSON list of recurring-job groups (schema 2)
    standby       TEXT             -- JSON of a DR standby's state (schema 2)
);
CREATE TABLE IF NOT EXISTS replicas (
    name        TEXT PRIMARY KEY,
    volume      TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    directory   TEXT NOT NULL,
    address     TEXT NOT NULL,
    pid         INTEGER,
    create_time REAL,
    restarts    INTEGER NOT NULL DEFAULT 0,
    failed_since REAL              -- see the module docstring; NULL: not failed (schema 2)
);
CREATE TABLE IF NOT EXISTS engines (
    volume         TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
    pid            INTEGER,
    create_time    REAL,
    nbd_socket     TEXT NOT NULL,
    control_socket TEXT NOT NULL,
    restarts       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,        -- a name of manager/settings.py's registry
    value TEXT NOT NULL            -- JSON; no row: the default
);
CREATE TABLE IF NOT EXISTS ports (
    port   INTEGER PRIMARY KEY,
    volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
    owner  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    name      TEXT PRIMARY KEY,
    spec      TEXT NOT NULL,        -- JSON: cron, task, retain, volume or grp, target
    created   REAL NOT NULL,        -- unix time
    last_slot REAL NOT NULL,        -- the latest cron slot handled (run or skipped), unix time
    runs      INTEGER NOT NULL DEFAULT 0,
    failures  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_runs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    job      TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    slot     REAL,                  -- the cron slot it ran for; NULL for `job run`
    started  REAL NOT NULL,
    finished REAL,
    state    TEXT NOT NULL,         -- running, ok, failed, interrupted
    message  TEXT,
    result   TEXT                   -- JSON: what the run made and removed, per volume
);
"""

# Columns added after schema 1, with their declarations: an old home gets them on open.
_ADDED_COLUMNS = {"volumes": [("groups", "TEXT"), ("standby", "TEXT")],
                  "replicas": [("failed_since", "REAL")]}


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float


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


def _proc(row: sqlite3.Row) -> ProcessRecord | None:
    if row["pid"] is None:
        return None
    return ProcessRecord(int(row["pid"]), float(row["create_time"] or 0.0))


def _volume(row: sqlite3.Row) -> VolumeRow:
    att = row["attachment"]
    return VolumeRow(row["name"], row["size"], row["replica_count"], row["access_mode"],
                     row["desired"], row["frontend"], json.loads(att) if att else None,
                     row["robustness"], row["message"], row["tcp_port"], row["created"],
                     bool(row["device_stale"]), json.loads(row["groups"] or "[]"),
                     json.loads(row["standby"]) if row["standby"] else None)


def _replica(row: sqlite3.Row) -> ReplicaRow:
    return ReplicaRow(row["name"], row["volume"], row["idx"], row["directory"],
                      row["address"], _proc(row), row["restarts"], row["failed_since"])


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        db = self._connect()
        try:
            # executescript commits on its own; every statement in the schema is idempotent.
            db.executescript(_SCHEMA)
            _migrate(db)
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction (BEGIN IMMEDIATE: writers queue up instead of deadlocking)."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # --- volumes ---------------------------------------------------------------------------

    def add_volume(self, name: str, size: int, replicas: list[tuple[str, str, str | None]],
                   engine: tuple[str, str], is_free: Callable[[int], bool]) -> VolumeRow:
        """Insert a volume with its replicas [(name, directory, address)] and its engine
        (nbd_socket, control_socket), atomically. A replica address of None gets
        `127.0.0.1:PORT` with a port allocated here, in the same transaction."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self.tx() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"volume {name!r} already exists")
            db.execute("INSERT INTO volumes (name, size, replica_count, created) "
                       "VALUES (?, ?, ?, ?)", (name, size, len(replicas), created))
            for idx, (rname, directory, address) in enumerate(replicas):
                if address is None:
                    address = f"127.0.0.1:{_allocate(db, name, rname, is_free)}"
                db.execute("INSERT INTO replicas (name, volume, idx, directory, address) "
                           "VALUES (?, ?, ?, ?, ?)", (rname, name, idx, directory, address))
            db.execute("INSERT INTO engines (volume, nbd_socket, control_socket) VALUES (?, ?, ?)",
                       (name, engine[0], engine[1]))
        return self.volume(name)

    def volume(self, name: str) -> VolumeRow:
        with self.tx() as db:
            row = db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"volume {name!r} does not exist")
        return _volume(row)

    def volumes(self) -> list[VolumeRow]:
        with self.tx() as db:
            return [_volume(r) for r in db.execute("SELECT * FROM volumes ORDER BY name")]

    def update_volume(self, name: str, **fields: Any) -> None:
        allowed = {"desired", "frontend", "attachment", "robustness", "message", "tcp_port",
                   "access_mode", "device_stale", "size", "groups", "standby"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update volume fields {sorted(set(fields) - allowed)}")
        for k in ("attachment", "groups", "standby"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k], sort_keys=True)
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            cur = db.execute(f"UPDATE volumes SET {sets} WHERE name=?", (*fields.values(), name))
            if cur.rowcount == 0:
                raise NotFound(f"volume {name!r} does not exist")

    def delete_volume(self, name: str) -> None:
        """Remove the volume, its replicas, engine record and ports (ON DELETE CASCADE)."""
        with self.tx() as db:
            cur = db.execute("DELETE FROM volumes WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"volume {name!r} does not exist")

    # --- replicas and engines --------------------------------------------------------------

    def replicas(self, volume: str) -> list[ReplicaRow]:
        with self.tx() as db:
            rows = db.execute("SELECT * FROM replicas WHERE volume=? ORDER BY idx", (volume,))
            return [_replica(r) for r in rows]

    def set_replica_process(self, name: str, proc: ProcessRecord | None,
                            restarted: bool = False) -> None:
        pid, ct = (proc.pid, proc.create_time) if proc else (None, None)
        with self.tx() as db:
            db.execute("UPDATE replicas SET pid=?, create_time=?, restarts=restarts+? "
                       "WHERE name=?", (pid, ct, int(restarted), name))

    def set_replica_address(self, name: str, address: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE replicas SET address=? WHERE name=?", (address, name))

    def set_replica_failed_since(self, name: str, when: float | None) -> None:
        """Record when replica `name` was first seen failed (None: it is fine again).
        An earlier time already stored is kept: the wait counts from the first failure."""
        with self.tx() as db:
            if when is None:
                db.execute("UPDATE replicas SET failed_since=NULL WHERE name=?", (name,))
            else:
                db.execute("UPDATE replicas SET failed_since=? WHERE name=? AND "
                           "failed_since IS NULL", (when, name))

    def clear_failed(self, volume: str) -> None:
        """Forget every failure time of `volume`'s replicas (an attach starts afresh)."""
        with self.tx() as db:
            db.execute("UPDATE replicas SET failed_since=NULL WHERE volume=?", (volume,))

    def set_replica_directory(self, name: str, directory: str) -> None:
        """Point replica `name` at a new directory (a replacement); its failure is over."""
        with self.tx() as db:
            db.execute("UPDATE replicas SET directory=?, failed_since=NULL WHERE name=?",
                       (directory, name))

    def engine(self, volume: str) -> EngineRow:
        with self.tx() as db:
            row = db.execute("SELECT * FROM engines WHERE volume=?", (volume,)).fetchone()
        if row is None:
            raise NotFound(f"volume {volume!r} has no engine record")
        return EngineRow(row["volume"], row["nbd_socket"], row["control_socket"], _proc(row),
                         row["restarts"])

    def set_engine_process(self, volume: str, proc: ProcessRecord | None,
                           restarted: bool = False) -> None:
        pid, ct = (proc.pid, proc.create_time) if proc else (None, None)
        with self.tx() as db:
            db.execute("UPDATE engines SET pid=?, create_time=?, restarts=restarts+? "
                       "WHERE volume=?", (pid, ct, int(restarted), volume))

    # --- settings (typed and validated by manager/settings.py) -----------------------------

    def setting_values(self) -> dict[str, str]:
        with self.tx() as db:
            return {r["name"]: r["value"] for r in db.execute("SELECT name, value FROM settings")}

    def put_setting(self, name: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "value=excluded.value", (name, value))

    def delete_setting(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM settings WHERE name=?", (name,))

    # --- ports -----------------------------------------------------------------------------

    def allocate_port(self, volume: str, owner: str, is_free: Callable[[int], bool]) -> int:
        """Record and return a TCP port that no volume holds and `is_free` accepts; it
        replaces the port `owner` held before (used when a stored port was taken meanwhile)."""
        with self.tx() as db:
            return _allocate(db, volume, owner, is_free)

    def ports(self, volume: str) -> dict[str, int]:
        with self.tx() as db:
            rows = db.execute("SELECT owner, port FROM ports WHERE volume=?", (volume,))
            return {r["owner"]: r["port"] for r in rows}


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older home's database to SCHEMA_VERSION. New tables come from the schema's
    CREATE IF NOT EXISTS; new columns of old tables are added here (nullable, so old rows
    read as before). Runs in one transaction: a crash leaves the old version, retried next open."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in _ADDED_COLUMNS.items():
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            for col, decl in columns:
                if col not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = max(int(row[0]) if row else 0, SCHEMA_VERSION)   # never downgrade
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _allocate(db: sqlite3.Connection, volume: str, owner: str,
              is_free: Callable[[int], bool]) -> int:
    taken = {r[0] for r in db.execute("SELECT port FROM ports")}
    first, last = PORT_RANGE
    span = last - first
    # Start at a random point so that two homes on one host (tests, hand-run setups) rarely
    # pick the same port before either binds it; scan the range once from there.
    start = random.randrange(span)
    for i in range(span):
        port = first + (start + i) % span
        if port not in taken and is_free(port):
            db.execute("DELETE FROM ports WHERE owner=? AND volume=?", (owner, volume))
            db.execute("INSERT INTO ports VALUES (?, ?, ?)", (port, volume, owner))
            return port
    raise NoSpace(f"no free TCP port in {first}-{last - 1} for {owner}")
