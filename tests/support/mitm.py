"""An on-path attacker for tests: a TCP proxy between engine and replica that forwards both
directions and lets a test rewrite the byte stream through explicit hooks. A hook gets the
stream offset of a chunk and the chunk, and returns the bytes to forward instead."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

Hook = Callable[[int, bytes], bytes]


def flip_at(position: int) -> Hook:
    """A hook that flips one bit of the byte at stream offset `position`."""
    def hook(offset: int, chunk: bytes) -> bytes:
        if offset <= position < offset + len(chunk):
            i = position - offset
            return chunk[:i] + bytes([chunk[i] ^ 0x01]) + chunk[i + 1:]
        return chunk
    return hook


class FlipNext:
    """A hook that forwards untouched until armed, then flips one bit of the last byte of the
    next chunk (inside a frame's payload or tag, past the header a receiver parses first)."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.fired = threading.Event()

    def __call__(self, offset: int, chunk: bytes) -> bytes:
        if not self.armed.is_set() or self.fired.is_set() or not chunk:
            return chunk
        self.fired.set()
        return chunk[:-1] + bytes([chunk[-1] ^ 0x01])


class Mitm:
    def __init__(self, upstream: tuple[str, int], c2s: Hook | None = None,
                 s2c: Hook | None = None) -> None:
        self.upstream, self.c2s, self.s2c = upstream, c2s, s2c
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
                self.socks += [client, server]
                for src, dst, hook in ((client, server, self.c2s), (server, client, self.s2c)):
                    t = threading.Thread(target=self._pump, args=(src, dst, hook), daemon=True)
                    t.start()
                    self.threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, hook: Hook | None) -> None:
        offset = 0
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                out = hook(offset, chunk) if hook else chunk
                offset += len(chunk)
                dst.sendall(out)
        for s in (src, dst):      # one side ended: end both (as a cut cable would)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept (Linux)
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self.threads:
            t.join(5)
