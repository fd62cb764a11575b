"""The engine's control socket: JSON lines over a unix socket, for the daemon and the CLI.

Requests: {"op": "status"}, {"op": "rebuild", "replica": NAME}, {"op": "replace_replica",
"replica": NAME, "address": ADDRESS, "path": DIR} (the daemon's replacement of a failed
replica: Engine.replace_replica), {"op": "migrate_replica", "replica": NAME, "address":
ADDRESS, "path": DIR} (a drain's move of an in-sync replica: engine/migrate.py; its progress
is the replica's `migration` in `status`), {"op": "snapshot", "name": N,
"labels": {...}}, {"op": "snapshot_rm", "name": N}, {"op": "snapshots"}, {"op": "purge",
"wait": bool}, {"op": "expand", "size": BYTES}, {"op": "revert", "name": N} (the daemon's
maintenance attach only, no frontend: engine/revert.py), {"op": "verify", "repair": bool,
"rate_mib_s": MiB/s, "wait": seconds} (starts a scrub: engine/verify.py), {"op":
"verify_status"}, {"op": "handover"} (nbd/plugin.py: the engine drains and closes for a live
upgrade behind the TLS proxy). Reply: a JSON object; errors are {"error": message, "errno": n}.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from blockhorn.config import ReplicaRef
from blockhorn.engine import revert
from blockhorn.engine.engine import Engine
from blockhorn.engine.verify import Verifier
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.engine")
MAX_LINE = 1 << 20   # bytes


class ControlServer:
    def __init__(self, engine: Engine, path: str,
                 extra_ops: dict[str, Callable[[], dict[str, Any]]] | None = None) -> None:
        self.engine = engine
        self.path = path
        self.extra_ops = extra_ops or {}   # ops of the process hosting the engine (handover)
        self.sock: socket.socket | None = None
        self.verifier = Verifier(engine)

    def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self.sock = sock
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if os.path.exists(self.path):
                os.unlink(self.path)

    def _accept(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # socket closed by stop()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                if len(line) > MAX_LINE:
                    return
                f.write(json.dumps(self.handle(line)).encode() + b"\n")
                f.flush()

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "status":
                return self.engine.status()
            if op == "rebuild":
                self.engine.rebuild(str(req["replica"]))
                return self.engine.status()
            if op == "replace_replica":
                self.engine.replace_replica(ReplicaRef(str(req["replica"]), str(req["address"]),
                                                       str(req["path"])))
                return self.engine.status()
            if op == "migrate_replica":
                self.engine.migrate_replica(ReplicaRef(str(req["replica"]), str(req["address"]),
                                                       str(req["path"])))
                return self.engine.status()
            if op == "snapshot":
                return self.engine.snapshot(str(req["name"]), req.get("labels") or None,
                                            bool(req.get("user_created", True)))
            if op == "snapshot_rm":
                self.engine.snapshot_remove(str(req["name"]))
                return self.engine.snapshots()
            if op == "snapshots":
                return self.engine.snapshots()
            if op == "purge":
                return self.engine.purge(wait=bool(req.get("wait", True)))
            if op == "expand":
                return self.engine.expand(int(req["size"]))
            if op == "revert":
                return revert.revert(self.engine, str(req["name"]))
            if op == "verify":
                return self.verifier.start(bool(req.get("repair")),
                                           float(req.get("rate_mib_s") or 0),
                                           float(req.get("wait") or 0))
            if op == "verify_status":
                return self.verifier.status()
            if op in self.extra_ops:
                return self.extra_ops[op]()
            raise BlockhornError(f"unknown control op {op!r}", errno.EINVAL)
        except BlockhornError as e:
            return {"error": str(e), "errno": e.errno}
        except (ValueError, KeyError, AttributeError) as e:
            return {"error": f"bad request: {e}", "errno": errno.EINVAL}


class ControlClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(json.dumps(req).encode() + b"\n")
                with sock.makefile("rb") as f:
                    line = f.readline(MAX_LINE)
        except OSError as e:
            raise BlockhornError(f"engine control socket {self.path}: {e.strerror or e}",
                                 e.errno or errno.EIO) from None
        if not line:
            raise BlockhornError(f"engine at {self.path} closed the control connection")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BlockhornError(reply["error"], int(reply.get("errno", errno.EIO)))
        return reply
