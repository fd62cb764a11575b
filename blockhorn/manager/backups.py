"""Backups as the daemon runs them: named targets (in the daemon's state store), backup
and restore jobs in worker threads with progress, and the list/show/delete calls the API
serves. The work itself is blockhorn.backup's; this module only finds replica directories,
targets and credentials, and keeps job state.

Targets: name, url, credential_file, mount, created (control/store BackupTargetRow). A credential file holds
AWS_* KEY=VALUE lines (Longhorn's credential-secret names) and is read at each use, so its
secrets are never copied into the state database. A backup URL names its target by URL; the
named target with that URL supplies its credentials (else the daemon's environment does).

On a cluster (manager/backup_peer.py, manager/maintenance.py): a backup reads the snapshot
from this node's replica when it holds one, else from a node that does, through that node's
API (`snapshot_source`, `snapshot_data` serve it); a restore into a volume with replicas on
other nodes attaches it here for the restore (no device) and writes to its engine over NBD.

Jobs live in memory; what survives a crash is the backup's journal under
`<home>/backup-journal/`: when the daemon starts it resumes every journal it finds (the same
backup name, skipping the blocks already uploaded).

For other daemon components (recurring jobs, DR standbys), synchronous calls to run in a
worker thread:
- `backup_now(volume, snapshot, target_row, labels=None, job=None, **options)` -> summary
  (`target_row` from `target(name)`; options: compression, block_size, full);
- `restore_into(url, volume, job=None, last_backup=None)` -> result: into the replicas of an
  existing *detached* volume, in full, or incrementally over `last_backup` (a DR standby);
- `start_backup(volume, snapshot, target, labels)` -> job, then `wait(job_id, timeout_s)` ->
  the finished job (`state`, `result` or `error`), woken by the job's end, no polling;
- `list_backups(volume=None, target=None)`, `show(url)`, `remove(url)`, `targets()`,
  `target(name)`, `open(target_row)` / `open_url(url)` -> a blockhorn.backup Target (close
  it), for `blockhorn.backup.load_volume(...).last_backup_name` and the like.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from blockhorn import backup as bk
from blockhorn.backup.backup import Progress
from blockhorn.backup.format import check_store_name
from blockhorn.control.store import BackupTargetRow, now_rfc3339
from blockhorn.manager import maintenance
from blockhorn.manager.snapshots import SnapshotManager
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import (
    AlreadyExists,
    BlockhornError,
    Busy,
    InvalidArgument,
    NotFound,
    ReplicaUnavailable,
    check_name,
    parse_size,
)

log = logging.getLogger("blockhorn.manager")

JOBS_KEPT = 100        # finished jobs remembered for `GET /v1/backups/jobs`
DELETE_WAIT_S = 120.0  # a delete waits this long for running backups: less than the CLI's
                       # request timeout (180 s), so the user gets EBUSY, not a timeout

@contextlib.contextmanager
def _unchanged(directory: str) -> Iterator[None]:
    """Around a read of a replica's snapshot served to another node: EAGAIN (read it again)
    when the replica began a rebuild meanwhile (Rebuilding is set before its layers are
    reset) or went through one (its join commit moved the generation), or is in error."""
    from blockhorn.engine.generation import seen_on_disk
    before = seen_on_disk("", directory)
    yield
    after = seen_on_disk("", directory)
    if before is None or after is None or after.rebuilding or after.error \
            or after.generation != before.generation:
        raise BlockhornError(f"the replica at {directory} changed during the read (a rebuild "
                             "or a commit): read it again", errno.EAGAIN)


class _Checked:
    """A snapshot read from a replica on this node, every block list and block inside
    `_unchanged`, as a read served to another node is: a replica that began or went through
    a rebuild or resync during the backup fails it with EAGAIN (run it again: it resumes)
    rather than give a block of a layer rewritten under the read."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.name, self.created, self.size = source.name, source.created, source.size
        self.directory = source.directory

    def changed_blocks(self, since: str | None, block_size: int) -> list[int] | None:
        with _unchanged(self.directory):
            return self._source.changed_blocks(since, block_size)

    def allocated_blocks(self, block_size: int) -> list[int]:
        with _unchanged(self.directory):
            return self._source.allocated_blocks(block_size)

    def read(self, offset: int, length: int) -> bytearray:
        with _unchanged(self.directory):
            return self._source.read(offset, length)

    def close(self) -> None:
        self._source.close()


class BackupService:
    def __init__(self, volumes: VolumeManager, resume: bool = True) -> None:
        self.volumes = volumes
        self.store = volumes.store
        self.snaps = SnapshotManager(volumes.store, volumes)
        self.journal_dir = os.path.join(volumes.home.root, "backup-journal")
        self._jobs: dict[str, dict[str, Any]] = {}
        self._guard = threading.Lock()
        self._changed = threading.Condition(self._guard)   # notified on every job update
        if resume:
            threading.Thread(target=self._resume_all, daemon=True,
                             name="backup-resume").start()

    # --- targets ---------------------------------------------------------------------------

    def set_target(self, name: str, url: str, credential_file: str | None = None,
                   mount: str | None = None) -> dict[str, Any]:
        check_name(name, "backup target")
        if credential_file:
            credential_file = os.path.abspath(credential_file)
            bk.read_credential_file(credential_file)    # readable and well-formed now
        bk.open_target(url, None, mount).close()        # a well-formed URL (no request)
        self.store.put_backup_target(BackupTargetRow(name, url, credential_file, mount,
                                                     now_rfc3339()))
        return self.target(name)

    def target(self, name: str) -> dict[str, Any]:
        for t in self.targets():
            if t["name"] == name:
                return t
        raise NotFound(f"no backup target named {name!r} (see `blockhorn backup target ls`)")

    def targets(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.store.backup_targets()]

    def remove_target(self, name: str) -> None:
        if not self.store.delete_backup_target(name):
            raise NotFound(f"no backup target named {name!r}")

    def _default_target(self, name: str | None) -> dict[str, Any]:
        if name:
            return self.target(name)
        targets = self.targets()
        if len(targets) == 1:
            return targets[0]
        for t in targets:
            if t["name"] == "default":
                return t
        raise InvalidArgument("no backup target given: add one with `blockhorn backup target "
                              "set NAME URL`, or name one with --target (or call one "
                              "'default')" if not targets else
                              "several backup targets: choose one with --target")

    def open(self, t: dict[str, Any]) -> bk.Target:
        creds = bk.read_credential_file(t["credential_file"]) if t.get("credential_file") \
            else None
        return bk.open_target(t["url"], creds, t.get("mount"))

    def open_url(self, url: str) -> tuple[bk.Target, bk.BackupURL]:
        """The target of a backup URL, with the credentials of the named target of that URL."""
        parsed = bk.decode_backup_url(url)
        for t in self.targets():
            if t["url"].rstrip("/") == parsed.target.rstrip("/"):
                return self.open(t), parsed
        return bk.open_target(parsed.target), parsed

    # --- jobs ------------------------------------------------------------------------------

    def _job(self, operation: str, **fields: Any) -> dict[str, Any]:
        with self._guard:
            return self._new_job(operation, **fields)

    def _new_job(self, operation: str, **fields: Any) -> dict[str, Any]:
        """Register a job; the caller holds `_guard`."""
        job = {"id": secrets.token_hex(6), "operation": operation, "state": "in-progress",
               "started": time.time(), **fields}
        self._jobs[job["id"]] = job
        done = [k for k, j in self._jobs.items() if j["state"] != "in-progress"]
        for k in done[:max(0, len(self._jobs) - JOBS_KEPT)]:
            del self._jobs[k]
        return job

    def _update(self, job: dict[str, Any], **fields: Any) -> None:
        with self._changed:
            job.update(fields)
            self._changed.notify_all()

    def _progress(self, job: dict[str, Any]) -> Callable[[Progress], None]:
        def report(p: Progress) -> None:
            d = p.to_dict()
            self._update(job, progress={k: d[k] for k in (
                "total_bytes", "done_bytes", "transferred_bytes", "rate", "eta", "percent",
                "new_blocks", "skipped_blocks")})
        return report

    def _run(self, job: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        def work() -> None:
            try:
                result = fn()
            except BlockhornError as e:
                log.warning("%s job %s failed: %s", job["operation"], job["id"], e)
                self._update(job, state="error", error=str(e), finished=time.time())
            except Exception as e:   # a bug: keep the daemon up, tell the client
                log.exception("%s job %s failed", job["operation"], job["id"])
                self._update(job, state="error", error=f"internal error: {e!r}",
                             finished=time.time())
            else:
                self._update(job, state="complete", result=result, finished=time.time())
        threading.Thread(target=work, daemon=True, name=f"backup-job-{job['id']}").start()

    def job(self, job_id: str) -> dict[str, Any]:
        with self._guard:
            if job_id not in self._jobs:
                raise NotFound(f"no backup job {job_id!r}")
            return json.loads(json.dumps(self._jobs[job_id]))

    def wait(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The job once it is no longer in progress (or as it is when `timeout_s` passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while True:
                job = self._jobs.get(job_id)
                if job is None:
                    raise NotFound(f"no backup job {job_id!r}")
                left = None if deadline is None else deadline - time.monotonic()
                if job["state"] != "in-progress" or (left is not None and left <= 0):
                    return json.loads(json.dumps(job))
                self._changed.wait(left)

    def jobs(self) -> list[dict[str, Any]]:
        with self._guard:
            return json.loads(json.dumps(list(self._jobs.values())))

    # --- backup ----------------------------------------------------------------------------

    def start_backup(self, volume: str, snapshot: str | None = None, target: str | None = None,
                     labels: dict[str, str] | None = None, compression: str | None = None,
                     block_size: int | None = None) -> dict[str, Any]:
        """Start a backup job of `volume`'s snapshot (a new snapshot if none is named).
        `compression` and `block_size` apply to a new backup volume (an existing one keeps
        its method; an incremental backup keeps its base's block size)."""
        check_name(volume)
        check_store_name(volume, "volume")   # Longhorn's rule: two characters at least
        t = self._default_target(target)
        self.store.volume(volume)
        options: dict[str, Any] = {"labels": labels}
        if compression:
            options["compression"] = compression
        if block_size:
            options["block_size"] = parse_size(block_size)
        with self._guard:   # one backup of a volume at a time: check and claim together
            running = [j for j in self._jobs.values() if j["operation"] == "backup"
                       and j["volume"] == volume and j["state"] == "in-progress"]
            if running:
                raise Busy(f"a backup of {volume!r} is running (job {running[0]['id']}): wait "
                           "for it (`blockhorn backup jobs`)")
            job = self._new_job("backup", volume=volume, snapshot=snapshot, target=t["name"])
        try:
            if snapshot is None:
                snapshot = time.strftime("backup-%Y%m%d-%H%M%S", time.gmtime())
                with self.volumes.locked(volume):
                    self.snaps.create(volume, snapshot, {"blockhorn/backup": "true"})
                self._update(job, snapshot=snapshot)
            else:
                with self.volumes.locked(volume):
                    self.snaps.find(volume, snapshot)
        except BaseException as e:
            self._update(job, state="error", error=str(e), finished=time.time())
            raise
        self._run(job, functools.partial(self.backup_now, volume, snapshot, t, job=job,
                                         **options))
        return self.job(job["id"])

    def backup_now(self, volume: str, snapshot: str, t: dict[str, Any],
                   labels: dict[str, str] | None = None, job: dict[str, Any] | None = None,
                   **options: Any) -> dict[str, Any]:
        """Back up synchronously (a job's body; recurring jobs may call it directly).
        `options` go to `blockhorn.backup.create_backup` (compression, block_size, full)."""
        source = self.open_source(volume, snapshot)
        try:
            target = self.open(t)
            try:
                return bk.create_backup(target, volume, source, labels=labels,
                                        journal_dir=self.journal_dir,
                                        progress=self._progress(job) if job else None,
                                        **options)
            finally:
                target.close()
        finally:
            source.close()

    def open_source(self, volume: str, snapshot: str) -> Any:
        """The snapshot to back up (or to clone, manager/snapshots.py): only from a replica
        in sync (backup_peer.readable_replicas: the engine's RW ones, or for a detached
        volume those the generation rule would start from), so never a Rebuilding, ERR or
        stale one — on one host too, where a stale replica may hold an older snapshot of the
        same name; this node's, else (a cluster) one on a node that is up
        (manager/backup_peer.py)."""
        vm = self.volumes
        from blockhorn.manager.backup_peer import PeerSnapshot, readable_replicas
        readable = readable_replicas(vm, volume)
        errors = []
        local = [r.directory for r in readable if vm.is_local(r)]
        if local:
            try:
                return _Checked(bk.open_snapshot(local, snapshot))
            except NotFound as e:
                errors.append(f"node {vm.me}: {e}")
        for r in sorted((r for r in readable if not vm.is_local(r)),
                        key=lambda r: (r.node or "", r.name)):
            node = r.node or ""
            if vm.cluster is None or not vm.cluster.is_up(node):
                errors.append(f"node {node}: down")
                continue
            try:
                source = PeerSnapshot(vm, node, volume, snapshot, r.name)
            except BlockhornError as e:
                errors.append(str(e))
                continue
            log.info("backup of %s/%s reads replica %s on node %s", volume, snapshot, r.name,
                     node)
            return source
        raise NotFound(f"no in-sync replica of {volume!r} ({', '.join(r.name for r in readable)})"
                       f" can read snapshot {snapshot!r}: {'; '.join(errors)}")

    # --- a snapshot served to another node's backup (manager/backup_peer.py) --------------

    def replica_state(self, volume: str) -> dict[str, Any]:
        """What this node's replicas of `volume` say of themselves on disk (the generation
        rule's view, engine/generation.py `seen_on_disk`), for another node's backup."""
        from blockhorn.engine.generation import seen_on_disk
        from blockhorn.manager.backup_peer import seen_to_json
        seen = [seen_on_disk(r.name, r.directory) for r in self.store.replicas(volume)
                if self.volumes.is_local(r)]
        return {"replicas": [seen_to_json(s) for s in seen if s is not None]}

    def _served_dirs(self, volume: str, replica: str | None) -> list[str]:
        """This node's replica directories of `volume` (only `replica`'s, when named) whose
        files say they are whole: not Rebuilding, not in error."""
        from blockhorn.engine.generation import seen_on_disk
        dirs, why = [], []
        for r in self.store.replicas(volume):
            if not self.volumes.is_local(r) or replica not in (None, r.name):
                continue
            s = seen_on_disk(r.name, r.directory)
            if s is None or s.rebuilding or s.error:
                why.append(f"{r.name}: " + ("unreadable" if s is None else
                                           "rebuilding" if s.rebuilding else "in error"))
                continue
            dirs.append(r.directory)
        if not dirs:
            raise ReplicaUnavailable(
                f"node {self.volumes.me} holds no whole replica of {volume!r}"
                + (f" named {replica!r}" if replica else "")
                + (f" ({'; '.join(why)})" if why else ""))
        return dirs

    def snapshot_source(self, volume: str, snapshot: str, blocks: str | None = None,
                        since: str | None = None, block_size: int = 0,
                        replica: str | None = None) -> dict[str, Any]:
        """This node's replica's snapshot: name, size, created; with `blocks` "all" or
        "changed" (since snapshot `since`) the offsets of those blocks of `block_size`."""
        if blocks is not None and (block_size <= 0 or blocks not in ("all", "changed")):
            raise InvalidArgument("blocks is all or changed, with a block_size")
        source = bk.open_snapshot(self._served_dirs(volume, replica), snapshot)
        try:
            out: dict[str, Any] = {"name": source.name, "size": source.size,
                                   "created": source.created}
            with _unchanged(source.directory):
                if blocks is not None:
                    out["blocks"] = source.allocated_blocks(block_size) if blocks == "all" \
                        else source.changed_blocks(since, block_size)
            return out
        finally:
            source.close()

    def snapshot_data(self, volume: str, snapshot: str, offset: int, length: int,
                      replica: str | None = None) -> bytes:
        from blockhorn.manager.backup_peer import MAX_READ
        if offset < 0 or not 0 < length <= MAX_READ:
            raise InvalidArgument(f"read 1 to {MAX_READ} bytes at an offset of 0 or more")
        source = bk.open_snapshot(self._served_dirs(volume, replica), snapshot)
        try:
            with _unchanged(source.directory):
                return bytes(source.read(offset, length))
        finally:
            source.close()

    def _resume_all(self) -> None:
        """Resume every interrupted backup whose journal names a known target and volume."""
        try:
            names = os.listdir(self.journal_dir)
        except FileNotFoundError:
            return
        for file_name in names:
            try:
                with open(os.path.join(self.journal_dir, file_name)) as f:
                    header = json.loads(f.readline())
                t = next(t for t in self.targets() if t["url"] == header["target"])
                self.store.volume(header["volume"])
            except (OSError, ValueError, KeyError, StopIteration, NotFound):
                continue   # not resumable here: left for an explicit `backup create`
            job = self._job("backup", volume=header["volume"], snapshot=header["snapshot"],
                            target=t["name"], resumed=True)
            log.info("resuming backup of %s/%s to %s", header["volume"], header["snapshot"],
                     t["name"])
            self._run(job, functools.partial(self.backup_now, header["volume"],
                                             header["snapshot"], t, job=job))

    # --- list, show, delete ----------------------------------------------------------------

    def list_backups(self, volume: str | None = None, target: str | None = None,
                     errors: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Backups on one target or all; with `errors`, a target that cannot be read is
        recorded there (name -> message) and the others are still listed."""
        out: list[dict[str, Any]] = []
        for t in [self.target(target)] if target else self.targets():
            try:
                store = self.open(t)
                try:
                    out.extend(dict(b, target=t["name"]) for b in bk.list_backups(store, volume))
                finally:
                    store.close()
            except NotFound:
                continue
            except BlockhornError as e:
                if errors is None or target:
                    raise
                errors[t["name"]] = str(e)
        return out

    def show(self, url: str) -> dict[str, Any]:
        target, parsed = self.open_url(url)
        try:
            if not parsed.backup:
                raise InvalidArgument(f"{url!r} names no backup (…?backup=NAME&volume=VOL)")
            return bk.show_backup(target, parsed.volume, parsed.backup)
        finally:
            target.close()

    def remove(self, url: str) -> dict[str, Any]:
        target, parsed = self.open_url(url)
        try:
            if not parsed.backup:
                raise InvalidArgument(f"{url!r} names no backup (…?backup=NAME&volume=VOL)")
            return bk.delete_backup(target, parsed.volume, parsed.backup,
                                    lock_timeout_s=DELETE_WAIT_S)
        finally:
            target.close()

    def collect_garbage(self, volume: str, target: str | None = None) -> dict[str, Any]:
        """Sweep the backup volume for blocks no backup uses (lists blocks/: run rarely)."""
        t = self._default_target(target)
        store = self.open(t)
        try:
            return bk.collect_garbage(store, check_store_name(volume, "volume"),
                                      lock_timeout_s=DELETE_WAIT_S)
        finally:
            store.close()

    # --- restore ---------------------------------------------------------------------------

    def start_restore(self, url: str, volume: str, replicas: int = 3,
                      disks: list[str] | None = None) -> dict[str, Any]:
        """Create volume `volume` (detached) and restore the backup into it, as a job."""
        check_name(volume)
        target, parsed = self.open_url(url)
        try:
            if not parsed.backup:
                raise InvalidArgument(f"{url!r} names no backup (…?backup=NAME&volume=VOL)")
            size = bk.load_volume(target, parsed.volume).size
            bk.show_backup(target, parsed.volume, parsed.backup)   # exists, before creating
        finally:
            target.close()
        try:
            self.store.volume(volume)
            raise AlreadyExists(f"volume {volume!r} already exists: restore into a new volume")
        except NotFound:
            pass
        self.volumes.create(volume, size, replicas=replicas, disks=disks or [])
        job = self._job("restore", volume=volume, url=url)

        def work() -> dict[str, Any]:
            try:
                return self.restore_into(url, volume, job)
            except BaseException:
                self.volumes.remove(volume, force=True)   # a half-restored volume is no volume
                raise
        self._run(job, work)
        return self.job(job["id"])

    def restore_into(self, url: str, volume: str, job: dict[str, Any] | None = None,
                     last_backup: str | None = None) -> dict[str, Any]:
        """Restore synchronously into the replicas of detached volume `volume` (in full, or
        incrementally over `last_backup` for a DR standby)."""
        target, parsed = self.open_url(url)
        try:
            with self.volumes.locked(volume):
                if self.store.volume(volume).desired == "attached":
                    raise Busy(f"volume {volume!r} is attached: detach it before restoring "
                               "into it")
                with maintenance.restore_sink(self.volumes, volume,
                                              f"restore of backup {parsed.backup}") as sink:
                    return self._restore(target, parsed, sink, job, last_backup)
        finally:
            target.close()

    def _restore(self, target: bk.Target, parsed: bk.BackupURL, sink: Any,
                 job: dict[str, Any] | None, last_backup: str | None) -> dict[str, Any]:
        prog = self._progress(job) if job else None
        if last_backup:
            return bk.incremental_restore(target, parsed.volume, parsed.backup, last_backup,
                                          sink, progress=prog)
        return bk.restore(target, parsed.volume, parsed.backup, sink, progress=prog)
