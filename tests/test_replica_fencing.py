"""Replica-side fencing (blockhorn/replica/fencing.py) against a real replica server: an
owner's epoch travels in the handshake; a newer one closes the older owner's connections and
locks it out, across a replica restart; epoch 0 (no failover) is never affected. An engine's
`claim` supersedes every connection admitted before it."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from harness import Cluster, ReplicaProc

from blockhorn.config import ReplicaRef
from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.keys import load_key
from blockhorn.replica.fencing import FILE
from blockhorn.replica.proto import Op, handshake_name, split_name
from blockhorn.types import AuthError, BlockhornError, ProtocolError


@pytest.fixture
def replica(tmp_path: object) -> Iterator[ReplicaProc]:
    c = Cluster(str(tmp_path), replicas=1)
    rep = c.reps[0]
    rep.start()
    try:
        yield rep
    finally:
        rep.stop()


def client(rep: ReplicaProc, epoch: int) -> ReplicaClient:
    c = ReplicaClient(ReplicaRef(rep.cfg.name, rep.cfg.listen), load_key(rep.cfg.key_file),
                      handshake_name("vol", epoch))
    c.connect()
    return c


def test_handshake_names() -> None:
    assert handshake_name("vol", 0) == "vol" and handshake_name("vol", 42) == "vol@42"
    assert split_name("vol@42") == ("vol", 42) and split_name("vol") == ("vol", 0)
    for bad in ("vol@", "vol@0", "vol@x"):
        with pytest.raises(ProtocolError):
            split_name(bad)


def test_newer_epoch_fences_the_older_owner(replica: ReplicaProc) -> None:
    old = client(replica, 5)
    plain = client(replica, 0)
    assert old.stat()["revision"] >= 0
    new = client(replica, 7)                 # a new owner connects
    with pytest.raises(BlockhornError):      # the old owner's connection was shut down
        old.stat(timeout=5)
    with pytest.raises(AuthError, match="fenced"):
        client(replica, 5)                   # and it cannot come back
    assert new.stat() and plain.stat()       # the new owner and epoch 0 are unaffected
    client(replica, 7).close()               # the same owner may open more connections
    for c in (new, plain):
        c.close()
    with open(os.path.join(replica.cfg.directory, FILE)) as f:
        assert f.read().strip() == "7"

    replica.stop()                           # durable across a restart
    replica.start()
    with pytest.raises(AuthError, match="fenced"):
        client(replica, 6)
    client(replica, 8).close()


def test_a_claim_supersedes_older_connections_of_any_epoch(replica: ReplicaProc) -> None:
    """The engine's `claim` on a new connection: connections admitted before it are refused
    (ESTALE) and shut down, whatever their epoch; those admitted after it are not; a resync's
    `set_rebuilding` claims the same way."""
    old, older_epoch = client(replica, 0), client(replica, 3)
    new = client(replica, 3)
    assert new.claim()["size"] == replica.cfg.size       # the reply is its STAT
    for c in (old, older_epoch):
        call = Call(1)
        c.submit(call, Op.WRITE, 0, 4096, b"x" * 4096)
        assert call.wait(5)
        assert call.results[c.name] in (errno.ESTALE, errno.EIO)   # refused or shut down
    later = client(replica, 0)                 # admitted after the claim: served
    assert later.stat() and new.stat()
    new.request(Op.WRITE, 0, 4096, b"n" * 4096)
    later.control({"op": "set_rebuilding", "value": True})   # claims too
    with pytest.raises(BlockhornError):
        new.stat(timeout=5)
    later.control({"op": "set_rebuilding", "value": False})
    for c in (old, older_epoch, new, later):
        c.close()
