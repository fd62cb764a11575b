"""Restore a backup into a sink (a new volume's replicas, or an image file), in full or
incrementally on top of an earlier backup of the same backup volume (a DR standby).

Every block is fetched, decompressed and checked against its checksum in a thread pool; the
sink is written from the calling thread only (a Replica is not thread-safe). Blocks whose
content is all zeros are not written: a fresh sink reads zeros there already, so holes stay
holes. A missing or corrupt block stops the restore with a `BackupCorrupt` error naming the
block, its offset, and every backup of the volume that uses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from blockhorn.backup.backup import (
    LOCK_TIMEOUT_S,
    QUEUE_PER_WORKER,
    Progress,
    ProgressFn,
    load_backup,
)
from blockhorn.backup.format import (
    LOCK_BACKUP,
    BackupCfg,
    BackupCorrupt,
    VolumeCfg,
    backup_name_from_file,
    backups_dir,
    block_path,
    checksum,
    decompress,
    volume_cfg_path,
    zero_checksum,
)
from blockhorn.backup.locks import StoreLock
from blockhorn.backup.targets import Target
from blockhorn.backup.volumes import Sink
from blockhorn.types import BlockhornError, InvalidArgument, NotFound

log = logging.getLogger("blockhorn.backup")


def load_volume(target: Target, volume: str) -> VolumeCfg:
    try:
        return VolumeCfg.decode(target.get(volume_cfg_path(volume)))
    except NotFound:
        raise NotFound(f"backup volume {volume!r} does not exist in {target.url}") from None


def backups_using(target: Target, volume: str, csum: str) -> list[str]:
    """Names of the backups whose block list has `csum` (only on the error path)."""
    users = []
    for file_name in target.list(backups_dir(volume)):
        name = backup_name_from_file(file_name)
        if name is None:
            continue
        try:
            cfg = load_backup(target, volume, name)
        except BlockhornError:
            continue
        if any(c == csum for _, c in cfg.blocks):
            users.append(name)
    return users


def _fetch(target: Target, volume: str, cfg: BackupCfg, offset: int, csum: str) -> bytes:
    path = block_path(volume, csum)
    try:
        blob = target.get(path)
        data = decompress(cfg.compression_method, blob)
        problem = "" if checksum(data) == csum else "has the wrong checksum (corrupt)"
        if not problem and len(data) != cfg.block_size:
            problem = f"holds {len(data)} bytes, not {cfg.block_size}"
    except NotFound:
        problem = "is missing"
    except BackupCorrupt as e:
        problem = f"is corrupt ({e})"
    if problem:
        users = backups_using(target, volume, csum)
        raise BackupCorrupt(f"block {csum} at offset {offset} ({path}) {problem} in "
                            f"{target.url}; backups of {volume!r} using it: "
                            f"{', '.join(users) or 'none'}")
    return data


def _apply(target: Target, volume: str, cfg: BackupCfg, writes: list[tuple[int, str]],
           zeros: list[int], sink: Sink, workers: int, prog: Progress,
           progress: ProgressFn | None) -> None:
    block = cfg.block_size
    zero = zero_checksum(block)
    for offset in zeros:
        sink.zero(offset, block)
        prog.done_bytes += block
    todo = [(o, c) for o, c in writes if c != zero]
    prog.done_bytes += (len(writes) - len(todo)) * block   # zero blocks: holes already
    last = [0.0]

    def fetched() -> Iterator[tuple[int, bytes]]:
        limit = workers * QUEUE_PER_WORKER
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:
            pending: list[tuple[int, Future[bytes]]] = []
            items = iter(todo)
            for offset, csum in items:
                pending.append((offset, pool.submit(_fetch, target, volume, cfg, offset, csum)))
                if len(pending) >= limit:
                    off, fut = pending.pop(0)
                    yield off, fut.result()
            for off, fut in pending:
                yield off, fut.result()

    try:
        for offset, data in fetched():
            if offset + len(data) > sink.size:
                # The last block of a volume whose size is not a multiple of the block size
                # is backed up whole, zeros past the end included.
                inside = max(0, sink.size - offset)
                if any(data[inside:]):
                    raise InvalidArgument(f"block at {offset} holds data past the end of the "
                                          f"target ({sink.size} bytes)")
                data = data[:inside]
            sink.write(offset, data)
            prog.done_bytes += block
            prog.transferred_bytes += len(data)
            if progress and time.monotonic() - last[0] > 0.2:
                last[0] = time.monotonic()
                progress(prog)
        sink.flush()
    except BaseException as e:
        prog.state, prog.error, prog.finished = "error", str(e), time.time()
        if progress:
            progress(prog)
        raise
    prog.state, prog.finished = "complete", time.time()
    if progress:
        progress(prog)


def restore(target: Target, volume: str, backup: str, sink: Sink, *,
            workers: int | None = None, progress: ProgressFn | None = None,
            lock_timeout_s: float = LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Write backup `backup` of backup volume `volume` into an empty `sink`."""
    workers = workers or target.workers
    with StoreLock(target, volume, LOCK_BACKUP).acquire(lock_timeout_s):
        vol = load_volume(target, volume)
        cfg = _complete(target, volume, backup)
        if sink.size < vol.size:
            raise InvalidArgument(f"the restore target has {sink.size} bytes; backup volume "
                                  f"{volume!r} needs {vol.size}")
        prog = Progress("restore", volume, backup, cfg.snapshot_name,
                        total_bytes=len(cfg.blocks) * cfg.block_size)
        _apply(target, volume, cfg, cfg.blocks, [], sink, workers, prog, progress)
    return _result(prog, vol, cfg)


def incremental_restore(target: Target, volume: str, backup: str, last_backup: str,
                        sink: Sink, *, workers: int | None = None,
                        progress: ProgressFn | None = None,
                        lock_timeout_s: float = LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Bring a sink that holds backup `last_backup` to backup `backup`: only blocks whose
    checksum differs are fetched; blocks gone from the list (or now all zeros) are zeroed."""
    workers = workers or target.workers
    with StoreLock(target, volume, LOCK_BACKUP).acquire(lock_timeout_s):
        vol = load_volume(target, volume)
        cfg = _complete(target, volume, backup)
        old = _complete(target, volume, last_backup)
        if old.block_size != cfg.block_size:
            raise InvalidArgument(f"backups {last_backup!r} and {backup!r} have different "
                                  "block sizes: restore in full")
        if sink.size < vol.size:
            raise InvalidArgument(f"the restore target has {sink.size} bytes; backup volume "
                                  f"{volume!r} needs {vol.size}")
        before = dict(old.blocks)
        now_map = dict(cfg.blocks)
        zero = zero_checksum(cfg.block_size)
        writes = [(o, c) for o, c in cfg.blocks if before.get(o) != c and c != zero]
        zeros = sorted(o for o, c in before.items()
                       if c != zero and (o not in now_map or now_map[o] == zero))
        prog = Progress("restore", volume, backup, cfg.snapshot_name,
                        total_bytes=(len(writes) + len(zeros)) * cfg.block_size)
        _apply(target, volume, cfg, writes, zeros, sink, workers, prog, progress)
    return _result(prog, vol, cfg)


def _complete(target: Target, volume: str, name: str) -> BackupCfg:
    cfg = load_backup(target, volume, name)
    if cfg.in_progress:
        raise NotFound(f"backup {name!r} of {volume!r} is not complete (still in progress, "
                       "or its backup was interrupted)")
    return cfg


def _result(prog: Progress, vol: VolumeCfg, cfg: BackupCfg) -> dict[str, Any]:
    return {"volume": vol.name, "backup": cfg.name, "snapshot": cfg.snapshot_name,
            "size": vol.size, "blocks": len(cfg.blocks),
            "restored_bytes": prog.transferred_bytes,
            "seconds": round(prog.finished - prog.started, 3)}

