"""Blocking socket helpers shared by the engine's client and the replica server."""

from __future__ import annotations

import errno
import socket
from typing import Any

from blockhorn.types import ProtocolError

BUFFERS_PER_SEND = 512       # sendmsg takes at most IOV_MAX (1024) buffers


def as_views(buffers: list[Any]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in buffers if len(b)]


def advance(views: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes (already sent) from `views`, in place."""
    while n:
        if n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


def sendmsg_all(sock: socket.socket, buffers: list[Any], skip: int = 0) -> None:
    """Send every byte of `buffers` but the first `skip` (already sent)."""
    views = as_views(buffers)
    advance(views, skip)
    while views:
        advance(views, sock.sendmsg(views[:BUFFERS_PER_SEND]))


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ProtocolError("peer closed the connection mid-message", errno.ECONNRESET)
        view = view[n:]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)
