"""Reading a replica that lives on this host straight from its layer files.

The head is the only layer that changes, so a read asks the file system (SEEK_DATA/SEEK_HOLE)
whether the head holds the whole range: then it is read from the head. If the head holds none
of it, the range is read from the snapshot layers through a map built once from their files
(they never change in place: a purge fold only copies a child's data onto its removed parent,
over ranges the child hides, and renames; open descriptors keep reading the same bytes). A
range the head holds only partly is left to the replica server (`read` returns False).

A write is acknowledged after the replica's `pwrite`, so a read issued after that sees it.
"""

from __future__ import annotations

import errno
import os

from blockhorn.fsutil import data_extents, preadv_full
from blockhorn.replica.extentmap import ZERO, ExtentMap


class LocalChain:
    def __init__(self, directory: str, chain: list[str], head_ino: int, head_dev: int) -> None:
        fds: list[int] = []
        try:
            for name in chain:
                fds.append(os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC))
            st = os.fstat(fds[-1])
            if (st.st_ino, st.st_dev) != (head_ino, head_dev):
                raise OSError(errno.ESTALE, "not the replica's head file (another host?)")
            size = max(os.fstat(fd).st_size for fd in fds)
            self.base = ExtentMap.sweep((s, e, i) for i, fd in enumerate(fds[:-1])
                                        for s, e in data_extents(fd, 0, size))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.fds = fds
        self.head = fds[-1]
        self.names = list(chain)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def read(self, view: memoryview, offset: int) -> bool:
        end = offset + len(view)
        if len(self.fds) == 1:
            preadv_full(self.head, view, offset)
            return True
        try:
            start = os.lseek(self.head, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            start = end                                  # no data after offset in the head
        if start <= offset:
            if os.lseek(self.head, offset, os.SEEK_HOLE) < end:
                return False                             # head holds part of it
            preadv_full(self.head, view, offset)
            return True
        if start < end:
            return False
        for s, stop, layer in self.base.lookup(offset, end):
            part = view[s - offset:stop - offset]
            if layer == ZERO:
                part[:] = bytes(len(part))
            else:
                preadv_full(self.fds[layer], part, s)
        return True
