"""Backupstore locks, Longhorn's protocol (backupstore lock.go), so that blockhorn and
Longhorn working on one store exclude each other:

- A lock is a file `locks/lock-<16 hex>.lck` in the backup volume: `{"Name", "Type",
  "Acquired"}`; its time is the file's modification time on the server.
- Types: 1 = backup and restore (they share), 2 = delete (excludes type 1).
- Acquire: write the lock (Acquired=false), wait LOCK_CHECK_WAIT_S (clocks differ and server
  times have one-second precision: the wait lets a competitor's lock become visible), list
  the locks and give up if one of the other type has priority — acquired before ours, or
  else older, or else a smaller name — and is not expired. Otherwise rewrite ours with
  Acquired=true and refresh it (rewrite) every LOCK_REFRESH_S.
- A lock not refreshed for LOCK_DURATION_S is expired and ignored: a crashed holder does not
  block the store forever.

Longhorn tries once; `acquire(timeout_s)` here retries until the deadline, so a delete can
wait for a running backup instead of failing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import TracebackType

from blockhorn.backup.format import LOCK_BACKUP, LOCK_DELETE, LockCfg, lock_path, locks_dir
from blockhorn.backup.format import new_lock_name as _new_name
from blockhorn.backup.targets import Target
from blockhorn.types import BlockhornError, Busy, NotFound

log = logging.getLogger("blockhorn.backup")

LOCK_DURATION_S = 150.0          # a lock older than this (since its last refresh) is expired
LOCK_REFRESH_S = 60.0            # a held lock is rewritten this often
LOCK_CHECK_WAIT_S = 2.0          # wait between writing our lock and reading the others
LOCK_WAIT_ENV = "BLOCKHORN_BACKUP_LOCK_WAIT_S"   # overrides LOCK_CHECK_WAIT_S (tests)
RETRY_INTERVAL_S = 1.0           # pause between attempts while acquire() waits

__all__ = ["LOCK_BACKUP", "LOCK_DELETE", "StoreLock"]


def _check_wait() -> float:
    try:
        return float(os.environ.get(LOCK_WAIT_ENV, LOCK_CHECK_WAIT_S))
    except ValueError:
        return LOCK_CHECK_WAIT_S


class StoreLock:
    """One lock on one backup volume. Use `with StoreLock(...).acquire(timeout_s):`."""

    def __init__(self, target: Target, volume: str, kind: int) -> None:
        self.target = target
        self.volume = volume
        self.kind = kind
        self.name = _new_name()
        self.path = lock_path(volume, self.name)
        self.acquired = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._write_lock = threading.Lock()

    def _save(self) -> float:
        with self._write_lock:
            self.target.put(self.path, LockCfg(self.name, self.kind, self.acquired).encode())
        return self.target.mtime(self.path)

    def _try_once(self) -> bool:
        self.acquired = False
        mine = self._save()
        time.sleep(_check_wait())
        now = time.time()
        for file_name in self.target.list(locks_dir(self.volume)):
            if not file_name.endswith(".lck") or file_name == f"{self.name}.lck":
                continue
            path = f"{locks_dir(self.volume)}/{file_name}"
            try:
                other = LockCfg.decode(self.target.get(path))
                when = self.target.mtime(path)
            except (NotFound, BlockhornError) as e:
                log.info("skipping lock %s: %s", path, e)   # released meanwhile, or unreadable
                continue
            if other.type == self.kind or now - when > LOCK_DURATION_S:
                continue
            # Longhorn's compareLocks: an acquired lock first, then the older, then by name
            # (ours is not acquired yet while we look).
            if other.acquired or (when, other.name) < (mine, self.name):
                log.info("lock %s (type %d) of %s has priority over ours", other.name,
                         other.type, self.volume)
                self.target.delete(self.path)
                return False
        self.acquired = True
        self._save()
        return True

    def acquire(self, timeout_s: float = 0.0) -> StoreLock:
        """Take the lock, retrying until `timeout_s` has passed; Busy if it cannot."""
        deadline = time.monotonic() + timeout_s
        while not self._try_once():
            if time.monotonic() + RETRY_INTERVAL_S > deadline:
                what = "delete" if self.kind == LOCK_DELETE else "backup/restore"
                other = "a backup or restore" if self.kind == LOCK_DELETE else "a delete"
                raise Busy(f"cannot lock backup volume {self.volume!r} for {what}: {other} "
                           "is running on it; try again later")
            time.sleep(RETRY_INTERVAL_S)
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                           name=f"backup-lock-{self.volume}")
        self._refresher.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                self._save()
            except BlockhornError as e:   # the next refresh may succeed; expiry is 2.5x
                log.warning("cannot refresh lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self.acquired:
            self.acquired = False
            try:
                self.target.delete(self.path)
            except BlockhornError as e:
                # Not fatal, and must not hide the error the lock's user is raising: a lock
                # left behind expires LOCK_DURATION_S after its last refresh.
                log.warning("cannot remove lock %s: %s (it expires in %.0f s)", self.path, e,
                            LOCK_DURATION_S)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
