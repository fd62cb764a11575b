"""The cluster leader's work: replacing replicas of nodes that died, and draining nodes.

One node daemon at a time leads (manager/nodes.py: the store's `try_lead`, on etcd a `leader`
key under the leader's liveness lease, so it passes to another node once the leader's lease
expires). Only the leader replaces replicas; `node drain` runs on whichever node is asked.

Replacing a replica (`move`, the leader's answer to a dead node, and a drain's of a replica
on a down node) is one store change: the replica keeps its name and gets a node, a disk
directory and an address (a port on the new node) chosen by the scheduler among the nodes
that hold no replica of the volume. The rest follows from each node reconciling its share:
- the new node's supervisor creates the directory (empty and `Rebuilding`: no engine start
  trusts it before its first resync, manager/across.py) and starts the replica process;
- the old node, if it is alive, stops its process of the replica (no longer its own);
- the engine's node sees the engine's path for the replica differ from the store's and, once
  the engine holds the old one ERR, tells it `replace_replica`: the engine rebuilds the new
  replica from a current one (engine/rebuild.py) — after its own resync attempt of the old one
  ends, when one is running (Engine.replace_replica).
Its old directory is a leftover of the old node (removed once that node sees the record).

A drain must not run a volume short (the old replica is alive, unlike a dead node's; it may
hold the only current copy), so it *moves* the replica instead — a detached volume's inside a
maintenance attach on the node asked (manager/maintenance.py) (`start_move`, docs/DURABILITY.md "Moving a
replica"): the store row keeps pointing at the old replica and gets a `moving` target; the
target node's supervisor creates the directory there (empty, `Rebuilding`) and runs a second
process of the replica in it; the engine's node asks the engine to `migrate_replica`, which
rebuilds the target beside the old one and swaps it in while the replica stays RW; seeing the
swap in the engine's status, the engine's node calls `finish_move` (the row points at the new
directory, the old one becomes a leftover); then the old node stops the old process and
removes its directory. The volume stays healthy throughout. A move whose target's node died
is not given up here: only the engine's node knows whether the engine swapped the target in
(then it may hold the only current copy), so the leader asks (`_give_up_moves`) and the
engine's node cancels or finishes the move (manager/moves.py).

A replica of a down node is moved once its node has been down (as this leader saw it, or the
replica's failed_since if earlier) longer than `replica-replenishment-wait-interval`; only for
attached volumes whose engine's node is up and whose engine has started since the volume was
attached there (robustness reported), since the rebuild needs an engine — and a replica the
generation rule still asks for must not be swapped for an empty one of the same name
(docs/DURABILITY.md, "A volume attached on a node that died"). Its old directory stays on the
dead node's disk. An RWO volume whose engine's node is down is attached on a live node after
the same wait, an RWX volume (its NFS share, with the service address and the clients'
recovery records) as soon as the node is down (`_move_engine`). Whether the moved volume
starts is the generation rule's: with the commit quorum (3 or more replicas) it starts from
any majority at the newest generation even when the dead node held a member, and that
engine's start (robustness reported) is what lets the dead node's replica be replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from blockhorn.control.scheduler import Placement, Unschedulable, place, room_left, schedule
from blockhorn.control.store import MoveTarget, ReplicaRow, VolumeRow, guarded, move_port_owner
from blockhorn.manager.across import ATTACHING
from blockhorn.manager.nodes import NodeService
from blockhorn.manager.replenish import disk_of
from blockhorn.manager.settings import REPLENISHMENT_WAIT, Settings
from blockhorn.types import BlockhornError, NotFound, format_size

if TYPE_CHECKING:
    from blockhorn.manager.volumes import VolumeManager

log = logging.getLogger("blockhorn.manager")

RETRY_S = 10.0          # seconds between attempts to place a replacement that did not fit
DRAIN_WAIT_S = 300.0    # seconds one replica's move (its rebuild) may take during a drain
DRAIN_POLL_S = 0.2      # seconds between two looks at a move in progress


class Leader:
    def __init__(self, nodes: NodeService) -> None:
        self.nodes = nodes
        self.store = nodes.store
        self._next: dict[str, float] = {}   # replica -> monotonic time of the next attempt
        self._down_since: dict[str, float] = {}   # replica -> when this leader saw its node down

    def tick(self) -> None:
        """Replace the replicas of down nodes whose wait is over (only while leading)."""
        if not self.nodes.is_leader:
            return
        live = self.nodes.up_nodes()
        wait = Settings(self.store).get_int(REPLENISHMENT_WAIT)
        now = time.time()
        for vol in self.store.volumes():
            if vol.desired != "attached" or (vol.node or self.nodes.name) in live:
                self._down_since.pop(f"engine/{vol.name}", None)   # a later death waits anew
            reps: list[ReplicaRow] | None = None
            if vol.desired == "attached":
                reps = self.store.replicas(vol.name)
                self._give_up_moves(vol, reps, live)
            if vol.desired == "attached" and (vol.node or self.nodes.name) not in live:
                self._move_engine(vol, live, wait, now)
                continue   # a rebuild needs a running engine: once it runs elsewhere
            if vol.robustness not in ("healthy", "degraded") \
                    or (vol.message or "").startswith(ATTACHING):
                # No engine has passed its start (the generation rule) since this attachment
                # (claim_attachment clears robustness): a dead node's replica may be a member
                # of the newest in-sync set that the rule is waiting for. Moved now, it would
                # answer under its name, empty, and the rule would stop asking for the old one.
                continue
            if reps is None:
                reps = self.store.replicas(vol.name)
            for r in reps:
                if r.node is None or r.node in live:
                    self._down_since.pop(r.name, None)
                    continue
                if r.name not in self._down_since:
                    log.warning("replica %s of %s: its node %s is down", r.name, vol.name, r.node)
                    self._down_since[r.name] = now
                    self.store.set_replica_failed_since(r.name, now)   # for `volume show`
                # The engine's node clears failed_since while the engine still holds the
                # replica RW (until its timeout): the wait counts from the node's death.
                since = min(self._down_since[r.name], r.failed_since or now)
                if now - since < wait or time.monotonic() < self._next.get(r.name, 0):
                    continue
                try:
                    p = move(self.nodes, vol, r, reps)
                except (BlockhornError, OSError) as e:
                    self._next[r.name] = time.monotonic() + RETRY_S
                    log.error("replica %s of %s cannot be replaced: %s", r.name, vol.name, e)
                    self.store.update_volume(vol.name, message=f"replica {r.name} on down node "
                                             f"{r.node} cannot be replaced: {e}")
                    continue
                self._next.pop(r.name, None)
                self._down_since.pop(r.name, None)
                self.store.update_volume(vol.name, message=(
                    f"replica {r.name}: node {r.node} down for {now - since:.0f} s; "
                    f"replaced on {p.node} ({p.disk})"))


    def _give_up_moves(self, vol: VolumeRow, reps: list[ReplicaRow], live: set[str]) -> None:
        """A move whose target's node is down is to be given up — but not by the leader: the
        engine may have swapped the target in already (it may then hold the only current
        copy: the other replicas failed after the swap), and only the engine's node can tell
        (its engine's status). So the leader only asks (`give_up_move`); the engine's node
        cancels the move when it certainly did not swap, else finishes it (manager/moves.py,
        docs/DURABILITY.md "Moving a replica"). Whatever the volume's robustness reads."""
        for r in reps:
            m = r.moving
            if m is not None and m.give_up is None and m.node not in live:
                log.warning("replica %s of %s: its move target's node %s is down: asking "
                            "for the move to be given up", r.name, vol.name, m.node)
                self.store.give_up_move(r.name, "the node is down")

    def _move_engine(self, vol: VolumeRow, live: set[str], wait: int, now: float) -> None:
        """A volume whose engine's node is down is attached on a live node instead
        (manager/across.py `move_attachment`: a new attach epoch fences the old engine):
        an RWO volume once the node has been down longer than the replenishment wait, an
        RWX volume's share at once — its NFS clients are waiting, and the move is safe as
        soon as the node's lease is gone: the node fenced itself (engines, Ganesha, service
        address) before its lease could expire (manager/nodes.py), and the replicas refuse
        its epoch once the new engine connected (docs/DURABILITY.md, "An RWX share on a node
        that died"). Whether the new engine may start is the generation rule's decision:
        without the commit quorum refused, with the replicas it misses, while a member of
        the newest in-sync set is on the dead node; with it, a majority suffices."""
        key = f"engine/{vol.name}"
        if vol.node is None:
            return
        if vol.access_mode == "rwx":
            wait = 0
        if key not in self._down_since:
            log.warning("volume %s: its engine's node %s is down", vol.name, vol.node)
            self._down_since[key] = now
        since = self._down_since[key]
        if now - since < wait or time.monotonic() < self._next.get(key, 0):
            return
        to = engine_target(self.nodes, vol, live)
        if to is None:
            self._next[key] = time.monotonic() + RETRY_S
            self.store.update_volume(vol.name, message=f"its engine's node {vol.node} is "
                                     "down and no live schedulable node can take it over")
            return
        from blockhorn.manager.across import move_attachment
        try:
            move_attachment(self.store, vol, to, f"node down for {now - since:.0f} s")
        except (BlockhornError, OSError) as e:
            self._next[key] = time.monotonic() + RETRY_S
            log.error("volume %s cannot be moved to %s: %s", vol.name, to, e)
            return
        self._down_since.pop(key, None)
        self._next.pop(key, None)


def engine_target(nodes: NodeService, vol: VolumeRow, live: set[str]) -> str | None:
    """A live, schedulable node for a volume's engine: one holding a replica of it first
    (data locality), the fewest engines next, then by name (deterministic)."""
    rows = {n.name: n for n in nodes.store.nodes()}
    cands = [n for n in sorted(live) if n in rows and rows[n].schedulable and n != vol.node]
    if not cands:
        return None
    holders = {r.node for r in nodes.store.replicas(vol.name)}
    engines: dict[str, int] = {}
    for v in nodes.store.volumes():
        if v.desired == "attached" and v.node:
            engines[v.node] = engines.get(v.node, 0) + 1
    return min(cands, key=lambda n: (n not in holders, engines.get(n, 0), n))


def plan(nodes: NodeService, vol: VolumeRow, r: ReplicaRow, reps: list[ReplicaRow],
         done: list[tuple[Placement, int]] | None = None) -> Placement:
    """Where replica `r` of `vol` could go: a node holding no other replica of the volume
    (nor `r`'s own) and carrying the volume's selector tags, by the scheduler's rules. `done`: placements planned before (a drain
    plans all of its moves before making any), counted as scheduled."""
    avoid = frozenset({x.node or nodes.name for x in reps} | {r.node or nodes.name})
    cands = nodes.nodes_for_scheduling(exclude=avoid)
    for p, size in done or []:
        cands = place(cands, [p], size)
    try:
        (p,) = schedule(vol.size, 1, cands, nodes.policy(), vol.node_selector,
                        vol.disk_selector)   # the volume's selectors hold for replacements too
    except Unschedulable as e:
        raise Unschedulable(f"no node for a replacement of {r.name} (the volume's replicas are "
                            f"on {', '.join(sorted(avoid))}): {e}") from None
    return p


def check_room(nodes: NodeService, vol: VolumeRow, r: ReplicaRow, p: Placement) -> None:
    """Placement `p`, planned for replica `r` earlier (a drain plans every move first), has
    room for it on what the store says now: Unschedulable when another create, expand or
    move took the room meanwhile. A disk `r`'s own move holds already is fine."""
    if r.moving is not None and (r.moving.node, disk_of(r.moving.directory)) == (p.node, p.disk):
        return
    size = nodes.store.volume(vol.name).promised
    for n in nodes.nodes_for_scheduling():
        for d in n.disks if n.name == p.node else ():
            if d.path == p.disk and room_left(d, nodes.policy(), size) is not None:
                return
    raise Unschedulable(f"replica {r.name} of {vol.name} was planned on disk {p.disk} of node "
                        f"{p.node}, which has no room for {format_size(size)} any more "
                        "(another create, expand or move took it meanwhile): nothing was "
                        "moved; plan again")


def move(nodes: NodeService, vol: VolumeRow, r: ReplicaRow, reps: list[ReplicaRow],
         to: Placement | None = None) -> Placement:
    """Point replica `r` at a new node and directory (module docstring); returns where. The
    room is checked and promised in one step (control/store/base.py `guarded`): placed
    again (`to` None) or refused (`to`, a planned one) when the room went meanwhile."""
    ports: list[int] = []

    def decide() -> Placement:
        if to is None:
            return plan(nodes, vol, r, reps)
        check_room(nodes, vol, r, to)
        return to

    def commit(p: Placement, mark: int) -> tuple[Placement, str, str]:
        if not ports:   # once: the replica's port record changes with the allocation
            ports.append(nodes.store.allocate_port(vol.name, r.name, lambda _port: True))
        directory = os.path.join(p.disk, "replicas", vol.name, r.name)
        address = f"{nodes.address_of(p.node)}:{ports[0]}"
        nodes.store.move_replica(r.name, p.node, directory, address, guard=mark)
        return p, directory, address

    p, directory, address = guarded(nodes.store, decide, commit, f"move replica {r.name}")
    log.warning("replica %s of %s moved from node %s to %s (%s, %s)", r.name, vol.name, r.node,
                p.node, directory, address)
    return p


def start_move(nodes: NodeService, vol: VolumeRow, r: ReplicaRow, p: Placement) -> MoveTarget:
    """Begin moving replica `r` of attached `vol` to placement `p` (module docstring): the
    target's port is held under the move's own owner until `finish_move`. The room on `p`
    is checked again and promised in one step (Unschedulable when it went meanwhile)."""
    directory = os.path.join(p.disk, "replicas", vol.name, r.name)
    ports: list[int] = []

    def commit(_: None, mark: int) -> str:
        if not ports:
            ports.append(nodes.store.allocate_port(vol.name, move_port_owner(r.name),
                                                   lambda _port: True))
        address = f"{nodes.address_of(p.node)}:{ports[0]}"
        nodes.store.start_move(r.name, p.node, directory, address, guard=mark)
        return address

    address = guarded(nodes.store, lambda: check_room(nodes, vol, r, p), commit,
                      f"move replica {r.name}")
    log.warning("replica %s of %s: moving from node %s to %s (%s, %s)", r.name, vol.name,
                r.node, p.node, directory, address)
    return MoveTarget(p.node, directory, address)


def drain(nodes: NodeService, node: str, volumes: VolumeManager | None = None
          ) -> dict[str, object]:
    """Move every replica off `node`: plan every move first (refused, nothing changed, when
    one has no room), mark the node unschedulable, then move one replica at a time, each
    copied before the old one is dropped: a replica of an attached volume is rebuilt on its
    new node by the volume's engine (`start_move`) and the drain waits for that
    (`_wait_moved`) before the next; a detached volume is attached on this node for the
    length of its moves (a maintenance attach: `volumes`, manager/maintenance.py) and moved
    the same way. (Moved at once without its data, as it once was, the replica could hold
    the only current copy: docs/DURABILITY.md, "Moving a replica".) A replica already moving
    (a drain that failed and is asked again) keeps its target."""
    store = nodes.store
    store.node(node)   # NotFound
    todo = [(v, r, store.replicas(v.name)) for v in store.volumes()
            for r in store.replicas(v.name) if (r.node or nodes.name) == node]
    planned: list[tuple[Placement, int]] = []   # new placements, counted by the next plans
    where: list[MoveTarget | Placement] = []
    for v, r, reps in todo:
        if r.moving is not None and r.moving.give_up is None:
            where.append(r.moving)
            continue
        try:
            p = plan(nodes, v, r, reps, planned)
        except Unschedulable as e:
            raise Unschedulable(f"cannot drain node {node}: {e}") from None
        planned.append((p, v.size))
        where.append(p)
    store.update_node(node, schedulable=False)
    moved = []
    for (v, r, _), to in zip(todo, where, strict=True):
        v = store.volume(v.name)
        if v.desired == "attached":
            done = _move_one(nodes, v, r, to, node, None)
        elif volumes is None:
            raise BlockhornError(f"volume {v.name} is detached: a drain of it needs the "
                                 "node's volume manager", errno.EINVAL)
        else:
            from blockhorn.manager import maintenance
            with maintenance.attached_here(volumes, v.name, f"drain of node {node}",
                                           supervised=True):
                done = _move_one(nodes, store.volume(v.name), r, to, node,
                                 store.engine(v.name).control_socket)
        if done:   # (after the maintenance attach: its detach clears the message)
            store.update_volume(v.name, message=done)
        row = next((x for x in store.replicas(v.name) if x.name == r.name), None)
        if row is not None:   # where it is now (planned again if its room went meanwhile)
            moved.append({"replica": r.name, "volume": v.name, "node": row.node,
                          "disk": disk_of(row.directory) or "", "message": done})
    log.info("node %s drained: %d replicas moved", node, len(moved))
    return {"node": node, "moved": moved}


def _move_one(nodes: NodeService, v: VolumeRow, r: ReplicaRow, to: MoveTarget | Placement,
              node: str, engine_here: str | None) -> str | None:
    """Move replica `r` of attached volume `v` (attached for the drain only when
    `engine_here`, its engine's control socket on this node, is given) to `to`: a
    placement, or the target of its move begun before. On a live node the replica is
    rebuilt at `to` beside the old one, which stays in the volume until the swap
    (`start_move`); on a down node there is nothing to copy from: it is replaced as the
    leader replaces a dead node's replica, from the replicas the running engine started
    from. Returns the volume's message on what was done."""
    store = nodes.store
    t0 = time.monotonic()
    if node not in nodes.up_nodes():
        if isinstance(to, MoveTarget):
            raise BlockhornError(
                f"replica {r.name} of {v.name} was being moved to node {to.node} and its node "
                f"{node} is down: the leader replaces it after the replenishment wait",
                errno.EAGAIN)
        p = _replace_down(nodes, v, r, to, node, engine_here)
        return (f"replica {r.name}: its node {node} is down; replaced on {p.node} in "
                f"{time.monotonic() - t0:.0f} s (drain)")
    target = to if isinstance(to, MoveTarget) else _start_planned(nodes, v, r, to)
    store.update_volume(v.name, message=f"replica {r.name} moving to node {target.node} "
                        "(drain)")
    if not _wait_moved(nodes, v, r, target):
        return None
    # Its node may have died after the engine's swap: the move was finished all the same
    # (the target may hold the only current copy: manager/moves.py).
    down = ("" if target.node in nodes.up_nodes() else
            f"; node {target.node} is down (it died after the engine's swap): the replica "
            "is that node's, rebuilt or replaced as any of a down node")
    return (f"replica {r.name} moved from node {node} to {target.node} in "
            f"{time.monotonic() - t0:.0f} s (drain)" + down)


def _start_planned(nodes: NodeService, v: VolumeRow, r: ReplicaRow, p: Placement
                   ) -> MoveTarget:
    """`start_move` to planned `p`, planned again once when a create, expand or move took
    its room since the drain planned it (Unschedulable when there is none left)."""
    try:
        return start_move(nodes, v, r, p)
    except Unschedulable:
        return start_move(nodes, v, r, plan(nodes, v, r, nodes.store.replicas(v.name)))


def _replace_down(nodes: NodeService, v: VolumeRow, r: ReplicaRow, p: Placement, node: str,
                  engine_here: str | None) -> Placement:
    """Replica `r` of `v` is on down node `node`: point it at `p` (`move`), once an engine
    of `v` started without it — the generation rule then found the data current elsewhere
    (a replica it still waits for must not be swapped for an empty one of the same name:
    the module docstring). For a volume attached for the drain only, wait until its engine
    rebuilt the new replica (RW at the new directory), so that it is detached whole."""
    if engine_here is None and (v.robustness not in ("healthy", "degraded")
                                or (v.message or "").startswith(ATTACHING)):
        raise BlockhornError(f"replica {r.name} of {v.name} is on down node {node} and no "
                             f"engine of {v.name} has started since its attach (it may wait "
                             "for that replica): drain again once it runs", errno.EAGAIN)
    reps = nodes.store.replicas(v.name)
    try:
        move(nodes, v, r, reps, p)
    except Unschedulable:   # its room went since the drain planned it: placed again
        p = move(nodes, v, r, reps)
    if engine_here is None:
        return p    # the engine's node has the engine rebuild it (supervisor)
    from blockhorn.manager.volumes import engine_status
    directory = os.path.join(p.disk, "replicas", v.name, r.name)
    start = time.monotonic()
    while True:
        replicas = engine_status(engine_here).get("replicas", [])
        st: dict[str, Any] = next((x for x in replicas if x.get("name") == r.name), {})
        if st.get("path") == directory and st.get("mode") == "RW":
            return p
        if time.monotonic() - start > DRAIN_WAIT_S:
            raise BlockhornError(f"replica {r.name} of {v.name} was not rebuilt on node "
                                 f"{p.node} within {DRAIN_WAIT_S:.0f} s (it is that node's "
                                 "now, rebuilt at the next attach)", errno.ETIMEDOUT)
        time.sleep(DRAIN_POLL_S)


def _wait_moved(nodes: NodeService, vol: VolumeRow, r: ReplicaRow, target: MoveTarget) -> bool:
    """Wait until the engine's node finished the move of `r` (the row points at the target).
    A volume removed meanwhile: nothing to wait for (False); one detached meanwhile fails
    the drain, the move left to its next attach (a detached volume's replica is never moved
    without its data). A move given up (its target's node died: asked by the leader,
    carried out by the engine's node once the engine certainly did not swap) fails the
    drain with the reason; one finished on the target's node although that node died (the
    engine had swapped it in) is a move done. One that did not finish within DRAIN_WAIT_S
    is asked to be given up here and fails the drain."""
    store = nodes.store
    start = time.monotonic()
    while True:
        try:
            v = store.volume(vol.name)
            row = next((x for x in store.replicas(vol.name) if x.name == r.name), None)
        except NotFound:
            return False
        if row is None:
            return False
        if row.moving is None:
            if (row.node, row.directory) == (target.node, target.directory):
                return True
            why = (f"node {target.node} is down" if target.node not in nodes.up_nodes()
                   else "given up elsewhere")
            raise BlockhornError(f"the move of replica {r.name} of {vol.name} to node "
                                 f"{target.node} was given up ({why}); the replica stays on "
                                 f"{row.node or nodes.name}: see `blockhorn volume show "
                                 f"{vol.name}`; drain again", errno.EIO)
        if v.desired != "attached":
            raise BlockhornError(f"volume {vol.name} was detached while its replica {r.name} "
                                 f"was moving to node {target.node}: the move goes on when it "
                                 "is attached; drain again to finish it now", errno.EAGAIN)
        if time.monotonic() - start > DRAIN_WAIT_S:
            # Asked, not done: the engine may have swapped the target in (Leader._give_up_moves).
            store.give_up_move(r.name, f"not moved within {DRAIN_WAIT_S:.0f} s")
            raise BlockhornError(f"replica {r.name} of {vol.name} was not moved to node "
                                 f"{target.node} within {DRAIN_WAIT_S:.0f} s: the move is being "
                                 f"given up (see `blockhorn volume show {vol.name}`)",
                                 errno.ETIMEDOUT)
        time.sleep(DRAIN_POLL_S)
