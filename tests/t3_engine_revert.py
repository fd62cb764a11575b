"""Tier 3: the engine's revert to a snapshot (engine/revert.py, the replica op `revert`) across
real replica processes, and what crashes in the middle leave (docs/DURABILITY.md, "Revert
across nodes"): never replicas that differ while the start rule counts them in sync.

- every replica reverts: the volume reads the snapshot, a restarted engine starts with every
  replica RW and no rebuild;
- replicas of an older release (the op unknown: EINVAL): every one refusing changes nothing;
  one refusing is left out (ERR) and rebuilt from the reverted ones;
- a replica killed in the middle is left out and rebuilt from the reverted ones;
- the engine killed after two of three replicas reverted: if they answer at the next start
  the volume reads the snapshot on every replica; if only the unreverted one answers, it
  reads as before the revert on every replica (the reverted ones are rebuilt from it);
- a replica that crashed between its head commit and its revision bump is suspect and loses
  to a clean replica at the same revision (the start rule, on the files).

Every case ends by reading each replica's files (the processes stopped) against the
checksum of what the volume must hold.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import nbd
import pytest
from harness import Cluster, proc_state, wait_for
from support.faulty_replica import PROGRAM as FAULTY

from blockhorn.config import ReplicaRef
from blockhorn.engine import generation
from blockhorn.engine.client import ReplicaClient
from blockhorn.keys import load_key
from blockhorn.replica import snapshots as store_snaps
from blockhorn.replica.store import Replica
from blockhorn.types import BlockhornError

MiB = 1 << 20
SIZE = 8 * MiB
NAMES = ["vol-r0", "vol-r1", "vol-r2"]


@pytest.fixture
def make(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """make(stop_r2_at=OP): a 3-replica cluster of faulty replicas (tests/support), r2
    stopping itself before its first OP when asked."""
    made: list[Cluster] = []

    def build(stop_r2_at: str = "") -> Cluster:
        c = Cluster(str(tmp_path / f"c{len(made)}"), size=SIZE, timeout_s=3.0,
                    replica_program=FAULTY)
        made.append(c)
        for i, r in enumerate(c.reps):
            if i == 2 and stop_r2_at:
                monkeypatch.setenv("FAULTY_STOP_AT", stop_r2_at)
            r.start()
            monkeypatch.delenv("FAULTY_STOP_AT", raising=False)
        c.start_engine()
        return c

    os.makedirs(tmp_path, exist_ok=True)
    yield build
    for c in made:
        for r in c.reps:
            r.kill(signal.SIGCONT)      # a stopped replica would not stop at teardown
        c.stop()


def write(c: Cluster, seed: int) -> None:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    for i in range(0, SIZE, 512 * 1024):    # half the volume, every other 512 KiB
        if (i // (512 * 1024)) % 2 == seed % 2 or seed > 1:
            h.pwrite(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (512 * 1024 // 32), i)
    h.flush()
    h.shutdown()


def volume_sum(c: Cluster) -> str:
    h = nbd.NBD()
    h.connect_uri(c.uri)
    d = hashlib.sha256()
    for off in range(0, SIZE, MiB):
        d.update(h.pread(MiB, off))
    h.shutdown()
    return d.hexdigest()


def replica_sums(c: Cluster) -> dict[str, str]:
    """Each replica's content from its files (every process stopped first)."""
    c.stop()
    out = {}
    for r in c.reps:
        rep = Replica.open(r.cfg.directory)
        try:
            out[r.cfg.name] = hashlib.sha256(bytes(rep.read(0, SIZE))).hexdigest()
        finally:
            rep.close()
    return out


def side(c: Cluster, i: int) -> ReplicaClient:
    rep = c.reps[i].cfg
    client = ReplicaClient(ReplicaRef(rep.name, rep.listen), load_key(rep.key_file), "vol")
    client.connect()
    return client


def stopped(pid: int) -> bool:
    return proc_state(pid) == "T"


def revision(c: Cluster, i: int) -> int:
    seen = generation.seen_on_disk(NAMES[i], c.reps[i].cfg.directory)
    assert seen is not None
    return seen.revision


def a_then_b(c: Cluster) -> tuple[str, str]:
    """Write A, snapshot s, write B over it: (checksum of A, checksum of B)."""
    write(c, 0)
    a = volume_sum(c)
    c.control().call({"op": "snapshot", "name": "s"})
    write(c, 1)
    write(c, 2)
    b = volume_sum(c)
    assert a != b
    return a, b


def converged(c: Cluster) -> bool:
    return all(r["mode"] == "RW" and (r.get("rebuild") or {}).get("state") in (None, "done")
               for r in c.status()["replicas"])


def test_revert_reaches_every_replica_and_a_restart_needs_no_rebuild(make: Any) -> None:
    c = make()
    a, _ = a_then_b(c)
    gen = c.status()["generation"]
    reply = c.control().call({"op": "revert", "name": "s"})
    assert reply["reverted"] == NAMES and reply["left_out"] == {}, reply
    assert reply["generation"] == gen     # the in-sync set did not change: no commit
    assert volume_sum(c) == a
    c.stop_engine()
    c.start_engine()
    wait_for(lambda: converged(c), "engine up")
    st = c.status()["replicas"]
    assert all(r["rebuild"] is None for r in st), st      # in sync: no resync at all
    assert volume_sum(c) == a
    assert set(replica_sums(c).values()) == {a}


def test_older_replicas_refusing_the_op(make: Any) -> None:
    """All refuse (the op unknown): an error saying so, nothing changed. One refuses: it is
    left out and rebuilt from the reverted ones."""
    c = make()
    a, b = a_then_b(c)
    clients = [side(c, i) for i in range(3)]
    for cl in clients:
        cl.control({"op": "fault", "old_control": ["revert"]})
    with pytest.raises(BlockhornError, match="refused by every replica, nothing changed"
                       ) as e:
        c.control().call({"op": "revert", "name": "s"})
    assert "older release" in str(e.value)
    assert set(c.modes().values()) == {"RW"} and volume_sum(c) == b
    for cl in clients[:2]:
        cl.control({"op": "fault"})
    reply = c.control().call({"op": "revert", "name": "s"})
    assert reply["reverted"] == NAMES[:2] and "older release" in reply["left_out"]["vol-r2"]
    assert c.modes()["vol-r2"] == "ERR"
    assert volume_sum(c) == a
    clients[2].control({"op": "fault"})      # upgraded
    for cl in clients:
        cl.close()
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    wait_for(lambda: converged(c), "vol-r2 rebuilt")
    assert set(replica_sums(c).values()) == {a}


def test_replica_killed_mid_revert_is_left_out_and_rebuilt(make: Any) -> None:
    c = make(stop_r2_at="revert")
    a, _ = a_then_b(c)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(
        c.control().call({"op": "revert", "name": "s"})))
    t.start()
    r2 = c.reps[2]
    assert r2.proc is not None
    wait_for(lambda: stopped(r2.proc.pid), "vol-r2 stopped before its revert")  # type: ignore[union-attr]
    r2.kill(signal.SIGKILL)
    t.join(60)
    assert result["reverted"] == NAMES[:2] and "vol-r2" in result["left_out"], result
    r2.start()                            # holds B, at the old revision, suspect (killed)
    c.control().call({"op": "rebuild", "replica": "vol-r2"})
    wait_for(lambda: converged(c), "vol-r2 rebuilt")
    assert volume_sum(c) == a
    assert set(replica_sums(c).values()) == {a}


@pytest.mark.parametrize("back_first", ["all", "unreverted"])
def test_engine_killed_after_two_of_three_reverted(make: Any, back_first: str) -> None:
    c = make(stop_r2_at="revert")
    a, b = a_then_b(c)
    before = revision(c, 0)
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            c.control().call({"op": "revert", "name": "s"})
        except BlockhornError as e:
            failed.append(e)
    t = threading.Thread(target=ask)
    t.start()
    r2 = c.reps[2]
    assert r2.proc is not None
    wait_for(lambda: stopped(r2.proc.pid)  # type: ignore[union-attr]
             and revision(c, 0) == revision(c, 1) == before + 1, "r0, r1 reverted")
    c.stop_engine(signal.SIGKILL)         # before the commit that would leave r2 out
    t.join(30)
    assert failed, "the revert answered though its engine was killed"
    r2.kill(signal.SIGKILL)               # it never reverted: B, at the old revision
    if back_first == "unreverted":
        # The reverted replicas do not answer the next start; the engine's record lets it
        # start from r2 alone: the volume reads as before the revert, and r0, r1, which
        # reverted, are rebuilt from it, never taken as in sync.
        c.reps[0].kill(signal.SIGKILL)
        c.reps[1].kill(signal.SIGKILL)
        r2.start()
        c.start_engine()
        assert volume_sum(c) == b
        for i in (0, 1):
            c.reps[i].start()
            c.control().call({"op": "rebuild", "replica": NAMES[i]})
        want = b
    else:
        r2.start()
        c.start_engine()
        want = a
    wait_for(lambda: converged(c), "every replica RW")
    assert volume_sum(c) == want
    assert set(replica_sums(c).values()) == {want}


def test_crash_between_head_commit_and_revision_leaves_the_replica_suspect(
        tmp_path: Any) -> None:
    """On the files alone: a replica that committed its new head but died before the bump
    opens Dirty at the old revision, and the start rule prefers a clean one at that revision
    (and any at the bumped one) as the source; it is resynced."""
    dirs = {}
    for n in ("a", "b"):
        d = str(tmp_path / n)
        r = Replica.create(d, SIZE, "vol", {"Members": ["a", "b"]})
        r.write(0, b"A" * 4096)
        store_snaps.create_snapshot(r, "s")
        r.write(0, b"B" * 4096)
        r.close()
        dirs[n] = d
    r = Replica.open(dirs["a"])

    def crash(step: str) -> None:
        if step == "revert:revision":
            raise KeyboardInterrupt("crash")
    r.crash_hook = crash
    with pytest.raises(KeyboardInterrupt):
        store_snaps.revert(r, "s")
    for layer in r.layers:                # the process dies: no orderly close
        os.close(layer.fd)
    seen = [generation.seen_on_disk(n, d) for n, d in dirs.items()]
    assert seen[0] is not None and seen[1] is not None
    assert seen[0].suspect and seen[0].revision == seen[1].revision
    decision = generation.choose(["a", "b"], [s for s in seen if s is not None], None)
    assert decision.rw == ["b"] and decision.resync == ["a"]
    back = Replica.open(dirs["a"])
    assert bytes(back.read(0, 4096)) == b"A" * 4096 and back.suspect
    back.close()
