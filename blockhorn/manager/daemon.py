"""`blockhorn daemon`: manager + node agent in one trio process.

Start-up: take the home's lock (one daemon per home), open the state store
(SQLite in the home, or etcd with `--etcd URL[,URL...]`), serve the REST API on
`<home>/daemon.sock` (0600), start the supervisor (which adopts the processes a previous daemon
left running), then tell systemd `READY=1`. SIGTERM/SIGINT or `POST /v1/daemon/stop` end the
daemon; replica and engine processes keep running and attached volumes keep serving I/O — the
next daemon adopts them.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from blockhorn import liveness
from blockhorn.control.store import DEFAULT_ETCD_PREFIX, open_store
from blockhorn.keys import adopt_key, ensure_key, load_key
from blockhorn.manager import remote
from blockhorn.manager.api import make_app
from blockhorn.manager.backup_adapter import BackupAdapter
from blockhorn.manager.backups import BackupService
from blockhorn.manager.forward import Forward
from blockhorn.manager.job_tasks import make_scheduler
from blockhorn.manager.leader import Leader
from blockhorn.manager.nodes import NodeService
from blockhorn.manager.paths import Home
from blockhorn.manager.settings import Settings, write_rebuild_limits
from blockhorn.manager.standby import StandbyManager
from blockhorn.manager.supervisor import Supervisor
from blockhorn.manager.volumes import VolumeManager
from blockhorn.node import fence
from blockhorn.sdnotify import notify
from blockhorn.types import BlockhornError, Busy

log = logging.getLogger("blockhorn.manager")

GRACEFUL_STOP_S = 2.0   # seconds in-flight API requests get when the daemon stops


def setup_logging(home: Home, to_stderr: bool = True) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    fh = logging.FileHandler(home.log("daemon.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if to_stderr:
        sh = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; keep the stderr lines short.
        sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        root.addHandler(sh)


def take_lock(home: Home) -> int:
    """Hold `<home>/daemon.lock` for the life of the process; fail if another daemon has it."""
    fd = os.open(home.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Busy(f"a blockhorn daemon (pid {other}) already runs for home {home.root}") \
            from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def main(home_root: str | None = None, to_stderr: bool = True, etcd: str | None = None,
         etcd_prefix: str = DEFAULT_ETCD_PREFIX, node: str | None = None,
         address: str = "127.0.0.1", api_listen: str | None = None) -> int:
    home = Home.at(home_root)
    try:
        home.ensure()
    except OSError as e:
        raise BlockhornError(f"cannot create home {home.root}: {e.strerror}", e.errno) from None
    setup_logging(home, to_stderr)
    lock_fd = take_lock(home)
    try:
        trio.run(run, home, etcd, etcd_prefix, node, address, api_listen)
    except BaseException as e:
        if not isinstance(e, BlockhornError | KeyboardInterrupt):
            log.exception("daemon failed")
        raise
    finally:
        try:
            os.unlink(home.socket)
        except FileNotFoundError:
            pass   # never bound, or removed already
        os.close(lock_fd)
    log.info("daemon stopped")
    return 0


async def run(home: Home, etcd: str | None = None, etcd_prefix: str = DEFAULT_ETCD_PREFIX,
              node: str | None = None, address: str = "127.0.0.1",
              api_listen: str | None = None) -> None:
    store = open_store(home.db, etcd, etcd_prefix)   # etcd: many hosts share one state (control/store)
    ensure_key(home.key)
    nodes = NodeService(store, node, address)
    tls: tuple[str, str, str | None] | None = None
    api_listen = remote.listen_address(api_listen, etcd is not None, address)
    listener: socket.socket | None = None
    if api_listen:   # TCP too: TLS + bearer token (manager/remote.py); the socket stays plain
        ip, port = remote.parse_listen(api_listen)
        listener = remote.listen_socket(ip, port)   # first: a port in use is a clear error
        tls = remote.ensure_certificate(home, ip)
        if etcd:   # peers forward engine requests here (manager/forward.py)
            nodes.api = (f"https://{remote.bind_text(ip, port)}", remote.ca_pem(tls[0], tls[2]))
    if etcd:   # the dead man's switch reads when the lease was last renewed (node/fence.py)
        nodes.on_beat = lambda began: fence.record_beat(home, began)
    nodes.register()
    # An expand runs in its daemon's API: one that died during it left its room promised
    # (manager/capacity.py expand_reservation); no expand of this node runs yet.
    for name in store.end_expands_of(nodes.name):
        log.warning("volume %s: the room promised for an expand that a previous daemon "
                    "left unfinished is released (run the expand again)", name)
    volumes = VolumeManager(home, store)
    volumes.placer = nodes.place   # volume create without --disk: the registered disks
    volumes.nodes = nodes
    switch: tuple[subprocess.Popen[bytes], int] | None = None
    if etcd:   # a cluster: one key for every node's engines and replicas; peers over TCP
        adopt_key(home.key, store.shared_key(load_key(home.key)))
        volumes.cluster = nodes
        nodes.on_lost = lambda: log.error("self-fencing stopped %d process(es)",
                                          fence.self_fence(home))
        switch = fence.arm(home)   # held until this process ends, however it ends
        volumes.shares.beat_file = liveness.beat_path(home.root)
    write_rebuild_limits(Settings(store), home.rebuild_limits)
    supervisor = Supervisor(volumes, Leader(nodes) if etcd else None)
    backups = BackupService(volumes)   # one for the API, recurring jobs and standbys
    adapter = BackupAdapter(volumes, backups)
    jobs = make_scheduler(volumes, adapter)
    standby = StandbyManager(volumes, adapter.open_target)
    shutdown = trio.Event()

    config = Config()
    config.bind = [f"unix:{home.socket}"]
    config.umask = 0o177                     # the socket is created 0600: root's API only
    config.accesslog = None
    config.errorlog = logging.getLogger("blockhorn.api")
    config.graceful_timeout = GRACEFUL_STOP_S
    # Any: starlette's ASGI types and hypercorn's describe the same protocol differently.
    app: Any = make_app(volumes, shutdown.set, jobs, standby, backups, nodes)
    peers = remote.cluster_token(load_key(home.key)) if etcd else None
    if peers is not None:   # engine requests for a volume attached elsewhere go there
        app = Forward(app, volumes, peers)
    if listener is not None and tls is not None:
        config.certfile, config.keyfile = tls[0], tls[1]
        config.insecure_bind = config.bind
        config.bind = [f"fd://{listener.fileno()}"]
        app = remote.BearerAuth(app, remote.ensure_token(home), also=peers)

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve, app, config,
                                              shutdown_trigger=shutdown.wait))
        os.chmod(home.socket, 0o600)
        helpers = trio.CancelScope()

        async def run_helpers() -> None:
            with helpers:
                async with trio.open_nursery() as inner:
                    inner.start_soon(supervisor.run)
                    inner.start_soon(jobs.run)
                    inner.start_soon(standby.run)
                    inner.start_soon(nodes.run)
                    inner.start_soon(_on_signals, shutdown)

        nursery.start_soon(run_helpers)
        log.info("daemon ready: pid %d, home %s, API on %s%s", os.getpid(), home.root,
                 home.socket, f" and https://{remote.bind_text(ip, port)}" if api_listen else "")
        notify("READY=1")
        notify(f"STATUS=serving {home.socket}")
        await shutdown.wait()
        notify("STOPPING=1")
        log.info("daemon stopping; replica and engine processes keep running%s",
                 "" if switch is None else f" (its dead man's switch, pid {switch[0].pid}, "
                 "fences them unless a daemon renews the lease in time)")
        helpers.cancel()


async def _on_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s", signal.Signals(signum).name)
            shutdown.set()
            return


def exit_code(e: BlockhornError) -> int:
    return 2 if e.errno == errno.EINVAL else 1
