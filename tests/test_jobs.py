"""Whole system: recurring jobs through the CLI and the daemon (schedules, retain, groups,
failures, a run missed while the daemon was down), with data written and read over NBD."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import nbd
import pytest
from daemon_util import Env, wait_until

from blockhorn.control.store import SqliteStore
from blockhorn.control.store.sqlite import SCHEMA_VERSION
from blockhorn.manager.client import Client
from blockhorn.manager.jobs import latest_slot
from blockhorn.replica.store import Replica

MiB = 1 << 20


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def api(env: Env, method: str, path: str) -> Any:
    """The daemon's REST API (reads that need no CLI process start: polls stay cheap)."""
    with Client(env.home) as c:
        return c.request(method, path)


def jobs(env: Env) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in api(env, "GET", "/jobs")["jobs"]}


def job_snaps(env: Env, vol: str, job: str) -> list[str]:
    snaps = api(env, "GET", f"/volumes/{vol}/snapshots")["snapshots"]
    return [s["name"] for s in snaps if s["labels"].get("RecurringJob") == job]


def nbd_io(uri: str, write: bytes | None = None, offset: int = 0, length: int = 0) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        if write is not None:
            h.pwrite(write, offset)
            h.flush()
            return b""
        return bytes(h.pread(length, offset))
    finally:
        h.shutdown()


def test_job_errors_retain_groups_and_failures(env: Env) -> None:
    # Bad input: clear errors, exit 2, no daemon started for what the CLI can check itself.
    for args, words in [(["--cron", "61 * * * *"], "invalid cron"),
                        (["--cron", "* * *"], "3 fields"),
                        (["--cron", "0 * * * *", "--retain", "0"], "retain")]:
        argv = ["job", "create", "j", "--task", "snapshot", "--volume", "v1", *args]
        if "--retain" not in args:
            argv += ["--retain", "2"]
        r = env.cli(*argv, check=False)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert env.daemon_pid() is None

    env.cli("volume", "create", "v1", "--size", "8MiB", "--replicas", "2")
    env.cli("volume", "create", "v2", "--size", "8MiB", "--replicas", "1")
    r = env.cli("job", "create", "j", "--cron", "0 * * * *", "--task", "snapshot",
                "--retain", "2", "--volume", "nope", check=False)
    assert r.returncode == 1 and "'nope' does not exist" in r.stderr
    r = env.cli("job", "create", "j", "--cron", "0 * * * *", "--task", "snapshot",
                "--retain", "2", "--volume", "v1", "--target", "t", check=False)
    assert r.returncode == 2 and "backup jobs" in r.stderr

    # A snapshot job on an attached volume: retain keeps the newest 2 of its 3 snapshots, a
    # user snapshot is never touched, and the data is what was written last.
    uri = env.cli("volume", "attach", "v1", "--frontend", "none").stdout.strip()
    env.cli("snapshot", "create", "v1", "mine")
    env.cli("job", "create", "hourly", "--cron", "0 * * * *", "--task", "snapshot",
            "--retain", "2", "--volume", "v1")
    r = env.cli("job", "create", "hourly", "--cron", "0 * * * *", "--task", "snapshot",
                "--retain", "2", "--volume", "v1", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    made = []
    for i in range(3):
        nbd_io(uri, bytes([i + 1]) * MiB, i * MiB)
        run = json.loads(env.cli("job", "run", "hourly", "--json").stdout)
        assert run["state"] == "ok", run
        made.append(run["result"]["volumes"]["v1"]["snapshot"])
    assert job_snaps(env, "v1", "hourly") == made[1:]
    assert "mine" in json.dumps(json.loads(env.cli("snapshot", "ls", "v1", "--json").stdout))
    expected = b"".join(bytes([i + 1]) * MiB for i in range(3)) + bytes(5 * MiB)
    got = nbd_io(uri, length=8 * MiB)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()

    j = {j["name"]: j for j in json.loads(env.cli("job", "ls", "--json").stdout)}["hourly"]
    assert "hourly" in env.cli("job", "ls").stdout
    assert j["runs"] == 3 and j["failures"] == 0 and j["last_run"]["state"] == "ok"
    assert j["next_run"] == time.strftime("%Y-%m-%dT%H:00:00Z",
                                          time.gmtime(latest_slot("0 * * * *", time.time())
                                                      + 3600))

    # A group job: only the group's volumes.
    assert env.cli("volume", "group", "v2", "--add", "g").stdout.strip() == "g"
    env.cli("job", "create", "grp", "--cron", "30 2 * * *", "--task", "snapshot",
            "--retain", "1", "--group", "g")
    env.cli("job", "run", "grp")
    started = json.loads(env.cli("job", "run", "grp", "--no-wait", "--json").stdout)
    # Returned at once: still running, or (a fast snapshot) already done.
    assert started["job"] == "grp"
    assert (started["state"], started["finished"] is None) in {("running", True), ("ok", False)}
    wait_until(lambda: jobs(env)["grp"]["runs"] == 2 and not jobs(env)["grp"]["running"], 20,
               "the run started with --no-wait")
    assert len(job_snaps(env, "v2", "grp")) == 1 and job_snaps(env, "v1", "grp") == []
    assert env.show("v2")["groups"] == ["g"]
    # The group 'default' also takes the volumes in no group (Longhorn's rule).
    env.cli("job", "create", "dflt", "--cron", "0 5 * * *", "--task", "snapshot",
            "--retain", "1", "--group", "default")
    env.cli("job", "run", "dflt")
    assert len(job_snaps(env, "v1", "dflt")) == 1 and job_snaps(env, "v2", "dflt") == []
    env.cli("job", "rm", "dflt")

    # snapshot-cleanup: an existing job's snapshots keep that job's retain (2); once the job
    # is removed its snapshots keep the cleanup's (1); user snapshots always stay.
    env.cli("job", "create", "clean", "--cron", "0 4 * * 0", "--task", "snapshot-cleanup",
            "--retain", "1", "--volume", "v1")
    assert "ok" in env.cli("job", "run", "clean").stdout
    assert job_snaps(env, "v1", "hourly") == made[1:]
    env.cli("job", "rm", "hourly")
    assert "ok" in env.cli("job", "run", "clean").stdout
    assert job_snaps(env, "v1", "hourly") == made[2:]
    assert "mine" in [s["name"] for s in json.loads(env.cli("snapshot", "ls", "v1",
                                                            "--json").stdout)]
    got = nbd_io(uri, length=8 * MiB)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()

    # A failure is recorded with its message; the CLI exits 1 and `job ls` counts it.
    env.cli("volume", "rm", "v2")
    r = env.cli("job", "run", "grp", check=False)
    assert r.returncode == 0 and "no volume is in group 'g'" in r.stdout
    env.cli("job", "create", "gone", "--cron", "0 * * * *", "--task", "snapshot",
            "--retain", "1", "--volume", "v1")
    env.cli("volume", "rm", "v1", "--force")
    r = env.cli("job", "run", "gone", check=False)
    assert r.returncode == 1 and "failed: volume 'v1' does not exist" in r.stdout
    j = jobs(env)["gone"]
    assert j["failures"] == 1 and j["last_run"]["state"] == "failed"
    assert "does not exist" in j["last_run"]["message"]
    shown = env.cli("job", "show", "gone").stdout
    assert "failed" in shown and "does not exist" in shown
    env.cli("job", "rm", "gone")
    assert "gone" not in jobs(env)
    r = env.cli("job", "run", "gone", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_backup_job_retains_its_backups_and_records_a_failure(env: Env) -> None:
    env.env["BLOCKHORN_BACKUP_LOCK_WAIT_S"] = "0.05"   # Longhorn's 2 s lock wait: one host here
    store = os.path.join(env.root, "store")
    os.makedirs(store)
    env.cli("volume", "create", "vol", "--size", "8MiB", "--replicas", "1")
    backup_job = ["job", "create", "b", "--cron", "0 1 * * *", "--task", "backup",
                  "--retain", "2", "--volume", "vol"]
    r = env.cli(*backup_job, check=False)
    assert r.returncode == 2 and "backup target set" in r.stderr, r.stderr
    env.cli("backup", "target", "set", "t", f"file://{store}")
    r = env.cli(*backup_job, "--target", "nope", check=False)
    assert r.returncode == 1 and "'nope'" in r.stderr
    env.cli(*backup_job)
    assert jobs(env)["b"]["target"] == "t"   # the default target, fixed when created

    uri = env.cli("volume", "attach", "vol", "--frontend", "none").stdout.strip()
    model = bytearray(8 * MiB)
    runs = []
    for i in range(3):
        data = os.urandom(MiB)
        nbd_io(uri, data, 2 * i * MiB)
        model[2 * i * MiB:(2 * i + 1) * MiB] = data
        run = json.loads(env.cli("job", "run", "b", "--json").stdout)
        assert run["state"] == "ok", run
        runs.append(run["result"]["volumes"]["vol"])
    assert runs[2]["deleted_backups"] == [runs[0]["backup"]]
    listed = json.loads(env.cli("backup", "ls", "vol", "--json").stdout)
    assert [b["name"] for b in listed if b["labels"].get("RecurringJob") == "b"] == \
        [r["backup"] for r in runs[1:]]
    assert job_snaps(env, "vol", "b") == [r["snapshot"] for r in runs[1:]]
    # Each was a backup job of the backup service like any other (progress in `backup jobs`).
    done = {j["snapshot"]: j for j in api(env, "GET", "/backups/jobs")["jobs"]}
    assert all(done[r["snapshot"]]["state"] == "complete" for r in runs)

    # The newest backup restores to what was written.
    env.cli("backup", "restore", runs[2]["url"], "r", "--replicas", "1")
    rep = Replica.open(env.show("r")["replicas"][0]["path"])
    try:
        assert hashlib.sha256(rep.read(0, 8 * MiB)).hexdigest() == \
            hashlib.sha256(model).hexdigest()
    finally:
        rep.close()

    # The target's directory gone (a file in its place): the run fails and says why.
    shutil.rmtree(store)
    open(store, "w").close()
    r = env.cli("job", "run", "b", check=False)
    assert r.returncode == 1 and "job b: failed: vol: " in r.stdout, r.stdout
    j = jobs(env)["b"]
    assert j["failures"] == 1 and j["runs"] == 4 and j["last_run"]["state"] == "failed"
    assert "internal error" not in j["last_run"]["message"]


def test_job_runs_on_its_schedule_and_retains(env: Env) -> None:
    """A real schedule (every 2 s, croniter's seconds field): the daemon runs it by itself."""
    env.cli("volume", "create", "v", "--size", "4MiB", "--replicas", "1")
    env.cli("job", "create", "fast", "--cron", "* * * * * */2", "--task", "snapshot",
            "--retain", "2", "--volume", "v")
    wait_until(lambda: jobs(env)["fast"]["runs"] >= 3, 30, "three scheduled runs")
    env.cli("job", "rm", "fast")
    wait_until(lambda: len(job_snaps(env, "v", "fast")) == 2, 10, "retain 2")


def test_missed_run_runs_once_when_the_daemon_starts(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "4MiB", "--replicas", "1")
    env.cli("job", "create", "h", "--cron", "0 * * * *", "--task", "snapshot", "--retain", "5",
            "--volume", "v")
    env.cli("daemon", "stop")
    # The daemon "was down" for 3.5 hours: three or four hourly slots passed without it.
    db = sqlite3.connect(env.home.db)
    db.execute("UPDATE jobs SET last_slot=? WHERE name='h'", (time.time() - 3.5 * 3600,))
    db.commit()
    db.close()
    env.cli("job", "ls")   # starts the daemon
    j = wait_until(lambda: (lambda j: j if j["runs"] >= 1 and not j["running"] else None)(
        jobs(env)["h"]), 20, "the missed run")
    assert j["runs"] == 1 and j["last_run"]["state"] == "ok"
    slot = latest_slot("0 * * * *", time.time())
    assert j["last_run"]["slot"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot))
    assert j["next_run"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot + 3600))
    assert len(job_snaps(env, "v", "h")) == 1


def test_old_home_is_migrated(tmp_path) -> None:
    """A schema-1 database (no groups/standby columns, no job tables) opens and works."""
    path = str(tmp_path / "state.db")
    SqliteStore(path)
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE volumes DROP COLUMN groups; ALTER TABLE volumes DROP COLUMN "
                     "standby; DROP TABLE job_runs; DROP TABLE jobs; "
                     "UPDATE meta SET value='1' WHERE key='schema_version';"
                     "INSERT INTO volumes (name, size, replica_count, created) "
                     "VALUES ('old', 4096, 1, '2026-01-01T00:00:00Z');")
    db.close()
    store = SqliteStore(path)
    vol = store.volume("old")
    assert vol.groups == [] and vol.standby is None
    store.update_volume("old", groups=["a"])
    assert store.volume("old").groups == ["a"]
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    db.close()
