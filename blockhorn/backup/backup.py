"""Create a backup of one snapshot: read the changed blocks, upload the new ones in parallel,
write the backup cfg last.

Order of writes (each a whole-object PUT or a rename, so never torn):
1. the lock (locks.py), then volume.cfg if the backup volume is new;
2. `backup_<name>.cfg` with an empty CreatedTime: "in progress". It is not listed as a backup,
   and while it exists no GC (ours or Longhorn's) deletes any block;
3. the blocks, in parallel; each block's (offset, checksum) goes to the local *journal* only
   after its upload completed (or it was known to be in the store already);
4. `backup_<name>.cfg` complete (CreatedTime set, the full block list), then volume.cfg
   (LastBackupName), then the journal is removed and the lock released.
A crash anywhere before 4 leaves no listed backup; running the same backup again (same
volume, snapshot and target) finds the journal, keeps the backup name and skips every block it
names without reading or uploading it again.

Dedup without listing `blocks/`: a block whose checksum is in the previous backup's list is in
the store (that cfg exists and our shared lock keeps any delete's GC away), and a checksum
uploaded earlier in this run is uploaded once. Any other block is PUT: at worst a block that an
older backup already stored is written again with the same bytes. So the requests of an
incremental backup are a constant handful plus one PUT per new block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from blockhorn.backup.format import (
    BLOCK_SIZE_PARAMETER,
    DEFAULT_BLOCK_SIZE,
    LARGE_BLOCK_SIZE,
    LOCK_BACKUP,
    BackupCfg,
    VolumeCfg,
    backup_cfg_path,
    block_path,
    check_store_name,
    checksum,
    compress,
    encode_backup_url,
    new_backup_name,
    now,
    volume_cfg_path,
)
from blockhorn.backup.locks import StoreLock
from blockhorn.backup.targets import Target
from blockhorn.backup.volumes import Source
from blockhorn.fsutil import fsync_dir
from blockhorn.types import BlockhornError, InvalidArgument, NotFound

log = logging.getLogger("blockhorn.backup")

QUEUE_PER_WORKER = 2             # blocks in flight per worker: memory <= workers*2*block_size*2
LOCK_TIMEOUT_S = 60.0            # how long a backup waits for a delete to finish
JOURNAL_SYNC_S = 1.0             # the journal is fsynced at most this often (a lost tail
                                 # only means those blocks are uploaded again)


@dataclass
class Progress:
    """What a running backup or restore has done; `to_dict()` is what the API shows."""

    operation: str
    volume: str
    backup: str
    snapshot: str = ""
    state: str = "in-progress"           # in-progress | complete | error
    total_bytes: int = 0                 # bytes of blocks to process
    done_bytes: int = 0                  # processed: read and uploaded or found in the store
    transferred_bytes: int = 0           # bytes sent or received (compressed)
    new_blocks: int = 0
    skipped_blocks: int = 0
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    error: str = ""
    url: str = ""

    def rate(self) -> float:
        """Processed bytes per second so far."""
        elapsed = (self.finished or time.time()) - self.started
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.state != "in-progress":
            return 0.0
        return (self.total_bytes - self.done_bytes) / rate if rate > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = round(self.rate())
        eta = self.eta()
        d["eta"] = None if eta is None else round(eta, 1)
        d["percent"] = (100 if self.state == "complete" else
                        int(100 * self.done_bytes / self.total_bytes) if self.total_bytes else 0)
        return d


ProgressFn = Callable[[Progress], None]


class Journal:
    """Local record of a backup in progress: a JSON header line, then `offset checksum`
    lines for blocks known to be durable in the store.

    Lines are kept in memory and written at most every JOURNAL_SYNC_S, each time *after*
    `target_sync()` made the blocks durable (blocks on a file target are written without
    fsync) and followed by an fsync of the journal: a journal line never reaches the disk
    before its block. A crash loses at most the last second's lines, which only means those
    blocks are uploaded again."""

    def __init__(self, path: str, header: dict[str, Any], done: dict[int, str]) -> None:
        self.path = path
        self.header = header
        self.done = done
        self.target_sync: Callable[[], None] = lambda: None
        self._pending: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()
        fresh = not os.path.exists(path)
        self.f = open(path, "a")   # noqa: SIM115 - closed by close()
        if fresh:
            self.f.write(json.dumps(header, sort_keys=True) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
            fsync_dir(os.path.dirname(path))

    @staticmethod
    def path_for(directory: str, target_url: str, volume: str, snapshot: str) -> str:
        key = hashlib.sha256(f"{target_url}\0{volume}\0{snapshot}".encode()).hexdigest()[:16]
        return os.path.join(directory, f"{volume}.{key}.journal")

    @classmethod
    def open(cls, directory: str, header: dict[str, Any]) -> Journal:
        """Resume the journal for the same target, volume, snapshot and base, or start one."""
        os.makedirs(directory, exist_ok=True)
        path = cls.path_for(directory, header["target"], header["volume"], header["snapshot"])
        done: dict[int, str] = {}
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
            try:
                old = json.loads(lines[0]) if lines else {}
            except ValueError:
                old = {}
            same = all(old.get(k) == header[k] for k in
                       ("target", "volume", "snapshot", "last_backup", "block_size",
                        "compression"))
            if same:
                header = old    # keeps the backup name
                for line in lines[1:]:
                    off, _, csum = line.partition(" ")
                    if off.isdigit() and len(csum) == 64:   # a torn last line is skipped
                        done[int(off)] = csum
            else:
                os.unlink(path)
        return cls(path, header, done)

    def reset(self) -> None:
        """Forget every block: keep only the header."""
        with self._lock:
            self.done.clear()
            self.f.seek(0)
            self.f.truncate()
            self.f.write(json.dumps(self.header, sort_keys=True) + "\n")
            self.f.flush()
            os.fsync(self.f.fileno())
            self._pending = []

    def record(self, entries: list[tuple[int, str]]) -> None:
        with self._lock:
            self._pending.extend(entries)
            if time.monotonic() - self._last_sync > JOURNAL_SYNC_S:
                self._sync()

    def _sync(self) -> None:
        if self._pending:
            self.target_sync()
            self.f.write("".join(f"{o} {c}\n" for o, c in self._pending))
            self.f.flush()
            os.fsync(self.f.fileno())
            self._pending = []
        self._last_sync = time.monotonic()

    def close(self, remove: bool) -> None:
        """Remove the journal (the backup is complete), or keep it with every line written
        (the backup failed: a later run resumes it)."""
        with self._lock:
            if not remove:
                try:
                    self._sync()
                except (OSError, BlockhornError) as e:   # the lines are only a saving
                    log.warning("cannot write backup journal %s: %s", self.path, e)
            self.f.close()
        if remove:
            os.unlink(self.path)


def _load_volume(target: Target, volume: str) -> VolumeCfg | None:
    try:
        return VolumeCfg.decode(target.get(volume_cfg_path(volume)))
    except NotFound:
        return None


def load_backup(target: Target, volume: str, name: str) -> BackupCfg:
    try:
        return BackupCfg.decode(target.get(backup_cfg_path(volume, name)))
    except NotFound:
        raise NotFound(f"backup {name!r} of volume {volume!r} does not exist in "
                       f"{target.url}") from None


def create_backup(target: Target, volume: str, source: Source, *,
                  backup_name: str | None = None, labels: dict[str, str] | None = None,
                  compression: str = "lz4", block_size: int = DEFAULT_BLOCK_SIZE,
                  journal_dir: str | None = None, workers: int | None = None,
                  progress: ProgressFn | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S,
                  full: bool = False,
                  on_upload: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Back up `source` (a snapshot of `volume`) to `target`; returns the backup's summary
    (see `backup_summary`). Incremental over the backup volume's last backup when that
    backup's snapshot is still on the source's chain (`full=True` forces a full read). The
    compression method is fixed by the backup volume's first backup. `on_upload(checksum)` is
    called after each block upload (tests use it to slow or crash a backup)."""
    check_store_name(volume, "volume")
    workers = workers or target.workers
    if block_size not in (DEFAULT_BLOCK_SIZE, LARGE_BLOCK_SIZE):
        raise InvalidArgument(f"block size must be 2 MiB or 16 MiB, not {block_size}")
    compress(compression, b"")   # rejects an unknown method before anything is written
    with StoreLock(target, volume, LOCK_BACKUP).acquire(lock_timeout_s):
        vol = _load_volume(target, volume)
        if vol is None:
            vol = VolumeCfg(name=volume, size=source.size, labels=labels, created_time=now(),
                            compression_method=compression)
            target.put(volume_cfg_path(volume), vol.encode())
        compression = vol.compression_method
        last: BackupCfg | None = None
        if vol.last_backup_name:
            try:
                last = load_backup(target, volume, vol.last_backup_name)
            except (NotFound, BlockhornError) as e:
                log.info("backup volume %s: last backup unusable (%s): full backup", volume, e)
        if last is not None and last.block_size != block_size:
            last = None    # a different block size cannot share a block list
        base = last.snapshot_name if last and not full and last.snapshot_name != source.name \
            else None
        delta = source.changed_blocks(base, block_size) if base else None
        incremental = delta is not None
        if delta is None:
            delta = source.allocated_blocks(block_size)
        header = {"target": target.url, "volume": volume, "snapshot": source.name,
                  "last_backup": last.name if last else "", "block_size": block_size,
                  "compression": compression, "backup": backup_name or new_backup_name()}
        journal = Journal.open(journal_dir, header) if journal_dir else None
        if journal:
            journal.target_sync = target.sync
        name = str(journal.header["backup"]) if journal else str(header["backup"])
        check_store_name(name, "backup")
        if journal and journal.done and not target.exists(backup_cfg_path(volume, name)):
            # Someone deleted the interrupted backup meanwhile, and a GC (Longhorn's sweeps
            # every unreferenced block) may have taken its blocks: trust none of them.
            log.info("backup %s of %s was deleted while interrupted: starting over", name,
                     volume)
            journal.reset()
        params = {BLOCK_SIZE_PARAMETER: str(block_size)} \
            if block_size != DEFAULT_BLOCK_SIZE else None
        prog = Progress("backup", volume, name, source.name,
                        total_bytes=len(delta) * block_size)
        try:
            target.put(backup_cfg_path(volume, name), BackupCfg(
                name=name, volume_name=volume, compression_method=compression).encode())
            known = {c for _, c in last.blocks} if last else set()
            entries = _upload(target, volume, source, delta, block_size, compression, known,
                              journal, workers, prog, progress, on_upload)
            target.sync()   # every block durable before the cfg that lists them
            blocks = _merge(entries, last.blocks) if incremental and last else sorted(entries)
            cfg = BackupCfg(
                name=name, volume_name=volume, snapshot_name=source.name,
                snapshot_created_at=source.created, created_time=now(),
                size=len(blocks) * block_size, labels=labels, parameters=params,
                is_incremental=incremental, compression_method=compression,
                newly_uploaded_data_size=prog.transferred_bytes, blocks=blocks)
            target.put(backup_cfg_path(volume, name), cfg.encode())
            vol = _load_volume(target, volume) or vol
            vol.last_backup_name = name
            vol.last_backup_at = cfg.snapshot_created_at
            vol.block_count += prog.new_blocks
            vol.size = source.size
            vol.labels = labels
            target.put(volume_cfg_path(volume), vol.encode())
        except BaseException as e:
            prog.state, prog.error, prog.finished = "error", str(e), time.time()
            if progress:
                progress(prog)
            if journal:
                journal.close(remove=False)
            raise
        if journal:
            journal.close(remove=True)
    prog.state, prog.finished = "complete", time.time()
    prog.url = encode_backup_url(target.url, volume, name)
    if progress:
        progress(prog)
    log.info("backup %s of %s/%s complete: %d blocks, %d new, %d bytes sent", name, volume,
             source.name, len(blocks), prog.new_blocks, prog.transferred_bytes)
    summary = backup_summary(target.url, cfg)
    summary.update(new_blocks=prog.new_blocks, transferred_bytes=prog.transferred_bytes,
                   seconds=round(prog.finished - prog.started, 3))
    return summary


def _merge(delta: list[tuple[int, str]], last: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The new full image: the delta's blocks over the last backup's (Longhorn's
    mergeSnapshotMap)."""
    merged = dict(last)
    merged.update(delta)
    return sorted(merged.items())


def _upload(target: Target, volume: str, source: Source, delta: list[int], block_size: int,
            compression: str, known: set[str], journal: Journal | None, workers: int,
            prog: Progress, progress: ProgressFn | None,
            on_upload: Callable[[str], None] | None) -> list[tuple[int, str]]:
    """Read the blocks at `delta` in this thread; checksum, dedup, compress and upload them in
    the pool (hashing 2 MiB with SHA-512 costs more than reading it, and hashlib, lz4 and
    the uploads release the GIL). At most workers * QUEUE_PER_WORKER blocks are in flight."""
    done = journal.done if journal else {}
    entries: list[tuple[int, str]] = []
    slots = threading.BoundedSemaphore(workers * QUEUE_PER_WORKER)
    lock = threading.Lock()
    waiting: dict[str, list[int]] = {}      # checksum being uploaded -> offsets using it
    errors: list[BaseException] = []
    last_report = [0.0]

    def report(force: bool = False) -> None:
        if progress and (force or time.monotonic() - last_report[0] > 0.2):
            last_report[0] = time.monotonic()
            progress(prog)

    def process(offset: int, data: bytes | bytearray) -> None:
        try:
            if errors:      # the backup has failed: upload nothing more
                return
            csum = checksum(data)
            with lock:
                entries.append((offset, csum))
                if csum in waiting:             # the same content is being uploaded now
                    waiting[csum].append(offset)
                    return
                if csum in known:               # in the store already
                    prog.done_bytes += block_size
                    prog.skipped_blocks += 1
                    if journal:
                        journal.record([(offset, csum)])
                    return
                known.add(csum)
                waiting[csum] = [offset]
            blob = compress(compression, data)
            target.put(block_path(volume, csum), blob, durable=False)
            if on_upload:
                on_upload(csum)
            with lock:
                offsets = waiting.pop(csum)
                prog.transferred_bytes += len(blob)
                prog.new_blocks += 1
                prog.done_bytes += len(offsets) * block_size
                if journal:
                    journal.record([(o, csum) for o in offsets])
            report()
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backup-upload") as pool:
        for offset in delta:
            if errors:
                break
            if offset in done:
                with lock:
                    entries.append((offset, done[offset]))
                    known.add(done[offset])
                    prog.done_bytes += block_size
                    prog.skipped_blocks += 1
                continue
            data = source.read(offset, block_size)
            slots.acquire()   # bounds the blocks held in memory
            pool.submit(process, offset, data)
            report()
    if errors:
        raise errors[0]
    report(force=True)
    return entries


def backup_summary(target_url: str, cfg: BackupCfg) -> dict[str, Any]:
    """The fields `backup ls` shows for one backup cfg."""
    return {
        "name": cfg.name, "url": encode_backup_url(target_url, cfg.volume_name, cfg.name),
        "volume": cfg.volume_name, "snapshot": cfg.snapshot_name, "size": cfg.size,
        "created": cfg.created_time, "snapshot_created": cfg.snapshot_created_at,
        "state": "in-progress" if cfg.in_progress else "complete",
        "incremental": cfg.is_incremental, "compression": cfg.compression_method,
        "block_size": cfg.block_size, "blocks": len(cfg.blocks), "labels": cfg.labels or {},
        "uploaded_bytes": cfg.newly_uploaded_data_size,
    }
