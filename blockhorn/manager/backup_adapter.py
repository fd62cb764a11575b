"""What recurring jobs and DR standbys need from the backup service (blockhorn.manager.backups,
owned by the backup work), in one place: opening a target by URL with the credentials of the
named target of that URL, resolving a backup job's target, a backup of one snapshot with
labels, and `retain` over the backups a job made."""

from __future__ import annotations

import logging
from typing import Any

from blockhorn import backup as bk
from blockhorn.manager.backups import BackupService
from blockhorn.manager.volumes import VolumeManager

log = logging.getLogger("blockhorn.manager")

DELETE_LOCK_TIMEOUT_S = 600.0   # seconds a retain deletion waits for running backups/restores


class BackupAdapter:
    def __init__(self, volumes: VolumeManager) -> None:
        # resume=False: the API's own BackupService resumes interrupted backups, once.
        self.service = BackupService(volumes, resume=False)

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
        return self.service.backup_now(volume, snapshot, self.service.target(target), labels)

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
