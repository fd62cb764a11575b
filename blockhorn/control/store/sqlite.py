"""The embedded state store: SQLite in WAL mode, one short transaction per change
(the StateStore interface of control/store/base.py; records in control/store/records.py).

The store is used from several threads (API requests run lifecycle steps in worker threads; the
supervisor has its own): every call opens its own connection, which SQLite makes cheap, so no
connection is ever shared between threads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from blockhorn.control.store.base import (
    NewReplica,
    SlotTaken,
    Stale,
    move_port_owner,
    now_rfc3339,
    pick_port,
    port_host,
    unpack_new,
)
from blockhorn.control.store.records import (
    DISK_FIELDS,
    NODE_FIELDS,
    VOLUME_FIELDS,
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
from blockhorn.types import AlreadyExists, Busy, NotFound

SCHEMA_VERSION = 8   # 2: replicas.failed_since or volumes.groups/standby + jobs; 3: both;
# 4: volumes.node/fresh, replicas.node (NULL in an older home: everything on this host).
# 5: volumes.node_selector/disk_selector. 6: volumes.salvage. 7: replicas.moving.
# 8: volumes.expanding (an older blockhorn ignores it: it only adds to promised room).
# New tables (shares, share_records, backup_targets, nodes, disks) need no version: CREATE IF NOT EXISTS
# adds them to any home, and an older blockhorn ignores them.
BUSY_TIMEOUT_S = 10.0       # seconds a writer waits for another writer's transaction

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
    standby       TEXT,            -- JSON of a DR standby's state (schema 2)
    node          TEXT,            -- the node its engine runs on; NULL: this host (schema 4)
    fresh         INTEGER,         -- 1: never attached (schema 4); NULL: attached, or older
    node_selector TEXT,            -- JSON list of tags; NULL: none (schema 5)
    disk_selector TEXT,            -- JSON list of tags; NULL: none (schema 5)
    salvage       TEXT,            -- JSON {"replica", "id"} for the next start (schema 6)
    expanding     INTEGER          -- bytes an expand in progress grows it to (schema 8)
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
    failed_since REAL,             -- see the module docstring; NULL: not failed (schema 2)
    node        TEXT,              -- the node it lives on; NULL: this host (schema 4)
    moving      TEXT               -- JSON of records.MoveTarget; NULL: not moving (schema 7)
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
CREATE TABLE IF NOT EXISTS shares (
    volume      TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
    options     TEXT NOT NULL,     -- JSON of blockhorn.sharemgr.config.share_options()
    pid         INTEGER,           -- the share manager process
    create_time REAL,
    restarts    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS share_records (
    volume      TEXT PRIMARY KEY REFERENCES volumes(name) ON DELETE CASCADE,
    records     TEXT NOT NULL      -- JSON of sharemgr.ganesha.snapshot_records()
);
CREATE TABLE IF NOT EXISTS nodes (
    name        TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    schedulable INTEGER NOT NULL DEFAULT 1,
    zone        TEXT,
    tags        TEXT NOT NULL DEFAULT '[]',   -- JSON list
    heartbeat   REAL                          -- unix time its daemon last said it is alive
);
CREATE TABLE IF NOT EXISTS disks (
    node        TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    path        TEXT NOT NULL,
    tags        TEXT NOT NULL DEFAULT '[]',   -- JSON list
    reserved    INTEGER NOT NULL DEFAULT 0,   -- bytes
    schedulable INTEGER NOT NULL DEFAULT 1,
    capacity    INTEGER NOT NULL DEFAULT 0,   -- bytes, as last measured on its node
    available   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node, path)
);
CREATE TABLE IF NOT EXISTS backup_targets (
    name            TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    credential_file TEXT,
    mount           TEXT,
    created         TEXT NOT NULL
);
"""

# Columns added after schema 1, with their declarations: an old home gets them on open.
_ADDED_COLUMNS = {"volumes": [("groups", "TEXT"), ("standby", "TEXT"), ("node", "TEXT"),
                              ("fresh", "INTEGER"), ("node_selector", "TEXT"),
                              ("disk_selector", "TEXT"), ("salvage", "TEXT"),
                              ("expanding", "INTEGER")],
                  "replicas": [("failed_since", "REAL"), ("node", "TEXT"), ("moving", "TEXT")]}


def _proc(row: sqlite3.Row) -> ProcessRecord | None:
    if row["pid"] is None:
        return None
    return ProcessRecord(int(row["pid"]), float(row["create_time"] or 0.0))


_ANY = object()   # _update_volume: no expectation about the volume's node

def _volume(row: sqlite3.Row) -> VolumeRow:
    att = row["attachment"]
    return VolumeRow(row["name"], row["size"], row["replica_count"], row["access_mode"],
                     row["desired"], row["frontend"], json.loads(att) if att else None,
                     row["robustness"], row["message"], row["tcp_port"], row["created"],
                     bool(row["device_stale"]), json.loads(row["groups"] or "[]"),
                     json.loads(row["standby"]) if row["standby"] else None, row["node"],
                     bool(row["fresh"]), json.loads(row["node_selector"] or "[]"),
                     json.loads(row["disk_selector"] or "[]"),
                     salvage=json.loads(row["salvage"]) if row["salvage"] else None,
                     expanding=row["expanding"])


def _node(r: sqlite3.Row) -> NodeRow:
    return NodeRow(r["name"], r["address"], bool(r["schedulable"]), r["zone"],
                   json.loads(r["tags"]), r["heartbeat"])


def _job(r: sqlite3.Row) -> JobRow:
    return JobRow(r["name"], json.loads(r["spec"]), r["created"], r["last_slot"], r["runs"],
                  r["failures"])


def _run(r: sqlite3.Row) -> RunRow:
    return RunRow(r["id"], r["job"], r["slot"], r["started"], r["finished"], r["state"],
                  r["message"], json.loads(r["result"]) if r["result"] else None)


def _replica(row: sqlite3.Row) -> ReplicaRow:
    return ReplicaRow(row["name"], row["volume"], row["idx"], row["directory"],
                      row["address"], _proc(row), row["restarts"], row["failed_since"],
                      row["node"],
                      MoveTarget.from_dict(json.loads(row["moving"]) if row["moving"] else None))


class SqliteStore:
    """The StateStore in one SQLite file. Used from several threads (API requests run
    lifecycle steps in worker threads; the supervisor has its own): every call opens its own
    connection, which SQLite makes cheap, so no connection is ever shared between threads."""

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

    def close(self) -> None:
        pass   # no connection outlives a call

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None] | None:
        return None   # one daemon makes every change: nothing to hear of

    # --- scheduling: the mark is a counter in `meta`, moved in the same transaction ---------

    def schedule_mark(self) -> int:
        with self.tx() as db:
            return _mark(db)

    def reserve_expand(self, name: str, size: int, guard: int | None = None,
                       node: str | None = None) -> None:
        with self.tx() as db:
            _promise(db, guard, f"expand {name}")
            if db.execute("UPDATE volumes SET expanding=? WHERE name=?",
                          (size, name)).rowcount == 0:
                raise NotFound(f"volume {name!r} does not exist")

    def end_expand(self, name: str, size: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE volumes SET expanding=NULL WHERE name=? AND expanding=?",
                       (name, size))

    def end_expands_of(self, node: str | None) -> list[str]:
        # One host, one daemon (its home's lock): every promise is that daemon's.
        with self.tx() as db:
            names = [r[0] for r in db.execute(
                "SELECT name FROM volumes WHERE expanding IS NOT NULL ORDER BY name")]
            db.execute("UPDATE volumes SET expanding=NULL WHERE expanding IS NOT NULL")
        return names

    def add_volume(self, name: str, size: int, replicas: list[NewReplica],
                   engine: tuple[str, str], is_free: Callable[[int], bool],
                   guard: int | None = None) -> VolumeRow:
        created = now_rfc3339()
        with self.tx() as db:
            _promise(db, guard, f"create volume {name}")
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"volume {name!r} already exists")
            db.execute("INSERT INTO volumes (name, size, replica_count, created, fresh) "
                       "VALUES (?, ?, ?, ?, 1)", (name, size, len(replicas), created))
            for idx, rep in enumerate(replicas):
                rname, directory, address, node = unpack_new(rep)
                host = port_host(address)
                if host is not None:
                    address = f"{host}:{_allocate(db, name, rname, is_free)}"
                db.execute("INSERT INTO replicas (name, volume, idx, directory, address, node) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (rname, name, idx, directory, address, node))
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
        self._update_volume(name, _ANY, fields)

    def _update_volume(self, name: str, expect: object, fields: dict[str, Any],
                       clear_engine: bool = False, detached: bool = False) -> None:
        if not fields or set(fields) - VOLUME_FIELDS:
            raise ValueError(f"cannot update volume fields {sorted(set(fields) - VOLUME_FIELDS)}")
        for k in ("attachment", "groups", "standby", "node_selector", "disk_selector",
                  "salvage"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k], sort_keys=True)
        sets = ", ".join(f"{k}=?" for k in fields)
        values = list(fields.values())
        if "size" in fields:   # an expand's reservation is the size itself once it reaches it
            sets += ", expanding=CASE WHEN expanding <= ? THEN NULL ELSE expanding END"
            values.append(fields["size"])
        with self.tx() as db:
            if "size" in fields:   # a size grown promises room: the mark moves with it
                row = db.execute("SELECT size FROM volumes WHERE name=?", (name,)).fetchone()
                if row is not None and fields["size"] > row["size"]:
                    _promise(db, None, f"expand {name}")
            if expect is not _ANY:
                row = db.execute("SELECT node, desired FROM volumes WHERE name=?",
                                 (name,)).fetchone()
                if row is not None and row["node"] != expect:
                    raise Busy(f"volume {name!r} is now attached on node {row['node']}, not "
                               f"{expect}: someone else moved it")
                if row is not None and detached and row["desired"] == "attached":
                    raise Busy(f"volume {name!r} was attached on node {row['node']} meanwhile")
            cur = db.execute(f"UPDATE volumes SET {sets} WHERE name=?", (*values, name))
            if cur.rowcount == 0:
                raise NotFound(f"volume {name!r} does not exist")
            if clear_engine:
                db.execute("UPDATE engines SET pid=NULL, create_time=NULL WHERE volume=?",
                           (name,))

    def claim_attachment(self, name: str, node: str | None, expect: str | None,
                         *, detached: bool = False, **fields: Any) -> int:
        # Check, change and the engine record cleared: one transaction.
        self._update_volume(name, expect, {**fields, "node": node}, clear_engine=True,
                            detached=detached)
        return 0

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

    def all_replicas(self) -> list[ReplicaRow]:
        with self.tx() as db:
            return [_replica(r) for r in db.execute("SELECT * FROM replicas ORDER BY volume, idx")]

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
        with self.tx() as db:
            _promise(db, None, f"replace replica {name}")
            db.execute("UPDATE replicas SET directory=?, failed_since=NULL WHERE name=?",
                       (directory, name))

    def move_replica(self, name: str, node: str, directory: str, address: str,
                     guard: int | None = None) -> None:
        with self.tx() as db:
            _promise(db, guard, f"move replica {name}")
            _drop_move_port(db, name)
            db.execute("UPDATE replicas SET node=?, directory=?, address=?, pid=NULL, "
                       "create_time=NULL, failed_since=NULL, moving=NULL WHERE name=?",
                       (node, directory, address, name))

    def _moving(self, db: sqlite3.Connection, name: str) -> MoveTarget | None:
        row = db.execute("SELECT moving FROM replicas WHERE name=?", (name,)).fetchone()
        return MoveTarget.from_dict(json.loads(row["moving"])) if row and row["moving"] \
            else None

    def start_move(self, name: str, node: str, directory: str, address: str,
                   guard: int | None = None) -> None:
        with self.tx() as db:
            _promise(db, guard, f"move replica {name}")
            cur = self._moving(db, name)
            if cur is not None:
                if (cur.node, cur.directory, cur.address) == (node, directory, address) \
                        and cur.give_up is None:
                    return
                if cur.give_up is not None:
                    raise Busy(f"replica {name}: its move to node {cur.node} is being given "
                               f"up ({cur.give_up}): try again once it is")
                raise Busy(f"replica {name} is being moved to node {cur.node} already")
            target = MoveTarget(node, directory, address, None, time.time())
            db.execute("UPDATE replicas SET moving=? WHERE name=?",
                       (json.dumps(target.to_dict(), sort_keys=True), name))

    def set_move_process(self, name: str, proc: ProcessRecord | None) -> None:
        with self.tx() as db:
            cur = self._moving(db, name)
            if cur is not None:
                cur.process = proc
                db.execute("UPDATE replicas SET moving=? WHERE name=?",
                           (json.dumps(cur.to_dict(), sort_keys=True), name))

    def give_up_move(self, name: str, reason: str) -> None:
        with self.tx() as db:
            cur = self._moving(db, name)
            if cur is not None and cur.give_up is None:
                cur.give_up = reason
                db.execute("UPDATE replicas SET moving=? WHERE name=?",
                           (json.dumps(cur.to_dict(), sort_keys=True), name))

    def finish_move(self, name: str) -> None:
        with self.tx() as db:
            cur = self._moving(db, name)
            if cur is None:
                return
            pid, ct = (cur.process.pid, cur.process.create_time) if cur.process else (None, None)
            db.execute("UPDATE replicas SET node=?, directory=?, address=?, pid=?, "
                       "create_time=?, failed_since=NULL, moving=NULL WHERE name=?",
                       (cur.node, cur.directory, cur.address, pid, ct, name))
            # The target's port is the replica's now; the old one's is free.
            db.execute("DELETE FROM ports WHERE owner=?", (name,))
            db.execute("UPDATE ports SET owner=? WHERE owner=?", (name, move_port_owner(name)))

    def cancel_move(self, name: str) -> None:
        with self.tx() as db:
            _drop_move_port(db, name)
            db.execute("UPDATE replicas SET moving=NULL WHERE name=?", (name,))

    def leftovers(self, node: str) -> list[LeftoverRow]:
        return []   # one host: `volume rm` removes every replica directory itself

    def forget_leftover(self, row: LeftoverRow) -> None:
        return None

    def engine(self, volume: str) -> EngineRow:
        with self.tx() as db:
            row = db.execute("SELECT * FROM engines WHERE volume=?", (volume,)).fetchone()
        if row is None:
            raise NotFound(f"volume {volume!r} has no engine record")
        return EngineRow(row["volume"], row["nbd_socket"], row["control_socket"], _proc(row),
                         row["restarts"])

    def set_engine_sockets(self, volume: str, nbd_socket: str, control_socket: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE engines SET nbd_socket=?, control_socket=? WHERE volume=?",
                       (nbd_socket, control_socket, volume))

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
        with self.tx() as db:
            return _allocate(db, volume, owner, is_free)

    def ports(self, volume: str) -> dict[str, int]:
        with self.tx() as db:
            rows = db.execute("SELECT owner, port FROM ports WHERE volume=?", (volume,))
            return {r["owner"]: r["port"] for r in rows}

    # --- shares ----------------------------------------------------------------------------

    def add_share(self, volume: str, options: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO shares (volume, options) VALUES (?, ?)",
                       (volume, json.dumps(options, sort_keys=True)))

    def share(self, volume: str) -> ShareRow:
        with self.tx() as db:
            row = db.execute("SELECT * FROM shares WHERE volume=?", (volume,)).fetchone()
        if row is None:
            raise NotFound(f"volume {volume!r} has no share settings")
        return ShareRow(volume, json.loads(row["options"]), _proc(row), row["restarts"])

    def set_share_process(self, volume: str, proc: ProcessRecord | None,
                          restarted: bool = False) -> None:
        pid, ct = (proc.pid, proc.create_time) if proc else (None, None)
        with self.tx() as db:
            db.execute("UPDATE shares SET pid=?, create_time=?, restarts=restarts+? "
                       "WHERE volume=?", (pid, ct, int(restarted), volume))

    def share_records(self, volume: str) -> dict[str, Any] | None:
        with self.tx() as db:
            row = db.execute("SELECT records FROM share_records WHERE volume=?",
                             (volume,)).fetchone()
        return json.loads(row["records"]) if row is not None else None

    def put_share_records(self, volume: str, records: dict[str, Any] | None,
                          epoch: int) -> bool:
        if epoch != 0:
            return False   # one host never moves a volume: its epoch stays 0
        with self.tx() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (volume,)).fetchone() is None:
                return False
            if records is None:
                db.execute("DELETE FROM share_records WHERE volume=?", (volume,))
            else:
                db.execute("INSERT OR REPLACE INTO share_records (volume, records) "
                           "VALUES (?, ?)", (volume, json.dumps(records, sort_keys=True)))
        return True

    # --- jobs ------------------------------------------------------------------------------

    def add_job(self, name: str, spec: dict[str, Any], now: float) -> JobRow:
        with self.tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"job {name!r} already exists")
            db.execute("INSERT INTO jobs (name, spec, created, last_slot) VALUES (?, ?, ?, ?)",
                       (name, json.dumps(spec, sort_keys=True), now, now))
        return self.job(name)

    def job(self, name: str) -> JobRow:
        with self.tx() as db:
            r = db.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
        if r is None:
            raise NotFound(f"job {name!r} does not exist")
        return _job(r)

    def jobs(self) -> list[JobRow]:
        with self.tx() as db:
            return [_job(r) for r in db.execute("SELECT * FROM jobs ORDER BY name")]

    def remove_job(self, name: str) -> None:
        with self.tx() as db:   # its runs go by ON DELETE CASCADE
            if db.execute("DELETE FROM jobs WHERE name=?", (name,)).rowcount == 0:
                raise NotFound(f"job {name!r} does not exist")

    def start_run(self, name: str, slot: float | None, now: float, state: str,
                  message: str | None, keep: int, node: str = "") -> int:
        with self.tx() as db:
            if slot is not None:
                row = db.execute("SELECT last_slot FROM jobs WHERE name=?", (name,)).fetchone()
                if row is not None and row["last_slot"] >= slot:
                    raise SlotTaken(f"job {name}: slot {slot} was claimed already")
                db.execute("UPDATE jobs SET last_slot=? WHERE name=?", (slot, name))
            cur = db.execute("INSERT INTO job_runs (job, slot, started, state, message, "
                             "finished) VALUES (?, ?, ?, ?, ?, ?)",
                             (name, slot, now, state, message,
                              None if state == "running" else now))
            db.execute("DELETE FROM job_runs WHERE job=? AND id NOT IN (SELECT id FROM job_runs "
                       "WHERE job=? ORDER BY id DESC LIMIT ?)", (name, name, keep))
            return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, state: str, message: str | None,
                   result: dict[str, Any] | None, now: float) -> None:
        with self.tx() as db:
            r = db.execute("SELECT job FROM job_runs WHERE id=?", (run_id,)).fetchone()
            if r is None:
                return   # the job was removed while it ran
            db.execute("UPDATE job_runs SET state=?, message=?, result=?, finished=? WHERE id=?",
                       (state, message, json.dumps(result, sort_keys=True) if result else None,
                        now, run_id))
            db.execute("UPDATE jobs SET runs=runs+1, failures=failures+? WHERE name=?",
                       (int(state == "failed"), r["job"]))

    def interrupt_running(self, now: float, node: str = "") -> int:
        with self.tx() as db:
            cur = db.execute("UPDATE job_runs SET state='interrupted', finished=?, message="
                             "'the daemon stopped during the run' WHERE state='running'", (now,))
            return cur.rowcount

    def job_runs(self, name: str, limit: int) -> list[RunRow]:
        with self.tx() as db:
            rows = db.execute("SELECT * FROM job_runs WHERE job=? ORDER BY id DESC LIMIT ?",
                              (name, limit)).fetchall()
        return [_run(r) for r in rows]

    def job_run(self, run_id: int) -> RunRow | None:
        with self.tx() as db:
            r = db.execute("SELECT * FROM job_runs WHERE id=?", (run_id,)).fetchone()
        return None if r is None else _run(r)

    # --- nodes and disks -------------------------------------------------------------------

    def put_node(self, row: NodeRow) -> bool:
        with self.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO nodes VALUES (?, ?, ?, ?, ?, ?)",
                             (row.name, row.address, int(row.schedulable), row.zone,
                              json.dumps(row.tags), row.heartbeat))
            return cur.rowcount > 0

    def node(self, name: str) -> NodeRow:
        with self.tx() as db:
            r = db.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        if r is None:
            raise NotFound(f"node {name!r} does not exist (see `blockhorn node ls`)")
        return _node(r)

    def nodes(self) -> list[NodeRow]:
        with self.tx() as db:
            return [_node(r) for r in db.execute("SELECT * FROM nodes ORDER BY name")]

    def update_node(self, name: str, **fields: Any) -> None:
        self._update("nodes", NODE_FIELDS, "name=?", (name,), fields,
                     f"node {name!r} does not exist (see `blockhorn node ls`)")

    def node_alive(self, name: str, ttl_s: int) -> None:
        self.update_node(name, heartbeat=time.time())

    def shared_key(self, candidate: bytes) -> bytes:
        return candidate   # one host: the home's key file is the only copy

    def try_lead(self, node: str, ttl_s: int) -> str | None:
        return node        # one host, one daemon (the home's lock): it leads

    def live_nodes(self, ttl_s: int) -> set[str]:
        with self.tx() as db:   # one host, one clock: a heartbeat time is enough
            return {r["name"] for r in db.execute("SELECT name FROM nodes WHERE heartbeat > ?",
                                                  (time.time() - ttl_s,))}

    def add_disk(self, row: DiskRow) -> None:
        with self.tx() as db:
            if not db.execute("SELECT 1 FROM nodes WHERE name=?", (row.node,)).fetchone():
                raise NotFound(f"node {row.node!r} does not exist (see `blockhorn node ls`)")
            if db.execute("SELECT 1 FROM disks WHERE node=? AND path=?",
                          (row.node, row.path)).fetchone():
                raise AlreadyExists(f"disk {row.path} of node {row.node} is registered already")
            db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (row.node, row.path, json.dumps(row.tags), row.reserved,
                        int(row.schedulable), row.capacity, row.available))

    def disks(self, node: str | None = None) -> list[DiskRow]:
        with self.tx() as db:
            rows = db.execute("SELECT * FROM disks WHERE ? IS NULL OR node=? ORDER BY node, path",
                              (node, node)).fetchall()
        return [DiskRow(r["node"], r["path"], json.loads(r["tags"]), r["reserved"],
                        bool(r["schedulable"]), r["capacity"], r["available"]) for r in rows]

    def update_disk(self, node: str, path: str, **fields: Any) -> None:
        self._update("disks", DISK_FIELDS, "node=? AND path=?", (node, path), fields,
                     f"node {node!r} has no disk {path}")

    def remove_disk(self, node: str, path: str) -> None:
        with self.tx() as db:
            if db.execute("DELETE FROM disks WHERE node=? AND path=?",
                          (node, path)).rowcount == 0:
                raise NotFound(f"node {node!r} has no disk {path}")

    def _update(self, table: str, allowed: frozenset[str], where: str, key: tuple[Any, ...],
                fields: dict[str, Any], missing: str) -> None:
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {table} fields {sorted(set(fields) - allowed)}")
        values = [json.dumps(v) if k == "tags" else int(v) if isinstance(v, bool) else v
                  for k, v in fields.items()]
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            if db.execute(f"UPDATE {table} SET {sets} WHERE {where}",
                          (*values, *key)).rowcount == 0:
                raise NotFound(missing)

    # --- backup targets --------------------------------------------------------------------

    def put_backup_target(self, row: BackupTargetRow) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO backup_targets VALUES (?, ?, ?, ?, ?)",
                       (row.name, row.url, row.credential_file, row.mount, row.created))

    def backup_targets(self) -> list[BackupTargetRow]:
        with self.tx() as db:
            rows = db.execute("SELECT * FROM backup_targets ORDER BY name").fetchall()
        return [BackupTargetRow(r["name"], r["url"], r["credential_file"], r["mount"],
                                r["created"]) for r in rows]

    def delete_backup_target(self, name: str) -> bool:
        with self.tx() as db:
            return db.execute("DELETE FROM backup_targets WHERE name=?", (name,)).rowcount > 0


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


def _mark(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key='schedule_mark'").fetchone()
    return int(row[0]) if row else 0


def _promise(db: sqlite3.Connection, guard: int | None, what: str) -> None:
    """Move the scheduling mark in transaction `db`; Stale (the transaction rolls back) when
    `guard` is given and the mark moved since. BEGIN IMMEDIATE makes the check and the
    change one step against every other writer, this process's threads included."""
    mark = _mark(db)
    if guard is not None and mark != guard:
        raise Stale(f"{what}: the disks' promised room changed since it was decided")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schedule_mark', ?)", (str(mark + 1),))


def _drop_move_port(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM ports WHERE owner=?", (move_port_owner(name),))


def _allocate(db: sqlite3.Connection, volume: str, owner: str,
              is_free: Callable[[int], bool]) -> int:
    port = pick_port({r[0] for r in db.execute("SELECT port FROM ports")}, is_free, owner)
    db.execute("DELETE FROM ports WHERE owner=? AND volume=?", (owner, volume))
    db.execute("INSERT INTO ports VALUES (?, ?, ?)", (port, volume, owner))
    return port
