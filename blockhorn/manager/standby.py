"""DR standby volumes: a detached volume that follows a backup volume, backup by backup.

Vocabulary:
- the *source* is a backup volume URL, `TARGET?volume=VOL` (Longhorn's form, without a backup).
- a standby's state (`volumes.standby`, JSON; `volume show` prints it): `source`,
  `interval_s`, `last_backup` (the backup its data equals), `applied` (when), `applied_bytes`
  (fetched for the last step), `last_check`, `next_check`, `error` (the last check's problem).

How it follows: a *check* reads the backup volume's `volume.cfg` (one GET) and compares its
`LastBackupName` with `last_backup`; only when they differ does it read the two backups' block
lists and fetch the blocks that changed between them (blockhorn.backup.incremental_restore),
writing them into every replica of the detached volume, offline. A check is made when it is
due (`interval_s` after the last one, default 300 s) or asked for (`volume standby-sync`); the
daemon sleeps until the earliest due check, so a target gets no request while none is due.

Invariants:
- A standby is never attached (attach refuses it); activation applies the latest backup and
  then clears the standby state, in that order: a crash in between leaves a standby that the
  next activation finishes.
- The data equals `last_backup` whenever the volume lock is free: `last_backup` is written
  only after the blocks are flushed to every replica. A crash in the middle of a step leaves
  some new blocks over the old backup; the next step rewrites every block that differs from
  `last_backup`, which covers them.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, Busy, InvalidArgument, NotFound, format_size

log = logging.getLogger("blockhorn.manager")

DEFAULT_INTERVAL_S = 300     # seconds between checks of a standby's backup volume
MIN_INTERVAL_S = 1
FOLLOWER_RECHECK_S = 5.0     # seconds a cluster node that does not lead waits to look again
MAX_SLEEP_S = 600.0          # seconds the follower sleeps at most (wall-clock steps)

OpenTarget = Callable[[str], Any]


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ts(text: str | None) -> float:
    if not text:
        return 0.0
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _backup_exists(target: Any, volume: str, backup: str) -> bool:
    from blockhorn.backup import show_backup
    try:
        show_backup(target, volume, backup)
    except NotFound:
        return False
    return True


class StandbyManager:
    """Create, check (sync) and activate standby volumes; `run()` is the daemon's follower.
    `open_target(url)` opens a backup target (an adapter: named targets with credentials
    are looked up there)."""

    def __init__(self, volumes: VolumeManager, open_target: OpenTarget | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.volumes = volumes
        self.store = volumes.store
        if open_target is None:
            from blockhorn.manager.backup_adapter import BackupAdapter
            open_target = BackupAdapter(volumes).open_target
        self.open_target = open_target
        self.clock = clock
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    def wake(self) -> None:
        """Recompute the due checks now; callable from the API's worker threads too."""
        if self._token is None:
            return   # the follower has not started: it reads every standby when it does
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:   # a worker thread
            trio.from_thread.run_sync(lambda: self._wake.set(), trio_token=self._token)
        else:
            self._wake.set()

    # --- create ----------------------------------------------------------------------------

    def create(self, name: str, source: str, replicas: int = 3, disks: list[str] | None = None,
               transport: str = "auto", interval_s: int = DEFAULT_INTERVAL_S,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Create volume `name` as a standby of backup volume `source`, restored in full from
        its latest backup. On failure nothing is left."""
        from blockhorn.backup import decode_backup_url, load_volume, restore
        url = decode_backup_url(source)
        if url.backup:
            raise InvalidArgument(f"--standby-from takes a backup volume URL "
                                  f"(TARGET?volume={url.volume}), not one backup's")
        if not isinstance(interval_s, int) or interval_s < MIN_INTERVAL_S:
            raise InvalidArgument(f"invalid standby interval {interval_s!r}: at least "
                                  f"{MIN_INTERVAL_S} s")
        target = self.open_target(url.target)
        try:
            vol = load_volume(target, url.volume)
            if not vol.last_backup_name:
                raise NotFound(f"backup volume {url.volume!r} in {url.target} has no backup "
                               "yet: a standby starts from one")
            self.volumes.create(name, vol.size, replicas=replicas, disks=disks or [],
                                transport=transport)
            now = self.clock()
            try:
                with self.volumes.locked(name):
                    self.store.update_volume(name, standby={
                        "source": source, "interval_s": interval_s, "last_backup": None,
                        "applied": None, "applied_bytes": 0, "last_check": _rfc3339(now),
                        "next_check": _rfc3339(now + interval_s), "error": None})
                    with self._sink(name) as sink:
                        res = restore(target, url.volume, vol.last_backup_name, sink,
                                      progress=self._progress(name, progress))
                    self._applied(name, res, self.clock())
            except BaseException:
                self.volumes.remove(name, force=True)   # a half restore is no standby
                raise
        finally:
            target.close()
        self.wake()
        log.info("volume %s: standby of %s at backup %s", name, source, vol.last_backup_name)
        return self.volumes.show(name)

    @contextmanager
    def _sink(self, name: str) -> Iterator[Any]:
        """Its replica directories, or on a cluster its engine in a maintenance attach."""
        from blockhorn.manager.maintenance import restore_sink
        with restore_sink(self.volumes, name, "standby restore") as sink:
            yield sink

    def _progress(self, name: str, report: Callable[[str], None] | None) -> Any:
        def progress(p: Any) -> None:
            d = p.to_dict()
            msg = (f"applying backup {d['backup']}: {format_size(d['done_bytes'])} of "
                   f"{format_size(d['total_bytes'])}")
            if d["state"] == "in-progress":
                self.store.update_volume(name, message=msg)
            if report:
                report(msg)
        return progress

    def _applied(self, name: str, res: dict[str, Any], now: float) -> None:
        st = dict(self.store.volume(name).standby or {})
        st.update(last_backup=res["backup"], applied=_rfc3339(now),
                  applied_bytes=res.get("restored_bytes", 0), error=None)
        self.store.update_volume(name, standby=st, message=None)

    # --- follow ----------------------------------------------------------------------------

    def sync(self, name: str) -> dict[str, Any]:
        """Check the backup volume now and apply a new backup if there is one; returns the
        standby state (with `applied_now`: the step's result, or None)."""
        with self.volumes.locked(name):
            return self._sync_locked(name)

    def _sync_locked(self, name: str) -> dict[str, Any]:
        from blockhorn.backup import decode_backup_url, incremental_restore, load_volume
        from blockhorn.backup import restore as full_restore
        st = self._standby(name)
        now = self.clock()
        st.update(last_check=_rfc3339(now), next_check=_rfc3339(now + st["interval_s"]))
        result = None
        try:
            url = decode_backup_url(st["source"])
            target = self.open_target(url.target)
            try:
                latest = load_volume(target, url.volume).last_backup_name
                if latest and latest != st.get("last_backup"):
                    if self.volumes._any_alive(name):
                        raise Busy(f"volume {name!r} has running processes")
                    progress = self._progress(name, None)
                    held = st.get("last_backup")
                    if held and not _backup_exists(target, url.volume, held):
                        # Deleted from the store: no block list to compare with. Every block
                        # is zeroed, then the new backup written in full.
                        log.warning("standby %s: backup %s is gone from the store; applying "
                                    "%s in full", name, held, latest)
                        held = None
                    with self._sink(name) as sink:
                        if held:
                            result = incremental_restore(target, url.volume, latest, held,
                                                         sink, progress=progress)
                        else:
                            sink.zero(0, sink.size)
                            result = full_restore(target, url.volume, latest, sink,
                                                  progress=progress)
            finally:
                target.close()
        except (BlockhornError, OSError) as e:
            st["error"] = str(e)
            self.store.update_volume(name, standby=st, message=None)
            log.warning("standby %s: check of %s failed: %s", name, st["source"], e)
            raise
        st["error"] = None
        if result is not None:
            st.update(last_backup=result["backup"], applied=_rfc3339(self.clock()),
                      applied_bytes=result.get("restored_bytes", 0))
            log.info("standby %s: applied backup %s (%d bytes fetched)", name,
                     result["backup"], st["applied_bytes"])
        self.store.update_volume(name, standby=st, message=None)
        st["applied_now"] = result
        return st

    def _standby(self, name: str) -> dict[str, Any]:
        st = self.store.volume(name).standby
        if not st:
            raise InvalidArgument(f"volume {name!r} is not a standby volume")
        return dict(st)

    def activate(self, name: str) -> dict[str, Any]:
        """Apply the latest backup, then make `name` a normal volume (it can be attached)."""
        with self.volumes.locked(name):
            st = self._sync_locked(name)
            self.store.update_volume(name, standby=None,
                                     message=f"activated at backup {st['last_backup']} of "
                                             f"{st['source']}")
        log.info("standby %s activated at backup %s", name, st["last_backup"])
        self.wake()
        return self.volumes.show(name)

    # --- the daemon's follower -------------------------------------------------------------

    async def run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        while True:
            # A fresh event before the volumes are read: a wake() during the pass (a standby
            # created meanwhile) ends the coming sleep at once instead of being lost.
            self._wake = wake = trio.Event()
            wake_at = self.clock() + MAX_SLEEP_S
            cluster = self.volumes.cluster
            if cluster is not None and not cluster.is_leader:
                # On a cluster the leader follows every standby (one node, so no two
                # step the same standby at once); the others look again in a while.
                with trio.move_on_after(FOLLOWER_RECHECK_S):
                    await wake.wait()
                continue
            try:
                vols = await trio.to_thread.run_sync(self.store.volumes)
                for vol in vols:
                    if not vol.standby:
                        continue
                    due = _ts(vol.standby.get("next_check"))
                    if due <= self.clock():
                        await trio.to_thread.run_sync(self._check_quietly, vol.name)
                        due = self.clock() + int(vol.standby.get("interval_s")
                                                 or DEFAULT_INTERVAL_S)
                    wake_at = min(wake_at, due)
            except Exception:   # a bug must not end following; the next pass retries
                log.exception("standby pass failed")
            with trio.move_on_after(max(0.0, wake_at - self.clock())):
                await wake.wait()

    def _check_quietly(self, name: str) -> None:
        try:
            self.sync(name)
        except InvalidArgument:
            pass   # activated meanwhile: no longer a standby
        except (BlockhornError, OSError) as e:
            # Recorded in the standby's `error` by sync; retried at the next check.
            log.info("standby %s: %s", name, e)
