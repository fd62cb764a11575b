"""List, inspect and delete backups; garbage-collect blocks no backup uses.

Deleting (docs/DURABILITY.md, "Backups: delete and GC"): under the exclusive delete lock,
remove the backup's cfg, then read every remaining cfg; if any is in progress (empty
CreatedTime: a backup of Longhorn or blockhorn that has not finished), delete no block.
Otherwise the candidates are the deleted backup's blocks that no remaining cfg lists; the list
of backups is read again and, if it changed, nothing is deleted. Blocks are found from cfgs,
never by listing `blocks/` (which costs thousands of LIST requests on a large store);
`collect_garbage` does that sweep on request, for blocks left by abandoned backups.
"""

from __future__ import annotations

import logging
from typing import Any

from blockhorn.backup.backup import backup_summary, load_backup
from blockhorn.backup.format import (
    LOCK_DELETE,
    BackupCfg,
    backup_cfg_path,
    backup_name_from_file,
    backups_dir,
    block_path,
    blocks_dir,
    check_store_name,
    valid_name,
    volume_cfg_path,
)
from blockhorn.backup.locks import StoreLock
from blockhorn.backup.restore import load_volume
from blockhorn.backup.targets import Target
from blockhorn.types import BlockhornError, NotFound

log = logging.getLogger("blockhorn.backup")

DELETE_LOCK_TIMEOUT_S = 600.0   # a delete waits this long for running backups/restores


def list_volumes(target: Target) -> list[str]:
    """Names of the backup volumes in the store (walks volumes/XX/YY/: 1 + 256 + ... LISTs at
    most; only `backup ls` without a volume does this)."""
    base = "backupstore/volumes"
    out: list[str] = []
    for a in target.list(base):
        for b in target.list(f"{base}/{a}"):
            out.extend(n for n in target.list(f"{base}/{a}/{b}") if valid_name(n))
    return sorted(out)


def _cfgs(target: Target, volume: str) -> list[BackupCfg]:
    out = []
    for file_name in target.list(backups_dir(volume)):
        name = backup_name_from_file(file_name)
        if name is not None:
            out.append(load_backup(target, volume, name))
    return out


def list_backups(target: Target, volume: str | None = None,
                 include_incomplete: bool = False) -> list[dict[str, Any]]:
    """Summaries of the backups (of one volume, or of all), oldest snapshot first. Backups in
    progress or interrupted are left out unless `include_incomplete`."""
    volumes = [check_store_name(volume, "volume")] if volume else list_volumes(target)
    out = []
    for v in volumes:
        for cfg in _cfgs(target, v):
            if include_incomplete or not cfg.in_progress:
                out.append(backup_summary(target.url, cfg))
    out.sort(key=lambda b: (b["volume"], b["snapshot_created"], b["created"], b["name"]))
    return out


def show_backup(target: Target, volume: str, name: str) -> dict[str, Any]:
    cfg = load_backup(target, volume, name)
    vol = load_volume(target, volume)
    summary = backup_summary(target.url, cfg)
    summary.update(volume_size=vol.size, volume_created=vol.created_time,
                   last_backup=vol.last_backup_name, volume_block_count=vol.block_count,
                   reuploaded_bytes=cfg.re_uploaded_data_size)
    return summary


def delete_backup(target: Target, volume: str, name: str,
                  lock_timeout_s: float = DELETE_LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Delete one backup and the blocks only it used. Waits up to `lock_timeout_s` for
    running backups and restores of the volume to finish."""
    check_store_name(volume, "volume")
    check_store_name(name, "backup")
    with StoreLock(target, volume, LOCK_DELETE).acquire(lock_timeout_s):
        try:
            doomed = load_backup(target, volume, name)
        except NotFound:
            raise
        except BlockhornError as e:   # an unreadable cfg is still deleted (as Longhorn does)
            log.warning("backup %s/%s unreadable (%s): deleting its cfg only", volume, name, e)
            doomed = BackupCfg(name=name, volume_name=volume)
        target.delete(backup_cfg_path(volume, name))
        remaining = _cfgs(target, volume)
        skipped = ""
        if any(c.in_progress for c in remaining):
            skipped = "a backup of this volume is in progress"
        used = {c for cfg in remaining for _, c in cfg.blocks}
        garbage = sorted({c for _, c in doomed.blocks} - used)
        names = sorted(c.name for c in remaining)
        if not skipped and sorted(c.name for c in _cfgs(target, volume)) != names:
            skipped = "backups were added meanwhile"
        deleted = 0
        if not skipped:
            deleted = _delete_blocks(target, volume, garbage)
        vol = load_volume(target, volume)
        if vol.last_backup_name == name:
            done = [c for c in remaining if not c.in_progress]
            latest = max(done, key=lambda c: (c.snapshot_created_at, c.created_time),
                         default=None)
            vol.last_backup_name = latest.name if latest else ""
            vol.last_backup_at = latest.snapshot_created_at if latest else ""
        vol.block_count = max(0, vol.block_count - deleted)
        target.put(volume_cfg_path(volume), vol.encode())
    log.info("backup %s/%s deleted; %d blocks collected%s", volume, name, deleted,
             f" (GC skipped: {skipped})" if skipped else "")
    return {"removed": name, "volume": volume, "blocks_deleted": deleted,
            "gc_skipped": skipped or None}


def _delete_blocks(target: Target, volume: str, checksums: list[str]) -> int:
    target.delete_many([block_path(volume, c) for c in checksums])
    return len(checksums)


def collect_garbage(target: Target, volume: str,
                    lock_timeout_s: float = DELETE_LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Sweep: list every block of the backup volume and delete those no cfg uses (left by
    interrupted backups that were never resumed). Lists `blocks/`: run it rarely."""
    check_store_name(volume, "volume")
    with StoreLock(target, volume, LOCK_DELETE).acquire(lock_timeout_s):
        cfgs = _cfgs(target, volume)
        if any(c.in_progress for c in cfgs):
            return {"volume": volume, "blocks_deleted": 0,
                    "gc_skipped": "a backup of this volume is in progress"}
        used = {c for cfg in cfgs for _, c in cfg.blocks}
        base = blocks_dir(volume)
        present: list[str] = []
        for a in target.list(base):
            for b in target.list(f"{base}/{a}"):
                present.extend(n[:-4] for n in target.list(f"{base}/{a}/{b}")
                               if n.endswith(".blk"))
        garbage = sorted(set(present) - used)
        deleted = _delete_blocks(target, volume, garbage)
        vol = load_volume(target, volume)
        vol.block_count = len(set(present) & used)
        target.put(volume_cfg_path(volume), vol.encode())
    return {"volume": volume, "blocks_deleted": deleted, "gc_skipped": None}
