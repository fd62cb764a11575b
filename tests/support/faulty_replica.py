"""A replica server with fault hooks, for tests only (never shipped in the production protocol).

`python tests/support/faulty_replica.py CONFIG` runs `FaultyReplicaServer` through the same
start-up path as `python -m blockhorn.replica CONFIG`. One extra CONTROL op, `fault`, sets the
hooks (a later `fault` replaces them; `{"op": "fault"}` heals):

- `delay_s`: sleep that long before executing each request (under the store lock, as a slow
  disk would), so requests queue up on the connection;
- `fail_control`: CONTROL op names answered EIO, to exercise the engine's error paths;
- `old_control`: CONTROL op names answered as a replica of an older release that does not
  know them (EINVAL "unknown control op"), nothing changed;
- `hold_write_at`: the first WRITE at that offset is received and then held: the server
  SIGSTOPs itself before executing it (outside the store lock), and once continued the
  connection's thread waits until a `release` op (any connection) before it executes it, as
  a thread not scheduled for that long would (tests/t3_engine_stale_connection.py). `held`
  reports `{"state": "stopped" | "held" | "done", "status": errno of its reply}`.

Crash points (tests/t3_engine_rebuild_crash.py): with `FAULTY_STOP_AT=NAME` in its
environment the server SIGSTOPs itself once, just before it executes the first request named
NAME (a CONTROL op name, or a data op: WRITE, WRITE_LAYER, FLUSH...). The test sees it stopped
and kills it or the engine there: a crash at exactly that step of a protocol.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from blockhorn.replica import proto  # noqa: E402
from blockhorn.replica.server import ReplicaServer, main  # noqa: E402
from blockhorn.types import BlockhornError  # noqa: E402

# What tests/harness.py runs instead of `-m blockhorn.replica` for a faulty replica.
PROGRAM = (os.path.abspath(__file__),)


HOLD_MAX_S = 120.0      # a held write is executed after this long even without `release`


class FaultyReplicaServer(ReplicaServer):
    fault: dict[str, Any] = {}
    stop_at = os.environ.get("FAULTY_STOP_AT", "")
    held: dict[str, Any] = {}
    released = threading.Event()

    def execute(self, h: proto.Header, payload: memoryview, *rest: Any) -> list[Any]:
        at = self.fault.get("hold_write_at")
        if at is None or h.op != proto.Op.WRITE or h.offset != at:
            return super().execute(h, payload, *rest)
        self.fault = {k: v for k, v in self.fault.items() if k != "hold_write_at"}
        self.held = {"state": "stopped"}
        os.kill(os.getpid(), signal.SIGSTOP)   # received, not executed: the process pauses
        self.held["state"] = "held"
        self.released.wait(HOLD_MAX_S)
        try:
            reply = super().execute(h, payload, *rest)
        except BlockhornError as e:           # refused (fenced): the connection ends
            self.held = {"state": "done", "status": e.errno}
            raise
        self.held = {"state": "done", "status": proto.unpack(reply[0], 0).status}
        return reply

    def _stop_point(self, name: str) -> None:
        if name == self.stop_at:
            FaultyReplicaServer.stop_at = ""        # once
            os.kill(os.getpid(), signal.SIGSTOP)

    def _execute(self, h: proto.Header, payload: memoryview) -> list[Any]:
        with contextlib.suppress(ValueError):
            self._stop_point(proto.Op(h.op).name)
        delay = self.fault.get("delay_s")
        if delay:
            time.sleep(float(delay))
        return super()._execute(h, payload)

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "fault":
            self.fault = {k: v for k, v in req.items() if k != "op"}
            return {"fault": self.fault}
        if op == "release":
            self.released.set()
            return {"held": self.held}
        if op == "held":
            return {"held": self.held}
        self._stop_point(op)
        if op in self.fault.get("fail_control", ()):
            raise BlockhornError(f"injected failure of {op}", errno.EIO)
        if op in self.fault.get("old_control", ()):
            raise BlockhornError(f"unknown control op {op!r}", errno.EINVAL)
        return super().control(req)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: faulty_replica.py CONFIG.json")
    sys.exit(main(sys.argv[1], FaultyReplicaServer))
