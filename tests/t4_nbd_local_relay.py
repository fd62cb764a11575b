"""Tier 4: the `nbd` frontend's local relay (manager/nbdproxy.py LOCAL) on this host.

This kernel has no NBD, so nbd-client itself runs only in the real-kernel tier
(tests/t7_vm_host.py). Here a libnbd client takes nbd-client's place on the relay's socket of a
volume attached with `--frontend none`; the attachment record says, as an `nbd` attach writes it,
that a device's client is on the relay. Checked: the socket is 0600; the relay is a process of
its own that outlives a kill -9 of the engine (the client sees a pause, no error) and of the
daemon (the next daemon finds it by its record); a relay killed is started again by the
supervisor, which reports the device stale (nbd-client does not reconnect); detach stops it
and removes its socket; what was acknowledged reads back.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator

import nbd
import psutil
import pytest
from daemon_util import IS_ROOT, Env, wait_until
from t4_nbd_tls import pause_through_kill

from blockhorn.control.store import SqliteStore
from blockhorn.manager import nbdproxy

MiB = 1 << 20
SIZE = 16 * MiB

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the relay's record is written as root")


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        e.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
        yield e


def client(sock: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_unix(sock)
    return h


def test_local_relay_outlives_engine_and_daemon(env: Env) -> None:
    env.cli("volume", "attach", "v", "--frontend", "none")
    try:
        engine_sock = env.show("v")["endpoint"].split("socket=", 1)[1]
        relay = nbdproxy.ensure(env.home, "v", engine_sock, nbdproxy.LOCAL)
        assert relay is not None
        sock = nbdproxy.local_socket(engine_sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
        # What an `nbd` attach records (volumes._attach_device): the device's client is on
        # the relay. (No kernel device here: libnbd plays nbd-client.)
        SqliteStore(env.home.db).update_volume(
            "v", attachment={"device": "", "frontend": "nbd", "pids": {}, "fuse_dir": "",
                             "relay": sock})
        data = os.urandom(SIZE)
        h = client(sock)
        h.pwrite(data, 0)
        h.flush()

        # kill -9 of the engine's nbdkit: the relay keeps the connection and re-sends.
        keeper = psutil.Process(env.show("v")["engine"]["pid"])
        engine = next(c for c in keeper.children() if "python" in c.cmdline())
        pause = pause_through_kill(engine, h, data)
        v = env.show("v")
        assert v["engine"]["restarts"] == 1, v
        assert "fails I/O" not in (v["message"] or ""), v["message"]
        assert nbdproxy.running(env.home, "v", nbdproxy.LOCAL) == relay

        # kill -9 of the daemon: the relay (own session) serves on, the next daemon adopts it.
        env.kill_daemon(signal.SIGKILL)
        assert bytes(h.pread(MiB, SIZE - MiB)) == data[:MiB]
        assert env.show("v")["state"] == "attached"
        assert nbdproxy.running(env.home, "v", nbdproxy.LOCAL) == relay
        h.shutdown()
        del h

        # The relay killed (its keeper: its nbdkit gets SIGTERM, and would keep the socket with
        # a client connected): the supervisor starts a new one and reports the device stale.
        h = client(sock)
        os.kill(relay.pid, signal.SIGKILL)
        new = wait_until(lambda: (r := nbdproxy.running(env.home, "v", nbdproxy.LOCAL))
                         and r != relay and r, 20, "a new relay")
        assert "local NBD relay exited" in (env.show("v")["message"] or "")
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)   # the old connection died with the old relay
        h = client(sock)
        assert bytes(h.pread(SIZE, 0)) == data[:SIZE - MiB] + data[:MiB]
        h.shutdown()
        del h
        print(f"\nlocal relay: first read {pause:.2f} s after the engine's kill -9")
    finally:
        env.cli("volume", "detach", "v")
    assert not os.path.exists(sock)
    assert nbdproxy.running(env.home, "v", nbdproxy.LOCAL) is None
    assert not psutil.pid_exists(new.pid) or psutil.Process(new.pid).status() == "zombie"
