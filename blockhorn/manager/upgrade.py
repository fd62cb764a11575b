"""Live engine upgrade: a new engine process, running the code installed now, takes over from
the running one under a live device.

Sequence (under the volume's lock, so the supervisor leaves the volume alone meanwhile):
1. SIGTERM to the old engine: nbdkit stops taking requests and finishes those in flight, the
   engine sends a final FLUSH and closes its replicas cleanly (the replicas record a clean
   close at their revision);
2. the new engine starts on the same socket: the replicas are clean at the same revision, so
   by the generation rule (docs/DURABILITY.md) it opens them RW with no rebuild;
3. the `fuse-nbd` holder, whose connections broke at step 1, reconnects and re-sends every
   request that was not answered. The workload sees a pause (measured: `pause_s`).

Only a frontend whose device outlives its engine (`attach.survives`) can be upgraded live:
nbdfuse/fuse devices would break. `nbd` can: its nbd-client talks to the volume's local relay,
which outlives the engine and retries (manager/nbdproxy.py). So can `none` when the volume has
a TCP endpoint: its clients (a kernel nbd-client on another host) talk to the TLS proxy, a
relay too. Behind a relay the engine is stopped by a handover (`_handover`).

The engine version is the package version plus a digest of the package's source files, so a
changed checkout (or a reinstalled package) is a new version. It is recorded when an engine
starts (`record_version`) and shown by `volume show`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from typing import Any

import psutil

from blockhorn.fsutil import atomic_write_json, read_json
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError, Busy, InvalidArgument

log = logging.getLogger("blockhorn.manager")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_WAIT_S = 40.0   # seconds for the holder to drain (its own limit is 30 s)
POLL_S = 0.002        # seconds between looks at the holder's state file
VERSION_FILE = "engine.version"   # in the volume's directory: the running engine's version


def installed_version() -> str:
    """`<package version>+<12 hex digits of the sources' SHA-256>`: what an engine started now
    would run (the plugin and the engine import the package from PACKAGE_DIR)."""
    try:
        from importlib.metadata import version
        base = version("blockhorn")
    except Exception:   # not installed as a distribution (a bare checkout): digest only
        base = "0"
    h = hashlib.sha256()
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                h.update(os.path.relpath(path, PACKAGE_DIR).encode() + b"\0")
                with open(path, "rb") as src:
                    h.update(src.read())
    return f"{base}+{h.hexdigest()[:12]}"


def record_version(home: Home, name: str) -> None:
    atomic_write_json(os.path.join(home.volume_dir(name), VERSION_FILE),
                      {"version": installed_version(), "started": time.time()})


def running_version(home: Home, name: str) -> str | None:
    try:
        return str(read_json(os.path.join(home.volume_dir(name), VERSION_FILE))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def upgrade(volumes: Any, name: str) -> dict[str, Any]:
    """Replace the engine of attached volume `name` by one running the installed code.
    `volumes` is the daemon's VolumeManager. Returns versions and timings (seconds)."""
    from blockhorn.nbd.attach import SURVIVING, survives
    store = volumes.store
    with volumes.locked(name):
        vol = store.volume(name)
        if vol.desired != "attached":
            raise InvalidArgument(f"volume {name!r} is not attached: its next attach starts "
                                  "the installed engine anyway")
        frontend = (vol.attachment or {}).get("frontend") or vol.frontend
        # `none` only behind the TCP proxy, `nbd` behind its local relay: the relay re-sends
        # what the old engine refused. A local client of the engine's unix socket is not
        # paused or retried by anyone.
        relayed = frontend == "nbd" and survives(vol.attachment or {})
        proxied = (frontend == "none" and bool(vol.tcp_port)) or relayed
        if frontend not in SURVIVING and not proxied:
            raise Busy(f"volume {name!r} uses the {frontend} frontend, whose device does not "
                       "survive an engine restart: a live upgrade needs --frontend "
                       f"{SURVIVING[0]} (or nbd where the kernel has NBD), or --frontend "
                       "none with a TCP endpoint (--port) (detach, then attach with it)")
        old = running_version(volumes.home, name)
        eng = store.engine(name)
        holder = _Holder(vol.attachment or {})
        _preflush(eng.nbd_socket)
        t0 = time.monotonic()
        holder.pause()
        try:
            tp = time.monotonic()
            if proxied:
                _handover(eng)                  # drained, final FLUSH, clean close, killed
            else:
                process.terminate([eng.process])   # SIGTERM: final FLUSH, clean close
            t1 = time.monotonic()
            volumes.start_engine(name)          # records the new version
        finally:
            holder.resume()
        t2 = time.monotonic()
        new = running_version(volumes.home, name)
    log.info("volume %s: engine upgraded %s -> %s (stop %.2f s, start %.2f s)", name, old, new,
             t1 - t0, t2 - t1)
    return {"name": name, "old_version": old, "version": new, "drain_s": round(tp - t0, 3),
            "stop_s": round(t1 - tp, 3),
            "start_s": round(t2 - t1, 3), "pause_s": round(t2 - t0, 3)}


HANDOVER_WAIT_S = 40.0   # seconds for the engine to drain and close (its own limit is 30 s)


def _handover(eng: Any) -> None:
    """Stop an engine whose client is the TCP proxy. SIGTERM would not stop it (nbdkit keeps
    serving a connected client, answering ESHUTDOWN, until it disconnects, and an idle one
    never does), so the engine is asked over its control socket to refuse new requests, drain
    the running ones and close its replicas cleanly (nbd/plugin.py `_handover`); then its
    nbdkit is killed: there is nothing left in it to lose. The proxy's relay (nbd/relay.py)
    re-sends the refused requests, and those that find no engine, to the next engine."""
    from blockhorn.engine.control import ControlClient
    ControlClient(eng.control_socket, timeout=HANDOVER_WAIT_S).call({"op": "handover"})
    kill_orphan_engine(eng.nbd_socket, "after its handover")   # the keeper's nbdkit
    process.terminate([eng.process])          # the keeper exits with its nbdkit


class _Holder:
    """The fuse-nbd holder of a volume, paused (SIGUSR1: requests drained, connections closed:
    nbdkit exits at once on SIGTERM only without clients; with them it keeps serving them)
    and resumed (SIGUSR2) through signals; it reports in `<fuse_dir>.state`."""

    def __init__(self, attachment: dict[str, Any]) -> None:
        self.pid = (attachment.get("pids") or {}).get("holder")
        self.state = str(attachment.get("fuse_dir", "")).rstrip("/") + ".state"

    def pause(self) -> None:
        if not self.pid:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + PAUSE_WAIT_S
        while (st := _read(self.state)) not in ("paused", "busy"):
            if time.monotonic() > deadline:
                raise BlockhornError(f"the fuse-nbd holder (pid {self.pid}) did not pause in "
                                     f"{PAUSE_WAIT_S:g} s", errno.ETIMEDOUT)
            time.sleep(POLL_S)
        if st == "busy":
            raise Busy("the fuse-nbd holder could not drain its requests (the engine does "
                       "not answer them): not upgraded")

    def resume(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGUSR2)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _preflush(nbd_socket: str) -> None:
    """A FLUSH before the stop, while I/O still flows: the replicas write back what is dirty
    now, so the final FLUSH of the stopping engine (inside the pause) has little left to do.
    Only speed depends on it: a failure is logged."""
    from blockhorn.fuse.holder import import_nbd
    try:
        nbd = import_nbd()
        h = nbd.NBD()
        h.connect_unix(nbd_socket)
        h.flush()
        h.shutdown()
        del h   # closes the connection: the engine's stop waits for its clients to go
    except Exception as e:   # nbd.Error, BlockhornError: the upgrade goes on without it
        log.warning("flush before the engine upgrade failed: %s", e)


def upgrade_all(volumes: Any) -> list[dict[str, Any]]:
    """Upgrade every volume whose engine runs on this node, one at a time; a volume that
    cannot be upgraded (not live, or it failed) is reported (`error`) and the others go on.
    On a cluster the API asks every node (manager/forward.py)."""
    results = []
    for vol in volumes.store.volumes():
        if vol.desired != "attached" or not volumes.engine_here(vol):
            continue
        try:
            results.append(upgrade(volumes, vol.name))
        except (BlockhornError, OSError) as e:
            log.error("volume %s: engine not upgraded: %s", vol.name, e)
            results.append({"name": vol.name, "error": str(e)})
    return results


def kill_orphan_engine(nbd_socket: str, why: str = "without its keeper") -> None:
    """SIGKILL an nbdkit still serving `nbd_socket` after its keeper died (kill -9 of the
    keeper): nbdkit gets SIGTERM through its parent-death signal, and with clients connected
    it keeps their connections open answering ESHUTDOWN and holds the socket, so no new engine
    could start there and the fuse-nbd holder could not reach one. Killing it is an engine
    crash, which the generation rule and the holder's retries already cover."""
    path = os.path.abspath(nbd_socket)
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            argv = p.info["cmdline"] or []
            if p.info["name"] == "nbdkit" and "--unix" in argv and path in argv:
                log.warning("nbdkit pid %d serves %s %s: SIGKILL", p.pid, path, why)
                p.kill()
                p.wait(5)
        except psutil.Error:
            continue   # gone meanwhile: what we wanted
