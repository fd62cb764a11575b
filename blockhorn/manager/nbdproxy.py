"""The TCP+TLS proxy of an attached volume (nbd/tls.py), run by the daemon beside its engine.

The proxy is a process of its own (own session, like the engine and the replicas), not a child
of the engine's keeper: when the engine dies (kill -9, crash) or is replaced (live upgrade),
the proxy stays, keeps its clients' TCP connections (a kernel `nbd-client` on another host),
and its relay (nbd/relay.py) re-sends the requests not yet answered on a new connection to
the engine's unix socket, where the daemon starts the next engine. The client sees a pause, no error.
It is recorded (pid + start time) in `<volume dir>/nbd-proxy.json`; started when the engine
is (if not running already), again by the supervisor if it died, and stopped at detach.

Like the engine, the proxy's nbdkit runs under a keeper (`python -m blockhorn.manager.nbdproxy
NBDKIT-ARGV`, nbd/keeper.py): nbdkit in the foreground gets SIGTERM when its parent dies, and its
parent must not be the daemon, whose restart must not touch the proxy. The recorded pid is
the keeper's. nbdkit with clients connected does not exit on SIGTERM (it answers ESHUTDOWN and
keeps the port), so stopping the proxy, or replacing one whose keeper died, SIGKILLs its nbdkit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import psutil

from blockhorn.control.store.records import ProcessRecord
from blockhorn.fsutil import atomic_write_json, read_json
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.nbd import tls as nbdtls

log = logging.getLogger("blockhorn.manager")

RECORD_FILE = "nbd-proxy.json"
STOP_TIMEOUT_S = 5.0   # seconds for the keeper to exit once its nbdkit was killed


def _record_path(home: Home, name: str) -> str:
    return os.path.join(home.volume_dir(name), RECORD_FILE)


def running(home: Home, name: str) -> ProcessRecord | None:
    """The volume's proxy process if it runs."""
    try:
        data = read_json(_record_path(home, name))
        rec = ProcessRecord(int(data["pid"]), float(data["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if process.alive(rec) else None


def ensure(home: Home, name: str, nbd_socket: str) -> ProcessRecord | None:
    """Start the proxy of `name`'s TCP endpoint unless it runs; None without an endpoint."""
    tcp = nbdtls.load(home.volume_dir(name))
    if tcp is None:
        return None
    rec = running(home, name)
    if rec is not None:
        return rec
    from blockhorn.nbd.attach import require
    _kill_nbdkit(nbd_socket)   # an orphan whose keeper was killed still holds the port
    argv, address = nbdtls.daemon_proxy_argv(tcp, require("nbdkit"), nbd_socket)
    nbdtls.check_bindable(tcp["address"], tcp["port"])
    log_path = home.log(f"{name}-nbd-proxy.log")
    rec = process.spawn([sys.executable, "-m", "blockhorn.manager.nbdproxy", *argv], log_path)
    atomic_write_json(_record_path(home, name), {"pid": rec.pid, "create_time": rec.create_time})
    log.info("started the NBD TLS proxy of %s on %s: pid %d", name, address, rec.pid)
    process.wait_ready(f"NBD TLS proxy of {name}", address, rec, log_path)
    return rec


def stop(home: Home, name: str, nbd_socket: str) -> None:
    rec = running(home, name)
    _kill_nbdkit(nbd_socket)
    process.terminate([rec], timeout=STOP_TIMEOUT_S)   # the keeper exits with its nbdkit
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(home, name))


def _kill_nbdkit(nbd_socket: str) -> None:
    """SIGKILL the proxy nbdkit forwarding to `nbd_socket` (the socket names the volume). It
    holds no data: what it acknowledged, the engine acknowledged."""
    target = f"socket={os.path.abspath(nbd_socket)}"
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["name"] == "nbdkit" and "--tls=require" in argv and target in argv:
                p.kill()
                p.wait(5)
        except psutil.Error:
            continue   # gone meanwhile (or a zombie its keeper reaps): what we wanted


def main(argv: list[str]) -> int:
    """The proxy's keeper: run nbdkit (`argv`) as a child, pass signals on, exit with it."""
    from blockhorn.nbd.keeper import keep
    return keep(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
