"""The TCP+TLS proxy of an attached volume (nbd/tls.py), run by the daemon beside its engine.

The proxy is a process of its own (own session, like the engine and the replicas), not a child
of the engine's keeper: when the engine dies (kill -9, crash) or is replaced (live upgrade),
the proxy stays, keeps its clients' TCP connections (a kernel `nbd-client` on another host),
and its retry filter re-sends the requests that failed on a new connection to the engine's
unix socket, where the daemon starts the next engine. The client sees a pause, no error.
It is recorded (pid + start time) in `<volume dir>/nbd-proxy.json`; started when the engine
is (if not running already), again by the supervisor if it died, and stopped at detach.
"""

from __future__ import annotations

import contextlib
import logging
import os

from blockhorn.control.store.records import ProcessRecord
from blockhorn.fsutil import atomic_write_json, read_json
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.nbd import tls as nbdtls

log = logging.getLogger("blockhorn.manager")

RECORD_FILE = "nbd-proxy.json"
# With clients connected nbdkit does not exit on SIGTERM (it answers ESHUTDOWN); the proxy
# holds no data (every write it acknowledged, the engine acknowledged), so detach does not wait.
STOP_TIMEOUT_S = 2.0


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
    argv, address = nbdtls.daemon_proxy_argv(tcp, require("nbdkit"), nbd_socket)
    nbdtls.check_bindable(tcp["address"], tcp["port"])
    log_path = home.log(f"{name}-nbd-proxy.log")
    rec = process.spawn(argv, log_path)
    atomic_write_json(_record_path(home, name), {"pid": rec.pid, "create_time": rec.create_time})
    log.info("started the NBD TLS proxy of %s on %s: pid %d", name, address, rec.pid)
    process.wait_ready(f"NBD TLS proxy of {name}", address, rec, log_path)
    return rec


def stop(home: Home, name: str) -> None:
    process.terminate([running(home, name)], timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(home, name))
