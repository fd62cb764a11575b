"""Tier 3: the engine inside real nbdkit against real replica processes, through libnbd."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import threading
import time

import nbd
import pytest
from conftest import assert_replicas_identical

MiB = 1 << 20


def connect(c) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    return h


class Writer(threading.Thread):
    """Writes random 4 KiB-aligned blocks and remembers the checksum of each acknowledged one."""

    def __init__(self, c, size: int, seed: int, block: int = 4096) -> None:
        super().__init__(daemon=True)
        self.h = connect(c)
        self.size, self.block = size, block
        self.rng = random.Random(seed)
        self.acked: dict[int, str] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.count = 0

    def run(self) -> None:
        while not self.stop.is_set():
            off = self.rng.randrange(self.size // self.block) * self.block
            data = self.rng.randbytes(self.block)
            try:
                self.h.pwrite(data, off)
            except nbd.Error as e:
                self.errors.append(str(e))
                continue
            self.acked[off] = hashlib.sha256(data).hexdigest()
            self.count += 1

    def verify(self, h: nbd.NBD) -> None:
        for off, digest in self.acked.items():
            assert hashlib.sha256(h.pread(self.block, off)).hexdigest() == digest, off


def test_write_read_flush_all_replicas_identical(cluster) -> None:
    h = connect(cluster)
    assert h.get_size() == 64 * MiB
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
    data = os.urandom(MiB)
    h.pwrite(data, 3 * MiB, nbd.CMD_FLAG_FUA)
    h.pwrite(b"tail", 64 * MiB - 4)
    assert h.pread(MiB, 3 * MiB) == data
    h.trim(MiB, 3 * MiB)
    assert h.pread(MiB, 3 * MiB) == bytes(MiB)
    h.zero(4096, 0)
    h.flush()
    assert_replicas_identical(cluster)
    h.shutdown()


def test_write_past_end_is_enospc(cluster) -> None:
    h = connect(cluster)
    h.set_strict_mode(0)  # let the request reach the server
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 8192, 64 * MiB - 4096)
    assert e.value.errnum == errno.ENOSPC
    h.shutdown()


def test_concurrent_unaligned_overlapping_writes_keep_replicas_identical(cluster) -> None:
    """Sub-4 KiB writes from many connections over the same blocks: every replica applies
    them in the same order, so they end byte-identical, and each read sees one writer's bytes."""
    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        h = connect(cluster)
        for _ in range(400):
            off = rng.randrange(0, 64 * 1024)
            h.pwrite(bytes([seed]) * rng.randrange(1, 3000), off)
        h.shutdown()

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = connect(cluster)
    h.flush()
    h.shutdown()
    assert_replicas_identical(cluster)


def test_ha_single_replica_failure_mid_write(cluster) -> None:
    w = Writer(cluster, 16 * MiB, seed=1)
    w.start()
    time.sleep(1.0)
    cluster.reps[1].kill()
    time.sleep(1.0)
    w.stop.set()
    w.join()
    assert not w.errors, w.errors[:3]
    assert cluster.modes() == {"vol-r0": "RW", "vol-r1": "ERR", "vol-r2": "RW"}
    assert cluster.status()["robustness"] == "degraded"
    h = connect(cluster)
    w.verify(h)
    h.flush()
    assert_replicas_identical(cluster, ["vol-r0", "vol-r2"])

    # The replica comes back (as the daemon would restart it) and is rebuilt under I/O.
    cluster.reps[1].start()
    w2 = Writer(cluster, 16 * MiB, seed=2)
    w2.start()
    cluster.control().call({"op": "rebuild", "replica": "vol-r1"})
    cluster.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"})
    w2.stop.set()
    w2.join()
    assert not w2.errors
    h.flush()
    assert_replicas_identical(cluster)
    w.acked.update(w2.acked)
    w.verify(h)
    h.shutdown()


def test_unresponsive_replica_times_out_and_io_continues(cluster_factory) -> None:
    c = cluster_factory(timeout_s=1.5)
    h = connect(c)
    c.reps[2].kill(signal.SIGSTOP)   # hung, not dead: only the timeout can notice
    try:
        start = time.monotonic()
        h.pwrite(b"z" * 4096, 0)
        assert time.monotonic() - start < 10
        assert c.modes()["vol-r2"] == "ERR"
        assert h.pread(4096, 0) == b"z" * 4096
    finally:
        c.reps[2].proc.send_signal(signal.SIGCONT)
    h.shutdown()


def test_below_min_rw_io_fails_with_eio(cluster_factory) -> None:
    c = cluster_factory(min_rw=2)
    h = connect(c)
    h.pwrite(b"a" * 4096, 0)
    c.reps[0].kill()
    h.pwrite(b"b" * 4096, 0)          # two RW replicas remain: still fine
    c.reps[1].kill()
    time.sleep(0.2)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"c" * 4096, 0)
    assert e.value.errnum == errno.EIO
    assert c.status()["robustness"] == "faulted"
    assert h.pread(4096, 0) == b"b" * 4096   # the survivor still holds the last good write
    h.shutdown()


def test_engine_restart_keeps_data_and_resyncs_a_crashed_replica(cluster) -> None:
    h = connect(cluster)
    data = os.urandom(2 * MiB)
    h.pwrite(data, 0)
    h.flush()
    h.shutdown()
    cluster.reps[0].kill()            # crashed replica: opens dirty on restart
    cluster.stop_engine()
    cluster.reps[0].start()
    cluster.start_engine()
    cluster.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"})
    h = connect(cluster)
    assert h.pread(len(data), 0) == data
    h.flush()
    assert_replicas_identical(cluster)
    h.shutdown()
