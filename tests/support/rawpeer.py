"""A hand-driven replica peer for hostile tests and fuzzing: it speaks the handshake and the
frame format of blockhorn/replica/proto.py byte by byte, so a test can send what the engine's
client never would (a name the engine would not send, a malformed or oversized request, a
request of an unknown op) and see the raw reply. Blocking sockets with timeouts throughout."""

from __future__ import annotations

import os
import socket

from blockhorn.config import parse_address
from blockhorn.replica import proto
from blockhorn.sockio import recv_exact

TIMEOUT_S = 10.0


def dial(address: str, timeout: float = TIMEOUT_S) -> socket.socket:
    kind, where = parse_address(address)
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = where
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (kind, where)
    s.settimeout(timeout)
    s.connect(target)   # type: ignore[arg-type]
    return s


class RawPeer:
    """An authenticated connection whose frames the test writes itself."""

    def __init__(self, address: str, key: bytes, name: bytes | str = b"vol") -> None:
        self.sock = dial(address)
        raw = name.encode() if isinstance(name, str) else name
        server_nonce = proto.unpack_hello(recv_exact(self.sock, proto.HELLO.size))
        client_nonce = os.urandom(proto.NONCE_SIZE)
        self.sock.sendall(len(raw).to_bytes(2, "little") + raw + client_nonce
                          + proto.mac(key, b"client", server_nonce, client_nonce, raw))
        welcome = recv_exact(self.sock, proto.WELCOME_SIZE)
        self.status = welcome[0]

    def send(self, op: int, seq: int = 1, offset: int = 0, length: int = 0,
             payload: bytes = b"", flags: int = 0) -> None:
        self.send_raw(proto.pack(op, seq, offset, length, len(payload), flags) + payload)

    def send_raw(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def reply(self) -> tuple[proto.Header, bytes]:
        """The next reply (header, payload); raises OSError/ProtocolError if the server
        closed the connection instead."""
        h = proto.unpack(recv_exact(self.sock, proto.HEADER_SIZE))
        return h, recv_exact(self.sock, h.payload)

    def call(self, op: int, seq: int = 1, offset: int = 0, length: int = 0,
             payload: bytes = b"", flags: int = 0) -> tuple[proto.Header, bytes]:
        self.send(op, seq, offset, length, payload, flags)
        return self.reply()

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF or reset), waiting up to the timeout."""
        try:
            return self.sock.recv(1 << 16) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
