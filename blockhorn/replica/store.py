"""A replica's directory: the layer chain on disk. Plain synchronous code over file descriptors.

Directory (Longhorn-compatible names, see docs/FORMAT.md):

    volume.meta                  JSON: Size, Head, Dirty, Rebuilding, Error, Parent, SectorSize,
                                 BackingFilePath + blockhorn's Volume, Generation, Members,
                                 FormatVersion
    volume-head-NNN.img          sparse raw file of Size bytes: the writable top layer
    volume-head-NNN.img.meta     JSON: Name, Parent, Removed, UserCreated, Created, Labels
    volume-snap-<name>.img(.meta) read-only snapshot layers (the snapshot issue adds them)
    revision.counter             4096 bytes: decimal count of mutations, NUL padded

A read finds each range in the newest layer holding it (`ExtentMap`). Writes always go to the
head. Requests are executed one at a time by the replica server, so the copy-up of a partial
4 KiB block (read from an older layer, patch, write the whole block to the head) never races
another request for the same block.

Revisions and suspicion (docs/DURABILITY.md, "Generations"):
- `revision` counts mutations that *succeeded*, bumped after the change is made; it is
  persisted by every FLUSH. After a crash the persisted count may be lower than the writes the
  files hold (they are then Dirty), never higher.
- A replica is *suspect* when its content may not be a prefix of the volume's history: it
  opened Dirty (a crash), or a mutation failed part-way (`halted`). A halted replica refuses
  every later mutation (ECANCELED), so what it holds stays a prefix plus at most one torn
  request. A suspect replica keeps `Dirty` through an orderly close; only the engine clears
  it: by a resync (`set_generation(..., clear_rebuilding=True)`) or by adopting the replica as
  the source of truth at start (`adopt`).
- Out of space: a WRITE first allocates the head's holes in its range (`fallocate`) when the
  file system has less than RESERVE_BELOW_FREE (1 GiB) free; when that
  fails with ENOSPC nothing has changed (the holes are punched again), the replica does not
  halt, and it answers ENOSPC (`OutOfSpace`). An ENOSPC later, part-way through a mutation,
  halts it like any other failure and is answered EIO: the engine keeps every replica RW only
  when all of them answered ENOSPC, i.e. none changed (docs/DURABILITY.md, "Out of space").
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blockhorn.fsutil import (
    FALLOC_FL_KEEP_SIZE,
    atomic_write,
    atomic_write_json,
    data_extents,
    fallocate,
    fsync_dir,
    preadv_full,
    punch_hole,
    pwrite_full,
    read_json,
)
from blockhorn.replica.changes import ChangeLog
from blockhorn.replica.copymap import CopyMap
from blockhorn.replica.extentmap import ZERO, ExtentMap, LayerMap
from blockhorn.types import BLOCK_SIZE, BlockhornError, InvalidArgument, NoSpace, NotFound

FORMAT_VERSION = 1
VOLUME_META = "volume.meta"
REVISION_COUNTER = "revision.counter"
REVISION_SIZE = 4096
HEAD_FMT = "volume-head-{:03d}.img"


# Below this much free space (bytes) on the replica's file system, a WRITE reserves its holes
# before writing (`Replica._reserve`); above it, the check is skipped: it costs an lseek and a
# fallocate per write. The free space is read again at least every RESERVE_CHECK_S seconds
# (and counted down by what this replica writes meanwhile).
RESERVE_BELOW_FREE = 1 << 30
RESERVE_CHECK_S = 1.0


class OutOfSpace(NoSpace):
    """A mutation refused for lack of space before it changed anything: the replica still
    holds exactly the mutations it counted, so it need not halt."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def layer_meta(name: str, parent: str, user_created: bool = False,
               labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Name": name, "Parent": parent, "Removed": False, "UserCreated": user_created,
            "Created": now_rfc3339(), "Labels": labels}


def new_head_file(directory: str, name: str, parent: str, size: int) -> None:
    """An empty sparse head layer of `size` bytes (fsynced) and its meta."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write_json(path + ".meta", layer_meta(name, parent))


def encode_revision(n: int) -> bytes:
    return str(n).encode().ljust(REVISION_SIZE, b"\0")


def decode_revision(buf: bytes) -> int:
    text = buf.split(b"\0", 1)[0].strip()
    if not text.isdigit():
        raise BlockhornError(f"corrupt revision counter {buf[:32]!r}", errno.EUCLEAN)
    return int(text)


@dataclass
class Layer:
    name: str       # file name in the replica directory
    fd: int
    meta: dict[str, Any]


class Replica:
    """An open replica directory. Not thread-safe: one caller (the server loop) at a time."""

    def __init__(self, directory: str, meta: dict[str, Any], layers: list[Layer],
                 revision: int) -> None:
        self.directory = directory
        self.meta = meta
        self.layers = layers            # oldest first; layers[-1] is the head
        self.revision = revision
        self._persisted_revision = revision
        # Dirty at open: the last process or host holding it did not close it cleanly, so it
        # may hold writes its revision counter does not count (the engine resyncs it).
        self.opened_dirty = bool(meta.get("Dirty"))
        self.suspect = self.opened_dirty     # see the module docstring
        self.halted = ""                     # why mutations are refused, after a failed one
        self._free = 0                       # bytes free on the file system, at _free_at
        self._free_at = -RESERVE_CHECK_S     # monotonic seconds
        # What changed after which revision, since this open (replica/changes.py), and the
        # first generation committed to this replica since then: a returning sibling at that
        # generation or later may resync from this log (docs/DURABILITY.md).
        self.changes = ChangeLog(revision)
        self.log_generation: int | None = None
        self.start_generation = 0       # the last engine start commit received (in memory)
        self.map = LayerMap(ExtentMap(), ExtentMap(), 0)
        self._map_layers()
        # Test hook: called with a step name before each step of a multi-file change.
        self.crash_hook: Callable[[str], None] | None = None
        # During a rebuild's copy (`begin_copy`): the blocks every mutation from the engine
        # reached (replica/copymap.py). A rebuild copy into the head skips those blocks: they
        # already hold a mutation newer than anything the copy read (docs/DURABILITY.md,
        # "Rebuild"). In memory only: a new process starts a new copy session.
        self.copy_dirty: CopyMap | None = None
        self._direct: mmap.mmap | None = None     # page-aligned buffer for O_DIRECT copies

    def _map_layers(self) -> None:
        """Build the layer map from the files (a single-layer chain needs none)."""
        if len(self.layers) > 1:
            self.map = LayerMap.build([list(data_extents(layer.fd, 0, self.size))
                                       for layer in self.layers])
        else:
            self.map = LayerMap(ExtentMap(), ExtentMap(), 0)

    def direct_buffer(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least `size` bytes (O_DIRECT needs one), kept."""
        if self._direct is None or len(self._direct) < size:
            if self._direct is not None:
                self._direct.close()
            self._direct = mmap.mmap(-1, max(size, 4 << 20))
        return self._direct

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, size: int, volume: str = "",
               extra_meta: dict[str, Any] | None = None) -> Replica:
        """A new, empty replica. `extra_meta`: e.g. {"Rebuilding": True} for a replacement,
        which must never be trusted before its first resync has finished."""
        if size <= 0 or size % BLOCK_SIZE:
            raise InvalidArgument(f"replica size {size} is not a positive multiple of 4096")
        parent = os.path.dirname(os.path.abspath(directory))
        existed = os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        if not existed:
            fsync_dir(parent)      # the new directory itself survives a power cut
        if os.path.exists(os.path.join(directory, VOLUME_META)):
            raise BlockhornError(f"{directory} already holds a replica", errno.EEXIST)
        head = HEAD_FMT.format(0)
        new_head_file(directory, head, "", size)
        atomic_write(os.path.join(directory, REVISION_COUNTER), encode_revision(0))
        # volume.meta last: its presence is what makes the directory a replica.
        atomic_write_json(os.path.join(directory, VOLUME_META), {
            "Size": size, "Head": head, "Dirty": False, "Rebuilding": False, "Error": "",
            "Parent": "", "SectorSize": 512, "BackingFilePath": "",
            "Volume": volume, "Generation": 0, "Members": [], "FormatVersion": FORMAT_VERSION,
            **(extra_meta or {}),
        })
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str) -> Replica:
        meta_path = os.path.join(directory, VOLUME_META)
        if not os.path.exists(meta_path):
            raise NotFound(f"{directory} holds no replica ({VOLUME_META} missing)")
        meta = read_json(meta_path)
        if meta.get("FormatVersion", 1) > FORMAT_VERSION:
            raise BlockhornError(f"{directory}: replica format {meta['FormatVersion']} is newer "
                                 "than this blockhorn understands", errno.EPROTO)
        from blockhorn.replica.snapshots import recover, roll_forward  # a layer on top of this
        roll_forward(directory)
        try:
            layers = cls._open_chain(directory, meta)
        except (OSError, BlockhornError):
            if not meta.get("Rebuilding"):
                raise
            # A crash inside a rebuild's chain reset (snapshots.reset_chain) left the chain
            # half-made. The replica holds nothing anyone trusts: give it a fresh, empty head.
            meta = cls._fresh_head(directory, meta)
            layers = cls._open_chain(directory, meta)
        try:
            with open(os.path.join(directory, REVISION_COUNTER), "rb") as f:
                revision = decode_revision(f.read(REVISION_SIZE))
        except BaseException:
            for layer in layers:
                os.close(layer.fd)
            raise
        replica = cls(directory, meta, layers, revision)
        recover(replica)
        return replica

    @staticmethod
    def _fresh_head(directory: str, meta: dict[str, Any]) -> dict[str, Any]:
        for entry in os.listdir(directory):
            if entry.startswith(("volume-snap-", "volume-head-")):
                os.unlink(os.path.join(directory, entry))
        head = HEAD_FMT.format(0)
        new_head_file(directory, head, "", int(meta["Size"]))
        fsync_dir(directory)
        meta = dict(meta, Head=head)
        atomic_write_json(os.path.join(directory, VOLUME_META), meta)
        return meta

    @staticmethod
    def _open_chain(directory: str, meta: dict[str, Any], readonly: bool = False) -> list[Layer]:
        names: list[str] = []
        name = meta["Head"]
        while name:
            if name in names or len(names) > 100000:
                raise BlockhornError(f"{directory}: layer chain loops at {name}", errno.EUCLEAN)
            names.append(name)
            name = read_json(os.path.join(directory, name + ".meta")).get("Parent", "")
        names.reverse()
        layers: list[Layer] = []
        try:
            for i, name in enumerate(names):
                flags = os.O_RDWR if i == len(names) - 1 and not readonly else os.O_RDONLY
                path = os.path.join(directory, name)
                layers.append(Layer(name, os.open(path, flags | os.O_CLOEXEC),
                                    read_json(path + ".meta")))
        except BaseException:
            for layer in layers:
                os.close(layer.fd)
            raise
        return layers

    def reload(self) -> None:
        """Reopen the chain named by volume.meta and rebuild the layer map (after a revert,
        a rebuild, a fold)."""
        layers = self._open_chain(self.directory, self.meta)
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = layers
        self._map_layers()

    def close(self) -> None:
        """Persist the revision counter; clear Dirty unless the replica is suspect (a clean
        close must not launder a replica that crashed or failed a write: module docstring)."""
        if self.layers:
            self.flush()
            if self.meta.get("Dirty") and not self.suspect:
                self.update_meta(Dirty=False)
            for layer in self.layers:
                os.close(layer.fd)
            self.layers = []

    # --- metadata --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self.meta["Size"])

    @property
    def head(self) -> Layer:
        return self.layers[-1]

    def update_meta(self, **changes: Any) -> None:
        meta = dict(self.meta, **changes)
        atomic_write_json(os.path.join(self.directory, VOLUME_META), meta)
        self.meta = meta

    def _mutating(self) -> None:
        """Before a mutation changes anything (after its arguments were checked)."""
        if self.halted:
            raise BlockhornError(f"replica refuses writes after a failed one ({self.halted}): "
                                 "it must be resynced", errno.ECANCELED)
        if not self.meta.get("Dirty"):
            # Durable before the first write lands: a crash from here on is visible at start.
            self.update_meta(Dirty=True)

    @contextlib.contextmanager
    def _mutation(self, offset: int, length: int) -> Iterator[None]:
        """Count a mutation only once it succeeded; a failure halts the replica."""
        self._mutating()
        if self.copy_dirty is not None:
            # Outward: the engine widens mutations to whole blocks while a replica rebuilds.
            self.copy_dirty.mark(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))
        try:
            yield
        except OutOfSpace:
            raise
        except BaseException as e:
            self.halted = f"{type(e).__name__}: {e}"
            self.suspect = True
            if getattr(e, "errno", None) == errno.ENOSPC:
                # Torn, not refused: an ENOSPC answer would tell the engine nothing changed.
                raise BlockhornError(f"out of space part-way: {e}", errno.EIO) from e
            raise
        self.revision += 1
        self.changes.record(self.revision, offset, length)

    # --- generations (engine-driven; docs/DURABILITY.md) ---------------------------------

    def set_generation(self, generation: int, members: list[str],
                       clear_rebuilding: bool = False, start: bool = False,
                       voters: list[str] | None = None) -> None:
        """Record that this replica is in sync at `generation` with `members` (one atomic,
        durable write). `clear_rebuilding`: the end of a resync — the replica now equals the
        source, so it stops being suspect and may be trusted from this write on. `voters`:
        the replicas a quorum-mode commit needed a majority of ([]: not quorum-committed)."""
        changes: dict[str, Any] = {"Generation": int(generation), "Members": list(members),
                                   "Voters": list(voters or [])}
        if clear_rebuilding:
            changes["Rebuilding"] = False
            changes["ResyncSince"] = None
            self.copy_dirty = None
            self.suspect = False
            self.halted = ""
        self.update_meta(**changes)
        if self.log_generation is None:
            self.log_generation = int(generation)
        if start:
            self.start_generation = int(generation)

    def adopt(self) -> None:
        """The engine chose this replica as the source of truth (its content defines the
        volume now): it is no longer suspect, and mutations are accepted again."""
        self.suspect = False
        self.halted = ""

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad range offset={offset} length={length}")
        if offset + length > self.size:
            raise NoSpace(f"range {offset}+{length} is past the end ({self.size})")

    # --- data ------------------------------------------------------------------------------

    def read_into(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        if len(self.layers) == 1:
            preadv_full(self.head.fd, buf, offset)
            return
        for start, end, index in self.map.lookup(offset, offset + len(buf)):
            part = buf[start - offset:end - offset]
            if index == ZERO:
                part[:] = bytes(len(part))
            else:
                preadv_full(self.layers[index].fd, part, start)

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return buf

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check(offset, len(data))
        with self._mutation(offset, len(data)):
            self._reserve(offset, offset + len(data))
            self._write(offset, data, os.RWF_DSYNC if fua else 0)

    def _reserve(self, offset: int, end: int) -> None:
        """Allocate the holes of the head in [offset, end) (whole blocks, as a copy-up may widen
        the write) so that the write cannot run out of space half-way. On ENOSPC, punch those
        holes again (allocated, unwritten blocks read as zeros, but a layer map rebuilt from
        the file must not take them for data) and raise OutOfSpace: nothing changed."""
        start = offset - offset % BLOCK_SIZE
        end = -(-end // BLOCK_SIZE) * BLOCK_SIZE
        pos, fd = start, self.head.fd
        now = time.monotonic()
        if now - self._free_at >= RESERVE_CHECK_S or self._free < RESERVE_BELOW_FREE:
            st = os.fstatvfs(fd)
            self._free, self._free_at = st.f_bfree * st.f_frsize, now  # replicas run as root
        self._free -= end - start
        if self._free >= RESERVE_BELOW_FREE:
            return
        holes = []
        while pos < end:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)      # the file's size ends in a hole
            if hole >= end:
                break
            try:
                pos = min(os.lseek(fd, hole, os.SEEK_DATA), end)
            except OSError as e:
                if e.errno != errno.ENXIO:    # no data after the hole
                    raise
                pos = end
            holes.append((hole, pos))
        for i, (hs, he) in enumerate(holes):
            try:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, hs, he - hs)
            except BlockhornError as err:
                if err.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return    # no fallocate here: an ENOSPC while writing halts, as before
                if err.errno != errno.ENOSPC:
                    raise
                for s2, e2 in holes[:i + 1]:
                    punch_hole(fd, s2, e2 - s2)
                raise OutOfSpace(f"no space for {end - start} bytes at {start}") from err

    def _write(self, offset: int, data: bytes | bytearray | memoryview, flags: int) -> None:
        length = len(data)
        if len(self.layers) == 1:
            pwrite_full(self.head.fd, data, offset, flags)
            return
        # Widen partial edge blocks that live in older layers (copy-up), then write.
        start = offset - offset % BLOCK_SIZE
        end = -(-(offset + length) // BLOCK_SIZE) * BLOCK_SIZE
        if (start, end) != (offset, offset + length) and self._needs_copy_up(start, end):
            block = self.read(start, end - start)
            block[offset - start:offset - start + length] = data
            data, offset = block, start
        pwrite_full(self.head.fd, data, offset, flags)
        self.map.overlay_head(start, end)

    def _needs_copy_up(self, start: int, end: int) -> bool:
        head = len(self.layers) - 1
        edges = [(start, start + BLOCK_SIZE), (end - BLOCK_SIZE, end)]
        return any(index not in (head, ZERO)
                   for s, e in edges for _, _, index in self.map.lookup(s, e))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: the range reads as zeros afterwards (blockhorn guarantees zeros on trim);
        with `fua`, durably so before it returns."""
        self.zero(offset, length, may_trim=True, fua=fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        """Make a range read as zeros. With `may_trim`, space is freed where that is safe:
        everywhere on a single-layer chain, and where no snapshot beneath holds data on a
        longer chain; over snapshot data real zeros are written so it stays hidden."""
        self._check(offset, length)
        with self._mutation(offset, length):
            end = offset + length
            if not may_trim:
                self._write_zeros(offset, end)
            elif len(self.layers) == 1:
                self._punch(offset, end)
            elif self.meta.get("Rebuilding"):
                # A rebuild target's snapshot layers are still being filled, so its base map
                # does not yet say where older data lies: a hole punched now could let data
                # copied later show through. Real zeros hide whatever arrives beneath.
                self._write_zeros(offset, end)
            else:
                for s, e, layer in self.map.base.lookup(offset, end):
                    if layer == ZERO:
                        self._punch(s, e)      # nothing beneath: a hole in the head reads zeros
                    else:
                        self._write_zeros(s, e)
            if fua:
                os.fdatasync(self.head.fd)

    def _punch(self, start: int, end: int) -> None:
        """Punch whole blocks of the head, write zeros on partial edges (holes are per block)."""
        s = -(-start // BLOCK_SIZE) * BLOCK_SIZE
        e = end // BLOCK_SIZE * BLOCK_SIZE
        if s >= e:
            self._write_zeros(start, end)
            return
        self._write_zeros(start, s)
        self._write_zeros(e, end)
        punch_hole(self.head.fd, s, e - s)

    def _write_zeros(self, start: int, end: int) -> None:
        chunk = memoryview(bytes(min(end - start, 1 << 20)))
        pos = start
        while pos < end:
            n = min(len(chunk), end - pos)
            self._write(pos, chunk[:n], 0)
            pos += n

    def flush(self) -> None:
        """Make every completed write durable: fdatasync the head, then the revision counter.
        A failed fdatasync may have lost written pages: the replica halts (module docstring)."""
        try:
            os.fdatasync(self.head.fd)
        except OSError as e:
            self.halted = f"flush failed: {e}"
            self.suspect = True
            raise
        self.changes.cut()
        if self.revision != self._persisted_revision:
            fd = os.open(os.path.join(self.directory, REVISION_COUNTER), os.O_WRONLY)
            try:
                pwrite_full(fd, encode_revision(self.revision), 0)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._persisted_revision = self.revision

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Ranges of [offset, offset+length) that hold data in any layer, as (start, length)."""
        self._check(offset, length)
        out: list[tuple[int, int]] = []
        if len(self.layers) == 1:
            ranges = ((s, e) for s, e in data_extents(self.head.fd, offset, length))
        else:
            ranges = ((s, e) for s, e, i in self.map.lookup(offset, offset + length) if i != ZERO)
        for s, e in ranges:
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], e - out[-1][0])
            else:
                out.append((s, e - s))
        return out

    def stat(self) -> dict[str, Any]:
        head_stat = os.fstat(self.head.fd)
        return {
            "volume": self.meta.get("Volume", ""), "size": self.size, "head": self.head.name,
            "revision": self.revision, "dirty": bool(self.meta.get("Dirty")),
            "opened_dirty": self.opened_dirty,
            "rebuilding": bool(self.meta.get("Rebuilding")), "error": self.meta.get("Error", ""),
            "generation": int(self.meta.get("Generation", 0)),
            "members": list(self.meta.get("Members") or []),
            "voters": list(self.meta.get("Voters") or []),
            "suspect": self.suspect, "halted": self.halted, "layers": len(self.layers),
            "log_start": self.changes.start, "log_generation": self.log_generation,
            "start_generation": self.start_generation,
            "resync_since": self.meta.get("ResyncSince"),
            "rebuild_cursor": self.meta.get("RebuildCursor"),
            "directory": os.path.abspath(self.directory), "head_ino": head_stat.st_ino,
            "head_dev": head_stat.st_dev, "allocated": head_stat.st_blocks * 512,
            "chain": [layer.name for layer in self.layers],
        }

    def set_revision(self, revision: int) -> None:
        """End of a resync's copy: the content now equals a replica at `revision`. It stays
        suspect (and Rebuilding) until the engine's join commit (`set_generation`)."""
        self.revision = revision
        self.flush()
        self.opened_dirty = False
        self.changes.reset(revision)      # its history before this is not this content's
        self.log_generation = None

