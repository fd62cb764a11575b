"""Tier 3: `replace_replica` in a real engine (nbdkit) against real replica processes.

The daemon's replacement of a failed replica, without the daemon: a new replica (another
directory and address, created Rebuilding as `replica create` makes it) takes the failed one's
name; the engine drops the old connection, resyncs the new one under writes, and the volume
reads back what was acknowledged. Only a failed replica may be replaced."""

from __future__ import annotations

import errno
import os
import random
import time

import nbd
import pytest
from conftest import assert_replicas_identical
from harness import ReplicaProc, free_port

from blockhorn.config import ReplicaConfig
from blockhorn.fsutil import read_json
from blockhorn.replica.store import Replica
from blockhorn.types import BlockhornError

MiB = 1 << 20


def replace(c, name: str, address: str, path: str, timeout: float = 20.0) -> dict:
    """The control op; EBUSY (the replica is not ERR yet) is retried, as the daemon retries
    it on its next pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.control().call({"op": "replace_replica", "replica": name,
                                     "address": address, "path": path})
        except BlockhornError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def written(cluster_factory, seed: int, offset: int, length: int):
    """A started 16 MiB volume of two replicas, `length` random bytes written at `offset` and
    flushed: the cluster, its NBD handle, the random source and the model of its contents."""
    c = cluster_factory(size=16 * MiB, replicas=2)
    h = nbd.NBD()
    h.connect_uri(c.uri)
    rng = random.Random(seed)
    model = bytearray(c.size)
    data = rng.randbytes(length)
    h.pwrite(data, offset)
    model[offset:offset + length] = data
    h.flush()
    return c, h, rng, model


def start_spare(c, old: ReplicaProc, tmp_path) -> tuple[ReplicaConfig, str]:
    """A new replica for `old`'s name in another directory and on another port, created
    Rebuilding as `replica create` makes it, started (in place of `old` in the cluster, which
    stops it at the end); returns its config and directory."""
    new_dir = str(tmp_path / "spare" / old.cfg.name)
    os.makedirs(os.path.dirname(new_dir))
    cfg = ReplicaConfig(c.volume, old.cfg.name, new_dir, c.size, f"127.0.0.1:{free_port()}",
                        c.key_file)
    cfg_path = str(tmp_path / f"{old.cfg.name}-new.json")
    cfg.save(cfg_path)
    Replica.create(new_dir, c.size, c.volume, {"Rebuilding": True}).close()
    new = ReplicaProc(cfg, cfg_path, str(tmp_path / f"{old.cfg.name}-new.log"))
    c.reps[c.reps.index(old)] = new
    new.start()
    return cfg, new_dir


def test_replace_replica_resyncs_a_new_directory(cluster_factory, tmp_path) -> None:
    c, h, rng, model = written(cluster_factory, 3, MiB, 8 * MiB)

    old = c.reps[1]
    with pytest.raises(BlockhornError) as e:     # an RW replica is not replaced
        c.control().call({"op": "replace_replica", "replica": old.cfg.name,
                          "address": old.cfg.listen, "path": old.cfg.directory})
    assert e.value.errno == errno.EBUSY and "only a failed replica" in str(e.value)
    with pytest.raises(BlockhornError) as e:
        c.control().call({"op": "replace_replica", "replica": "nope", "address": "x",
                          "path": "/x"})
    assert e.value.errno == errno.EINVAL

    old.kill()                                   # its disk died
    c.wait_modes({"vol-r0": "RW", "vol-r1": "ERR"})
    more = rng.randbytes(2 * MiB)                # degraded writes the new one must receive
    h.pwrite(more, 10 * MiB)
    model[10 * MiB:12 * MiB] = more

    cfg, new_dir = start_spare(c, old, tmp_path)
    st = replace(c, cfg.name, cfg.listen, new_dir)
    r1 = next(r for r in st["replicas"] if r["name"] == cfg.name)
    assert (r1["path"], r1["address"]) == (new_dir, cfg.listen)

    # Writes go on while it resyncs; then both are RW and the new one is no longer Rebuilding.
    for _ in range(32):
        chunk = rng.randbytes(64 * 1024)
        off = rng.randrange(0, c.size - len(chunk), 4096)
        h.pwrite(chunk, off)
        model[off:off + len(chunk)] = chunk
    c.wait_modes({"vol-r0": "RW", "vol-r1": "RW"})
    h.flush()
    assert h.pread(c.size, 0) == bytes(model)
    h.shutdown()
    c.stop_engine()
    meta = read_json(os.path.join(new_dir, "volume.meta"))   # the server still has it open
    assert not meta["Rebuilding"] and "vol-r1" in meta["Members"]
    assert_replicas_identical(c)


def test_replacement_told_during_a_resync_attempt_is_taken_when_it_ends(
        cluster_factory, tmp_path) -> None:
    """The engine retries an ERR replica by itself (every REBUILD_RETRY_S); an attempt at an
    unreachable one lasts up to its timeouts. A replacement told meanwhile is not refused (the
    daemon's retries could keep missing the gaps between attempts: a node's replica that
    moved stayed unsynced for minutes) but waits for the attempt to end and is taken then."""
    import socket
    c, h, rng, model = written(cluster_factory, 5, 0, 4 * MiB)

    old = c.reps[1]
    old.kill()
    c.wait_modes({"vol-r0": "RW", "vol-r1": "ERR"})
    # Its address now answers TCP but never the protocol: a resync attempt hangs in the claim
    # for its timeout (10 s) — what a peer that is not there any more can cost.
    host, port = old.cfg.listen.rsplit(":", 1)
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind((host, int(port)))
    hole.listen(8)
    try:
        c.control().call({"op": "rebuild", "replica": "vol-r1"})

        def attempt() -> dict:
            st = c.control().call({"op": "status"})
            return next(r for r in st["replicas"] if r["name"] == "vol-r1")
        deadline = time.monotonic() + 10
        while (attempt()["rebuild"] or {}).get("state") not in ("queued", "running"):
            assert time.monotonic() < deadline, attempt()
            time.sleep(0.05)

        cfg, new_dir = start_spare(c, old, tmp_path)
        # Told once, while the attempt runs: accepted (no EBUSY), waiting for the attempt.
        st = c.control().call({"op": "replace_replica", "replica": cfg.name,
                               "address": cfg.listen, "path": new_dir})
        r1 = next(r for r in st["replicas"] if r["name"] == cfg.name)
        assert r1["replacement"] == new_dir and r1["path"] == old.cfg.directory, r1
        more = rng.randbytes(1 * MiB)            # written while the old one is still named
        h.pwrite(more, 8 * MiB)
        model[8 * MiB:9 * MiB] = more
        c.wait_modes({"vol-r0": "RW", "vol-r1": "RW"}, timeout=60)
    finally:
        hole.close()
    r1 = attempt()
    assert (r1["path"], r1["address"], r1["replacement"]) == (new_dir, cfg.listen, None)
    h.flush()
    assert h.pread(c.size, 0) == bytes(model)
    h.shutdown()
    c.stop_engine()
    assert_replicas_identical(c)
