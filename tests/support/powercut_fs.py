"""A test-only FUSE passthrough that can lose power (scenario 9 of issue 9).

    python tests/support/powercut_fs.py BACKING MOUNTPOINT READY_FILE STATS_FILE

Every request goes through to BACKING at once (so the processes above see a normal file
system), but the file system remembers what a power cut would lose, the way dm-log-writes /
CrashMonkey replay only what was made durable:

- data: the first time a 4 KiB block of a file changes after the file's last fsync/fdatasync
  (write, truncate, fallocate), its durable content is saved (undo log, in memory); an fsync of
  the file drops the file's undo log (its current content is durable now);
- names: a directory's entries are durable as they were at its last fsync (or at mount);
  creating, renaming over, or unlinking a name changes only the live view. A file that a
  durable name still refers to is kept as a hidden hard link when its last live name goes.

SIGUSR1 cuts the power: the file system unmounts, then puts BACKING back into its durable
state (file data and sizes reverted, every directory's entries exactly its durable ones), writes
what it dropped to STATS_FILE (JSON) and exits. SIGTERM unmounts without losing anything.
Directories themselves are not reverted (the replicas never create or remove them), and file
modes and times are not either. No lseek: SEEK_HOLE/SEEK_DATA see the files as all data.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

import pyfuse3
import trio

BLOCK = 4096                 # bytes: the undo log's granularity
STASH = ".powercut-stash"    # hidden directory in BACKING: files kept for durable names


@dataclass
class Undo:
    """What a file held at its last fsync: its size and the blocks changed since."""
    fd: int
    size: int
    blocks: dict[int, bytes] = field(default_factory=dict)


class PowerCutFS(pyfuse3.Operations):
    def __init__(self, backing: str) -> None:
        super().__init__()
        self.backing = os.path.abspath(backing)
        self.root_ino = os.lstat(self.backing).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.backing}
        self.fds: dict[int, int] = {}            # fh (the backing fd) -> inode
        self.undo: dict[int, Undo] = {}
        os.makedirs(os.path.join(self.backing, STASH), exist_ok=True)
        # Everything present at mount is durable.
        self.durable: dict[str, dict[str, int]] = {}
        for top, dirs, _ in os.walk(self.backing):
            if STASH in dirs:
                dirs.remove(STASH)
            self.durable[top] = self._listing(top)

    # --- helpers ---------------------------------------------------------------------------

    def _listing(self, path: str) -> dict[str, int]:
        return {e.name: e.inode() for e in os.scandir(path)
                if e.name != STASH and not e.is_dir(follow_symlinks=False)}

    def _ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self.root_ino else st_ino

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        ino = self._ino(st.st_ino)
        self.paths[ino] = path
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 0      # no kernel caching: the state changes under it at a cut
        a.attr_timeout = 0
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        return a

    def _durable_ino(self, ino: int) -> bool:
        return any(ino in names.values() for names in self.durable.values())

    def _keep(self, path: str) -> None:
        """Before a name goes (unlink, rename over it): keep its file if a durable name needs it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        kept = os.path.join(self.backing, STASH, str(st.st_ino))
        if stat.S_ISREG(st.st_mode) and self._durable_ino(st.st_ino) and not os.path.exists(kept):
            os.link(path, kept)

    def _save(self, fh_or_path: int | str, ino: int, start: int, end: int) -> None:
        """Remember the durable content of the blocks in [start, end) before they change."""
        u = self.undo.get(ino)
        if u is None:
            fd = os.open(fh_or_path if isinstance(fh_or_path, str) else f"/proc/self/fd/{fh_or_path}",
                         os.O_RDWR)
            u = self.undo[ino] = Undo(fd, os.fstat(fd).st_size)
        for b in range(start // BLOCK, -(-end // BLOCK)):
            if b * BLOCK < u.size and b not in u.blocks:
                u.blocks[b] = os.pread(u.fd, BLOCK, b * BLOCK)

    # --- the operations --------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        if name == STASH.encode() and parent_inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._child(parent_inode, name))

    async def getattr(self, inode, ctx=None):
        return self._attr(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            self._save(path, inode, attr.st_size, os.lstat(path).st_size)
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(path)

    async def opendir(self, inode, ctx):
        self._path(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(n for n in os.listdir(path) if not (fh == pyfuse3.ROOT_INODE and n == STASH))
        for i, n in enumerate(names[start_id:], start_id):
            try:
                attr = self._attr(os.path.join(path, n))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(n), attr, i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        path = self._path(fh)
        self.durable[path] = self._listing(path)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        self.durable.setdefault(path, {})
        return self._attr(path)

    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(self._child(parent_inode, name))

    async def open(self, inode, flags, ctx):
        # O_DIRECT is the caller's cache hint, not durability (that is fsync, which this file
        # system models): the buffers FUSE hands us are not aligned for the backing file.
        fd = os.open(self._path(inode), flags & ~(os.O_CREAT | os.O_EXCL | os.O_DIRECT))
        self.fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, (flags | os.O_CREAT) & ~os.O_DIRECT, mode)
        attr = self._attr(path)
        self.fds[fd] = attr.st_ino
        return pyfuse3.FileInfo(fh=fd), attr

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        self._save(fh, self.fds[fh], off, off + len(buf))
        return os.pwrite(fh, buf, off)

    async def fallocate(self, fh, mode, offset, length):
        self._save(fh, self.fds[fh], offset, offset + length)
        from blockhorn.fsutil import fallocate
        try:
            fallocate(fh, mode, offset, length)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def fsync(self, fh, datasync):
        u = self.undo.pop(self.fds[fh], None)
        if u is not None:
            os.close(u.fd)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.fds.pop(fh, None)
        os.close(fh)

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        self._keep(path)
        os.unlink(path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        self._keep(new)
        os.rename(old, new)
        self.paths[self._ino(os.lstat(new).st_ino)] = new

    async def statfs(self, ctx):
        st = os.statvfs(self.backing)
        s = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(s, name, getattr(st, name))
        return s

    # --- the power cut ---------------------------------------------------------------------

    def revert(self) -> dict[str, int]:
        """Put BACKING into its durable state (after unmount: nothing else touches it)."""
        stats = {"blocks": 0, "files_truncated": 0, "names_dropped": 0, "names_restored": 0}
        for u in self.undo.values():
            if os.fstat(u.fd).st_size != u.size:
                stats["files_truncated"] += 1
            os.ftruncate(u.fd, u.size)
            for b, data in u.blocks.items():
                os.pwrite(u.fd, data, b * BLOCK)
                stats["blocks"] += 1
            os.close(u.fd)
        stash = os.path.join(self.backing, STASH)
        live: dict[int, str] = {}
        for top, _dirs, files in os.walk(self.backing):
            for f in files:
                live.setdefault(os.lstat(os.path.join(top, f)).st_ino, os.path.join(top, f))
        for directory, names in self.durable.items():
            if not os.path.isdir(directory):
                continue
            for ino in names.values():      # every durable file gets a safe name first
                kept = os.path.join(stash, str(ino))
                if not os.path.exists(kept) and ino in live:
                    os.link(live[ino], kept)
        for directory, names in self.durable.items():
            if not os.path.isdir(directory):
                continue
            for name, ino in self._listing(directory).items():
                if names.get(name) != ino:
                    os.unlink(os.path.join(directory, name))
                    stats["names_dropped"] += 1
            current = self._listing(directory)
            for name, ino in names.items():
                if current.get(name) != ino:
                    os.link(os.path.join(stash, str(ino)), os.path.join(directory, name))
                    stats["names_restored"] += 1
        for f in os.listdir(stash):
            os.unlink(os.path.join(stash, f))
        os.rmdir(stash)
        return stats


def main() -> None:
    backing, mountpoint, ready, stats_file = sys.argv[1:5]
    fs = PowerCutFS(backing)
    options = set(pyfuse3.default_options)
    options.add("fsname=powercut")
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)
    cut = False

    async def run() -> None:
        nonlocal cut
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
                nursery.start_soon(pyfuse3.main)
                # Signals are ours from here on: the test may cut.
                os.close(os.open(ready, os.O_CREAT | os.O_WRONLY, 0o644))
                async for sig in signals:
                    cut = sig == signal.SIGUSR1
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    if cut:
        stats = fs.revert()
    else:
        stats = {}
        for u in fs.undo.values():
            os.close(u.fd)
        stash = os.path.join(fs.backing, STASH)
        for f in os.listdir(stash):
            os.unlink(os.path.join(stash, f))
        os.rmdir(stash)
    with open(stats_file, "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
