"""Starting, recognising and stopping the replica and engine processes.

Processes are started in their own session (`start_new_session=True`), so they survive the
daemon: a daemon restart (systemd `KillMode=process`, a crash, an upgrade) must not interrupt
I/O. A process is identified by pid + create_time (`ProcessRecord`), never by pid alone.

Processes this daemon started are its children and must be reaped: `reap()` polls them (the
supervisor calls it every tick). Processes adopted from a previous daemon were re-parented to
init (or a subreaper) and are reaped there.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time

import psutil

from blockhorn.config import parse_address
from blockhorn.control.store import ProcessRecord
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.manager")

STOP_TIMEOUT_S = 10.0      # seconds between SIGTERM and SIGKILL
READY_TIMEOUT_S = 30.0     # seconds a started process has to accept connections
LOG_TAIL_LINES = 15

_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def spawn(argv: list[str], log_path: str, env: dict[str, str] | None = None) -> ProcessRecord:
    """Start `argv` detached from the daemon (own session), output appended to `log_path`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n"
                  .encode())
        out.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, env=env)
        except OSError as e:
            raise BlockhornError(f"cannot start {argv[0]}: {e.strerror}", e.errno) from None
    with _children_lock:
        _children[proc.pid] = proc
    try:
        ct = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        ct = 0.0   # already gone; alive() will say so
    return ProcessRecord(proc.pid, ct)


def spawn_switch(argv: list[str], log_path: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a dead man's switch `argv` (own session, output appended to `log_path`) whose
    stdin is a pipe: (the helper, the pipe's write end). Only the caller holds that end (os.pipe
    makes it non-inheritable): it reaches EOF when the caller closes it or dies."""
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as out:
            helper = subprocess.Popen(argv, stdin=read_end, stdout=out, stderr=out,
                                      start_new_session=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return helper, write_end


def reap() -> list[tuple[int, int]]:
    """Collect exited children; return [(pid, returncode)]."""
    done = []
    with _children_lock:
        for pid, proc in list(_children.items()):
            rc = proc.poll()
            if rc is not None:
                del _children[pid]
                done.append((pid, rc))
    return done


def alive(rec: ProcessRecord | None) -> bool:
    """True when the process `rec` names still runs (same pid and start time, not a zombie)."""
    if rec is None:
        return False
    reap()
    try:
        p = psutil.Process(rec.pid)
        # create_time is derived from boot time + start ticks; allow for rounding.
        if abs(p.create_time() - rec.create_time) > 0.05:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate(recs: list[ProcessRecord | None], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process in `recs`, wait up to `timeout`, then SIGKILL the ones left.
    Processes that are gone already are fine; so is an empty list."""
    procs = []
    for rec in recs:
        if rec is None or not alive(rec):
            continue
        try:
            p = psutil.Process(rec.pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            pass   # exited between the check and the signal: what we wanted
    left = wait_exited(procs, timeout)
    for p in left:
        log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", p.pid, timeout)
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass   # exited just now
    wait_exited(left, timeout)
    reap()


def wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s until every process in `procs` has exited; return those left.
    Our own children are waitpid()ed here, so they leave no zombies (reap() then finds their
    Popen objects finished: Popen treats ECHILD as exited). Another's (adopted from a previous
    daemon: init's) counts as exited once it is a zombie, as alive() has it: init may reap
    late (~2 s in some containers, per process), and a zombie holds nothing any more."""
    deadline = time.monotonic() + timeout
    left = list(procs)
    while True:
        left = [p for p in left if not _exited(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.01)


def _exited(p: psutil.Process) -> bool:
    try:
        p.wait(0)   # reaps our own child; TimeoutExpired while any process runs
        return True
    except psutil.TimeoutExpired:
        pass
    except psutil.NoSuchProcess:
        return True
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def accepts(address: str) -> bool:
    """True when `address` (HOST:PORT or unix:/PATH) accepts a connection now."""
    host, port = parse_address(address)
    try:
        if host == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(port))
        else:
            with socket.create_connection((host, int(port)), timeout=1.0):
                pass
    except OSError:
        return False
    return True


def wait_ready(what: str, address: str, rec: ProcessRecord, log_path: str,
               timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until `address` accepts; fail early (with the log tail) if the process exits."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not accepts(address):
        if not alive(rec):
            raise BlockhornError(f"{what} exited during start-up; last lines of {log_path}:\n"
                                 f"{log_tail(log_path)}", errno.EIO)
        if time.monotonic() > deadline:
            raise BlockhornError(f"{what} did not accept connections on {address} within "
                                 f"{timeout:.0f} s; last lines of {log_path}:\n"
                                 f"{log_tail(log_path)}", errno.ETIMEDOUT)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def tcp_port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
