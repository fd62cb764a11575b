"""Tier 2: the disk-room decision and the write that promises the room are one atomic step
across nodes (control/store/base.py `guarded`; docs/OPERATIONS.md "Nodes, disks and
scheduling").

Several store clients, each with its own node service and volume manager (what several node
daemons are), create volumes on the same nearly-full disks at one moment (threads released
together by a barrier), for many rounds, on a real etcd; and the same on one host's SQLite
store, where the daemon's API threads race the same way. Without the guard two creators read
the same `scheduled` bytes, both pass storage-over-provisioning-percentage and together
promise more than the disk has; with it a loser re-decides on fresh state: a placement
elsewhere, or a clear ENOSPC. A refused create leaves nothing behind: no volume, no replica
row, no directory. Then a create racing an expand of another volume on the same disk, and
one racing the leader's replacement of a replica: one of them gets the last room, the other
a clear ENOSPC; and a drain-style move planned earlier is refused once its room went. The
store contract of guarded writes (both stores) first names what moves the mark.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from blockhorn.control.store import Stale, StateStore, open_store
from blockhorn.keys import ensure_key
from blockhorn.manager.capacity import expand_reservation
from blockhorn.manager.nodes import NodeService
from blockhorn.manager.paths import Home
from blockhorn.manager.settings import MINIMAL_AVAILABLE, Settings
from blockhorn.manager.volumes import VolumeManager
from blockhorn.types import BlockhornError, NotFound

MiB = 1 << 20
SIZE = 64 * MiB        # bytes of each volume
ROOM = 2               # volumes of SIZE each disk may be promised
NODES = 3              # store clients / node services / volume managers
THREADS_PER_NODE = 2   # concurrent creates asked of each
ROUNDS = 4
BARRIER_S = 30.0       # seconds the racing threads may wait for each other


@dataclass
class Site:
    stores: list[StateStore]
    nodes: list[NodeService]
    vms: list[VolumeManager]
    disks: dict[tuple[str, str], int]   # (node, path) -> bytes that may be promised there


@pytest.fixture(params=["etcd", "sqlite"])
def site(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Site]:
    kind = str(request.param)
    url = request.getfixturevalue("etcd_url") if kind == "etcd" else None
    prefix = f"/bh-race-{uuid.uuid4().hex[:12]}/"
    count = NODES if kind == "etcd" else 1   # one host: one daemon, many API threads
    stores = [open_store(f"{tmp_path}/state.db", url, prefix) for _ in range(count)]
    nodes = [NodeService(s, f"n{i}") for i, s in enumerate(stores)]
    for n in nodes:
        n.register()
    Settings(stores[0]).set(MINIMAL_AVAILABLE, 0)   # whatever this machine's disk holds
    disks: dict[tuple[str, str], int] = {}
    for n in nodes[:2]:   # two disks (on two nodes of etcd's), each with room for ROOM
        path = os.path.join(str(tmp_path), f"disk-{n.name}")
        os.makedirs(path)
        cap = os.statvfs(path).f_blocks * os.statvfs(path).f_frsize
        n.add_disk(path, reserve=cap - ROOM * SIZE)
        disks[(n.name, path)] = ROOM * SIZE
    vms = []
    for i, (s, n) in enumerate(zip(stores, nodes, strict=True)):
        home = Home(os.path.join(str(tmp_path), f"home{i}"))
        home.ensure()
        ensure_key(home.key)   # as the daemon does at start (not per create)
        vm = VolumeManager(home, s)
        vm.placer = n.place
        vm.cluster = n if url else None
        vms.append(vm)
    try:
        yield Site(stores, nodes, vms, disks)
    finally:
        for s in stores:
            s.close()


def race(calls: list[Callable[[], object]]) -> list[BaseException | None]:
    """Run every call in its own thread, all released at one moment; each one's error."""
    barrier = threading.Barrier(len(calls))
    out: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(BARRIER_S)
        try:
            calls[i]()
        except BaseException as e:  # noqa: BLE001 (what each racer got is the result)
            out[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_S * 2)
        assert not t.is_alive(), "a racing create hung"
    return out


def promised(site: Site) -> dict[tuple[str, str], int]:
    """Bytes promised per registered disk, from the store (replica rows and volume sizes)."""
    out = dict.fromkeys(site.disks, 0)
    store = site.stores[0]
    for v in store.volumes():
        for r in store.replicas(v.name):
            disk = os.path.dirname(os.path.dirname(os.path.dirname(r.directory)))
            key = (r.node or site.nodes[0].name, disk)
            assert key in out, f"replica {r.name} outside the registered disks: {r.directory}"
            out[key] += v.promised
    return out


def on_disk(site: Site) -> set[str]:
    """The volume directories under the disks' replicas/ (what creates left on disk)."""
    return {v for _, path in site.disks for v in
            (os.listdir(os.path.join(path, "replicas"))
             if os.path.isdir(os.path.join(path, "replicas")) else [])}


def empty(site: Site, names: list[str]) -> None:
    """Remove the volumes, each through the node holding its replica (which removes the
    directory there), so that the next round starts from empty disks."""
    by_name = {n.name: vm for n, vm in zip(site.nodes, site.vms, strict=True)}
    for name in names:
        (r,) = site.stores[0].replicas(name)
        by_name.get(r.node or "", site.vms[0]).remove(name, force=True)
    assert on_disk(site) == set()


def test_concurrent_creates_never_over_commit(site: Site) -> None:
    racers = len(site.disks) * ROOM + 2 * len(site.vms)   # more than fits
    racers = max(racers, len(site.vms) * THREADS_PER_NODE)
    over = []
    outcomes = {"won": 0, "ENOSPC": 0, "EBUSY": 0}
    for rnd in range(ROUNDS):
        for n in site.nodes:   # leases live (15 s TTL) whatever this machine's speed
            n.beat()
        names = [f"r{rnd}-{i}" for i in range(racers)]
        vms = [site.vms[i % len(site.vms)] for i in range(racers)]
        errors = race([lambda vm=vm, n=n: vm.create(n, SIZE, 1)
                       for vm, n in zip(vms, names, strict=True)])
        won = sorted(n for n, e in zip(names, errors, strict=True) if e is None)
        for n, e in zip(names, errors, strict=True):
            if e is not None:   # a clear error, never a traceback of a half-made volume
                assert isinstance(e, BlockhornError), f"{n}: {e!r}"
                assert e.errno in (errno.ENOSPC, errno.EBUSY), f"{n}: {e}"
                outcomes[errno.errorcode[e.errno]] += 1
        outcomes["won"] += len(won)
        per_disk = promised(site)
        over += [(rnd, d, b) for d, b in per_disk.items() if b > site.disks[d]]
        store = site.stores[0]
        assert sorted(v.name for v in store.volumes()) == won
        assert on_disk(site) <= set(won), "a refused create left a directory behind"
        for n in won:
            assert len(store.replicas(n)) == 1
        empty(site, won)
    print(f"{ROUNDS} rounds of {racers} racing creates into room for "
          f"{len(site.disks) * ROOM}: {outcomes}; {len(over)} disk(s) over-committed")
    assert not over, f"disks promised more than they may hold: {over}"


def test_guarded_writes_refuse_a_moved_mark(site: Site) -> None:
    """The store contract (both stores): every change that promises room moves the mark;
    one guarded by an older mark is refused whole (Stale), with nothing written."""
    store = site.stores[-1]   # another client than the one that writes first (etcd)
    first = site.stores[0]

    def new(name: str, guard: int | None) -> None:
        first.add_volume(name, SIZE, [(f"{name}-r0", f"/d/replicas/{name}/{name}-r0", None)],
                         (f"/run/{name}/nbd", f"/run/{name}/ctl"), is_free=lambda p: True,
                         guard=guard)

    mark = store.schedule_mark()
    new("g1", mark)   # the mark it was decided at: written
    with pytest.raises(Stale):
        new("g2", mark)   # decided before g1 was written: refused whole
    with pytest.raises(NotFound):
        store.volume("g2")
    assert store.replicas("g2") == [] and store.ports("g2") == {}
    mark = store.schedule_mark()
    store.update_volume("g1", message="x")   # promises nothing: the mark stays
    assert store.schedule_mark() == mark
    with pytest.raises(NotFound):
        store.reserve_expand("nope", 2 * SIZE, mark)
    store.reserve_expand("g1", 3 * SIZE, mark)
    assert (store.volume("g1").expanding, store.volume("g1").promised) == (3 * SIZE, 3 * SIZE)
    assert site.nodes[0]._scheduled()[("n0", "/d")] == 3 * SIZE   # counted from now on
    with pytest.raises(Stale):
        store.reserve_expand("g1", 4 * SIZE, mark)
    assert store.volume("g1").expanding == 3 * SIZE
    store.end_expand("g1", 4 * SIZE)   # not its reservation: left alone
    assert store.volume("g1").expanding == 3 * SIZE
    mark = store.schedule_mark()
    store.update_volume("g1", size=2 * SIZE)   # grown: moves the mark, reservation stays
    assert store.schedule_mark() != mark
    assert (store.volume("g1").size, store.volume("g1").expanding) == (2 * SIZE, 3 * SIZE)
    store.update_volume("g1", size=3 * SIZE)   # reached: the size holds the promise now
    assert store.volume("g1").expanding is None
    store.reserve_expand("g1", 4 * SIZE)
    store.end_expand("g1", 4 * SIZE)   # the expand failed: the promise ends
    assert store.volume("g1").promised == 3 * SIZE
    # A daemon that died during an expand: its promise ends as that node's daemon starts
    # again (manager/daemon.py), another node's is left alone (etcd; SQLite is one daemon's).
    store.reserve_expand("g1", 5 * SIZE, node="n1")
    cluster = len(site.stores) > 1
    assert store.end_expands_of("n2") == ([] if cluster else ["g1"])
    if cluster:
        assert store.volume("g1").expanding == 5 * SIZE
        assert store.end_expands_of("n1") == ["g1"]
    assert store.volume("g1").promised == 3 * SIZE and store.end_expands_of("n1") == []
    stale = store.schedule_mark()
    new("g3", None)   # unguarded (explicit --disk): still moves the mark
    for change in (lambda: store.move_replica("g1-r0", "n9", "/e/replicas/g1/g1-r0",
                                              "127.0.0.1:9", guard=stale),
                   lambda: store.start_move("g1-r0", "n9", "/e/replicas/g1/g1-r0",
                                            "127.0.0.1:9", guard=stale)):
        with pytest.raises(Stale):
            change()
        (r,) = store.replicas("g1")
        assert (r.directory, r.moving) == ("/d/replicas/g1/g1-r0", None)
    mark = store.schedule_mark()
    store.start_move("g1-r0", "n9", "/e/replicas/g1/g1-r0", "127.0.0.1:9", guard=mark)
    assert store.replicas("g1")[0].moving is not None
    # A replica being moved is promised on both disks (what the scheduler counts).
    sched = site.nodes[0]._scheduled()
    assert (sched[("n0", "/d")], sched[("n9", "/e")]) == (3 * SIZE + SIZE, 3 * SIZE)  # + g3
    mark2 = store.schedule_mark()
    assert mark2 != mark
    store.move_replica("g1-r0", "n8", "/f/replicas/g1/g1-r0", "127.0.0.1:8", guard=mark2)
    assert store.replicas("g1")[0].directory == "/f/replicas/g1/g1-r0"
    assert store.schedule_mark() != mark2
    # What a decision counts, in one read: every volume's replicas.
    assert [(r.volume, r.name) for r in store.all_replicas()] == [
        ("g1", "g1-r0"), ("g3", "g3-r0")]
    mark = store.schedule_mark()
    store.delete_volume("g3")   # frees room: no decision can over-commit by it
    assert store.schedule_mark() == mark


@pytest.mark.parametrize("site", ["etcd"], indirect=True)   # a cluster's only
def test_create_races_an_expand_for_the_last_room(site: Site) -> None:
    """A volume on a disk with room for one more SIZE grows by SIZE while another node
    creates a volume of SIZE there, at one moment: exactly one gets the room; the other
    gets a clear ENOSPC and changes nothing (a cluster: one host's expand has no room
    rule to keep)."""
    (n0, d0), (n1, d1) = sorted(site.disks)
    site.stores[0].update_disk(n1, d1, schedulable=False)   # one disk: the contested one
    store = site.stores[0]
    outcome = {"expand": 0, "create": 0}
    for rnd in range(ROUNDS):
        for n in site.nodes:
            n.beat()
        a, b = f"a{rnd}", f"b{rnd}"
        site.vms[0].create(a, SIZE, 1)

        def expand(vm: VolumeManager = site.vms[1], a: str = a) -> None:
            # The API's expand (api_snapshots.py): the check and the promise, then the
            # replicas grow (here: what snaps.expand records once they did).
            with expand_reservation(vm, a, 2 * SIZE):
                vm.store.update_volume(a, size=2 * SIZE)

        errors = race([expand, lambda vm=site.vms[2], b=b: vm.create(b, SIZE, 1)])
        for e in errors:
            if e is not None:
                assert isinstance(e, BlockhornError) and e.errno == errno.ENOSPC, repr(e)
        assert errors.count(None) == 1, f"round {rnd}: {errors}"
        assert promised(site)[(n0, d0)] <= site.disks[(n0, d0)]
        grown = store.volume(a).size == 2 * SIZE
        assert store.volume(a).expanding is None
        names = {v.name for v in store.volumes()}
        assert names == ({a} if grown else {a, b})
        assert on_disk(site) <= names
        outcome["expand" if grown else "create"] += 1
        empty(site, sorted(names))
    print(f"{ROUNDS} rounds of create against expand for the last room: won {outcome}")


@pytest.mark.parametrize("site", ["etcd"], indirect=True)   # a cluster's only
def test_replacement_and_planned_move_race_a_create(site: Site) -> None:
    """The leader's replacement of a replica (manager/leader.py `move`) and a create race
    for the last room of a disk: one gets it, the other a clear ENOSPC. A move planned
    earlier (a drain plans every move first) whose room a create took since is refused,
    nothing moved (`start_move`)."""
    from blockhorn.manager.leader import move, plan, start_move
    (n0, d0), (n1, d1) = sorted(site.disks)
    store, leader = site.stores[0], site.nodes[2]
    outcome = {"move": 0, "create": 0}
    for rnd in range(ROUNDS // 2):
        for n in site.nodes:
            n.beat()
        # x's replica on n0 (a node the leader replaces it from: to n1, the only other
        # disk), whose disk then takes nothing more: n1's room is the contested one.
        store.update_disk(n0, d0, schedulable=True)
        store.update_disk(n1, d1, schedulable=False)
        x, b = f"x{rnd}", f"b{rnd}"
        site.vms[0].create(x, SIZE, 1)
        store.update_disk(n1, d1, schedulable=True)
        store.update_disk(n0, d0, schedulable=False)
        site.vms[1].create(f"half{rnd}", SIZE, 1)   # n1 keeps room for one
        vol, reps = store.volume(x), store.replicas(x)
        errors = race([lambda vol=vol, reps=reps: move(leader, vol, reps[0], reps),
                       lambda vm=site.vms[2], b=b: vm.create(b, SIZE, 1)])
        for e in errors:
            if e is not None:
                assert isinstance(e, BlockhornError) and e.errno == errno.ENOSPC, repr(e)
        assert errors.count(None) == 1, f"round {rnd}: {errors}"
        assert all(p <= site.disks[d] for d, p in promised(site).items()), promised(site)
        moved = store.replicas(x)[0].node == n1
        assert moved == (errors[0] is None)
        outcome["move" if moved else "create"] += 1
        if moved:   # what n0's daemon does with the leftover record (manager/leftovers.py)
            shutil.rmtree(os.path.join(d0, "replicas", x))
        empty(site, sorted(v.name for v in store.volumes()))
    # A planned move whose room went meanwhile.
    store.update_disk(n0, d0, schedulable=True)
    store.update_disk(n1, d1, schedulable=False)
    site.vms[0].create("y", SIZE, 1)
    store.update_disk(n1, d1, schedulable=True)
    store.update_disk(n0, d0, schedulable=False)
    vol, reps = store.volume("y"), store.replicas("y")
    p = plan(leader, vol, reps[0], reps)
    site.vms[1].create("c1", SIZE, 1)
    site.vms[1].create("c2", SIZE, 1)   # n1 is full now
    with pytest.raises(BlockhornError, match="no room") as e:
        start_move(leader, vol, reps[0], p)
    assert e.value.errno == errno.ENOSPC
    assert store.replicas("y")[0].moving is None and store.ports("y").keys() == {"y-r0"}
    print(f"{ROUNDS // 2} rounds of a replacement against a create for the last room: "
          f"won {outcome}")
