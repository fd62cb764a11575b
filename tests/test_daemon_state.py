"""Units of the daemon's building blocks: the SQLite store, process records, sd_notify."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import psutil
import pytest

from blockhorn.control.store import PORT_RANGE, ProcessRecord, SqliteStore
from blockhorn.manager import process
from blockhorn.sdnotify import notify
from blockhorn.types import AlreadyExists, NotFound


def make(store: SqliteStore, name: str = "v", n: int = 2, free: object = None) -> None:
    reps: list[tuple[str, str, str | None]] = [(f"{name}-r{i}", f"/d/{name}/{i}", None)
                                              for i in range(n)]
    store.add_volume(name, 1 << 20, reps, (f"/run/{name}/nbd.sock", f"/run/{name}/c.sock"),
                     is_free=free or (lambda port: True))  # type: ignore[arg-type]


# --- store --------------------------------------------------------------------------------

def test_store_volume_roundtrip(tmp_path: object) -> None:
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    make(store)
    vol = store.volume("v")
    assert (vol.name, vol.size, vol.replica_count, vol.desired) == ("v", 1 << 20, 2, "detached")
    assert vol.attachment is None and vol.created.endswith("Z")
    reps = store.replicas("v")
    assert [r.name for r in reps] == ["v-r0", "v-r1"]
    assert all(r.address.startswith("127.0.0.1:") and r.process is None for r in reps)
    assert len({r.address for r in reps}) == 2
    store.update_volume("v", desired="attached", attachment={"device": "/dev/loop7"})
    assert store.volume("v").attachment == {"device": "/dev/loop7"}
    store.set_replica_process("v-r0", ProcessRecord(123, 45.5), restarted=True)
    r0 = store.replicas("v")[0]
    assert r0.process == ProcessRecord(123, 45.5) and r0.restarts == 1
    store.set_engine_process("v", ProcessRecord(9, 1.25))
    assert store.engine("v").process == ProcessRecord(9, 1.25)
    # A second SqliteStore on the same file (a restarted daemon) sees the same state.
    again = SqliteStore(store.path)
    assert again.volume("v").desired == "attached"
    assert [v.name for v in again.volumes()] == ["v"]


def test_store_is_wal_and_survives_reopen(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "db")
    SqliteStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_duplicate_and_missing(tmp_path: object) -> None:
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    make(store)
    with pytest.raises(AlreadyExists):
        make(store)
    for call in (lambda: store.volume("x"), lambda: store.delete_volume("x"),
                 lambda: store.update_volume("x", desired="attached"),
                 lambda: store.engine("x")):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(ValueError):
        store.update_volume("v", replica_count=5)   # fixed at creation


def test_store_delete_cascades(tmp_path: object) -> None:
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    make(store)
    assert len(store.ports("v")) == 2
    store.delete_volume("v")
    assert store.volumes() == [] and store.replicas("v") == [] and store.ports("v") == {}
    make(store)   # the name is free again


def test_store_failed_create_is_atomic(tmp_path: object) -> None:
    """A failure in the middle of add_volume leaves no volume, replica or port behind."""
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    with pytest.raises(sqlite3.IntegrityError):
        # Two replicas with the same name violate the primary key after ports were taken.
        store.add_volume("v", 4096, [("same", "/a", None), ("same", "/b", None)],
                         ("/n", "/c"), is_free=lambda p: True)
    assert store.volumes() == []
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM ports").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM replicas").fetchone()[0] == 0


def test_ports_unique_and_checked_free(tmp_path: object) -> None:
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    busy = set(range(PORT_RANGE[0], PORT_RANGE[1], 2))   # every other port is "in use"
    for i in range(20):
        make(store, f"v{i}", 3, free=lambda p: p not in busy)
    ports = [p for i in range(20) for p in store.ports(f"v{i}").values()]
    assert len(ports) == len(set(ports)) == 60
    assert not busy & set(ports)
    old = store.ports("v0")["v0-r0"]
    new = store.allocate_port("v0", "v0-r0", lambda p: p != old and p not in busy)
    assert new != old and store.ports("v0")["v0-r0"] == new


def test_store_concurrent_writers(tmp_path: object) -> None:
    """Threads (API requests, the supervisor) each use their own connection; no lost update."""
    store = SqliteStore(os.path.join(str(tmp_path), "db"))
    make(store, "v", 8)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(20):
                store.set_replica_process(f"v-r{i}", ProcessRecord(j, float(j)), restarted=True)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r.restarts == 20 for r in store.replicas("v"))


# --- processes ----------------------------------------------------------------------------

def test_spawn_alive_terminate_reaps(tmp_path: object) -> None:
    log = os.path.join(str(tmp_path), "p.log")
    rec = process.spawn([sys.executable, "-c", "import time; print('hi', flush=True); "
                         "time.sleep(60)"], log)
    assert process.alive(rec)
    assert os.getsid(rec.pid) == rec.pid          # own session: survives the daemon
    assert not process.alive(ProcessRecord(rec.pid, rec.create_time + 100))  # pid reuse
    process.terminate([rec], timeout=5)
    assert not process.alive(rec)
    assert not psutil.pid_exists(rec.pid)         # reaped, no zombie
    assert "hi" in open(log).read()


def test_terminate_escalates_to_sigkill(tmp_path: object) -> None:
    code = ("import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    log = os.path.join(str(tmp_path), "p.log")
    rec = process.spawn([sys.executable, "-c", code], log)
    deadline = time.monotonic() + 10
    while "ready" not in open(log).read():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    process.terminate([rec], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert not psutil.pid_exists(rec.pid)


def test_dead_child_is_reaped_and_not_alive(tmp_path: object) -> None:
    rec = process.spawn([sys.executable, "-c", "pass"], os.path.join(str(tmp_path), "l"))
    deadline = time.monotonic() + 10
    while process.alive(rec):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # alive() may see the exit (a zombie) a moment before its reap pass could collect it:
    # one more pass, as the supervisor makes every second, and no zombie is left.
    process.reap()
    assert not psutil.pid_exists(rec.pid)


def test_wait_ready_reports_log_tail(tmp_path: object) -> None:
    from blockhorn.types import BlockhornError
    log = os.path.join(str(tmp_path), "l")
    rec = process.spawn([sys.executable, "-c", "import sys; sys.exit('bad config: nope')"], log)
    with pytest.raises(BlockhornError, match="bad config: nope"):
        process.wait_ready("replica x", "unix:/nonexistent/sock", rec, log, timeout=10)


def test_start_process_detached_from_killed_parent(tmp_path: object) -> None:
    """A process started by a (daemon) process survives that process being SIGKILLed."""
    log = os.path.join(str(tmp_path), "l")
    code = ("import sys; from blockhorn.manager import process; "
            f"r = process.spawn([sys.executable, '-c', 'import time; time.sleep(60)'], {log!r}); "
            "print(r.pid, r.create_time, flush=True); import time; time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid, ct = parent.stdout.readline().split()
    rec = ProcessRecord(int(pid), float(ct))
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(0.2)
    try:
        assert process.alive(rec)
    finally:
        os.kill(rec.pid, signal.SIGKILL)


# --- sd_notify ----------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True])
def test_sdnotify(tmp_path: object, monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        if abstract:
            name = f"blockhorn-test-{os.getpid()}"
            s.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = os.path.join(str(tmp_path), "notify")
            s.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")
