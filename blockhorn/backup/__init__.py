"""Backups in Longhorn's backupstore format, to S3 or a mounted directory (NFS or local).

The public API (everything else in this package is internal):

Targets
    `open_target(url, credentials=None, mount=None) -> Target` — `s3://BUCKET@REGION/PATH/`,
    `nfs://HOST:/EXPORT/PATH` (an already-mounted directory), `file:///PATH`.
    `read_credential_file(path) -> dict` — AWS_* KEY=VALUE lines for `credentials`.
    `Target.close()` when done.

Sources and sinks (blockhorn.backup.volumes)
    `open_snapshot(replica_dirs, snapshot) -> ReplicaSnapshot` — a snapshot to back up, read
    offline from one replica directory; `.close()` it.
    `ReplicaSink(replica_dirs)` — every replica of a new *detached* volume, written offline;
    `NbdSink(uri)` — a volume's engine over NBD (a cluster's restore);
    `FileSink(path, size)` — a sparse image file. `.close()` them.

Operations (all synchronous; run them in a thread; each takes the store lock it needs)
    `create_backup(target, volume, source, *, backup_name=None, labels=None,
        compression="lz4", block_size=2 MiB, journal_dir=None, workers=None, progress=None,
        full=False) -> dict` — summary {name, url, volume, snapshot, size, created, state,
        incremental, blocks, new_blocks, transferred_bytes, ...}. With `journal_dir`, an
        interrupted backup of the same snapshot to the same target resumes.
    `restore(target, volume, backup, sink, *, workers=None, progress=None) -> dict`
    `incremental_restore(target, volume, backup, last_backup, sink, ...) -> dict` — sink
        holds `last_backup` already (a DR standby); only changed blocks are fetched.
    `list_backups(target, volume=None) -> list[dict]` — complete backups, oldest first.
    `show_backup(target, volume, backup) -> dict`
    `delete_backup(target, volume, backup, lock_timeout_s=600) -> dict` — with GC.
    `collect_garbage(target, volume) -> dict` — sweep blocks no backup uses (lists blocks/).
    `load_volume(target, volume) -> VolumeCfg` — `.last_backup_name`, `.size`, ...

URLs
    `encode_backup_url(target_url, volume, backup) -> str` — `TARGET?backup=B&volume=V`
    `decode_backup_url(url) -> BackupURL(target, volume, backup)`

`workers=None` means the target's default (`Target.workers`: 8 for S3, one per core and at
least 2 for a directory). `progress` callbacks get a `Progress` (`.to_dict()`: state, total_bytes, done_bytes,
transferred_bytes, rate, eta, percent). Errors are `blockhorn.types.BlockhornError`s:
`NotFound`, `Busy` (a lock is held), `InvalidArgument`, `BackupCorrupt` (a missing or corrupt
block, named with the backups using it), `TargetError`.
"""

from blockhorn.backup.backup import Progress, create_backup
from blockhorn.backup.format import (
    DEFAULT_BLOCK_SIZE,
    LARGE_BLOCK_SIZE,
    BackupCorrupt,
    BackupURL,
    VolumeCfg,
    decode_backup_url,
    encode_backup_url,
)
from blockhorn.backup.manage import (
    collect_garbage,
    delete_backup,
    list_backups,
    list_volumes,
    show_backup,
)
from blockhorn.backup.restore import incremental_restore, load_volume, restore
from blockhorn.backup.targets import Target, TargetError, open_target, read_credential_file
from blockhorn.backup.volumes import (
    FileSink,
    NbdSink,
    ReplicaSink,
    ReplicaSnapshot,
    open_snapshot,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE", "LARGE_BLOCK_SIZE", "BackupCorrupt", "BackupURL", "FileSink",
    "NbdSink",
    "Progress", "ReplicaSink", "ReplicaSnapshot", "Target", "TargetError", "VolumeCfg",
    "collect_garbage", "create_backup", "decode_backup_url", "delete_backup",
    "encode_backup_url", "incremental_restore", "list_backups", "list_volumes", "load_volume",
    "open_snapshot", "open_target", "read_credential_file", "restore", "show_backup",
]
