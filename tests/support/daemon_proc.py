"""A daemon started by hand with options (`daemon run --etcd ... --node ... --api-listen ...`),
for tests that cannot use the CLI's autostart; stopped (then killed) at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from daemon_util import ROOT, Env, wait_until

START_TIMEOUT_S = 20.0   # seconds for the daemon to answer on its socket
STOP_TIMEOUT_S = 15.0


@contextmanager
def daemon(env: Env, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "blockhorn", "--home", env.home.root,
                             "daemon", "run", "--quiet", *options],
                            env=env.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited {proc.returncode}: "
                                     f"{proc.stderr.read().decode()}")  # type: ignore[union-attr]
            return os.path.exists(env.home.socket) and env.cli(
                "daemon", "status", check=False).returncode == 0
        wait_until(up, START_TIMEOUT_S, "daemon start")
        yield proc
    finally:
        if proc.poll() is None:
            env.cli("daemon", "stop", check=False, timeout=30)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        assert proc.stderr is not None
        proc.stderr.close()
