"""Tier 6: the REST API and every local socket and secret stay the owner's (root's).

A process of another user (nobody) tries the daemon's API socket, the engine's NBD and control
sockets and reads the cluster key and the volume's TLS key: every attempt is refused. Then the
directories are opened up (as a careless packaging of /var/lib/blockhorn might leave them):
the sockets' and files' own modes still refuse it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import needs_root
from daemon_util import Env
from harness import free_port

pytestmark = needs_root()
NOBODY = 65534

PROBE = r"""
import json, os, socket, sys
results = {}
for kind, path in json.loads(sys.argv[1]):
    try:
        if kind == "sock":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            if path.endswith("daemon.sock"):
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.recv(100)
        else:
            open(path, "rb").read()
        results[path] = "ALLOWED"
    except OSError as e:
        results[path] = e.__class__.__name__
print(json.dumps(results))
"""


def as_nobody(targets: list[tuple[str, str]]) -> dict[str, str]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(targets)], check=True,
                         capture_output=True, text=True, timeout=30, preexec_fn=drop,
                         cwd="/")
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with Env() as e:
        e.cli("volume", "create", "v", "--size", "8MiB", "--replicas", "1")
        e.cli("volume", "attach", "v", "--frontend", "none", "--port", str(free_port()))
        yield e


def test_other_users_are_refused(env: Env) -> None:
    v = env.show("v")
    nbd_sock = v["endpoint"].split("socket=", 1)[1]
    control = os.path.join(os.path.dirname(nbd_sock), "control.sock")
    targets = [("sock", env.home.socket), ("sock", nbd_sock), ("sock", control),
               ("file", env.home.key), ("file", v["nbd_tcp"]["psk_file"])]
    for path in (env.home.socket, nbd_sock, control, env.home.key):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(env.home.root).st_mode) == 0o700
    # The owner gets in (the probe is not just failing for another reason).
    env.cli("volume", "show", "v")
    assert set(as_nobody(targets).values()) == {"PermissionError"}

    # Directories opened up: each socket and secret still refuses by its own mode.
    # (env.root, the test's private parent directory, too: else nothing below it is reachable
    # and the check would pass for the wrong reason.)
    dirs = [env.root, env.home.root, os.path.dirname(os.path.dirname(nbd_sock)),
            os.path.dirname(nbd_sock), os.path.join(env.home.root, "volumes"),
            env.home.volume_dir("v")]
    modes = {d: stat.S_IMODE(os.stat(d).st_mode) for d in dirs}
    try:
        for d in dirs:
            os.chmod(d, 0o755)
        result = as_nobody(targets)
    finally:
        for d, m in modes.items():
            os.chmod(d, m)
    assert set(result.values()) == {"PermissionError"}, result
    # ... and the probe can tell: a socket left world-writable would be reached.
    os.chmod(env.root, 0o755)
    os.chmod(env.home.root, 0o755)
    os.chmod(env.home.socket, 0o666)
    try:
        assert as_nobody([("sock", env.home.socket)]) == {env.home.socket: "ALLOWED"}
    finally:
        os.chmod(env.home.socket, 0o600)
        os.chmod(env.home.root, modes[env.home.root])
        os.chmod(env.root, modes[env.root])
