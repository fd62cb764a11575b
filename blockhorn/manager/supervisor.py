"""Supervision: keep the processes of attached volumes running.

Every tick (about a second) for each attached volume:
- a replica process that died is started again and the engine is asked to `rebuild` it (the
  engine reconnects and resyncs it; robustness goes degraded -> healthy). A replica whose process
  runs but which the engine holds in ERR is also handed to `rebuild`.
- an engine that died is recorded (robustness faulted, a message) and started again, so the NBD
  endpoint works for new clients; a device above it (nbdfuse + loop) does not reconnect, which the
  message says: detach and attach the volume.
Failed restarts back off exponentially, so a replica that cannot start does not spin.

Adoption: after a daemon restart nothing special happens. The records in the store name each
process by pid + create_time; a process that still matches is simply left running, one that does
not is treated as dead and restarted by the tick.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil
import trio

from blockhorn.manager import process
from blockhorn.manager.state import VolumeRow
from blockhorn.manager.volumes import VolumeManager, engine_rebuild, engine_status
from blockhorn.types import BlockhornError, ReplicaMode

log = logging.getLogger("blockhorn.manager")

TICK_S = 1.0              # seconds between supervision passes
BACKOFF_FIRST_S = 1.0     # seconds before retrying a failed restart
BACKOFF_MAX_S = 30.0


class Supervisor:
    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes
        self.store = volumes.store
        self._next_try: dict[str, tuple[float, float]] = {}   # key -> (monotonic time, delay)

    async def run(self, tick: float = TICK_S) -> None:
        await trio.to_thread.run_sync(self.adopt)
        while True:
            try:
                await trio.to_thread.run_sync(self.tick)
            except Exception:   # a bug in one pass must not end supervision; log it loudly
                log.exception("supervision pass failed")
            await trio.sleep(tick)

    def adopt(self) -> None:
        """Log what a (re)started daemon finds; stop leftovers of detached volumes."""
        for vol in self.store.volumes():
            eng = self.store.engine(vol.name)
            reps = self.store.replicas(vol.name)
            recs = [("engine", eng.process)] + [(r.name, r.process) for r in reps]
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
        for vol in self.store.volumes():
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

    def _due(self, key: str) -> bool:
        when, _ = self._next_try.get(key, (0.0, 0.0))
        return time.monotonic() >= when

    def _failed(self, key: str) -> None:
        _, delay = self._next_try.get(key, (0.0, 0.0))
        delay = min(max(delay * 2, BACKOFF_FIRST_S), BACKOFF_MAX_S)
        self._next_try[key] = (time.monotonic() + delay, delay)

    def _succeeded(self, key: str) -> None:
        self._next_try.pop(key, None)

    def _check(self, vol: VolumeRow) -> None:
        name = vol.name
        eng = self.store.engine(name)
        if not process.alive(eng.process):
            self._restart_engine(vol, eng.process is not None)
            return
        try:
            status: dict[str, Any] | None = engine_status(eng.control_socket)
        except (BlockhornError, OSError) as e:
            log.warning("engine of %s does not answer status: %s", name, e)
            status = None
        self._check_frontend(vol)
        if vol.access_mode == "rwx":
            self._check_share(vol)
        modes = {r.get("name"): r for r in (status or {}).get("replicas", [])}
        for r in self.store.replicas(name):
            key = f"replica/{r.name}"
            dead = not process.alive(r.process)
            st = modes.get(r.name, {})
            in_err = st.get("mode") == ReplicaMode.ERR and not st.get("rebuild")
            if not (dead or in_err) or not self._due(key):
                continue
            try:
                if dead:
                    log.warning("replica %s of %s (pid %s) died: restarting", r.name, name,
                                r.process.pid if r.process else "-")
                    self.volumes.start_replicas(name, [r], restarted=True)
                log.info("asking the engine of %s to rebuild %s", name, r.name)
                engine_rebuild(eng.control_socket, r.name)
                self._succeeded(key)
            except (BlockhornError, OSError) as e:
                log.error("recovering replica %s of %s failed: %s", r.name, name, e)
                self.store.update_volume(name, message=f"replica {r.name}: {e}")
                self._failed(key)
        if status and status.get("robustness") != vol.robustness:
            self.store.update_volume(name, robustness=status.get("robustness"))

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
        if vol.device_stale or self.volumes.shares.alive(vol.name) or not self._due(key):
            return
        log.error("share manager of %s is not running: restarting it", vol.name)
        try:
            self.volumes.start_share(vol.name, restarted=True)
        except (BlockhornError, OSError) as e:
            log.error("restarting the share manager of %s failed: %s", vol.name, e)
            self.store.update_volume(vol.name, message=f"share: {e}")
            self._failed(key)
            return
        self._succeeded(key)

    def _restart_engine(self, vol: VolumeRow, was_running: bool) -> None:
        name = vol.name
        key = f"engine/{name}"
        if not self._due(key):
            return
        device = (vol.attachment or {}).get("device")
        if was_running:
            log.error("engine of %s died", name)
        try:
            self.volumes.start_engine(name, restarted=True)
        except (BlockhornError, OSError) as e:
            log.error("restarting the engine of %s failed: %s", name, e)
            self.store.update_volume(name, robustness="faulted",
                                     message=f"engine died and could not be restarted: {e}")
            self._failed(key)
            return
        self._succeeded(key)
        msg = "engine restarted after it died"
        if device:
            msg += (f"; {device} lost its connection and fails I/O: detach and attach the "
                    "volume again")
        log.warning("%s: %s", name, msg)
        self.store.update_volume(name, device_stale=bool(device), message=msg)
