"""A replica that holds the cluster key but answers wrongly, for tests of the engine's client:
it completes the server side of the handshake (no frame MACs) on one connection, reads one
request and answers it with the reply a test gives (header fields and payload of its choice).
A thread in the test process; `close()` ends it."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from blockhorn.replica import proto
from blockhorn.sockio import recv_exact


class EvilReplica:
    def __init__(self, path: str, key: bytes, reply: bytes) -> None:
        self.key, self.reply = key, reply
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.address = f"unix:{path}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                server_nonce = os.urandom(proto.NONCE_SIZE)
                conn.sendall(proto.pack_hello(server_nonce))
                name_len, features = proto.AUTH_PREFIX.unpack(recv_exact(conn, 4))
                body = recv_exact(conn, proto.auth_size(name_len))
                client_nonce, name, _ = proto.verify_auth_epoch(
                    self.key, "vol", server_nonce, body, 0, features)
                conn.sendall(proto.pack_welcome(self.key, name, server_nonce, client_nonce))
                h = proto.unpack(recv_exact(conn, proto.HEADER_SIZE))
                recv_exact(conn, h.payload)
                conn.sendall(self.reply)
                conn.recv(1)        # until the client hangs up

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
