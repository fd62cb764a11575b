"""Volumes for backup tests: real replica directories (blockhorn.replica) with real snapshot
layers, written through the layer-chain code, and digests of what a snapshot or an image
holds."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import nbd

from blockhorn import backup as bk
from blockhorn.replica import snapshots as store_snaps
from blockhorn.replica.store import Replica

MiB = 1 << 20
BLOCK = 2 * MiB


class ReplicaVolume:
    """One replica directory holding a volume of `size` bytes; `write` and `snapshot` change
    it the way an engine would."""

    def __init__(self, directory: str, size: int, name: str = "vol", seed: int = 1) -> None:
        self.directory = directory
        self.rng = random.Random(seed)
        self.replica = Replica.create(directory, size, name)

    def write(self, offset: int, data: bytes) -> None:
        self.replica.write(offset, data)

    def random(self, offset: int, length: int) -> bytes:
        data = self.rng.randbytes(length)
        self.write(offset, data)
        return data

    def zero(self, offset: int, length: int) -> None:
        self.replica.zero(offset, length)

    def snapshot(self, name: str) -> str:
        store_snaps.create_snapshot(self.replica, name, True, None)
        return name

    def close(self) -> None:
        self.replica.close()


def snapshot_digest(directory: str, name: str) -> str:
    view = store_snaps.snapshot_view(directory, name)
    try:
        return hashlib.sha256(bytes(view.read(0, view.size))).hexdigest()
    finally:
        for layer in view.layers:
            os.close(layer.fd)


def file_digest(path: str, size: int | None = None) -> str:
    with open(path, "rb") as f:
        data = f.read() if size is None else f.read(size)
    if size is not None and len(data) < size:
        data += bytes(size - len(data))
    return hashlib.sha256(data).hexdigest()


def replica_digest(directory: str, size: int) -> str:
    r = Replica.open(directory)
    try:
        return hashlib.sha256(bytes(r.read(0, size))).hexdigest()
    finally:
        r.close()


def backup_snapshot(target, vol: ReplicaVolume, snap: str, **kw) -> dict:
    """Back up snapshot `snap` of a one-replica volume to `target` (volume name "vol")."""
    from blockhorn import backup as bk
    src = bk.open_snapshot([vol.directory], snap)
    try:
        return bk.create_backup(target, "vol", src, **kw)
    finally:
        src.close()


def restore_digest(target, name: str, path: str, size: int) -> str:
    """Restore backup `name` of volume "vol" into the file `path`; its checksum."""
    from blockhorn import backup as bk
    sink = bk.FileSink(path, size)
    try:
        bk.restore(target, "vol", name, sink)
    finally:
        sink.close()
    return file_digest(path, size)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def backup_killed_after(uploads: int, target_url: str, target_env: dict | None,
                        directory: str, snap: str, journal: str) -> subprocess.CompletedProcess:
    """Back up snapshot `snap` of the one-replica volume in `directory` in a child process
    that SIGKILLs itself right after its `uploads`-th block upload (one worker, a journal
    line per block, so what was journaled is exact)."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
from blockhorn import backup as bk
import blockhorn.backup.backup
blockhorn.backup.backup.JOURNAL_SYNC_S = 0   # a journal line per block, for an exact count
uploads = []
def hook(csum):
    uploads.append(csum)
    if len(uploads) == {uploads}:
        os.kill(os.getpid(), signal.SIGKILL)
t = bk.open_target({target_url!r}, {target_env!r})
src = bk.open_snapshot([{directory!r}], {snap!r})
bk.create_backup(t, "vol", src, journal_dir={journal!r}, workers=1, on_upload=hook)
"""
    return subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)


def volume_digest(uri: str, length: int | None = None, write_seed: int | None = None) -> str:
    """sha256 of the volume's first `length` bytes (all: None), after writing a pattern of
    spread 64 KiB blocks and flushing when `write_seed` is given."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        if write_seed is not None:
            block = 64 * 1024
            for i in range(48):
                off = (i * 7919 * block) % (size - block)
                h.pwrite(hashlib.sha256(f"{write_seed}-{i}".encode()).digest() * (block // 32),
                         off - off % 4096)
            h.flush()
        d = hashlib.sha256()
        end = size if length is None else length
        for off in range(0, end, 4 * MiB):
            d.update(h.pread(min(4 * MiB, end - off), off))
        return d.hexdigest()
    finally:
        h.shutdown()


def restored_url_digest(target_dir: str, url: str, size: int) -> str:
    """sha256 of backup `url` restored into a file of `size` bytes."""
    parsed = bk.decode_backup_url(url)
    t = bk.open_target(f"file://{target_dir}")
    path = os.path.join(target_dir, "..", "restored.img")
    sink = bk.FileSink(path, size)
    try:
        bk.restore(t, parsed.volume, str(parsed.backup), sink)
    finally:
        sink.close()
        t.close()
    d = hashlib.sha256()
    with open(path, "rb") as f:
        d.update(f.read())
    os.unlink(path)
    return d.hexdigest()
