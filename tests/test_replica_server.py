"""Tier 2: one real replica server process, driven over a socket by the engine's client."""

from __future__ import annotations

import errno
import os
import secrets

import pytest
from harness import ReplicaProc, free_port

from blockhorn.config import ReplicaConfig, ReplicaRef
from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.keys import ensure_key, load_key
from blockhorn.replica.proto import Op
from blockhorn.types import AuthError

MiB = 1 << 20


@pytest.fixture(params=["tcp", "unix"])
def replica(tmp_path, request):
    key = ensure_key(str(tmp_path / "cluster.key"))
    listen = (f"unix:{tmp_path}/r.sock" if request.param == "unix"
              else f"127.0.0.1:{free_port()}")
    cfg = ReplicaConfig("vol", "vol-r0", str(tmp_path / "r0"), 8 * MiB, listen, key)
    cfg.save(str(tmp_path / "r0.json"))
    p = ReplicaProc(cfg, str(tmp_path / "r0.json"), str(tmp_path / "r0.log"))
    p.start()
    yield p
    p.stop()


def connect(p: ReplicaProc, volume: str = "vol", key: bytes | None = None) -> ReplicaClient:
    c = ReplicaClient(ReplicaRef(p.cfg.name, p.cfg.listen), key or load_key(p.cfg.key_file),
                      volume)
    c.connect()
    return c


def test_pipelined_writes_and_reads(replica) -> None:
    c = connect(replica)
    blocks = {i: secrets.token_bytes(4096) for i in range(256)}
    writes = []
    for i, data in blocks.items():      # 256 requests in flight on one connection
        call = Call(1)
        c.submit(call, Op.WRITE, i * 4096, 4096, data)
        writes.append(call)
    for call in writes:
        assert call.wait(10) and call.results[c.name] == 0
    bufs = {i: bytearray(4096) for i in blocks}
    calls = []
    for i, buf in bufs.items():
        call = Call(1, dest=memoryview(buf))
        c.submit(call, Op.READ, i * 4096, 4096)
        calls.append(call)
    for call in calls:
        assert call.wait(10) and call.results[c.name] == 0
    assert all(bytes(bufs[i]) == blocks[i] for i in blocks)
    c.request(Op.FLUSH)
    assert c.stat()["revision"] == 256
    c.close()


def test_big_request_past_the_receive_buffer(replica) -> None:
    c = connect(replica)
    data = secrets.token_bytes(6 * MiB)
    c.request(Op.WRITE, 0, len(data), data)
    buf = bytearray(len(data))
    call = Call(1, dest=memoryview(buf))
    c.submit(call, Op.READ, 0, len(data))
    assert call.wait(10) and call.results[c.name] == 0
    assert buf == data
    c.close()


def test_trim_zero_extents_and_errors(replica) -> None:
    c = connect(replica)
    c.request(Op.WRITE, 0, 3 * MiB, b"\x01" * (3 * MiB))
    c.request(Op.TRIM, MiB, MiB)
    assert c.control({"op": "extents", "offset": 0, "length": 8 * MiB})["extents"] == [
        [0, MiB], [2 * MiB, MiB]]
    c.request(Op.ZERO, 0, 4096)
    with pytest.raises(Exception) as e:
        c.request(Op.WRITE, 8 * MiB - 1, 2, b"xx")
    assert getattr(e.value, "errno", None) == errno.ENOSPC
    c.request(Op.PING)
    c.close()


def test_wrong_key_or_volume_is_refused_and_reads_nothing(replica) -> None:
    with pytest.raises(AuthError):
        connect(replica, key=os.urandom(32))
    with pytest.raises(AuthError):
        connect(replica, volume="other")
    # The server is still fine for the rightful engine.
    c = connect(replica)
    assert c.stat()["volume"] == "vol"
    c.close()


def test_clean_stop_clears_dirty(replica) -> None:
    c = connect(replica)
    c.request(Op.WRITE, 0, 4, b"abcd")
    assert c.stat()["dirty"] is True
    c.close()
    replica.stop()
    replica.start()
    c = connect(replica)
    s = c.stat()
    assert not s["opened_dirty"] and s["revision"] == 1
    c.close()
