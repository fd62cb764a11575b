"""A private blockhorn home per test, driven through the real CLI and daemon.

`Env` runs `python -m blockhorn --home H ...` as a user would. Its `close()` leaves nothing
behind: every volume is removed with --force (which detaches it: device, engine, replicas), the
daemon is stopped, and as a safety net every process the store still records is killed and any
FUSE mount under the home is unmounted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil

from blockhorn.control.store import SqliteStore
from blockhorn.manager import nbdproxy
from blockhorn.manager.paths import Home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_FUSE = os.path.exists("/dev/fuse")
IS_ROOT = os.geteuid() == 0
DEVICE_SKIP = "attaching a device needs root and /dev/fuse (nbdfuse + loop)"
if os.environ.get("CI") and not (IS_ROOT and HAVE_FUSE):
    # CI runs as root with FUSE: device tests must run there, never be skipped.
    raise RuntimeError(f"CI without root or /dev/fuse: {DEVICE_SKIP}")


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Env:
    def __init__(self) -> None:
        # Short path: unix socket paths under the home must fit in 107 bytes.
        self.root = tempfile.mkdtemp(prefix="bh", dir="/tmp")
        self.home = Home(os.path.join(self.root, "home"))
        self.env = dict(os.environ)
        self.env.pop("BLOCKHORN_HOME", None)
        self.env.pop("NOTIFY_SOCKET", None)

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- running the CLI -------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "blockhorn", "--home", self.home.root,
                               *args], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"blockhorn {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("volume", "show", name, "--json").stdout))

    def ls(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("volume", "ls", "--json").stdout))

    def daemon_pid(self) -> int | None:
        try:
            with open(self.home.lock) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and psutil.pid_exists(pid) and _is_daemon(pid) else None

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        pid = self.daemon_pid()
        assert pid, "no daemon running"
        os.kill(pid, sig)
        # Not our child: a zombie (its parent reaps it late) counts as gone.
        wait_until(lambda: not _is_daemon(pid), 15, "daemon exit")

    # --- clean-up --------------------------------------------------------------------------

    def close(self) -> None:
        try:
            if os.path.exists(self.home.db):
                for vol in self.ls():
                    self.cli("volume", "rm", vol["name"], "--force", check=False)
                self.cli("daemon", "stop", check=False)
        finally:
            self._safety_net()
            shutil.rmtree(self.root, ignore_errors=True)

    def _safety_net(self) -> None:
        pid = self.daemon_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        if os.path.exists(self.home.db):
            store = SqliteStore(self.home.db)
            for vol in store.volumes():
                att = vol.attachment or {}
                if att.get("device"):
                    subprocess.run(["losetup", "-d", att["device"]], capture_output=True)
                # The TLS proxy too: a process of its own (manager/nbdproxy.py).
                nbdproxy.stop(self.home, vol.name, store.engine(vol.name).nbd_socket)
                recs = [store.engine(vol.name).process] + [
                    r.process for r in store.replicas(vol.name)]
                for rec in recs:
                    if rec and _same(rec.pid, rec.create_time):
                        os.kill(rec.pid, signal.SIGKILL)
        run = os.path.join(self.home.root, "run")
        if os.path.isdir(run):
            for vol in os.listdir(run):
                fuse = os.path.join(run, vol, "fuse")
                if os.path.ismount(fuse):
                    subprocess.run(["fusermount3", "-u", "-z", fuse], capture_output=True)


def _same(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.05
    except psutil.Error:
        return False


def _is_daemon(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and "daemon" in p.cmdline()
    except psutil.Error:
        return False
