"""Replica-side fencing: an owner's epoch, accepted only if no newer owner has been seen.

A cluster node daemon gives an engine the volume's attach epoch from the state store as its
fencing *epoch* (manager/across.py: every attach, and every move of an attachment off a dead
node, bumps it in one compare-and-swap); every new attachment has a higher one. The engine sends
it in the handshake (AUTH name `vol@<epoch>`, docs/FORMAT.md). The replica server:

- refuses a handshake whose epoch is below the highest it has seen (WELCOME status 2), so an
  engine of a former owner — paused, cut off, not yet fenced by its own node — cannot
  (re)connect once a newer owner has;
- on a higher epoch, records it durably (`fence.epoch` in the replica directory, so a restart
  keeps it) before it answers, and shuts down the open connections of lower epochs: writes a
  former owner still had in flight fail instead of landing after the new owner's.

Epoch 0 (no `@`: the single-host daemon, tools, tests) is neither checked nor closed.

Within one owner the engine also replaces its own connections: its first request on every
new connection is `claim`, after which the replica refuses every request of a connection
admitted before it (`Superseded`) and shuts those connections down (replica/server.py). A
request the replica had received on the old connection but not executed yet (it was paused,
or its thread waited for the store lock) could otherwise land after the resync that the new
connection runs, leaving the replica older than its siblings (docs/DURABILITY.md).
"""

from __future__ import annotations

import errno
import os
import socket
import threading

from blockhorn.fsutil import atomic_write
from blockhorn.types import AuthError, BlockhornError

FILE = "fence.epoch"


class Fenced(AuthError):   # logged as a refusal, like a wrong key
    errno = errno.ESTALE


class Superseded(BlockhornError):
    """A request on a connection admitted before the engine's latest `claim`."""
    errno = errno.ESTALE


class Fencing:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE)
        try:
            with open(self.path) as f:
                self.highest = int(f.read().strip() or 0)
        except FileNotFoundError:
            self.highest = 0   # never fenced
        except ValueError:
            raise BlockhornError(f"{self.path} is corrupt: it should hold one number",
                                 errno.EIO) from None
        self.lock = threading.Lock()
        self.connections: dict[socket.socket, int] = {}

    def admit(self, epoch: int) -> None:
        """Before WELCOME: refuse a stale epoch; on a newer one record it (durably) and
        close the connections of older ones. Blocking (fsync): run it in a thread."""
        if epoch == 0:
            return
        with self.lock:
            if epoch < self.highest:
                raise Fenced(f"epoch {epoch} is fenced: epoch {self.highest} has connected")
            if epoch == self.highest:
                return
            atomic_write(self.path, f"{epoch}\n".encode())
            self.highest = epoch
            stale = [c for c, e in self.connections.items() if 0 < e < epoch]
        for conn in stale:
            try:
                conn.shutdown(socket.SHUT_RDWR)   # its data loop sees EOF and ends
            except OSError:
                pass   # closing already

    def register(self, conn: socket.socket, epoch: int) -> None:
        with self.lock:
            self.connections[conn] = epoch
        if 0 < epoch < self.highest:   # fenced between its handshake and now
            conn.shutdown(socket.SHUT_RDWR)

    def unregister(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections.pop(conn, None)
