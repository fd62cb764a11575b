"""Tier 3: the review's crash sequences (issue "data safety under faults"), replayed through real
replica processes and a real nbdkit engine. Each ends by reading back what was acknowledged
(checksums) and checking that the replicas agree."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import nbd
import pytest
from conftest import assert_replicas_identical
from harness import ROOT
from support.recovery import report

from blockhorn.replica.store import Replica

MiB = 1 << 20
HEALTHY = {"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "RW"}


def connect(c) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    return h


def write_blocks(h: nbd.NBD, seed: int, offsets: list[int], size: int = 64 * 1024
                 ) -> dict[int, str]:
    acked = {}
    for i, off in enumerate(offsets):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32)
        h.pwrite(data, off)
        acked[off] = hashlib.sha256(data).hexdigest()
    return acked


def check(h: nbd.NBD, acked: dict[int, str], size: int = 64 * 1024) -> None:
    for off, digest in acked.items():
        assert hashlib.sha256(h.pread(size, off)).hexdigest() == digest, f"block at {off}"


def crash_everything(c) -> None:
    """kill -9 of the engine and of every replica: the host crashed (page cache kept)."""
    c.stop_engine(signal.SIGKILL)
    for r in c.reps:
        r.kill(signal.SIGKILL)


def restart_everything(c) -> None:
    for r in c.reps:
        r.start()
    c.start_engine()


def stat_on_disk(directory: str) -> dict:
    with open(os.path.join(directory, "volume.meta")) as f:
        return json.load(f)


def test_serving_a_directory_without_its_replica_is_refused(cluster) -> None:
    """Sequence 1, first half: a missing disk must not come back as an empty replica."""
    r = cluster.reps[2]
    r.kill(signal.SIGKILL)
    os.rename(r.cfg.directory, r.cfg.directory + ".unmounted")
    os.mkdir(r.cfg.directory)
    p = subprocess.run([sys.executable, "-m", "blockhorn.replica", r.config_path], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "volume.meta" in p.stderr and "replica create" in p.stderr, p.stderr
    assert os.listdir(r.cfg.directory) == [], "nothing may be created in its place"


def test_an_empty_replacement_never_wins_after_a_host_crash(cluster) -> None:
    """Sequence 1: all real replicas dirty after a host crash, and an empty replica made in
    place of one: the engine must take the real ones and rebuild the empty one."""
    h = connect(cluster)
    acked = write_blocks(h, 1, [i * MiB for i in range(0, 48, 3)])
    h.flush()
    h.shutdown()
    crash_everything(cluster)
    r2 = cluster.reps[2]
    os.rename(r2.cfg.directory, r2.cfg.directory + ".lost")
    subprocess.run([sys.executable, "-m", "blockhorn", "replica", "create", "--config",
                    r2.config_path], cwd=ROOT, check=True, capture_output=True, timeout=30)
    assert stat_on_disk(r2.cfg.directory)["Rebuilding"] is True
    restart_everything(cluster)
    cluster.wait_modes(HEALTHY)
    h = connect(cluster)
    check(h, acked)
    h.shutdown()
    assert_replicas_identical(cluster)


@pytest.mark.parametrize("record", [True, False], ids=["record", "replicas-only"])
def test_a_stale_clean_replica_never_beats_fresher_dirty_ones(cluster, record) -> None:
    """Sequence 2: r2 leaves at revision 1 with a clean close; r0/r1 take writes and a FLUSH;
    their processes and the engine crash. The flushed writes must survive."""
    h = connect(cluster)
    first = write_blocks(h, 2, [0])
    cluster.reps[2].stop()                     # orderly close: clean, revision 1
    cluster.wait_modes({"vol-r0": "RW", "vol-r1": "RW", "vol-r2": "ERR"})
    later = write_blocks(h, 3, [MiB, 2 * MiB, 0])
    h.flush()
    h.shutdown()
    crash_everything(cluster)
    assert stat_on_disk(cluster.reps[2].cfg.directory)["Dirty"] is False
    if not record:
        os.unlink(cluster.record)
    restart_everything(cluster)
    cluster.wait_modes(HEALTHY)
    h = connect(cluster)
    check(h, {**first, **later})
    h.shutdown()
    assert_replicas_identical(cluster)


def test_a_failed_write_is_not_counted_and_the_replica_is_resynced(cluster_factory) -> None:
    """Sequence 3: r1's disk refuses writes past 32 MiB (EFBIG). A write there is acknowledged
    by r0 and r2; r1 halts and goes ERR. After a crash of everything, r1 must not come back
    RW beside the others with different data."""
    c = cluster_factory(replicas=3)
    r1 = c.reps[1]
    # An explicit fault: r1's disk now refuses writes past 32 MiB (its head file stays).
    resource.prlimit(r1.proc.pid, resource.RLIMIT_FSIZE, (32 * MiB, 32 * MiB))
    h = connect(c)
    before = write_blocks(h, 4, [MiB])
    after = write_blocks(h, 5, [40 * MiB])          # fails on r1 only
    h.flush()
    h.shutdown()
    modes = c.modes()
    assert modes["vol-r1"] == "ERR", modes
    crash_everything(c)
    restart_everything(c)           # without the limit
    c.wait_modes(HEALTHY)
    h = connect(c)
    check(h, {**before, **after})
    h.shutdown()
    assert_replicas_identical(c)


def test_a_dirty_replica_is_not_laundered_by_an_orderly_close(cluster) -> None:
    """Sequence 5: a replica opened dirty and never resynced stays dirty through SIGTERM."""
    h = connect(cluster)
    acked = write_blocks(h, 6, [0])
    h.shutdown()
    cluster.stop_engine(signal.SIGKILL)
    r = cluster.reps[0]
    r.kill(signal.SIGKILL)
    r.start()          # opened dirty
    r.stop()           # orderly close, no engine ever adopted or resynced it
    assert stat_on_disk(r.cfg.directory)["Dirty"] is True
    r.start()
    cluster.start_engine()
    cluster.wait_modes(HEALTHY)
    h = connect(cluster)
    check(h, acked)
    h.shutdown()
    assert_replicas_identical(cluster)


def test_trim_on_a_rebuilding_replica_with_snapshots_writes_zeros(tmp_path) -> None:
    """Sequence 4, at the layer chain: a rebuild target's base map is not built yet, so a
    may-trim ZERO must write zeros rather than punch a hole older data could show through."""
    from blockhorn.replica import snapshots
    d = str(tmp_path / "r")
    r = Replica.create(d, 4 * MiB)
    r.write(0, b"S" * MiB)
    snapshots.create_snapshot(r, "s1", True, None)
    r.update_meta(Rebuilding=True)
    r.zero(0, MiB, may_trim=True)
    assert bytes(r.read(0, MiB)) == bytes(MiB)
    # Whatever a rebuild copies into the snapshot layer later stays hidden.
    snapshots.write_layer(r, "volume-snap-s1.img", 0, b"X" * MiB)
    r.reload()
    assert bytes(r.read(0, MiB)) == bytes(MiB)
    r.close()


def test_a_clone_never_reads_a_rebuilding_replica(tmp_path) -> None:
    """Sequence 7: snapshot_view refuses a replica marked Rebuilding."""
    from blockhorn.replica import snapshots
    from blockhorn.types import BlockhornError
    d = str(tmp_path / "r")
    r = Replica.create(d, 4 * MiB)
    r.write(0, b"S" * 4096)
    snapshots.create_snapshot(r, "s1", True, None)
    r.update_meta(Rebuilding=True)
    r.close()
    with pytest.raises(BlockhornError, match="rebuilt"):
        snapshots.snapshot_view(d, "s1")


def test_the_record_is_written_before_the_replicas(cluster) -> None:
    """Every generation a replica holds is in the record, and the record's set holds every
    RW replica (read while the engine runs)."""
    deadline = time.monotonic() + 10
    while not os.path.exists(cluster.record) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(cluster.record) as f:
        rec = json.load(f)
    for r in cluster.reps:
        meta = stat_on_disk(r.cfg.directory)
        assert meta["Generation"] <= rec["generation"]
    assert sorted(rec["members"]) == sorted(HEALTHY)


def _wait_rebuilt(c, name: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = {r["name"]: r for r in c.status()["replicas"]}[name]
        if st["mode"] == "RW" and st["rebuild"] and st["rebuild"].get("state") == "done":
            return st["rebuild"]
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


@pytest.mark.parametrize("blip", ["sigstop", "kill"])
def test_a_returning_replica_resyncs_only_what_changed(cluster_factory, blip) -> None:
    """Scenario 4 (SIGSTOP past the timeout, then SIGCONT) and a process restart (kill -9):
    the replica catches up from the source's change log, copying about what was written
    while it was away — not the volume."""
    c = cluster_factory(timeout_s=1.0, size=64 * MiB)
    h = connect(c)
    base = write_blocks(h, 7, [i * MiB for i in range(48)])     # 3 MiB of data before
    h.flush()
    r1 = c.reps[1]
    if blip == "sigstop":
        r1.kill(signal.SIGSTOP)
    else:
        r1.kill(signal.SIGKILL)
    away = [i * MiB + 512 * 1024 for i in range(0, 48, 4)]       # 12 x 64 KiB while away
    during = write_blocks(h, 8, away[:1])                        # times out, r1 -> ERR
    c.wait_modes({"vol-r0": "RW", "vol-r1": "ERR", "vol-r2": "RW"})
    during.update(write_blocks(h, 8, away))
    written = len(away) * 64 * 1024
    t0 = time.monotonic()
    if blip == "sigstop":
        r1.kill(signal.SIGCONT)
    else:
        r1.start()
    c.control().call({"op": "rebuild", "replica": "vol-r1"})
    progress = _wait_rebuilt(c, "vol-r1")
    report("4 SIGSTOP past the timeout: SIGCONT -> replica RW" if blip == "sigstop" else
           "kill -9 one replica: restart -> replica RW (no daemon)", time.monotonic() - t0,
           f"{progress['mode']} resync of {progress['total']} bytes for {written} written")
    assert progress["mode"] == "incremental", progress
    assert 0 < progress["total"] <= 2 * written, (progress, written)
    check(h, {**base, **during})
    h.flush()
    h.shutdown()
    assert_replicas_identical(c)
