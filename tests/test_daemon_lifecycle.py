"""The daemon end to end through the CLI: readiness, the volume lifecycle, supervision
(replica and engine crashes) and adoption of running processes by a restarted daemon."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
from conftest import loop_bound_to
from daemon_util import DEVICE_SKIP, HAVE_FUSE, IS_ROOT, ROOT, Env, wait_until

from blockhorn.replica.store import Replica

MiB = 1 << 20


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def pids(show: dict) -> list[int | None]:   # type: ignore[type-arg]
    return [show["engine"]["pid"]] + [r["pid"] for r in show["replicas"]]


def nbd_write(uri: str, data: bytes, tmp: str) -> None:
    src = os.path.join(tmp, "src.img")
    with open(src, "wb") as f:
        f.write(data)
    subprocess.run(["nbdcopy", src, uri], check=True, capture_output=True, timeout=60)


def nbd_read(uri: str, tmp: str) -> bytes:
    dst = os.path.join(tmp, "dst.img")
    subprocess.run(["nbdcopy", uri, dst], check=True, capture_output=True, timeout=60)
    with open(dst, "rb") as f:
        return f.read()


def replicas_identical(show: dict) -> None:   # type: ignore[type-arg]
    """Invariant after a detach: every replica holds the same bytes."""
    digests = set()
    for r in show["replicas"]:
        rep = Replica.open(r["path"])
        try:
            digests.add(hashlib.sha256(rep.read(0, show["size"])).hexdigest())
        finally:
            rep.close()
    assert len(digests) == 1, show["replicas"]


def test_daemon_ready_socket_and_single_instance(env: Env) -> None:
    env.home.ensure()
    notify_path = os.path.join(env.root, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(notify_path)
        s.settimeout(30)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "blockhorn", "daemon", "--home", env.home.root],
            env=dict(env.env, NOTIFY_SOCKET=notify_path), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert s.recv(100) == b"READY=1"
            assert stat.S_IMODE(os.stat(env.home.socket).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(env.home.key).st_mode) == 0o600
            second = env.cli("daemon", "run", check=False)
            assert second.returncode == 1
            assert "already runs" in second.stderr and "Traceback" not in second.stderr
            assert env.cli("volume", "ls").stdout.strip() == "no volumes"
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert not os.path.exists(env.home.socket)
    assert os.path.exists(os.path.join(env.home.logs, "daemon.log"))


def test_home_from_environment(env: Env) -> None:
    e = dict(env.env, BLOCKHORN_HOME=env.home.root)
    proc = subprocess.run([sys.executable, "-m", "blockhorn", "volume", "create", "v",
                           "--size", "1MiB", "--replicas", "1"], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [v["name"] for v in env.ls()] == ["v"]


def test_endpoint_lifecycle_and_show_fields(env: Env, tmp_path: object) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2",
            "--transport", "unix")
    show = env.show("v")
    assert show["state"] == "detached" and show["robustness"] == "healthy"
    assert show["endpoint"] is None and show["device"] is None
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    show = env.show("v")
    for key in ("name", "size", "state", "robustness", "endpoint", "device", "frontend",
                "replicas"):
        assert key in show, key
    assert (show["name"], show["size"], show["state"]) == ("v", 16 * MiB, "attached")
    assert show["endpoint"] == uri == f"nbd+unix:///?socket={env.home.nbd_socket('v')}"
    assert show["robustness"] == "healthy" and show["device"] is None
    assert show["frontend"] == "none"
    for i, r in enumerate(show["replicas"]):
        assert set(r) >= {"name", "mode", "address", "path", "pid"}
        assert r["name"] == f"v-r{i}" and r["mode"] == "RW"
        assert r["address"].startswith("unix:") and psutil.pid_exists(r["pid"])
    data = os.urandom(4 * MiB)
    nbd_write(uri, data, str(tmp_path))
    assert nbd_read(uri, str(tmp_path))[: len(data)] == data
    human = env.cli("volume", "show", "v").stdout
    assert "Robustness:  healthy" in human and "v-r1" in human
    assert "v" in env.cli("volume", "ls").stdout
    env.cli("volume", "detach", "v")
    env.cli("volume", "detach", "v")       # idempotent
    after = env.show("v")
    assert after["state"] == "detached" and after["endpoint"] is None
    assert all(not psutil.pid_exists(p) for p in pids(show) if p)
    replicas_identical(after)
    # Attach again: the data is still there.
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    assert nbd_read(uri, str(tmp_path))[: len(data)] == data
    env.cli("volume", "rm", "v", "--force")
    assert env.ls() == []
    assert not any(os.path.exists(r["path"]) for r in show["replicas"])
    assert not os.path.exists(env.home.volume_dir("v"))


def test_ha_replica_killed_is_restarted_and_rebuilt(env: Env, tmp_path: object) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "3")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    first = os.urandom(8 * MiB)
    nbd_write(uri, first, str(tmp_path))
    before = env.show("v")
    victim = before["replicas"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def recovered() -> dict | None:   # type: ignore[type-arg]
        s = env.show("v")
        r = s["replicas"][1]
        ok = (r["pid"] not in (None, victim["pid"]) and r["restarts"] == 1
              and s["robustness"] == "healthy"
              and all(x["mode"] == "RW" for x in s["replicas"]))
        return s if ok else None

    after = wait_until(recovered, 30, "replica restart and rebuild")
    assert after["replicas"][1]["rebuild"]["state"] == "done"
    assert pids(after)[:2] == pids(before)[:2] and pids(after)[3] == pids(before)[3]
    second = os.urandom(4 * MiB)
    nbd_write(uri, first + second, str(tmp_path))
    assert nbd_read(uri, str(tmp_path))[: 12 * MiB] == first + second
    env.cli("volume", "detach", "v")
    replicas_identical(env.show("v"))


def test_daemon_restart_adopts_running_processes(env: Env, tmp_path: object) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    data = os.urandom(2 * MiB)
    nbd_write(uri, data, str(tmp_path))
    before = env.show("v")
    # A crash (SIGKILL), then a clean stop: the processes outlive both.
    for stop in ("kill", "stop"):
        if stop == "kill":
            env.kill_daemon(signal.SIGKILL)
        else:
            env.cli("daemon", "stop")
        assert all(psutil.pid_exists(p) for p in pids(before))
        assert nbd_read(uri, str(tmp_path))[: len(data)] == data   # I/O without a daemon
        after = env.show("v")                                       # starts a new daemon
        assert pids(after) == pids(before)
        assert after["state"] == "attached" and after["endpoint"] == uri
        assert after["robustness"] == "healthy"
    # A replica that died while no daemon ran is restarted by the next daemon.
    env.kill_daemon(signal.SIGKILL)
    dead = before["replicas"][0]["pid"]
    os.kill(dead, signal.SIGKILL)
    wait_until(lambda: env.show("v")["replicas"][0]["pid"] not in (None, dead), 30,
               "restart of the replica that died between daemons")
    wait_until(lambda: env.show("v")["robustness"] == "healthy", 30, "rebuild")
    assert nbd_read(uri, str(tmp_path))[: len(data)] == data
    log = open(os.path.join(env.home.logs, "daemon.log")).read()
    assert "adopted engine of v" in log


def test_engine_killed_is_restarted_and_reported(env: Env, tmp_path: object) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    data = os.urandom(2 * MiB)
    nbd_write(uri, data, str(tmp_path))
    before = env.show("v")
    os.kill(before["engine"]["pid"], signal.SIGKILL)
    # Restarted means a new pid *and* an engine answering its control socket again.
    after = wait_until(lambda: (lambda s: s if s["engine"]["pid"] not in
                                (None, before["engine"]["pid"])
                                and "engine restarted" in (s["message"] or "") else None)(
                                    env.show("v")),
                       30, "engine restart")
    assert after["engine"]["restarts"] == 1
    assert "engine restarted" in after["message"]
    assert nbd_read(uri, str(tmp_path))[: len(data)] == data


@pytest.mark.skipif(not (IS_ROOT and HAVE_FUSE), reason=DEVICE_SKIP)
def test_device_attach_detach_attach(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "3")
    dev = env.cli("volume", "attach", "v").stdout.strip()
    assert dev.startswith("/dev/")
    show = env.show("v")
    assert show["device"] == dev and show["frontend"] in ("fuse-nbd", "nbdfuse", "nbd")
    data = os.urandom(MiB)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    env.cli("volume", "detach", "v")
    show = env.show("v")
    assert show["device"] is None
    assert not loop_bound_to(dev, env.home.fuse_dir("v"))
    dev = env.cli("volume", "attach", "v").stdout.strip()
    with open(dev, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data
    env.cli("volume", "rm", "v", "--force")
    assert not os.path.ismount(env.home.fuse_dir("v"))


WRITER = r"""
import hashlib, mmap, os, sys, time
dev, blocks, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BS = 65536
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, BS)                      # page-aligned, as O_DIRECT wants
for i in range(blocks):
    buf[:] = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (BS // 32)
    os.pwrite(fd, buf, i * BS)
    if i == 0:
        print("started", flush=True)
    time.sleep(0.004)                        # spread the writes over a few seconds
os.fsync(fd)
os.close(fd)
print("done", flush=True)
"""


def expected_block(seed: str, i: int) -> bytes:
    return hashlib.sha256(f"{seed}-{i}".encode()).digest() * (65536 // 32)


def read_blocks(dev: str, blocks: int) -> list[bytes]:
    import mmap
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 65536)
    out = []
    try:
        for i in range(blocks):
            assert os.preadv(fd, [buf], i * 65536) == 65536
            out.append(bytes(buf))
    finally:
        os.close(fd)
    return out


@pytest.mark.skipif(not (IS_ROOT and HAVE_FUSE), reason=DEVICE_SKIP)
def test_daemon_restart_under_io(env: Env) -> None:
    """A writer keeps writing to the device while the daemon is killed and restarted twice;
    afterwards every block reads back with the checksum written, also after detach + attach."""
    blocks, seed = 600, os.urandom(4).hex()
    env.cli("volume", "create", "v", "--size", "64MiB", "--replicas", "3")
    dev = env.cli("volume", "attach", "v").stdout.strip()
    before = env.show("v")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, dev, str(blocks), seed],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        env.kill_daemon(signal.SIGKILL)
        after = env.show("v")                       # a new daemon adopts everything
        assert pids(after) == pids(before) and after["device"] == dev
        env.cli("daemon", "stop")
        after = env.show("v")
        assert pids(after) == pids(before) and after["state"] == "attached"
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert "done" in out
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert env.show("v")["robustness"] == "healthy"
    want = [expected_block(seed, i) for i in range(blocks)]
    assert read_blocks(dev, blocks) == want
    env.cli("volume", "detach", "v")
    replicas_identical(env.show("v"))
    dev = env.cli("volume", "attach", "v").stdout.strip()
    assert read_blocks(dev, blocks) == want


@pytest.mark.skipif(not (IS_ROOT and HAVE_FUSE), reason=DEVICE_SKIP)
def test_frontend_killed_is_reported_and_detach_cleans_up(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "1")
    dev = env.cli("volume", "attach", "v", "--frontend", "nbdfuse").stdout.strip()
    show = env.show("v")
    nbdfuse = show["attachment"]["pids"]["nbdfuse"]
    os.kill(nbdfuse, signal.SIGKILL)
    show = wait_until(lambda: (lambda s: s if s["robustness"] == "faulted" else None)(
        env.show("v")), 20, "faulted after nbdfuse died")
    assert "detach and attach" in show["message"]
    env.cli("volume", "detach", "v")
    assert not os.path.ismount(env.home.fuse_dir("v"))
    assert not loop_bound_to(dev, env.home.fuse_dir("v"))
    dev = env.cli("volume", "attach", "v").stdout.strip()
    assert env.show("v")["robustness"] == "healthy"
