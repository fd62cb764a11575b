"""What a recurring job does to each volume it applies to (blockhorn.manager.jobs schedules).

Every snapshot a job takes carries the label `RecurringJob=<job name>` (Longhorn's label), and
`retain N` keeps the newest N of them per volume: older ones are removed after each run, so a
job never touches snapshots it did not take. Tasks:

- `snapshot`: take a snapshot, then remove this job's snapshots beyond the newest N.
- `snapshot-cleanup`: remove system snapshots (not user-created: taken by blockhorn for its own
  work) and recurring-job snapshots beyond retain: for a job that exists, its own retain; for
  the label of a job that was removed, this job's N. Then fold the removed ones. Snapshots
  without the label are never touched.
- `backup`: take a snapshot, back it up to the job's target (labels `RecurringJob=<job>`),
  delete this job's backups of the volume beyond the newest N (with the store's GC), and keep
  the newest N of its snapshots (the newest is the base of the next incremental backup).

Snapshot steps run under the volume's lock (the API takes the same lock); the upload does not,
so a long backup does not hold up attach or detach. A failure on one volume does not stop the
others: the run fails with every volume's error in its message.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from blockhorn.keys import load_key
from blockhorn.manager import remote
from blockhorn.manager.backup_adapter import BackupAdapter
from blockhorn.manager.jobs import JobFailed, JobScheduler, JobSpec, JobStore, group_members
from blockhorn.manager.snapshots import SnapshotManager
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import AlreadyExists, BlockhornError, Busy, NotFound

log = logging.getLogger("blockhorn.manager")

JOB_LABEL = "RecurringJob"
TASK_TIMEOUT_S = 6 * 3600.0   # seconds a job's steps for one volume may take on another node

Backup = Callable[[JobSpec, str, str], dict[str, Any]]


class JobTasks:
    """`execute(spec)` runs one job over its volumes (synchronous: a worker thread calls it).
    `backup(spec, volume, snapshot)` backs a snapshot up and applies retain; None while this
    build has no backup support."""

    def __init__(self, volumes: VolumeManager, backup: Backup | None = None) -> None:
        self.volumes = volumes
        self.store = volumes.store
        # With the volume manager: a detached cluster volume with replicas on other nodes is
        # attached here for the snapshot steps (manager/maintenance.py).
        self.snaps = SnapshotManager(volumes.store, volumes)
        self.jobs = JobStore(volumes.store)
        self.backup = backup

    def targets(self, spec: JobSpec) -> list[str]:
        """The job's volumes now. A DR standby takes no snapshots or backups (as in
        Longhorn): it holds what the backups it follows hold, until it is activated."""
        if spec.volume:
            if self.store.volume(spec.volume).standby:   # NotFound once the volume is gone
                raise Busy(f"volume {spec.volume!r} is a DR standby: its jobs run once it is "
                           "activated")
            return [spec.volume]
        return group_members(self.store, spec.group or "")

    def execute(self, spec: JobSpec) -> dict[str, Any]:
        names = self.targets(spec)
        if not names:
            return {"volumes": {}, "message": f"no volume is in group {spec.group!r}"}
        done: dict[str, Any] = {}
        errors = []
        for name in names:
            try:
                done[name] = self._one(spec, name)
            except (BlockhornError, OSError) as e:   # OSError: a file target's disk, say
                log.warning("job %s on volume %s failed: %s", spec.name, name, e)
                errors.append(f"{name}: {e}")
        result = {"volumes": done}
        if errors:
            raise JobFailed("; ".join(errors), result)
        return result

    def _one(self, spec: JobSpec, name: str) -> dict[str, Any]:
        node = self.volumes.engine_elsewhere(self.store.volume(name))
        if node:
            return self._on_engine_node(spec, name, node)
        return self.one(spec, name)

    def _on_engine_node(self, spec: JobSpec, name: str, node: str) -> dict[str, Any]:
        """A cluster volume attached on another node: its engine is there, so the job's
        steps for it run there (POST /v1/jobs/JOB/volumes/VOL/run, with the cluster token)."""
        path = f"/v1/jobs/{quote(spec.name, safe='')}/volumes/{quote(name, safe='')}/run"
        token = remote.cluster_token(load_key(self.volumes.home.key))
        with remote.Peer(self.store, node, token, TASK_TIMEOUT_S) as peer:
            done: dict[str, Any] = peer.request("POST", path, json={}).json()
        return {**done, "node": node}

    def one(self, spec: JobSpec, name: str, here_only: bool = False) -> dict[str, Any]:
        """The job's steps for volume `name`, on this node. `here_only` (asked by another
        node): refused when the volume's engine is not here (moved meanwhile), never
        passed on again."""
        node = self.volumes.engine_elsewhere(self.store.volume(name)) if here_only else None
        if node:
            raise Busy(f"volume {name!r} is attached on node {node}, not here: the job's "
                       "next run goes there")
        if spec.task == "snapshot-cleanup":
            with self.volumes.locked(name):
                return self._cleanup(name, spec.retain)
        if spec.task == "backup" and self.backup is None:
            raise BlockhornError("this blockhorn has no backup support")
        with self.volumes.locked(name):
            snap = self._snapshot(spec, name)
        out: dict[str, Any] = {"snapshot": snap}
        if spec.task == "backup" and self.backup is not None:
            # Not under the volume lock: a long upload must not hold up attach, detach or
            # snapshots of the volume (the snapshot it reads does not change).
            out.update(self.backup(spec, name, snap))
        with self.volumes.locked(name):
            # After the backup: the newest snapshot is the base of the next incremental one.
            out["removed"] = self._retain_snapshots(name, spec.name, spec.retain)
        return out

    def _snapshot(self, spec: JobSpec, name: str) -> str:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        for n in range(100):
            # Two runs in one second (`job run` twice) need distinct names.
            snap = f"{spec.name}-{stamp}" + (f"-{n}" if n else "")
            try:
                self.snaps.create(name, snap, {JOB_LABEL: spec.name})
                return snap
            except BlockhornError as e:   # the engine's refusal carries the errno only
                if e.errno != errno.EEXIST:
                    raise
        raise AlreadyExists(f"cannot name a snapshot of job {spec.name!r} on {name!r}")

    def _retain_snapshots(self, name: str, job: str, retain: int) -> list[str]:
        """Remove job `job`'s snapshots of `name` beyond the newest `retain`."""
        mine = [s for s in self.snaps.list(name) if (s.get("labels") or {}).get(JOB_LABEL) == job]
        mine.sort(key=lambda s: str(s.get("created")))
        return self._remove(name, [s["name"] for s in mine[:-retain]])

    def _remove(self, name: str, snaps: list[str]) -> list[str]:
        removed = []
        for snap in snaps:
            try:
                self.snaps.remove(name, snap)
            except NotFound:
                continue   # gone already: what we wanted
            removed.append(snap)
            log.info("removed snapshot %s of %s (recurring job retain)", snap, name)
        return removed

    def _cleanup(self, name: str, retain: int) -> dict[str, Any]:
        snaps = sorted(self.snaps.list(name), key=lambda s: str(s.get("created")))
        doomed = [s["name"] for s in snaps if not s.get("user_created")]
        by_job: dict[str, list[str]] = {}
        for s in snaps:
            job = (s.get("labels") or {}).get(JOB_LABEL)
            if job and s.get("user_created"):
                by_job.setdefault(job, []).append(s["name"])
        for job, names in by_job.items():
            # A job that exists keeps its own retain (this job must not fight it); the
            # snapshots of a removed job keep this job's.
            try:
                keep = self.jobs.get(job).spec.retain
            except NotFound:
                keep = retain
            doomed += names[:-keep]
        removed = self._remove(name, doomed)
        if removed:
            self.snaps.purge(name)
        return {"removed": removed}


def make_scheduler(volumes: VolumeManager, adapter: BackupAdapter) -> JobScheduler:
    """The daemon's job scheduler, with the tasks of this build."""

    def backup(spec: JobSpec, volume: str, snap: str) -> dict[str, Any]:
        target = spec.target or adapter.resolve_target(None)
        made = adapter.backup(volume, snap, target, {JOB_LABEL: spec.name})
        deleted = adapter.retain(volume, target, (JOB_LABEL, spec.name), spec.retain)
        return {"backup": made["name"], "url": made["url"], "target": target,
                "deleted_backups": deleted}

    tasks = JobTasks(volumes, backup)
    sched = JobScheduler(volumes.store, tasks.execute, check_target=adapter.resolve_target,
                         node=volumes.me or "",
                         live_nodes=volumes.cluster.up_nodes if volumes.cluster else None)
    sched.run_volume = tasks.one
    return sched
