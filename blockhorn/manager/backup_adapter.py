"""What recurring jobs and DR standbys need from the backup service (blockhorn.manager.backups,
owned by the backup work), in one place: opening a target by URL with the credentials of the
named target of that URL, resolving a backup job's target, a backup of one snapshot with
labels, and `retain` over the backups a job made.

The daemon shares one BackupService between the API and this adapter, so a recurring backup is
a backup job like any other: its progress shows in `blockhorn backup jobs`, and the service's
rule of one backup of a volume at a time covers both."""

from __future__ import annotations

import logging
import time
from typing import Any

from blockhorn import backup as bk
from blockhorn.manager.backups import BackupService
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.manager")

DELETE_LOCK_TIMEOUT_S = 600.0   # seconds a retain deletion waits for running backups/restores
# Seconds between looks at a running backup job: the service runs it in its own thread and
# offers no completion event; this is an in-memory read, and a backup takes far longer.
JOB_POLL_S = 0.5


class BackupAdapter:
    def __init__(self, volumes: VolumeManager, service: BackupService | None = None) -> None:
        # Without a shared service (outside the daemon) a private one, which resumes nothing.
        self.service = service or BackupService(volumes, resume=False)

    def open_target(self, url: str) -> bk.Target:
        """The target at `url`, with its named target's credentials when one has that URL."""
        for t in self.service.targets():
            if t["url"].rstrip("/") == url.rstrip("/"):
                return self.service.open(t)
        return bk.open_target(url)

    def resolve_target(self, name: str | None) -> str:
        """The name of the target a backup job uses: `name`, or the default target
        (NotFound / InvalidArgument as `backup create` gives them)."""
        # _default_target is the backup service's own rule (one target, or one called
        # 'default'); called here so that jobs and `backup create` never disagree.
        return str(self.service._default_target(name)["name"])

    def backup(self, volume: str, snapshot: str, target: str,
               labels: dict[str, str]) -> dict[str, Any]:
        """Back snapshot `snapshot` up as a job of the backup service; wait for it."""
        job = self.service.start_backup(volume, snapshot, target, labels)
        while job["state"] == "in-progress":
            time.sleep(JOB_POLL_S)
            job = self.service.job(job["id"])
        if job["state"] != "complete":
            raise BlockhornError(f"backup job {job['id']}: {job.get('error')}")
        return dict(job["result"])

    def retain(self, volume: str, target: str, label: tuple[str, str],
               keep: int) -> list[str]:
        """Delete the backups of `volume` on `target` carrying `label` beyond the newest
        `keep` (with the store's GC); returns their names."""
        t = self.service.open(self.service.target(target))
        try:
            mine = [b for b in bk.list_backups(t, volume)   # oldest first
                    if (b.get("labels") or {}).get(label[0]) == label[1]]
            deleted = []
            for b in mine[:-keep]:
                bk.delete_backup(t, volume, b["name"], lock_timeout_s=DELETE_LOCK_TIMEOUT_S)
                deleted.append(str(b["name"]))
                log.info("deleted backup %s of %s (recurring job retain)", b["name"], volume)
            return deleted
        finally:
            t.close()
