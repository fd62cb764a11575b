"""Where backups read from and restores write to: replica directories, read and written with the
layer-chain code of blockhorn.replica.

Reading: a backup reads a snapshot *offline from one replica directory* through
`replica.snapshots.snapshot_view` — the chain from that snapshot down, opened read-only. That is
safe while the replica serves, attached or not: snapshot layers never change in place (a purge
that folds one replaces the file by one that reads the same, and our open descriptors keep the
old inode). It costs no engine round trips and no network hop on this host. The replica chosen
is one that is not being rebuilt (`Rebuilding` in its volume.meta) and holds the snapshot.

Changed blocks: the layer files are sparse, so the ranges written after snapshot P and up to
snapshot S are the data extents (SEEK_DATA/SEEK_HOLE) of the layers above P on S's chain. Only
those blocks are read for an incremental backup. A zeroed range over older data is written as
real zeros, so it shows up too; a trimmed range with nothing beneath stays a hole and was never
in a backup. If P is no longer on S's chain (removed and folded), every block holding data is
read and dedup against the previous backup's block list keeps the upload small.

Writing: a restore writes into every replica directory of a new, detached volume through
`Replica.write` (only blocks that hold data: holes stay holes), then flushes. On a cluster,
where those directories are on other nodes, it writes to the volume's engine over NBD
(`NbdSink`; the engine replicates each write), the same blocks, zeroed ranges as NBD zero
requests, and one flush at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from blockhorn.fsutil import data_extents, read_json
from blockhorn.replica import snapshots as store_snaps
from blockhorn.replica.store import Replica
from blockhorn.types import BlockhornError, InvalidArgument, NotFound


class Source(Protocol):
    """A read-only point-in-time image of a volume."""

    name: str            # the snapshot's name
    created: str         # RFC 3339

    @property
    def size(self) -> int:
        """Bytes in the snapshot's image."""
        ...

    def changed_blocks(self, since: str | None, block_size: int) -> list[int] | None:
        """Offsets of the blocks that may differ from snapshot `since` (None: since is not
        known to this source — read everything holding data instead)."""
        ...

    def allocated_blocks(self, block_size: int) -> list[int]:
        """Offsets of every block holding data."""
        ...

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def close(self) -> None: ...


def _blocks_of(ranges: list[tuple[int, int]], block_size: int, size: int) -> list[int]:
    out: set[int] = set()
    for start, end in ranges:
        first = start // block_size
        last = (min(end, size) - 1) // block_size
        out.update(range(first * block_size, last * block_size + 1, block_size))
    return sorted(out)


@dataclass
class ReplicaSnapshot:
    """Snapshot `name` read from the replica directory `directory`."""

    directory: str
    name: str
    view: Replica = field(init=False)
    created: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.view = store_snaps.snapshot_view(self.directory, self.name)
        self.created = str(self.view.layers[-1].meta.get("Created", ""))

    @property
    def size(self) -> int:
        # The snapshot's size: its largest layer file (a later expand grows only newer layers).
        return self.view.size

    def _ranges(self, layers: list[Any]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for layer in layers:
            out.extend(data_extents(layer.fd, 0, self.size))
        return out

    def changed_blocks(self, since: str | None, block_size: int) -> list[int] | None:
        if since is None:
            return self.allocated_blocks(block_size)
        names = [layer.name for layer in self.view.layers]
        base = store_snaps.snap_file(since)
        if base not in names:
            return None
        above = self.view.layers[names.index(base) + 1:]
        return _blocks_of(self._ranges(above), block_size, self.size)

    def allocated_blocks(self, block_size: int) -> list[int]:
        return _blocks_of(self._ranges(self.view.layers), block_size, self.size)

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        inside = max(0, min(length, self.view.size - offset))
        if inside:
            self.view.read_into(memoryview(buf)[:inside], offset)
        return buf

    def close(self) -> None:
        for layer in self.view.layers:
            os.close(layer.fd)
        self.view.layers = []


def open_snapshot(replica_dirs: list[str], snapshot: str) -> ReplicaSnapshot:
    """The snapshot from the first replica directory that holds it and is not rebuilding."""
    errors = []
    for d in replica_dirs:
        try:
            if read_json(os.path.join(d, "volume.meta")).get("Rebuilding"):
                errors.append(f"{d}: rebuilding")
                continue
            return ReplicaSnapshot(d, snapshot)
        except (NotFound, OSError, BlockhornError) as e:
            errors.append(f"{d}: {e}")
    raise NotFound(f"no replica holds snapshot {snapshot!r} ({'; '.join(errors) or 'none'})")


class Sink(Protocol):
    """Where a restore writes: a volume-sized, initially empty (all holes) image."""

    size: int

    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class ReplicaSink:
    """Every replica directory of a detached volume, written offline. With several replicas
    each call writes them all at once, one thread per replica (pwrite releases the GIL), and
    returns when all are done: one Replica is never used by two threads at a time."""

    def __init__(self, replica_dirs: list[str]) -> None:
        if not replica_dirs:
            raise InvalidArgument("a restore needs at least one replica directory")
        self.replicas: list[Replica] = []
        self._pool: ThreadPoolExecutor | None = None
        try:
            for d in replica_dirs:
                self.replicas.append(Replica.open(d))
        except BaseException:
            self.close()
            raise
        self.size = min(r.size for r in self.replicas)
        if len(self.replicas) > 1:
            self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="sink")

    def _each(self, fn: Callable[[Replica], None]) -> None:
        if self._pool is None:
            for r in self.replicas:
                fn(r)
            return
        for fut in [self._pool.submit(fn, r) for r in self.replicas]:
            fut.result()

    def write(self, offset: int, data: bytes) -> None:
        self._each(lambda r: r.write(offset, data))

    def zero(self, offset: int, length: int) -> None:
        self._each(lambda r: r.zero(offset, length))

    def flush(self) -> None:
        self._each(lambda r: r.flush())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for r in self.replicas:
            r.close()
        self.replicas = []


NBD_ZERO_MAX = 1 << 30   # bytes zeroed per NBD request


class NbdSink:
    """A volume's engine, written over NBD (libnbd: one handle, whose calls may come from
    several threads). Only what the restore writes is sent: holes stay holes."""

    def __init__(self, uri: str) -> None:
        import nbd  # libnbd's Python binding (Debian python3-libnbd)
        self.handle: Any = nbd.NBD()
        try:
            self.handle.connect_uri(uri)
        except nbd.Error as e:
            raise BlockhornError(f"cannot reach the volume's engine at {uri}: {e}") from None
        self.size = int(self.handle.get_size())

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.handle.pwrite(bytes(data), offset)

    def zero(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)   # the last block may pass the end
        while offset < end:   # NBD requests carry a 32-bit length
            n = min(end - offset, NBD_ZERO_MAX)
            self.handle.zero(n, offset)
            offset += n

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.shutdown()
            except Exception:   # noqa: BLE001 - the engine may be gone; nothing left to send
                pass


class FileSink:
    """A raw image file (sparse); used by tests, benchmarks and `restore --to-file`."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        from blockhorn.fsutil import punch_hole
        punch_hole(self.fd, offset, length)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
