"""The relays of an attached volume, run by the daemon beside its engine: the TCP+TLS proxy
(nbd/tls.py) and the local relay of the `nbd` frontend. One module runs either or both.

A relay is nbdkit running the relay plugin (nbd/relay.py) in a process of its own (own session,
like the engine and the replicas), not a child of the engine's keeper: when the engine dies
(kill -9, crash) or is replaced (live upgrade), the relay stays, keeps its clients' connections
and re-sends the requests not yet answered on a new connection to the engine's unix socket,
where the daemon starts the next engine. The client sees a pause, no error.
- `TLS`: listens on the volume's TCP endpoint with TLS required; its client is a kernel
  `nbd-client` on another host (or nbdsh, nbdcopy ...). Recorded in `<volume dir>/nbd-proxy.json`.
- `LOCAL`: listens on a unix socket of its own next to the engine's (`relay.sock` in the
  volume's run directory, 0700, the socket itself 0600 like the engine's), no TLS: the `nbd`
  frontend's `nbd-client` connects there instead of to the engine, so the kernel's connection
  outlives the engine. Recorded in `<volume dir>/nbd-relay.json`.
Each is started when needed (the TLS one with the engine, the local one before nbd-client), again
by the supervisor if it died, stopped at detach, and simply found running (pid + start time in
its record) after a daemon restart.

Like the engine, a relay's nbdkit runs under a keeper (`python -m blockhorn.manager.nbdproxy
NBDKIT-ARGV`, nbd/keeper.py): nbdkit in the foreground gets SIGTERM when its parent dies, and its
parent must not be the daemon, whose restart must not touch the relay. The recorded pid is
the keeper's. nbdkit with clients connected does not exit on SIGTERM (it answers ESHUTDOWN and
keeps its socket), so stopping a relay, or replacing one whose keeper died, SIGKILLs its nbdkit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

import psutil

from blockhorn.control.store.records import ProcessRecord
from blockhorn.fsutil import atomic_write_json, read_json
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.nbd import tls as nbdtls

log = logging.getLogger("blockhorn.manager")

STOP_TIMEOUT_S = 5.0   # seconds for the keeper to exit once its nbdkit was killed
LOCAL_SOCKET = "relay.sock"   # the local relay's socket, in the directory of the engine's


@dataclass(frozen=True)
class Kind:
    record: str   # file in the volume's directory: pid + start time of the keeper
    log: str      # log file suffix: <volume>-<log>.log
    what: str     # in messages


TLS = Kind("nbd-proxy.json", "nbd-proxy", "NBD TLS proxy")
LOCAL = Kind("nbd-relay.json", "nbd-relay", "local NBD relay")
KINDS = (TLS, LOCAL)


def local_socket(nbd_socket: str) -> str:
    """The local relay's socket: beside the engine's, in the same private directory."""
    return os.path.join(os.path.dirname(os.path.abspath(nbd_socket)), LOCAL_SOCKET)


def _record_path(home: Home, name: str, kind: Kind) -> str:
    return os.path.join(home.volume_dir(name), kind.record)


def running(home: Home, name: str, kind: Kind = TLS) -> ProcessRecord | None:
    """The volume's relay process of `kind` if it runs."""
    try:
        data = read_json(_record_path(home, name, kind))
        rec = ProcessRecord(int(data["pid"]), float(data["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if process.alive(rec) else None


def ensure(home: Home, name: str, nbd_socket: str, kind: Kind = TLS) -> ProcessRecord | None:
    """Start `name`'s relay of `kind` unless it runs; None for TLS without a TCP endpoint."""
    from blockhorn.nbd.attach import remove_stale_socket, require
    tcp = nbdtls.load(home.volume_dir(name)) if kind is TLS else None
    if kind is TLS and tcp is None:
        return None
    rec = running(home, name, kind)
    if rec is not None:
        return rec
    _kill_nbdkit(nbd_socket, kind)   # an orphan whose keeper was killed still holds the socket
    if tcp is not None:
        argv, address = nbdtls.daemon_proxy_argv(tcp, require("nbdkit"), nbd_socket)
        nbdtls.check_bindable(tcp["address"], tcp["port"])
    else:
        sock = local_socket(nbd_socket)
        remove_stale_socket(sock)   # nbdkit leaves its socket behind when killed
        argv = nbdtls.relay_argv(require("nbdkit"), nbd_socket, ["--unix", sock])
        address = f"unix:{sock}"
    log_path = home.log(f"{name}-{kind.log}.log")
    rec = process.spawn([sys.executable, "-m", "blockhorn.manager.nbdproxy", *argv], log_path)
    atomic_write_json(_record_path(home, name, kind),
                      {"pid": rec.pid, "create_time": rec.create_time})
    log.info("started the %s of %s on %s: pid %d", kind.what, name, address, rec.pid)
    process.wait_ready(f"{kind.what} of {name}", address, rec, log_path)
    if kind is LOCAL:
        # As strict as the engine's socket (volumes.start_engine): nbdkit creates it under the
        # umask; the directory (0700) already keeps others out.
        os.chmod(local_socket(nbd_socket), 0o600)
    return rec


def stop(home: Home, name: str, nbd_socket: str, kinds: tuple[Kind, ...] = KINDS) -> None:
    """Stop the volume's relays (both kinds unless told): any that does not run is fine."""
    for kind in kinds:
        rec = running(home, name, kind)
        _kill_nbdkit(nbd_socket, kind)
        process.terminate([rec], timeout=STOP_TIMEOUT_S)   # the keeper exits with its nbdkit
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_record_path(home, name, kind))
        if kind is LOCAL:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local_socket(nbd_socket))


def _kill_nbdkit(nbd_socket: str, kind: Kind) -> None:
    """SIGKILL the relay nbdkit of `kind` forwarding to `nbd_socket` (the socket names the
    volume). It holds no data: what it acknowledged, the engine acknowledged."""
    target = f"socket={os.path.abspath(nbd_socket)}"
    marker = "--tls=require" if kind is TLS else local_socket(nbd_socket)
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["name"] == "nbdkit" and marker in argv and target in argv:
                p.kill()
                p.wait(5)
        except psutil.Error:
            continue   # gone meanwhile (or a zombie its keeper reaps): what we wanted


def main(argv: list[str]) -> int:
    """A relay's keeper: run nbdkit (`argv`) as a child, pass signals on, exit with it."""
    from blockhorn.nbd.keeper import keep
    return keep(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
