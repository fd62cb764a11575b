"""Supervision: keep the processes of attached volumes running, and heal their replicas.

Every tick (about a second, and at once when an engine exits) for each attached volume, in
this order:
- a replica process that is not running is started again; when the engine runs, it is asked
  to `rebuild` (resync) the replica. Replicas come before the engine: an engine can start only
  when the replicas it must trust answer, so after every process of a volume died (a power
  cut, a kill of everything) the replicas are started, then the engine, which chooses its
  source by the generation rule (engine/generation.py) and resyncs the others by itself.
- an engine that is not running is started again, so the NBD endpoint works for new clients;
  a device above it (nbdfuse + loop) does not reconnect, which the message says: detach and
  attach the volume. The fuse-nbd holder does reconnect, and so does the `nbd` frontend's
  local relay (manager/nbdproxy.py) in front of nbd-client: their devices only pause.
- a relay (the TLS proxy of a TCP endpoint, the local relay of the `nbd` frontend) that is not
  running is started again; a dead local relay took its nbd-client's connection with it, so
  the device is reported stale (detach and attach).
- a replica whose process runs but which the engine holds in ERR is handed to `rebuild`.
- a replica that stayed failed (ERR in the engine, or its process cannot be started) longer
  than the setting `replica-replenishment-wait-interval` is replaced by a new, empty one on
  another disk (manager/replenish.py) while another replica is RW to resync it from. The time
  it was first seen failed is in the state store, so the wait survives a daemon restart.
Every restart retries forever with exponential back-off (BACKOFF_FIRST_S doubling up to
BACKOFF_MAX_S), reset once the replica is RW again or the engine answers (on a node without
the volume's engine, once the replica's process has run STABLE_S); meanwhile the
volume's message starts with "waiting for " and says what for. Asking the engine to resync a
running ERR replica backs off only up to RESYNC_RETRY_MAX_S: a replica cut off by its network
is back within a few seconds of its link (tests/t5_fault_link_cut.py).

On a cluster (`daemon run --etcd`) each node's supervisor does this for its own share: the
replicas that live on it, and the engine of a volume attached on it (manager/across.py: it
also creates its replicas of a volume made elsewhere, brings up a volume another node asked
it to attach, and stops its processes of a volume detached elsewhere).

Adoption: after a daemon restart nothing special happens. The records in the store name each
process by pid + create_time; a process that still matches is simply left running, one that does
not is treated as dead and restarted by the tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import psutil
import trio

from blockhorn.control.store import ProcessRecord, ReplicaRow, VolumeRow
from blockhorn.manager import across, leftovers, moves, process, replenish
from blockhorn.manager.leader import Leader
from blockhorn.manager.settings import REPLENISHMENT_WAIT, Settings
from blockhorn.manager.volumes import (
    VolumeManager,
    engine_rebuild,
    engine_replace,
    engine_status,
)
from blockhorn.types import BlockhornError, ReplicaMode

log = logging.getLogger("blockhorn.manager")

TICK_S = 1.0              # seconds between supervision passes
MIN_PASS_GAP_S = 0.2      # seconds from one pass's start to the next at least (store changes)
BACKOFF_FIRST_S = 1.0     # seconds before retrying a failed restart
BACKOFF_MAX_S = 30.0
STABLE_S = 10.0           # seconds a replica process of another node's engine runs: started well
# Seconds, cap of the back-off between resync requests for a running ERR replica. One request
# costs the engine at most a connect timeout (5 s) when the replica is unreachable; with the
# 30 s cap a replica whose link returned after two minutes waited up to 30 s more.
RESYNC_RETRY_MAX_S = 5.0
WAITING = "waiting for "  # prefix of a volume message about a recovery in progress


class _Wakeup:
    """An eventfd another thread (the store's watch) sets; readable until cleared. Closed
    under the lock, so a late `set` never writes to a descriptor number reused meanwhile."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):
            if not self._closed:
                os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


class Supervisor:
    def __init__(self, volumes: VolumeManager, leader: Leader | None = None) -> None:
        self.volumes = volumes
        self.store = volumes.store
        self.leader = leader   # a cluster's: replaces replicas of down nodes while leading
        self._next_try: dict[str, tuple[float, float]] = {}   # key -> (monotonic time, delay)
        # volume -> its replicas' back-off keys on this node, ended when it is seen detached
        self._backoff_of: dict[str, set[str]] = {}
        self._replace_error: dict[str, str] = {}   # replica -> why its last replacement failed
        # The running engines the last pass saw here: their exit ends the wait for the next.
        self._engines: list[ProcessRecord] = []
        self._wake: _Wakeup | None = None   # set by the store's watch (run)

    async def run(self, tick: float = TICK_S) -> None:
        # A cluster's store reports changes other nodes made (an attach asked here, a node
        # gone): the next pass starts then instead of up to a tick later.
        self._wake = _Wakeup()
        stop = self.store.watch(self._wake.set)
        try:
            await trio.to_thread.run_sync(self.adopt)
            while True:
                started = trio.current_time()
                try:
                    await trio.to_thread.run_sync(self.tick)
                except Exception:   # a bug in one pass must not end supervision; log it loudly
                    log.exception("supervision pass failed")
                await self._sleep(tick)
                await trio.sleep_until(started + MIN_PASS_GAP_S)
        finally:
            if stop is not None:
                stop()
            self._wake.close()

    async def _sleep(self, tick: float) -> None:
        """Wait `tick` seconds, or less: until an engine of an attached volume exits. The
        engine's restart is then not delayed by up to a tick (most of the pause a surviving
        frontend showed on a kill -9). A pidfd per running engine (Linux 5.3+; the engines
        need not be this daemon's children: after a daemon restart they are not), readable
        once the process exits; the pass that follows restarts the engine if its back-off
        allows, as the tick would have."""
        fds = self._engine_pidfds()

        async def exit_of(fd: int, scope: trio.CancelScope) -> None:
            await trio.lowlevel.wait_readable(fd)
            scope.cancel()

        async def changed(wake: _Wakeup, scope: trio.CancelScope) -> None:
            await trio.lowlevel.wait_readable(wake.fd)
            wake.clear()
            scope.cancel()

        try:
            with trio.move_on_after(tick):
                async with trio.open_nursery() as nursery:
                    for fd in fds:
                        nursery.start_soon(exit_of, fd, nursery.cancel_scope)
                    if self._wake is not None:
                        nursery.start_soon(changed, self._wake, nursery.cancel_scope)
                    await trio.sleep_forever()
        finally:
            for fd in fds:
                os.close(fd)

    def _engine_pidfds(self) -> list[int]:
        """A pidfd of each engine the last pass found running (no store access: on a cluster
        every store read is a request to etcd)."""
        fds = []
        for rec in self._engines:
            try:
                fd = os.pidfd_open(rec.pid)
            except OSError:
                continue   # exited meanwhile: the next pass sees it
            if not process.alive(rec):   # the pid was reused between the check and the open
                os.close(fd)
                continue
            fds.append(fd)
        return fds

    def adopt(self) -> None:
        """Log what a (re)started daemon finds; stop leftovers of detached volumes."""
        across.adopt_started(self.volumes)
        across.stop_moved_engines(self.volumes)
        for vol in self.store.volumes():
            eng = self.store.engine(vol.name)
            reps = self.store.replicas(vol.name)
            # This node's processes only (on a cluster a record of another node's pid means
            # nothing here).
            recs = ([("engine", eng.process)] if self.volumes.engine_here(vol) else []) + [
                (r.name, r.process) for r in reps if self.volumes.is_local(r)]
            if vol.desired == "attached":
                for what, rec in recs:
                    if rec is None:
                        continue
                    if process.alive(rec):
                        log.info("adopted %s of %s: pid %d", what, vol.name, rec.pid)
                    else:
                        log.warning("%s of %s (pid %d) is gone; it will be restarted",
                                    what, vol.name, rec.pid)
            elif any(process.alive(rec) for _, rec in recs):
                # A daemon died in the middle of a detach: finish it.
                log.warning("volume %s is detached but has processes running: stopping them",
                            vol.name)
                with self.volumes.locked(vol.name):
                    self.volumes._teardown(vol.name)

    def tick(self) -> None:
        process.reap()
        self._engines = []
        cluster = self.volumes.cluster is not None
        if cluster:
            across.stop_strays(self.volumes)
            leftovers.sweep(self.volumes)   # directories of removed and moved-away replicas
        if self.leader is not None:
            try:
                self.leader.tick()
            except (BlockhornError, OSError) as e:
                log.error("leader pass failed: %s", e)
        for vol in self.store.volumes():
            if cluster:
                self._cluster_pass(vol)
            if vol.desired != "attached":
                continue
            with self.volumes.locked(vol.name, blocking=False) as got:
                if not got:
                    continue   # an attach/detach/rm is working on it; look next tick
                try:
                    vol = self.store.volume(vol.name)
                except BlockhornError:
                    continue   # removed meanwhile
                if vol.desired == "attached":
                    self._check(vol)

    def _cluster_pass(self, vol: VolumeRow) -> None:
        """A cluster node's own share of a volume beyond supervision: create its replicas of
        a volume made elsewhere; stop its processes of a volume detached elsewhere."""
        if vol.desired != "attached":
            # Detached: its replicas were stopped on purpose, so the next attach starts them
            # at once; their back-off counted restarts of this attachment's processes.
            for key in self._backoff_of.pop(vol.name, ()):
                self._succeeded(key)
        try:
            leftovers = vol.desired != "attached" and self.volumes.local_leftovers(vol)
            if leftovers and not self.volumes.engine_here(vol) \
                    and self.store.engine(vol.name).process is not None \
                    and self.volumes.cluster is not None \
                    and self.volumes.cluster.is_up(vol.node or ""):
                # The engine goes first: replicas stopped under it would leave the in-sync
                # set, and the next attach would have to resync them.
                leftovers = False
            with self.volumes.locked(vol.name, blocking=False) as got:
                if not got:
                    return   # an attach/detach/rm is working on it; look next tick
                vol = self.store.volume(vol.name)
                reps = self.store.replicas(vol.name)
                across.create_missing_replicas(self.volumes, vol, reps)
                if vol.desired != "attached":
                    moves.stop_targets(self, vol)
                    self._forget_dead_replicas(vol, reps)
                if leftovers and vol.desired != "attached":
                    log.info("volume %s was detached: stopping this node's part", vol.name)
                    self.volumes._teardown(vol.name)
        except (BlockhornError, OSError) as e:
            log.error("volume %s: %s", vol.name, e)

    def _forget_dead_replicas(self, vol: VolumeRow, reps: list[ReplicaRow]) -> None:
        """A detached volume's replica of this node whose recorded process is dead (it died
        or was killed, and the detach came before its restart): the record goes, as a
        detach's stop clears it for a live one. Else `volume show` shows the dead pid for
        good, and waiting for a detached volume's replicas to stop never ends. `reps`: read
        under the volume's lock (only this node starts its replicas, under that lock)."""
        for r in reps:
            if r.process is not None and self.volumes.is_local(r) \
                    and not process.alive(r.process):
                log.info("replica %s of detached %s: its process %d is gone", r.name,
                         vol.name, r.process.pid)
                self.store.set_replica_process(r.name, None)

    def _due(self, key: str) -> bool:
        when, _ = self._next_try.get(key, (0.0, 0.0))
        return time.monotonic() >= when

    def _attempted(self, key: str, cap: float = BACKOFF_MAX_S) -> float:
        """Count one restart attempt of `key` (successful or not): the next one may come only
        after the back-off, which doubles up to BACKOFF_MAX_S. Returns that delay (seconds).
        A process that starts and dies at once therefore does not spin."""
        _, delay = self._next_try.get(key, (0.0, 0.0))
        delay = min(max(delay * 2, BACKOFF_FIRST_S), cap)
        self._next_try[key] = (time.monotonic() + delay, delay)
        return delay

    def _succeeded(self, key: str) -> None:
        self._next_try.pop(key, None)

    def _check(self, vol: VolumeRow) -> None:
        """One supervision pass over an attached volume. Replicas come first: an engine can
        only start once the replicas it must trust answer, so after everything died (power
        cut, kill of every process) the replicas are restarted, then the engine, and the
        engine resyncs the rest by itself. Every restart retries forever with back-off; the
        volume's message says what is being waited for."""
        name = vol.name
        if across.attach_requested(self.volumes, vol):
            across.realize_attach(self.volumes, name)
            return
        eng = self.store.engine(name)
        here = self.volumes.engine_here(vol)
        engine_up = here and process.alive(eng.process)
        if engine_up and eng.process is not None:
            self._engines.append(eng.process)
        waiting: dict[str, str] = {}   # replica -> what the volume waits for
        for r in self.store.replicas(name):
            if self.volumes.is_local(r) and not process.alive(r.process):
                w = self._restart_replica(vol, r, engine_up, eng.control_socket)
                if w:
                    waiting[r.name] = w
            elif not here and r.process is not None and self.volumes.is_local(r) \
                    and time.time() - r.process.create_time >= STABLE_S:
                # Its restart back-off ends once it has run a while: the engine's node ends
                # it when the engine holds the replica RW, which this node cannot see, and
                # kept, every attach here (a detach stops the process) waited longer.
                self._succeeded(f"replica/{r.name}")
            if r.moving is not None and self.volumes.cluster is not None \
                    and self.volumes.here(r.moving.node):
                moves.serve_target(self, vol, r)
        if not here:
            return   # the engine's node supervises the rest
        if not engine_up:
            self._restart_engine(vol, eng.process is not None, list(waiting.values()))
            return
        try:
            status: dict[str, Any] | None = engine_status(eng.control_socket)
        except (BlockhornError, OSError) as e:
            log.warning("engine of %s does not answer status: %s", name, e)
            status = None
        self._check_frontend(vol)
        self._check_relays(vol, eng.nbd_socket)
        if vol.access_mode == "rwx":
            self._check_share(vol)
        if status is not None:
            self._succeeded(f"engine/{name}")
            modes = {r.get("name"): r for r in status.get("replicas", [])}
            told = False
            for r in self.store.replicas(name):
                st = modes.get(r.name, {})
                if r.moving is not None and moves.engine_pass(self, vol, r, st,
                                                              eng.control_socket):
                    told = True
                    continue
                if self.volumes.cluster is not None and st.get("path") \
                        and st["path"] != r.directory:
                    # Moved to another node (manager/leader.py): once the engine holds the old
                    # one ERR (its process was stopped, or its node is gone) it takes the new.
                    told = True
                    if st.get("mode") == ReplicaMode.ERR:
                        self._tell_engine(vol, r, eng.control_socket)
                    continue
                self._check_replica(vol, r, st, eng.control_socket, status, waiting)
            if told:
                return   # the status read before the swap is stale; the next pass records it
        vol = self.store.volume(name)
        robustness = (status or {}).get("robustness", vol.robustness)
        update: dict[str, Any] = {}
        if robustness != vol.robustness:
            update["robustness"] = robustness
        message = vol.message
        if waiting:
            message = WAITING + "; ".join(waiting.values())
        elif robustness == "healthy" and message and message.startswith(WAITING):
            message = None   # what it waited for has happened
        if message != vol.message:
            update["message"] = message
        if update:
            self.store.update_volume(name, **update)

    def _restart_replica(self, vol: VolumeRow, r: ReplicaRow, engine_up: bool,
                         control_socket: str) -> str | None:
        """Start replica `r`, whose process is gone; when the engine runs, ask it to resync
        the replica. Returns what the volume waits for, or None once it started."""
        key = f"replica/{r.name}"
        if not self._due(key):
            return f"replica {r.name} to start (next try in {self._wait_left(key):.0f} s)"
        delay = self._attempted(key)
        self._backoff_of[vol.name] = self._backoff_of.get(vol.name, set()) | {key}
        try:
            log.warning("replica %s of %s (pid %s) is not running: starting it", r.name,
                        vol.name, r.process.pid if r.process else "-")
            self.volumes.start_replicas(vol.name, [r], restarted=r.process is not None)
        except (BlockhornError, OSError) as e:
            first = _short(e)
            log.error("starting replica %s of %s failed: %s", r.name, vol.name, first)
            self.store.set_replica_failed_since(r.name, time.time())
            return f"replica {r.name} to start ({first}; next try in {delay:.0f} s)"
        if engine_up:
            self._ask_rebuild(vol, r, control_socket)
        return None

    def _ask_rebuild(self, vol: VolumeRow, r: ReplicaRow, control_socket: str) -> None:
        try:
            log.info("asking the engine of %s to rebuild %s", vol.name, r.name)
            engine_rebuild(control_socket, r.name)
        except (BlockhornError, OSError) as e:
            log.error("asking the engine of %s to rebuild %s failed: %s", vol.name, r.name, e)

    def _check_replica(self, vol: VolumeRow, r: ReplicaRow, st: dict[str, Any],
                       control_socket: str, status: dict[str, Any],
                       waiting: dict[str, str]) -> None:
        """Track how long replica `r` has been failed (in the store: survives a daemon
        restart); hand a failed one whose process runs to a resync; replace one that stayed
        failed longer than the replenishment wait. Adds to `waiting` what is waited for."""
        key = f"replica/{r.name}"
        mode = st.get("mode")
        rebuilding = (st.get("rebuild") or {}).get("state") in ("queued", "running")
        if mode == ReplicaMode.RW:
            if r.failed_since is not None:
                self.store.set_replica_failed_since(r.name, None)
            self._succeeded(key)
            self._replace_error.pop(r.name, None)
            return
        if mode != ReplicaMode.ERR or rebuilding:
            # Being resynced: wait for it. The failure time stays: a replica whose resyncs
            # keep failing (a disk that fails writes) must not escape replacement by
            # restarting its resync every few seconds.
            return
        now = time.time()
        since = r.failed_since
        if since is None:
            since = now
            self.store.set_replica_failed_since(r.name, now)
        wait = Settings(self.store).get_int(REPLENISHMENT_WAIT)
        others_rw = any(x.get("mode") == ReplicaMode.RW for x in status.get("replicas", [])
                        if x.get("name") != r.name)
        if now - since >= wait and others_rw and self._due(f"replace/{r.name}") \
                and self.volumes.cluster is None:   # a cluster's leader replaces (leader.py)
            if self._replace(vol, r, now - since):
                waiting.pop(r.name, None)
                return
        if r.name in self._replace_error:
            waiting[r.name] = (waiting.get(r.name, f"replica {r.name} to resync")
                               + f"; it cannot be replaced: {self._replace_error[r.name]}")
        if st.get("path") and st.get("path") != r.directory:
            # A replacement the engine was not told of (the daemon stopped in between).
            self._tell_engine(vol, r, control_socket)
        elif self.volumes.running(r) and self._due(key):
            self._attempted(key, RESYNC_RETRY_MAX_S)
            self._ask_rebuild(vol, r, control_socket)

    def _replace(self, vol: VolumeRow, r: ReplicaRow, failed_for: float) -> bool:
        """Replace replica `r` (manager/replenish.py); False (the reason remembered for the
        volume's message, and retried with back-off) when that fails."""
        key = f"replace/{r.name}"
        log.error("replica %s of %s has been failed for %.0f s (%s): replacing it", r.name,
                  vol.name, failed_for, REPLENISHMENT_WAIT)
        self._attempted(key)
        try:
            new_dir = replenish.replace(self.volumes, vol.name, r.name)
        except (BlockhornError, OSError) as e:
            first = _short(e)
            log.error("replacing replica %s of %s failed: %s", r.name, vol.name, first)
            self._replace_error[r.name] = first
            return False
        self._succeeded(key)
        self._succeeded(f"replica/{r.name}")
        self._replace_error.pop(r.name, None)
        self.store.update_volume(vol.name, message=f"replica {r.name} was failed for "
                                 f"{failed_for:.0f} s: replaced by {new_dir}")
        return True

    def _tell_engine(self, vol: VolumeRow, r: ReplicaRow, control_socket: str) -> None:
        try:
            engine_replace(control_socket, r.name, r.address, r.directory)
        except (BlockhornError, OSError) as e:
            log.warning("telling the engine of %s about replica %s's new directory: %s",
                        vol.name, r.name, e)

    def _wait_left(self, key: str) -> float:
        return max(0.0, self._next_try.get(key, (0.0, 0.0))[0] - time.monotonic())

    def _check_frontend(self, vol: VolumeRow) -> None:
        """Reap a dead frontend helper (nbdfuse is our child when this daemon attached the
        volume) and report the device as lost: only detach + attach brings it back."""
        att = vol.attachment or {}
        for what, pid in (att.get("pids") or {}).items():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass   # not our child (adopted from an earlier daemon): init reaps it
            try:
                gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone and not vol.device_stale:
                msg = (f"{what} (pid {pid}) exited; {att.get('device')} fails I/O: detach and "
                       "attach the volume again")
                log.error("%s: %s", vol.name, msg)
                self.store.update_volume(vol.name, device_stale=True, message=msg)

    def _check_share(self, vol: VolumeRow) -> None:
        """Restart a share manager that died (it restarts Ganesha itself; this covers the
        share manager process) unless the device under it is gone."""
        key = f"share/{vol.name}"
        alive = self.volumes.shares.alive(vol.name)
        if self.volumes.cluster is not None and alive:
            try:   # for the node the share moves to if this one dies (manager/leader.py)
                self.volumes.shares.sync_records(vol.name, vol.epoch)
            except (BlockhornError, OSError) as e:
                log.warning("share of %s: storing its NFS client records: %s", vol.name, e)
        if vol.device_stale or alive or not self._due(key):
            return
        log.error("share manager of %s is not running: restarting it", vol.name)
        try:
            self.volumes.start_share(vol.name, restarted=True)
        except (BlockhornError, OSError) as e:
            log.error("restarting the share manager of %s failed: %s", vol.name, e)
            self.store.update_volume(vol.name, message=f"share: {e}")
            self._attempted(key)
            return
        self._succeeded(key)

    def _check_relays(self, vol: VolumeRow, nbd_socket: str) -> None:
        """Start the volume's relays again if they died (manager/nbdproxy.py): the TLS proxy
        of its TCP endpoint, and the `nbd` frontend's local relay. A dead local relay took
        its nbd-client's connection with it (the kernel's netlink NBD does not reconnect):
        the device fails I/O until detach + attach, as a device on the engine's socket did
        after an engine crash, which the volume then says; the relay is started again anyway,
        like the TLS proxy, so that what connects next finds it."""
        from blockhorn.manager import nbdproxy
        wanted = [k for k, on in ((nbdproxy.TLS, bool(vol.tcp_port)),
                                  (nbdproxy.LOCAL, bool((vol.attachment or {}).get("relay"))))
                  if on]
        for kind in wanted:
            if nbdproxy.running(self.volumes.home, vol.name, kind) is not None:
                continue
            key = f"{kind.log}/{vol.name}"
            if kind is nbdproxy.LOCAL and not vol.device_stale:
                msg = (f"the local NBD relay exited; {(vol.attachment or {}).get('device')} "
                       "lost its connection and fails I/O: detach and attach the volume again")
                log.error("%s: %s", vol.name, msg)
                self.store.update_volume(vol.name, device_stale=True, message=msg)
            if not self._due(key):
                continue
            log.error("the %s of %s is not running: starting it", kind.what, vol.name)
            try:
                nbdproxy.ensure(self.volumes.home, vol.name, nbd_socket, kind)
                self._succeeded(key)
            except (BlockhornError, OSError) as e:
                self._attempted(key)
                log.error("starting the %s of %s failed: %s", kind.what, vol.name, e)

    def _restart_engine(self, vol: VolumeRow, was_running: bool, waiting: list[str]) -> None:
        name = vol.name
        key = f"engine/{name}"
        if not self._due(key):
            return
        device = (vol.attachment or {}).get("device")
        if was_running:
            log.error("engine of %s is not running: restarting it", name)
        delay = self._attempted(key)
        try:
            from blockhorn.manager.upgrade import kill_orphan_engine
            kill_orphan_engine(self.store.engine(name).nbd_socket)
            self.volumes.start_engine(name, restarted=True)
        except (BlockhornError, OSError) as e:
            first = _short(e)
            log.error("restarting the engine of %s failed: %s", name, e)
            self.store.update_volume(name, robustness="faulted", message=(
                f"{WAITING}the engine to start ({first}; next try in {delay:.0f} s)"
                + "".join(f"; {w}" for w in waiting)))
            return
        msg = "engine restarted after it died"
        from blockhorn.nbd.attach import survives
        if survives(vol.attachment or {}):
            device = None   # its holder or relay reconnects and retries: the device lives on
        if device:
            msg += (f"; {device} lost its connection and fails I/O: detach and attach the "
                    "volume again")
        log.warning("%s: %s", name, msg)
        self.store.update_volume(name, device_stale=bool(device), message=msg)


def _short(e: Exception) -> str:
    """One line for a volume's message: an error's first line, and for a process that exited
    during start-up (whose error carries its log tail) the last line of that log — the
    process's own reason, e.g. a replica directory without volume.meta."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = lines[0].split("; last lines of")[0]
    return f"{head}: {lines[-1]}" if len(lines) > 1 else head
