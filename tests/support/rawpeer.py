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

    def __init__(self, address: str, key: bytes, name: bytes | str = b"vol",
                 features: int | None = None) -> None:
        """`features` None: what the server requires (HELLO), like the engine on a unix
        socket; frame MACs are used (and checked) when the session turns them on."""
        self.sock = dial(address)
        raw = name.encode() if isinstance(name, str) else name
        server_nonce, required = proto.unpack_hello(recv_exact(self.sock, proto.HELLO.size))
        self.features = required if features is None else features
        client_nonce = os.urandom(proto.NONCE_SIZE)
        self.sock.sendall(proto.AUTH_PREFIX.pack(len(raw), self.features) + raw + client_nonce
                          + proto.mac(key, b"client", server_nonce, client_nonce, raw,
                                      proto.AUTH_PREFIX.pack(required, self.features)))
        welcome = recv_exact(self.sock, proto.WELCOME_SIZE)
        self.status = welcome[0]
        self.tx = self.rx = None
        if self.status == 0 and self.features & proto.FEATURE_FRAME_MAC:
            c2s, s2c = proto.session_keys(key, server_nonce, client_nonce, raw)
            self.tx, self.rx = proto.FrameMac(c2s), proto.FrameMac(s2c)

    def send(self, op: int, seq: int = 1, offset: int = 0, length: int = 0,
             payload: bytes = b"", flags: int = 0) -> None:
        self.send_raw(proto.pack(op, seq, offset, length, len(payload), flags) + payload)

    def send_raw(self, frame: bytes, tagged: bool = True) -> None:
        """Send `frame` (header + payload) as is, plus its tag when the session has MACs
        (`tagged` False: without one, as an attacker without the session key would)."""
        if self.tx is not None and tagged:
            frame += self.tx.tag([frame])
        self.sock.sendall(frame)

    def reply(self) -> tuple[proto.Header, bytes]:
        """The next reply (header, payload), its tag checked; raises OSError/ProtocolError
        if the server closed the connection instead."""
        head = recv_exact(self.sock, proto.HEADER_SIZE)
        h = proto.unpack(head)
        payload = recv_exact(self.sock, h.payload)
        if self.rx is not None:
            m = self.rx.begin(h.payload)
            m.update(head + payload)
            self.rx.check(m, recv_exact(self.sock, proto.TAG_SIZE))
        return h, payload

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
