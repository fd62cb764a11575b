"""Snapshot-tree operations on one replica directory: snapshot, remove + purge, revert, expand,
and the layer-level access a layer-aware rebuild needs. Plain synchronous code.

The directory holds a *tree* of snapshot layers (reverts start new branches); the *chain* is
the path from the head to the root. Every operation has one commit point — an atomic rewrite of
`volume.meta` (snapshot, revert, expand) or an atomic rename (purge) — and `recover()`, run at
every open, finishes or discards whatever a crash interrupted (docs/FORMAT.md, "Transitions").
`Replica.crash_hook(step)` is called before each step so tests can crash there.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import Any

from blockhorn.fsutil import (
    atomic_write_json,
    data_extents,
    fsync_dir,
    preadv_full,
    punch_hole,
    pwrite_full,
    read_json,
)
from blockhorn.replica.store import HEAD_FMT, Layer, Replica, layer_meta, new_head_file
from blockhorn.types import (
    BLOCK_SIZE,
    AlreadyExists,
    BlockhornError,
    Busy,
    InvalidArgument,
    NotFound,
    check_name,
)

DIRECT_MIN = 256 << 10       # bytes per piece (on average) for O_DIRECT rebuild writes
SNAP_PREFIX = "volume-snap-"
HEAD_PREFIX = "volume-head-"
PURGE_JOURNAL = "purge.journal"
COPY_CHUNK = 1 << 20          # bytes per read/write while folding a snapshot


def snap_file(name: str) -> str:
    return f"{SNAP_PREFIX}{name}.img"


def snap_name(file_name: str) -> str:
    return file_name[len(SNAP_PREFIX):-len(".img")]


def all_snapshots(r: Replica) -> dict[str, dict[str, Any]]:
    """Every snapshot layer in the directory (the whole tree), by file name."""
    out = {}
    for entry in os.listdir(r.directory):
        if entry.startswith(SNAP_PREFIX) and entry.endswith(".img.meta"):
            out[entry[:-len(".meta")]] = read_json(os.path.join(r.directory, entry))
    return out


def _visible_parent(parent: str, snaps: dict[str, dict[str, Any]]) -> str:
    """Nearest ancestor a user can see: removed snapshots waiting to be folded are skipped."""
    while parent and snaps.get(parent, {}).get("Removed"):
        parent = snaps[parent].get("Parent", "")
    return parent


def list_snapshots(r: Replica) -> list[dict[str, Any]]:
    """User view of the tree: `{name, parent, created, user_created, removed, size, labels}`;
    removed snapshots are hidden (they fold away), their children point past them."""
    snaps = all_snapshots(r)
    children: dict[str, int] = {}
    for meta in snaps.values():
        children[meta.get("Parent", "")] = children.get(meta.get("Parent", ""), 0) + 1
    def depth(file_name: str) -> int:
        n = 0
        while file_name in snaps and n <= len(snaps):
            file_name, n = snaps[file_name].get("Parent", ""), n + 1
        return n

    out = []
    order = sorted(snaps.items(), key=lambda kv: (kv[1].get("Created", ""), depth(kv[0])))
    for file_name, meta in order:
        if meta.get("Removed"):
            continue
        st = os.stat(os.path.join(r.directory, file_name))
        parent = _visible_parent(meta.get("Parent", ""), snaps)
        out.append({"name": snap_name(file_name),
                    "parent": snap_name(parent) if parent else "",
                    "created": meta.get("Created", ""), "user_created": bool(meta.get("UserCreated")),
                    "removed": False, "size": st.st_blocks * 512, "labels": meta.get("Labels") or {},
                    "on_chain": any(layer.name == file_name for layer in r.layers)})
    return out


# --- snapshot ------------------------------------------------------------------------------

def _hook(r: Replica, step: str) -> None:
    if r.crash_hook is not None:
        r.crash_hook(step)


def _next_head(r: Replica) -> str:
    number = int(r.head.name[len(HEAD_PREFIX):-len(".img")]) + 1
    return HEAD_FMT.format(number)


def create_snapshot(r: Replica, name: str, user_created: bool = True,
                    labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Freeze the head as snapshot `name` and continue on a new, empty head. Copies no data.

    Steps: new head file (+meta, parent = the snapshot); hard link old head -> snapshot name
    (+meta); COMMIT: volume.meta Head = new head; drop the old head's names."""
    check_name(name, "snapshot")
    snap = snap_file(name)
    if os.path.exists(os.path.join(r.directory, snap + ".meta")):
        raise AlreadyExists(f"snapshot {name!r} already exists")
    old, new = r.head, _next_head(r)
    r.flush()
    _hook(r, "snapshot:new-head")
    new_head_file(r.directory, new, snap, r.size)
    _hook(r, "snapshot:link")
    snap_path = os.path.join(r.directory, snap)
    if os.path.exists(snap_path):
        os.unlink(snap_path)   # leftover of an uncommitted attempt
    os.link(os.path.join(r.directory, old.name), snap_path)
    atomic_write_json(snap_path + ".meta",
                      dict(layer_meta(snap, old.meta.get("Parent", ""), user_created, labels)))
    _hook(r, "snapshot:commit")
    r.update_meta(Head=new)
    _hook(r, "snapshot:cleanup")
    _remove_files(r.directory, old.name)
    fsync_dir(r.directory)
    # In memory: the old head's fd now reads the snapshot (same inode); a new head on top.
    had_map = len(r.layers) > 1
    r.layers[-1] = Layer(snap, old.fd, read_json(snap_path + ".meta"))
    fd = os.open(os.path.join(r.directory, new), os.O_RDWR | os.O_CLOEXEC)
    r.layers.append(Layer(new, fd, read_json(os.path.join(r.directory, new + ".meta"))))
    if had_map:
        r.map.push_head()
    else:
        r._map_layers()
    return {"name": name, "file": snap}


def _remove_files(directory: str, layer_file: str) -> None:
    for path in (layer_file, layer_file + ".meta"):
        try:
            os.unlink(os.path.join(directory, path))
        except FileNotFoundError:
            pass  # already gone: removal is idempotent (recovery may repeat it)


# --- remove and purge ----------------------------------------------------------------------

def mark_removed(r: Replica, name: str) -> None:
    snap = snap_file(name)
    path = os.path.join(r.directory, snap + ".meta")
    if not os.path.exists(path):
        raise NotFound(f"snapshot {name!r} does not exist")
    meta = read_json(path)
    if not meta.get("Removed"):
        atomic_write_json(path, dict(meta, Removed=True))
    for layer in r.layers:
        if layer.name == snap:
            layer.meta = dict(meta, Removed=True)


def _children(r: Replica, parent: str, snaps: dict[str, dict[str, Any]]) -> list[str]:
    kids = [f for f, m in snaps.items() if m.get("Parent") == parent]
    if r.head.meta.get("Parent") == parent:
        kids.append(r.head.name)
    return kids


def purge(r: Replica, lock: Any = None) -> list[str]:
    """Fold every removed snapshot that can go away; return the names folded.

    - no child (a branch left by a revert): delete it;
    - one snapshot child C: copy C's data onto it, then (journaled) rename it over C — needs
      no more free space than C's data, and no read changes at any point;
    - the head as only child: punch holes where the head has data (it stays, hidden);
    - several children: stays, hidden, until a branch goes away.
    Data is copied without `lock` (no read reaches the ranges written); decisions and commits
    hold it, so this can run in a thread beside I/O."""
    guard = lock if lock is not None else contextlib.nullcontext()
    folded: list[str] = []
    punched: set[str] = set()
    while True:
        with guard:
            action = _next_action(r, punched)
            if action is None:
                return folded
            if action[0] == "delete":
                _remove_files(r.directory, action[1])
                fsync_dir(r.directory)
                folded.append(snap_name(action[1]))
                continue
        if action[0] == "punch":
            _punch_under_head(r, action[1])
            punched.add(action[1])
            continue
        parent, child = action[1], action[2]
        _fold_copy(r, parent, child)
        with guard:
            _hook(r, "purge:journal")
            atomic_write_json(os.path.join(r.directory, PURGE_JOURNAL),
                              {"parent": parent, "child": child})
            _finish_fold(r, parent, child)
        folded.append(snap_name(parent))


def _next_action(r: Replica, punched: set[str]) -> tuple[str, ...] | None:
    snaps = all_snapshots(r)
    for snap, meta in sorted(snaps.items()):
        if not meta.get("Removed"):
            continue
        kids = _children(r, snap, snaps)
        if not kids and _layer_index(r, snap) is None:
            return ("delete", snap)
        if len(kids) == 1 and kids[0] != r.head.name:
            return ("fold", snap, kids[0])
        if len(kids) == 1 and snap not in punched:
            return ("punch", snap)
    return None


def _layer_index(r: Replica, file_name: str) -> int | None:
    for i, layer in enumerate(r.layers):
        if layer.name == file_name:
            return i
    return None


def _fold_copy(r: Replica, parent: str, child: str) -> None:
    """Copy the child's data onto the parent: the parent file then reads as the child."""
    d = r.directory
    _hook(r, "purge:copy")
    pfd = os.open(os.path.join(d, parent), os.O_RDWR | os.O_CLOEXEC)
    cfd = os.open(os.path.join(d, child), os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = memoryview(bytearray(COPY_CHUNK))
        child_size = os.fstat(cfd).st_size
        for start, end in data_extents(cfd, 0, child_size):
            pos = start
            while pos < end:
                n = min(COPY_CHUNK, end - pos)
                preadv_full(cfd, buf[:n], pos)
                pwrite_full(pfd, buf[:n], pos)
                pos += n
        if os.fstat(pfd).st_size < child_size:
            os.ftruncate(pfd, child_size)
        os.fsync(pfd)
    finally:
        os.close(cfd)
        os.close(pfd)


def _finish_fold(r: Replica, parent: str, child: str) -> None:
    """Second half of a fold (journaled), then the in-memory chain follows."""
    fold_commit(r.directory, parent, child, lambda step: _hook(r, step))
    # In memory: the child's layer takes the parent's place in the chain (when on it).
    pi, ci = _layer_index(r, parent), _layer_index(r, child)
    if pi is not None and ci is not None:
        os.close(r.layers[ci].fd)
        os.close(r.layers[pi].fd)
        fd = os.open(os.path.join(r.directory, child), os.O_RDONLY | os.O_CLOEXEC)
        r.layers[pi] = Layer(child, fd, read_json(os.path.join(r.directory, child + ".meta")))
        del r.layers[ci]
        r._map_layers()


def fold_commit(d: str, parent: str, child: str,
                hook: Callable[[str], None] | None = None) -> None:
    """Idempotent: rename parent over child, child inherits parent's parent, parent's meta
    goes, journal goes. `roll_forward` re-runs it after a crash, before the chain is read."""
    step = hook or (lambda name: None)
    grandparent = read_json(os.path.join(d, parent + ".meta")).get("Parent", "") \
        if os.path.exists(os.path.join(d, parent + ".meta")) else None
    step("purge:rename")
    if os.path.exists(os.path.join(d, parent)):
        os.replace(os.path.join(d, parent), os.path.join(d, child))
    step("purge:reparent")
    if grandparent is not None:
        child_meta = read_json(os.path.join(d, child + ".meta"))
        atomic_write_json(os.path.join(d, child + ".meta"), dict(child_meta, Parent=grandparent))
        step("purge:cleanup")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, parent + ".meta"))
    os.unlink(os.path.join(d, PURGE_JOURNAL))
    fsync_dir(d)


def roll_forward(directory: str) -> None:
    """Before a replica's chain is read: finish a fold whose journal survived a crash."""
    journal = os.path.join(directory, PURGE_JOURNAL)
    if os.path.exists(journal):
        j = read_json(journal)
        fold_commit(directory, j["parent"], j["child"])


def _punch_under_head(r: Replica, snap: str) -> None:
    """The head's removed parent cannot be renamed away online; reclaim the space the head
    hides instead (those ranges are never read from it again)."""
    index = _layer_index(r, snap)
    if index is None:
        return
    fd = os.open(os.path.join(r.directory, snap), os.O_RDWR | os.O_CLOEXEC)
    try:
        for start, end in data_extents(r.head.fd, 0, r.size):
            s = -(-start // BLOCK_SIZE) * BLOCK_SIZE
            e = end // BLOCK_SIZE * BLOCK_SIZE
            if s < e:
                punch_hole(fd, s, e - s)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- revert and expand ---------------------------------------------------------------------

def revert(r: Replica, name: str) -> None:
    """Start a new, empty head on snapshot `name`; the old head's data is dropped.

    Counted as one mutation (docs/DURABILITY.md, "Revert"), so a replica that reverted never
    looks in sync with one that did not: `Dirty` is set durably before anything changes (a
    crash in the middle leaves the replica suspect), the revision is bumped and persisted
    after the commit, and the change log starts anew at it (its history is not this
    content's: a sibling behind it is rebuilt in full, never resynced from the log)."""
    check_name(name, "snapshot")     # from the wire too: never a path
    snap = snap_file(name)
    meta_path = os.path.join(r.directory, snap + ".meta")
    if not os.path.exists(meta_path) or read_json(meta_path).get("Removed"):
        raise NotFound(f"snapshot {name!r} does not exist")
    r._mutating()     # refuses a halted replica; Dirty durable before the first change
    old, new = r.head, _next_head(r)
    try:
        _hook(r, "revert:new-head")
        new_head_file(r.directory, new, snap, r.size)
        _hook(r, "revert:commit")
        r.update_meta(Head=new)
        _hook(r, "revert:cleanup")
        _remove_files(r.directory, old.name)
        fsync_dir(r.directory)
        r.reload()
        _hook(r, "revert:revision")
        r.revision += 1
        r.flush()     # the new head (empty) and the revision counter, durable
    except BaseException as e:
        # Part-way: reverted or not, it must not be trusted beside the others (as a failed
        # write halts a replica: store.py).
        r.halted = f"revert failed: {type(e).__name__}: {e}"
        r.suspect = True
        raise
    r.changes.reset(r.revision)
    r.log_generation = None


def expand(r: Replica, size: int) -> None:
    """Grow the volume: the head file first, then volume.meta (the commit). Older layers stay
    shorter; reading past their end gives zeros."""
    if size % BLOCK_SIZE:
        raise InvalidArgument(f"size {size} is not a multiple of 4096")
    if size < r.size:
        raise InvalidArgument(f"cannot shrink the volume from {r.size} to {size} bytes")
    if size == r.size:
        return
    _hook(r, "expand:truncate")
    os.ftruncate(r.head.fd, size)
    os.fsync(r.head.fd)
    _hook(r, "expand:commit")
    r.update_meta(Size=size)


# --- recovery ------------------------------------------------------------------------------

def recover(r: Replica) -> None:
    """At open: drop layer files no commit made reachable (a journaled fold was already
    finished by `roll_forward`)."""
    d = r.directory
    head = r.meta["Head"]
    head_ino = os.stat(os.path.join(d, head)).st_ino
    changed = False
    for entry in os.listdir(d):
        path = os.path.join(d, entry)
        if ".tmp." in entry:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            changed = True
        elif entry.startswith(HEAD_PREFIX) and entry.endswith(".img") and entry != head:
            _remove_files(d, entry)       # a new head that was never committed, or an old one
            changed = True
        elif entry.startswith(HEAD_PREFIX) and entry.endswith(".img.meta") \
                and entry[:-len(".meta")] != head:
            _remove_files(d, entry[:-len(".meta")])
            changed = True
        elif entry.startswith(SNAP_PREFIX) and entry.endswith(".img"):
            # A snapshot that still shares the head's inode was never committed.
            if os.stat(path).st_ino == head_ino or not os.path.exists(path + ".meta"):
                _remove_files(d, entry)
                changed = True
    if changed:
        fsync_dir(d)


def snapshot_view(directory: str, name: str) -> Replica:
    """A read-only view of snapshot `name` of the replica in `directory` (its chain from that
    snapshot down). Safe while the replica serves: snapshot layers never change in place, a
    fold replaces a file by one that reads the same, and no recovery runs. For clones."""
    snap = snap_file(name)
    path = os.path.join(directory, snap + ".meta")
    if not os.path.exists(path) or read_json(path).get("Removed"):
        raise NotFound(f"snapshot {name!r} does not exist in {directory}")
    meta = read_json(os.path.join(directory, "volume.meta"))
    if meta.get("Rebuilding") or meta.get("Error"):
        # Its layers may be empty or half-copied: reading them would give zeros.
        raise BlockhornError(f"{directory} is being rebuilt or failed: not readable",
                             errno.EAGAIN)
    meta = dict(meta, Head=snap)
    layers = Replica._open_chain(directory, meta, readonly=True)
    size = max(os.fstat(layer.fd).st_size for layer in layers)
    return Replica(directory, dict(meta, Size=size), layers, 0)


# --- layer access for a layer-aware rebuild ------------------------------------------------

def chain_metas(r: Replica) -> list[dict[str, Any]]:
    """The chain below the head, oldest first, as layer metas (what a rebuild recreates)."""
    return [dict(layer.meta) for layer in r.layers[:-1]]


def layer_fd(r: Replica, layer_file: str) -> int:
    index = _layer_index(r, layer_file)
    if index is None:
        raise NotFound(f"layer {layer_file!r} is not on the chain")
    return r.layers[index].fd


def reset_chain(r: Replica, chain: list[dict[str, Any]]) -> None:
    """Start of a rebuild: empty this replica and give it the source's chain (empty snapshot
    layers with the source's metas, oldest first) under a fresh, empty head."""
    if not r.meta.get("Rebuilding"):
        raise Busy("reset_chain needs the replica marked Rebuilding first", errno.EBUSY)
    d = r.directory
    for layer in r.layers:
        os.close(layer.fd)
    r.layers = []
    for entry in os.listdir(d):
        if entry.startswith((SNAP_PREFIX, HEAD_PREFIX)):
            os.unlink(os.path.join(d, entry))
    parent = ""
    for meta in chain:
        name = meta["Name"]
        if not name.startswith(SNAP_PREFIX):
            raise InvalidArgument(f"bad layer name {name!r} in chain")
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.truncate(r.size)
        atomic_write_json(path + ".meta", dict(meta, Parent=parent))
        parent = name
    head = HEAD_FMT.format(0)
    new_head_file(r.directory, head, parent, r.size)
    fsync_dir(d)
    r.update_meta(Head=head, ResyncSince=None, RebuildCursor=None)
    r.reload()


def write_layer(r: Replica, layer_file: str, offset: int, data: bytes | memoryview) -> None:
    """Rebuild only: fill a layer of a Rebuilding replica. The head takes a copy only during
    a copy session (`begin_copy`), and only into blocks no mutation has reached since."""
    write_layer_many(r, layer_file, [(offset, memoryview(data))])


def write_layer_many(r: Replica, layer_file: str,
                     pieces: list[tuple[int, memoryview]]) -> None:
    """`write_layer` of many (offset, data) pieces, the file opened once (a resync's vector)."""
    if not r.meta.get("Rebuilding"):
        raise BlockhornError("snapshot layers are read-only", errno.EROFS)
    index = _layer_index(r, layer_file)
    if index is None:
        raise NotFound(f"layer {layer_file!r} is not on the chain")
    head = index == len(r.layers) - 1
    work = [(offset, data, _clean_runs(r, offset, len(data)) if head
             else [(offset, offset + len(data))]) for offset, data in pieces]
    _write_direct(r, os.path.join(r.directory, layer_file), work)
    # The map is rebuilt from the files when the rebuild finishes (finish_rebuild).


def _write_direct(r: Replica, path: str,
                  work: list[tuple[int, memoryview, list[tuple[int, int]]]]) -> None:
    """Write each piece's `runs` of its data (placed at its offset) with O_DIRECT when they
    are whole blocks: a rebuild's bulk copy then costs no copy into the page cache (most of
    the target's CPU) and evicts nothing; finish_rebuild's fsync still makes it durable. The
    kernel keeps direct and buffered I/O of the file coherent. Small pieces (a resync's
    scattered blocks: one synchronous disk write each would cost more than the copy),
    anything unaligned, or a file system that refuses direct writes: buffered."""
    aligned = all(s % BLOCK_SIZE == 0 and e % BLOCK_SIZE == 0
                  for _, _, runs in work for s, e in runs) and \
        sum(len(data) for _, data, _ in work) >= DIRECT_MIN * len(work)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if aligned else 0))
    except OSError as e:
        if not aligned or e.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)     # no O_DIRECT on this file system
        aligned = False
    try:
        for offset, data, runs in work:
            for start, end in runs:
                part = data[start - offset:end - offset]
                if aligned:
                    buf = r.direct_buffer(len(part))
                    buf[:len(part)] = part
                    try:
                        pwrite_full(fd, memoryview(buf)[:len(part)], start)
                        continue
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        # Opened, but this file system refuses the direct write: buffered.
                        os.close(fd)
                        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                        aligned = False
                pwrite_full(fd, part, start)
    finally:
        os.close(fd)


def punch_layer(r: Replica, layer_file: str, offset: int, length: int) -> None:
    """Rebuild only: make a range of a layer a hole (in the head: its blocks no mutation has
    reached during the copy session)."""
    if not r.meta.get("Rebuilding"):
        raise BlockhornError("punch_layer: only a replica being rebuilt", errno.EROFS)
    if offset + length > r.size:
        raise InvalidArgument(f"punch_layer: {offset}+{length} is past the end ({r.size})")
    index = _layer_index(r, layer_file)
    if index is None:
        raise NotFound(f"layer {layer_file!r} is not on the chain")
    if index == len(r.layers) - 1:
        for s, e in _clean_runs(r, offset, length):
            punch_hole(r.head.fd, s, e - s)
        return
    _check_blocks(offset, length)
    punch_hole(r.layers[index].fd, offset, length)


def _check_blocks(offset: int, length: int) -> None:
    if offset % BLOCK_SIZE or length % BLOCK_SIZE:
        raise InvalidArgument(f"rebuild copy: {offset}+{length} is not whole 4 KiB blocks")


def _clean_runs(r: Replica, offset: int, length: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of whole blocks in the range that no mutation reached during
    the current copy session."""
    if r.copy_dirty is None:
        raise BlockhornError("the head takes a rebuild copy only in a copy session",
                             errno.EROFS)
    _check_blocks(offset, length)
    return [(s * BLOCK_SIZE, e * BLOCK_SIZE) for s, e in
            r.copy_dirty.clean_runs(offset // BLOCK_SIZE, (offset + length) // BLOCK_SIZE)]


def sync_layers(r: Replica) -> None:
    for layer in r.layers:
        os.fsync(layer.fd)
