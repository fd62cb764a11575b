"""Tier 2: the state-store contract (control/store/base.py), one suite run against both
implementations: SQLite in a temporary file, and etcd (a real one-member etcd on 127.0.0.1,
started once for this module; every test gets its own key prefix)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from blockhorn.control.store import (
    PORT_RANGE,
    BackupTargetRow,
    DiskRow,
    NodeRow,
    ProcessRecord,
    SlotTaken,
    SqliteStore,
    StateStore,
    open_store,
)
from blockhorn.control.store.etcd import EtcdStore
from blockhorn.types import AlreadyExists, Busy, NotFound

LIVENESS_WAIT_S = 10.0   # seconds for a 2 s TTL to run out (etcd checks leases every 500 ms)


@pytest.fixture(params=["sqlite", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reopen(kind: str, request: pytest.FixtureRequest, tmp_path: object) -> Iterator[object]:
    """A function opening the store under test (again: a restarted daemon sees the same)."""
    opened: list[StateStore] = []
    prefix = f"/bh-test-{uuid.uuid4().hex[:12]}/"
    url = request.getfixturevalue("etcd_url") if kind == "etcd" else None

    def open_() -> StateStore:
        s = open_store(f"{tmp_path}/state.db", url, prefix)
        opened.append(s)
        return s
    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(reopen: object) -> StateStore:
    return reopen()   # type: ignore[operator, no-any-return]


def make(store: StateStore, name: str = "v", n: int = 2) -> None:
    store.add_volume(name, 1 << 20, [(f"{name}-r{i}", f"/d/{name}/{i}", None) for i in range(n)],
                     (f"/run/{name}/nbd.sock", f"/run/{name}/c.sock"), is_free=lambda p: True)


def test_open_store_picks_the_implementation(kind: str, store: StateStore) -> None:
    assert isinstance(store, SqliteStore if kind == "sqlite" else EtcdStore)


def test_volume_roundtrip_and_reopen(store: StateStore, reopen: object) -> None:
    make(store)
    vol = store.volume("v")
    assert (vol.name, vol.size, vol.replica_count, vol.desired) == ("v", 1 << 20, 2, "detached")
    assert vol.attachment is None and vol.created.endswith("Z") and vol.groups == []
    reps = store.replicas("v")
    assert [r.name for r in reps] == ["v-r0", "v-r1"] and [r.idx for r in reps] == [0, 1]
    ports = [int(r.address.split(":")[1]) for r in reps]
    assert len(set(ports)) == 2 and all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    assert store.ports("v") == {"v-r0": ports[0], "v-r1": ports[1]}
    store.update_volume("v", desired="attached", attachment={"device": "/dev/loop7"},
                        groups=["g"], device_stale=True, standby={"source": "s3://b"})
    store.set_replica_process("v-r0", ProcessRecord(123, 45.5), restarted=True)
    store.set_engine_process("v", ProcessRecord(9, 1.25))
    again = reopen()   # type: ignore[operator]
    v = again.volume("v")
    assert (v.desired, v.attachment, v.groups, v.device_stale, v.standby) == \
        ("attached", {"device": "/dev/loop7"}, ["g"], True, {"source": "s3://b"})
    r0 = again.replicas("v")[0]
    assert r0.process == ProcessRecord(123, 45.5) and r0.restarts == 1
    assert again.engine("v").process == ProcessRecord(9, 1.25)
    store.set_replica_process("v-r0", None)
    assert store.replicas("v")[0].process is None and store.replicas("v")[0].restarts == 1
    with pytest.raises(ValueError):
        store.update_volume("v", replica_count=9)


def test_names_are_unique_and_missing_is_notfound(store: StateStore) -> None:
    make(store)
    with pytest.raises(AlreadyExists):
        make(store)
    for call in (lambda: store.volume("x"), lambda: store.engine("x"),
                 lambda: store.update_volume("x", message="m"),
                 lambda: store.delete_volume("x"), lambda: store.share("v"),
                 lambda: store.job("j"), lambda: store.remove_job("j")):
        with pytest.raises(NotFound):
            call()
    store.set_replica_process("nope", ProcessRecord(1, 1.0))   # removed meanwhile: no-op
    assert store.replicas("x") == []


def test_delete_removes_everything_of_the_volume(store: StateStore) -> None:
    make(store, "a")
    make(store, "b")
    store.allocate_port("a", "nfs", lambda p: True)
    store.add_share("a", {"squash": "none"})
    store.delete_volume("a")
    assert [v.name for v in store.volumes()] == ["b"]
    assert store.replicas("a") == [] and store.ports("a") == {}
    with pytest.raises(NotFound):
        store.engine("a")
    with pytest.raises(NotFound):
        store.share("a")
    make(store, "a")   # the name, its replicas and ports are free again
    assert len(store.replicas("b")) == 2


def test_ports_are_never_handed_out_twice(store: StateStore) -> None:
    make(store, "a", 3)
    old = store.ports("a")
    refused = set(old.values())
    port = store.allocate_port("a", "a-r0", lambda p: p not in refused)
    assert port not in refused and store.ports("a")["a-r0"] == port   # replaces a-r0's
    assert len(set(store.ports("a").values())) == 3
    store.set_replica_address("a-r0", f"127.0.0.1:{port}")
    assert store.replicas("a")[0].address == f"127.0.0.1:{port}"
    # Concurrent allocations (threads of one daemon, or daemons on several hosts) collide
    # on purpose: a tiny range of acceptable ports; every one handed out is distinct.
    few = set(range(PORT_RANGE[0], PORT_RANGE[0] + 8))
    got: list[int] = []
    errors: list[BaseException] = []

    def alloc(i: int) -> None:
        try:
            got.append(store.allocate_port("a", f"o{i}", lambda p: p in few))
        except BaseException as e:   # reported below
            errors.append(e)
    threads = [threading.Thread(target=alloc, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors and len(got) == 6 and len(set(got)) == 6


def test_replica_failure_times(store: StateStore) -> None:
    make(store)
    store.set_replica_failed_since("v-r1", 100.0)
    store.set_replica_failed_since("v-r1", 200.0)          # the first failure counts
    assert store.replicas("v")[1].failed_since == 100.0
    store.set_replica_failed_since("v-r0", 5.0)
    store.clear_failed("v")
    assert [r.failed_since for r in store.replicas("v")] == [None, None]
    store.set_replica_failed_since("v-r0", 7.0)
    store.set_replica_directory("v-r0", "/d/new")          # replaced: its failure is over
    r0 = store.replicas("v")[0]
    assert (r0.directory, r0.failed_since) == ("/d/new", None)


def test_concurrent_updates_are_not_lost(store: StateStore) -> None:
    make(store)
    n = 10

    def restart(name: str) -> None:
        for _ in range(n):
            store.set_replica_process(name, ProcessRecord(1, 1.0), restarted=True)
    threads = [threading.Thread(target=restart, args=("v-r0",)) for _ in range(3)]
    threads.append(threading.Thread(target=lambda: [store.update_volume("v", message=str(i))
                                                    for i in range(n)]))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.replicas("v")[0].restarts == 3 * n
    assert store.volume("v").message == str(n - 1)


def test_settings(store: StateStore) -> None:
    assert store.setting_values() == {}
    store.put_setting("a-b", "600")
    store.put_setting("c", '"x"')
    store.put_setting("a-b", "5")
    assert store.setting_values() == {"a-b": "5", "c": '"x"'}
    store.delete_setting("a-b")
    store.delete_setting("never-set")
    assert store.setting_values() == {"c": '"x"'}


def test_shares(store: StateStore) -> None:
    make(store)
    store.add_share("v", {"squash": "none", "clients": []})
    row = store.share("v")
    assert row.options == {"squash": "none", "clients": []} and row.process is None
    store.set_share_process("v", ProcessRecord(77, 3.5), restarted=True)
    row = store.share("v")
    assert row.process == ProcessRecord(77, 3.5) and row.restarts == 1


def test_share_records(store: StateStore) -> None:
    """Ganesha's client records of a share: stored only under the volume's current attach
    epoch, dropped with None and with the volume."""
    make(store)
    tree = {"dirs": ["node0"], "files": {"node0/v4recov/c1": "AAE="}}
    assert store.share_records("v") is None
    epoch = store.volume("v").epoch
    assert store.put_share_records("v", tree, epoch)
    assert store.share_records("v") == tree
    assert not store.put_share_records("v", {"dirs": [], "files": {}}, epoch + 1)
    assert store.share_records("v") == tree
    assert store.put_share_records("v", None, epoch) and store.share_records("v") is None
    assert store.put_share_records("v", tree, epoch)
    store.delete_volume("v")
    assert store.share_records("v") is None and not store.put_share_records("v", tree, epoch)


def test_jobs_and_runs(store: StateStore) -> None:
    spec = {"name": "h", "cron": "0 * * * *", "task": "snapshot", "retain": 2}
    job = store.add_job("h", spec, 1000.0)
    assert (job.spec, job.created, job.last_slot, job.runs) == (spec, 1000.0, 1000.0, 0)
    with pytest.raises(AlreadyExists):
        store.add_job("h", spec, 1.0)
    store.add_job("a", spec, 1.0)
    assert [j.name for j in store.jobs()] == ["a", "h"]
    ids = [store.start_run("h", 1000.0 + 3600 * i, 2000.0 + i, "running", None, keep=3)
           for i in range(1, 5)]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert store.job("h").last_slot == 1000.0 + 3600 * 4
    # A slot is claimed once (every node of a cluster sees it due): the same or an older one
    # again is refused, nothing recorded.
    for slot in (1000.0 + 3600 * 4, 5.0):
        with pytest.raises(SlotTaken):
            store.start_run("h", slot, 9.0, "running", None, keep=3)
    store.start_run("h", None, 9.0, "failed", "skipped", keep=3)   # `job run`: no slot
    assert store.job("h").last_slot == 1000.0 + 3600 * 4
    runs = store.job_runs("h", 10)
    assert len(runs) == 3 and runs[0].state == "failed" and runs[0].finished == 9.0
    assert store.job_run(ids[0]) is None                          # beyond the kept history
    store.finish_run(ids[3], "ok", None, {"v": {"made": "s1"}}, 3000.0)
    done = store.job_run(ids[3])
    assert done is not None and (done.state, done.result, done.finished) == \
        ("ok", {"v": {"made": "s1"}}, 3000.0)
    store.finish_run(ids[2], "failed", "boom", None, 3001.0)
    assert (store.job("h").runs, store.job("h").failures) == (2, 1)
    store.start_run("a", None, 1.0, "running", None, keep=3, node="n1")
    store.start_run("a", None, 2.0, "running", None, keep=3, node="n2")
    # A starting daemon interrupts its own node's runs only: another node's may be going on.
    # One host (SQLite) has no other node: every run.
    one_host = isinstance(store, SqliteStore)
    assert store.interrupt_running(4000.0, "n1") == (2 if one_host else 1)
    states = [r.state for r in store.job_runs("a", 5)]   # newest first
    assert states == ["interrupted" if one_host else "running", "interrupted"], states
    store.remove_job("h")
    assert store.job_runs("h", 10) == [] and store.job_run(ids[3]) is None
    store.finish_run(ids[3], "ok", None, None, 1.0)   # its job is gone: a no-op


def test_backup_targets(store: StateStore) -> None:
    t = BackupTargetRow("default", "s3://b@r/", "/etc/cred", None, "2026-01-01T00:00:00Z")
    store.put_backup_target(t)
    store.put_backup_target(BackupTargetRow("nfs", "nfs://h:/e", None, "/mnt", "x"))
    assert [r.name for r in store.backup_targets()] == ["default", "nfs"]
    assert store.backup_targets()[0] == t
    assert store.delete_backup_target("nfs") and not store.delete_backup_target("nfs")


def test_nodes_and_disks(store: StateStore) -> None:
    assert store.put_node(NodeRow("n1", "10.0.0.1", zone="z1", tags=["ssd"]))
    assert not store.put_node(NodeRow("n1", "10.9.9.9"))          # registered once
    assert store.node("n1").address == "10.0.0.1"
    store.put_node(NodeRow("n0", "10.0.0.2"))
    store.update_node("n1", schedulable=False, tags=["a", "b"], zone=None, heartbeat=5.5)
    n1 = store.node("n1")
    assert (n1.schedulable, n1.tags, n1.zone, n1.heartbeat) == (False, ["a", "b"], None, 5.5)
    assert [n.name for n in store.nodes()] == ["n0", "n1"]
    with pytest.raises(NotFound, match="node 'x' does not exist"):
        store.update_node("x", zone="z")
    store.add_disk(DiskRow("n1", "/mnt/d 1", ["fast"], reserved=1 << 30))
    store.add_disk(DiskRow("n1", "/mnt/a"))
    store.add_disk(DiskRow("n0", "/mnt/d 1"))
    with pytest.raises(AlreadyExists):
        store.add_disk(DiskRow("n1", "/mnt/a"))
    with pytest.raises(NotFound):
        store.add_disk(DiskRow("nx", "/mnt/a"))
    assert [(d.node, d.path) for d in store.disks()] == \
        [("n0", "/mnt/d 1"), ("n1", "/mnt/a"), ("n1", "/mnt/d 1")]
    store.update_disk("n1", "/mnt/d 1", capacity=100, available=40, schedulable=False)
    d = store.disks("n1")[1]
    assert (d.tags, d.reserved, d.capacity, d.available, d.schedulable) == \
        (["fast"], 1 << 30, 100, 40, False)
    store.remove_disk("n1", "/mnt/a")
    with pytest.raises(NotFound):
        store.remove_disk("n1", "/mnt/a")
    assert [dk.path for dk in store.disks("n1")] == ["/mnt/d 1"]


def test_node_liveness_expires_and_returns(store: StateStore) -> None:
    store.put_node(NodeRow("n1", "10.0.0.1"))
    store.put_node(NodeRow("n2", "10.0.0.2"))
    assert store.live_nodes(2) == set()
    store.node_alive("n1", 2)
    store.node_alive("n1", 2)                      # renewed, not a second record
    assert store.live_nodes(2) == {"n1"} and store.node("n1").heartbeat is not None
    deadline = time.monotonic() + LIVENESS_WAIT_S
    while store.live_nodes(2):                     # silent longer than its TTL: down
        assert time.monotonic() < deadline, "liveness did not expire"
        time.sleep(0.2)
    store.node_alive("n1", 2)                      # back (etcd: a new lease)
    assert store.live_nodes(2) == {"n1"}


def test_replicas_on_nodes_moves_and_engine_sockets(store: StateStore) -> None:
    """Issue 12: a replica's node, `HOST:0` addresses getting a port on that host, a move to
    another node in one step, a volume's engine node and freshness, the engine's sockets."""
    store.add_volume("c", 1 << 20, [("c-r0", "/d0/replicas/c/c-r0", "10.0.0.1:0", "n1"),
                                    ("c-r1", "/d1/replicas/c/c-r1", "10.0.0.2:0", "n2"),
                                    ("c-r2", "/x/c-r2", "unix:/run/c-r2.sock")],
                     ("/run/c/nbd.sock", "/run/c/c.sock"), is_free=lambda p: True)
    r0, r1, r2 = store.replicas("c")
    assert (r0.node, r1.node, r2.node) == ("n1", "n2", None)
    assert r0.address.startswith("10.0.0.1:") and r1.address.startswith("10.0.0.2:")
    assert int(r0.address.split(":")[1]) in store.ports("c").values()
    assert r2.address == "unix:/run/c-r2.sock"
    v = store.volume("c")
    assert v.fresh and v.node is None
    store.update_volume("c", node="n2", fresh=False)
    v = store.volume("c")
    assert (v.node, v.fresh) == ("n2", False)
    store.set_replica_process("c-r1", ProcessRecord(42, 1.5))
    store.set_replica_failed_since("c-r1", 100.0)
    store.move_replica("c-r1", "n3", "/d3/replicas/c/c-r1", "10.0.0.3:7000")
    moved = store.replicas("c")[1]
    assert (moved.node, moved.directory, moved.address, moved.process, moved.failed_since) == \
        ("n3", "/d3/replicas/c/c-r1", "10.0.0.3:7000", None, None)
    store.set_engine_sockets("c", "/h2/run/c/nbd.sock", "/h2/run/c/control.sock")
    eng = store.engine("c")
    assert (eng.nbd_socket, eng.control_socket) == ("/h2/run/c/nbd.sock",
                                                    "/h2/run/c/control.sock")


def test_leftover_directories_of_removed_and_moved_replicas(kind: str,
                                                            store: StateStore) -> None:
    """A replica moved to another node, and every replica of a removed volume, leave a record
    of the directory their old node removes (manager/leftovers.py): etcd only (one host's
    `volume rm` removes its directories itself)."""
    store.add_volume("g", 1 << 20, [("g-r0", "/d0/replicas/g/g-r0", "10.0.0.1:0", "n1"),
                                    ("g-r1", "/d1/replicas/g/g-r1", "10.0.0.2:0", "n2")],
                     ("/run/g/nbd.sock", "/run/g/c.sock"), is_free=lambda p: True)
    created = store.volume("g").created
    store.move_replica("g-r1", "n3", "/d3/replicas/g/g-r1", "10.0.0.3:7000")
    if kind == "sqlite":
        store.delete_volume("g")
        assert store.leftovers("n1") == store.leftovers("n2") == []
        return
    (moved,) = store.leftovers("n2")
    assert (moved.replica, moved.volume, moved.directory, moved.volume_created) == \
        ("g-r1", "g", "/d1/replicas/g/g-r1", created)
    assert store.leftovers("n1") == store.leftovers("n3") == []
    store.delete_volume("g")
    assert [x.directory for x in store.leftovers("n1")] == ["/d0/replicas/g/g-r0"]
    assert [x.directory for x in store.leftovers("n3")] == ["/d3/replicas/g/g-r1"]
    store.forget_leftover(moved)
    store.forget_leftover(moved)   # twice: a node that died after forgetting does it again
    assert store.leftovers("n2") == []


def test_shared_key_and_leader(kind: str, store: StateStore, reopen: object) -> None:
    """etcd: the first key stored is every node's; one leader at a time, under its lease.
    SQLite (one host): the home's own key, and this node leads."""
    first, second = b"\x01" * 32, b"\x02" * 32
    assert store.shared_key(first) == first
    other: StateStore = reopen()   # type: ignore[operator]
    assert other.shared_key(second) == (first if kind == "etcd" else second)
    store.put_node(NodeRow("n1", "10.0.0.1"))
    store.put_node(NodeRow("n2", "10.0.0.2"))
    assert store.try_lead("n1", 2) == "n1"
    assert other.try_lead("n2", 2) == ("n1" if kind == "etcd" else "n2")
    if kind == "etcd":
        # n1 stops renewing: its lease, and with it the leader key, expires; n2 takes over.
        deadline = time.monotonic() + LIVENESS_WAIT_S
        while other.try_lead("n2", 2) != "n2":
            assert time.monotonic() < deadline, "the leader key outlived its lease"
            other.node_alive("n2", 2)
            time.sleep(0.3)


def test_claim_attachment_moves_once_and_bumps_the_epoch(kind: str, store: StateStore) -> None:
    """Issue 12: moving an attachment is one compare-and-swap on the engine's node; on etcd
    it bumps the attach epoch (the replicas refuse engines of older ones), on SQLite (one
    host, one engine) the epoch stays 0."""
    make(store, "m")
    assert store.volume("m").epoch == 0
    e1 = store.claim_attachment("m", "n1", None, desired="attached", message="attaching")
    v = store.volume("m")
    assert (v.node, v.desired, v.message, v.epoch) == ("n1", "attached", "attaching", e1)
    store.set_engine_process("m", ProcessRecord(42, 1.5))   # n1's engine
    # Two movers saw n1 down; the first wins, the second is told who has it.
    e2 = store.claim_attachment("m", "n2", "n1")
    assert store.engine("m").process is None   # cleared in the same step
    with pytest.raises(Busy, match="now attached on node n2"):
        store.claim_attachment("m", "n3", "n1")
    assert store.volume("m").node == "n2" and store.volume("m").epoch == e2
    assert (e1, e2) == ((1, 2) if kind == "etcd" else (0, 0))
    with pytest.raises(NotFound):
        store.claim_attachment("nope", "n1", None)


def test_an_attach_of_a_detached_volume_claims_it_only_while_detached(
        kind: str, store: StateStore) -> None:
    """Two attaches of a detached volume (a user's and a maintenance attach, or users on two
    nodes) both read it detached on the node it was last on: the second claim must not take
    over the first one's attachment."""
    make(store, "d")
    store.claim_attachment("d", "n1", None, detached=True, desired="attached")
    with pytest.raises(Busy, match="was attached on node n1 meanwhile"):
        store.claim_attachment("d", "n1", "n1", detached=True, desired="attached",
                               message="maintenance on node n1: x")
    v = store.volume("d")
    assert (v.node, v.desired, v.message) == ("n1", "attached", None)
    store.update_volume("d", desired="detached")
    store.claim_attachment("d", "n2", "n1", detached=True, desired="attached")
    assert store.volume("d").node == "n2"


def test_watch_reports_what_supervision_acts_on(kind: str, store: StateStore,
                                                 reopen: object) -> None:
    """etcd: a change another node makes to a volume wakes the watcher (the supervisor's
    next pass starts then); a heartbeat (the node document, every beat) does not. SQLite
    has no feed: one daemon makes every change."""
    make(store)
    store.put_node(NodeRow("n1", "10.0.0.1"))
    woken = threading.Event()
    stop = store.watch(woken.set)
    if kind == "sqlite":
        assert stop is None
        return
    assert stop is not None
    try:
        assert woken.wait(5), "no wake when the watch started"   # a new stream: maybe missed
        woken.clear()
        other = reopen()   # type: ignore[operator]
        other.update_node("n1", heartbeat=7.0)
        assert not woken.wait(0.5), "a heartbeat woke the watcher"
        other.update_volume("v", desired="attached", node="n1",
                            salvage={"replica": "v-r1", "id": "t"})
        assert woken.wait(5), "a volume change did not wake the watcher"
        assert store.volume("v").salvage == {"replica": "v-r1", "id": "t"}
        woken.clear()
        other.node_alive("n1", 2)       # a node's liveness key appears
        assert woken.wait(5), "a node coming up did not wake the watcher"
    finally:
        stop()


def test_replica_move_start_finish_cancel(kind: str, store: StateStore) -> None:
    """A drain's move of an attached volume's replica: the row keeps the old replica with a
    `moving` target until finish_move points it at the target in one step (the target's
    process and port the replica's, the old directory a leftover: etcd); cancel_move drops
    the target (its directory a leftover of its node: etcd); give_up_move only records why
    the move is to be given up (the engine's node cancels or finishes it)."""
    from blockhorn.control.store import move_port_owner
    from blockhorn.types import Busy
    store.add_volume("m", 1 << 20, [("m-r0", "/d0/replicas/m/m-r0", "10.0.0.1:0", "n1"),
                                    ("m-r1", "/d1/replicas/m/m-r1", "10.0.0.2:0", "n2")],
                     ("/run/m/nbd.sock", "/run/m/c.sock"), is_free=lambda p: True)
    old = store.replicas("m")[1]
    port = store.allocate_port("m", move_port_owner("m-r1"), lambda p: True)
    store.start_move("m-r1", "n3", "/d3/replicas/m/m-r1", f"10.0.0.3:{port}")
    store.start_move("m-r1", "n3", "/d3/replicas/m/m-r1", f"10.0.0.3:{port}")   # same: no-op
    with pytest.raises(Busy):
        store.start_move("m-r1", "n4", "/d4/replicas/m/m-r1", "10.0.0.4:1")
    row = store.replicas("m")[1]
    assert (row.node, row.directory, row.address) == (old.node, old.directory, old.address)
    assert row.moving is not None and (row.moving.node, row.moving.directory,
                                       row.moving.process) == ("n3", "/d3/replicas/m/m-r1", None)
    store.set_move_process("m-r1", ProcessRecord(77, 2.5))
    assert store.replicas("m")[1].moving.process == ProcessRecord(77, 2.5)  # type: ignore[union-attr]
    assert store.leftovers("n2") == store.leftovers("n3") == []
    store.finish_move("m-r1")
    store.finish_move("m-r1")     # twice (a daemon restarted after the first): no-op
    row = store.replicas("m")[1]
    assert (row.node, row.directory, row.address, row.process, row.moving) == \
        ("n3", "/d3/replicas/m/m-r1", f"10.0.0.3:{port}", ProcessRecord(77, 2.5), None)
    ports = store.ports("m")
    assert ports["m-r1"] == port and move_port_owner("m-r1") not in ports
    if kind == "etcd":
        assert [x.directory for x in store.leftovers("n2")] == ["/d1/replicas/m/m-r1"]
    # A move given up: the target's port released, its directory a leftover of its node.
    port2 = store.allocate_port("m", move_port_owner("m-r0"), lambda p: True)
    store.start_move("m-r0", "n4", "/d4/replicas/m/m-r0", f"10.0.0.4:{port2}")
    # Asked first (the leader: its node is down), carried out by the engine's node: the
    # first reason kept; the same move asked again is refused while it waits.
    store.give_up_move("m-r0", "the node is down")
    store.give_up_move("m-r0", "not moved within 300 s")
    assert store.replicas("m")[0].moving.give_up == "the node is down"  # type: ignore[union-attr]
    with pytest.raises(Busy):
        store.start_move("m-r0", "n4", "/d4/replicas/m/m-r0", f"10.0.0.4:{port2}")
    store.cancel_move("m-r0")
    store.give_up_move("m-r0", "late")     # not moving: no-op
    row = store.replicas("m")[0]
    assert (row.node, row.directory, row.moving) == ("n1", "/d0/replicas/m/m-r0", None)
    assert move_port_owner("m-r0") not in store.ports("m")
    if kind == "etcd":
        assert [x.directory for x in store.leftovers("n4")] == ["/d4/replicas/m/m-r0"]


def test_slot_claimed_once_among_racing_nodes(etcd_url: str) -> None:
    """Real etcd: CLAIMERS schedulers, each with its own store client (as every node of a
    cluster has), claim each of SLOTS slots of one job at the same moment (a barrier), as
    their schedulers do when all see the slot due: exactly one wins each slot, the others get
    SlotTaken, and the store holds one run per slot, the winner's."""
    claimers, slots = 4, 40
    prefix = f"/bh-test-{uuid.uuid4().hex[:12]}/"
    stores = [EtcdStore(etcd_url, prefix) for _ in range(claimers)]
    try:
        stores[0].add_job("race", {"name": "race", "cron": "* * * * *", "task": "snapshot",
                                   "retain": 1}, 0.0)
        barrier = threading.Barrier(claimers)
        won: dict[int, list[int]] = {i: [] for i in range(claimers)}
        failed: list[BaseException] = []

        def claim(i: int) -> None:
            try:
                for k in range(1, slots + 1):
                    barrier.wait(timeout=30)
                    try:
                        stores[i].start_run("race", 60.0 * k, 60.0 * k + 1, "running",
                                            f"n{i}", keep=slots + 1, node=f"n{i}")
                        won[i].append(k)
                    except SlotTaken:
                        pass
            except BaseException as e:   # reported below
                failed.append(e)
                barrier.abort()

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(claimers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failed, failed
        winners = {k: [i for i in won if k in won[i]] for k in range(1, slots + 1)}
        assert all(len(w) == 1 for w in winners.values()), winners
        runs = stores[1].job_runs("race", slots + 10)
        assert sorted((r.slot, r.message) for r in runs) == sorted(
            (60.0 * k, f"n{w[0]}") for k, w in winners.items())
        assert stores[2].job("race").last_slot == 60.0 * slots
        print(f"{slots} slots, {claimers} claimers: {time.monotonic() - t0:.2f} s; wins per "
              f"claimer {[len(won[i]) for i in range(claimers)]}")
    finally:
        for s in stores:
            s.close()
