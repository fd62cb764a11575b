"""Tier 3: snapshots coordinated by the engine across real replica processes, through a real
NBD client: snapshots under writes, remove + purge under writes, a layer-aware rebuild,
online expansion, and an offline revert checked on every replica."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time

import nbd

from blockhorn.replica import snapshots as store_snaps
from blockhorn.replica.store import Replica

MiB = 1 << 20


def connect(c) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    return h


def image(h: nbd.NBD, size: int) -> bytes:
    return b"".join(h.pread(MiB, off) for off in range(0, size, MiB))


def call(c, **req) -> dict:
    return c.control().call(req)


def chain_digests(directory: str) -> list[tuple[str, str]]:
    """(layer name, sha256 of its content) from the head down; heads compared by content."""
    meta = json.load(open(os.path.join(directory, "volume.meta")))
    out = []
    name = meta["Head"]
    while name:
        with open(os.path.join(directory, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out.append(("<head>" if name.startswith("volume-head-") else name, digest))
        name = json.load(open(os.path.join(directory, name + ".meta"))).get("Parent", "")
    return out


def assert_chains_identical(c) -> None:
    """The invariant after every snapshot test: same chain, byte-identical layers."""
    chains = {r.cfg.name: chain_digests(r.cfg.directory) for r in c.reps}
    assert len({json.dumps(v) for v in chains.values()}) == 1, chains


class Writer(threading.Thread):
    def __init__(self, c, span: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.h, self.span, self.rng = connect(c), span, random.Random(seed)
        self.acked: dict[int, bytes] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            off = self.rng.randrange(self.span // 4096) * 4096
            data = self.rng.randbytes(4096)
            self.h.pwrite(data, off)
            self.acked[off] = data

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.h.shutdown()


def test_snapshots_purge_rebuild_expand_revert(cluster_factory) -> None:
    c = cluster_factory(size=16 * MiB)
    size = 16 * MiB
    h = connect(c)
    rng = random.Random(5)
    images = {}
    for i in range(3):
        for _ in range(30):
            h.pwrite(rng.randbytes(rng.choice([512, 4096, 65536])), rng.randrange(size - 65536))
        h.flush()
        images[f"s{i}"] = image(h, size)
        call(c, op="snapshot", name=f"s{i}", labels={"n": str(i)})
    listed = call(c, op="snapshots")["snapshots"]
    assert [s["name"] for s in listed] == ["s0", "s1", "s2"]
    assert [s["parent"] for s in listed] == ["", "s0", "s1"]
    assert listed[1]["labels"] == {"n": "1"} and listed[0]["user_created"]

    # Remove a middle snapshot while a writer runs: it folds away, nothing read changes.
    w = Writer(c, size, seed=9)
    w.start()
    time.sleep(0.3)
    call(c, op="snapshot_rm", name="s1")
    call(c, op="purge", wait=True)
    w.stop()
    names = [s["name"] for s in call(c, op="snapshots")["snapshots"]]
    assert names == ["s0", "s2"]
    for off, data in w.acked.items():
        assert h.pread(4096, off) == data
    h.flush()
    assert_chains_identical(c)

    # A replica dies and comes back: the rebuild recreates its chain layer by layer.
    c.reps[2].kill()
    w = Writer(c, size, seed=11)
    w.start()
    c.reps[2].start()
    call(c, op="rebuild", replica="vol-r2")
    c.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}, timeout=60)
    w.stop()
    for off, data in w.acked.items():
        assert h.pread(4096, off) == data
    h.flush()
    assert_chains_identical(c)

    # Online expansion while a writer runs; a new connection sees the new size.
    w = Writer(c, size, seed=13)
    w.start()
    assert call(c, op="expand", size=2 * size)["size"] == 2 * size
    w.stop()
    h.shutdown()
    h = connect(c)
    assert h.get_size() == 2 * size
    h.pwrite(b"E" * 4096, 2 * size - 4096)
    assert h.pread(4096, 2 * size - 4096) == b"E" * 4096
    h.flush()
    h.shutdown()
    assert_chains_identical(c)

    # Offline revert on every replica (volume detached): each reads as s2 did.
    c.stop()
    for r in c.reps:
        rep = Replica.open(r.cfg.directory)
        store_snaps.revert(rep, "s2")
        assert bytes(rep.read(0, size)) == images["s2"]
        store_snaps.revert(rep, "s0")
        assert bytes(rep.read(0, size)) == images["s0"]
        rep.close()


def test_replica_failing_a_snapshot_goes_err_and_is_rebuilt_with_it(cluster_factory) -> None:
    from support.faulty_replica import PROGRAM

    from blockhorn.config import ReplicaRef
    from blockhorn.engine.client import ReplicaClient
    from blockhorn.keys import load_key

    c = cluster_factory(size=8 * MiB, replica_program=PROGRAM)
    h = connect(c)
    h.pwrite(b"a" * MiB, 0)
    rep = c.reps[1].cfg
    side = ReplicaClient(ReplicaRef(rep.name, rep.listen), load_key(rep.key_file), "vol")
    side.connect()
    side.control({"op": "fault", "fail_control": ["snapshot"]})
    call(c, op="snapshot", name="s")
    assert c.modes() == {"vol-r0": "RW", "vol-r1": "ERR", "vol-r2": "RW"}
    h.pwrite(b"b" * MiB, 0)                       # I/O goes on with the others
    side.control({"op": "fault"})                 # healed
    side.close()
    call(c, op="rebuild", replica="vol-r1")
    c.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"})
    assert [s["name"] for s in call(c, op="snapshots")["snapshots"]] == ["s"]
    assert h.pread(MiB, 0) == b"b" * MiB
    h.flush()
    h.shutdown()
    assert_chains_identical(c)
