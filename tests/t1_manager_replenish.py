"""Replenishment's pieces without processes: which disk a replacement goes to, moving a failed
replica's directory aside, and the failure time in the state store (kept across a daemon
restart, migrated into a version-1 store)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from blockhorn.control.store import ReplicaRow, SqliteStore
from blockhorn.control.store.sqlite import SCHEMA_VERSION
from blockhorn.manager.replenish import disk_of, move_aside, pick_disk
from blockhorn.types import BlockhornError


def row(name: str, directory: str) -> ReplicaRow:
    return ReplicaRow(name, "v", 0, directory, "unix:/x", None)


def test_disk_of_reads_the_layout(tmp_path: object) -> None:
    assert disk_of("/data/d1/replicas/v/v-r0") == "/data/d1"
    assert disk_of("/data/d1/replicas/v/v-r0/") == "/data/d1"
    assert disk_of("/elsewhere/v-r0") is None      # a hand-made directory: no disk known


def test_pick_disk_takes_a_disk_no_replica_uses(tmp_path: object) -> None:
    root = str(tmp_path)
    home = os.path.join(root, "home")
    disks = [os.path.join(root, f"d{i}") for i in range(3)]
    for d in disks + [home]:
        os.makedirs(d)
    reps = [row(f"v-r{i}", os.path.join(d, "replicas", "v", f"v-r{i}"))
            for i, d in enumerate(disks)]
    assert pick_disk(home, reps) == home
    # Once replaced into the home, d1 is no disk of the volume any more (a disk where a replica
    # failed is not sought out again), and every remaining one holds a replica.
    reps[1] = row("v-r1", os.path.join(home, "replicas", "v", "v-r1"))
    with pytest.raises(BlockhornError, match="no free disk"):
        pick_disk(home, reps)
    # Every disk holds a replica (all in the home, the default): nothing to replace onto.
    same = [row(f"v-r{i}", os.path.join(home, "replicas", "v", f"v-r{i}")) for i in range(2)]
    with pytest.raises(BlockhornError, match="no free disk") as e:
        pick_disk(home, same)
    assert e.value.errno == 28   # ENOSPC


def test_pick_disk_skips_a_disk_that_is_gone(tmp_path: object) -> None:
    home = os.path.join(str(tmp_path), "home")
    gone = os.path.join(str(tmp_path), "gone")
    os.makedirs(home)
    reps = [row("v-r0", os.path.join(home, "replicas", "v", "v-r0"))]
    with pytest.raises(BlockhornError, match="no free disk"):
        pick_disk(home, reps)
    reps = [row("v-r0", os.path.join(gone, "replicas", "v", "v-r0"))]
    assert pick_disk(home, reps) == home


def test_move_aside_keeps_everything(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "v-r1")
    assert move_aside(d) is None          # nothing there
    os.makedirs(d)
    open(os.path.join(d, "volume-head-000.img"), "w").close()
    first = move_aside(d)
    assert first and first.startswith(d + ".replaced-") and not os.path.exists(d)
    assert os.listdir(first) == ["volume-head-000.img"]
    with open(d, "w") as f:              # a file where the directory was: moved the same way
        f.write("x")
    second = move_aside(d)
    assert second and second != first and open(second).read() == "x"


def test_failed_since_keeps_the_first_failure_and_survives_a_new_store(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "state.db")
    store = SqliteStore(path)
    store.add_volume("v", 4096, [("v-r0", "/d/replicas/v/v-r0", "unix:/a"),
                                 ("v-r1", "/e/replicas/v/v-r1", "unix:/b")],
                     ("/n", "/c"), is_free=lambda p: True)
    assert [r.failed_since for r in store.replicas("v")] == [None, None]
    store.set_replica_failed_since("v-r1", 100.0)
    store.set_replica_failed_since("v-r1", 200.0)     # later sightings keep the first
    assert SqliteStore(path).replicas("v")[1].failed_since == 100.0
    store.set_replica_directory("v-r1", "/f/replicas/v/v-r1")
    r1 = SqliteStore(path).replicas("v")[1]
    assert r1.directory == "/f/replicas/v/v-r1" and r1.failed_since is None
    store.set_replica_failed_since("v-r0", 5.0)
    store.set_replica_failed_since("v-r1", 6.0)
    store.clear_failed("v")
    assert [r.failed_since for r in store.replicas("v")] == [None, None]


def test_version1_store_gains_failed_since(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "state.db")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE volumes (name TEXT PRIMARY KEY, size INTEGER NOT NULL,
            replica_count INTEGER NOT NULL, access_mode TEXT NOT NULL DEFAULT 'rwo',
            desired TEXT NOT NULL DEFAULT 'detached', frontend TEXT, attachment TEXT,
            robustness TEXT, message TEXT, tcp_port INTEGER,
            device_stale INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
        CREATE TABLE replicas (name TEXT PRIMARY KEY, volume TEXT NOT NULL, idx INTEGER NOT NULL,
            directory TEXT NOT NULL, address TEXT NOT NULL, pid INTEGER, create_time REAL,
            restarts INTEGER NOT NULL DEFAULT 0);
        INSERT INTO volumes (name, size, replica_count, created) VALUES ('v', 4096, 1, 'now');
        INSERT INTO replicas (name, volume, idx, directory, address)
            VALUES ('v-r0', 'v', 0, '/d', 'unix:/a');
    """)
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert store.replicas("v")[0].failed_since is None
    assert store.replicas("v")[0].moving is None        # schema 7's column, added
    store.set_replica_failed_since("v-r0", 7.0)
    assert SqliteStore(path).replicas("v")[0].failed_since == 7.0
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
