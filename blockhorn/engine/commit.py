"""The engine's commits of its in-sync set (docs/DURABILITY.md, "Generations" and "The commit
quorum"): the record first, then every member that stays, then joining replicas, each attempt
at a generation of its own; in quorum mode a set smaller than a majority of the replicas is
not committed at all, and nothing is acknowledged until one is (Engine.commit_if_needed)."""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING

from blockhorn.engine import generation
from blockhorn.engine.client import Call
from blockhorn.engine.ping import MAINT_TICK_S, expire_pings
from blockhorn.replica.proto import Op
from blockhorn.replica.proto import encode_json as proto_json
from blockhorn.types import BlockhornError, ReplicaMode, ReplicaUnavailable

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine, ReplicaState

log = logging.getLogger("blockhorn.engine")


class NoQuorum(ReplicaUnavailable):
    """Quorum mode: the in-sync set is not a majority of the volume's replicas (EIO)."""


def quorum_reason(eng: Engine, in_sync: int) -> str:
    return (f"volume {eng.cfg.volume}: {in_sync} of {len(eng.voters)} replicas in "
            f"sync, a majority ({eng.majority}) is needed: writes fail until a resync "
            "brings one back")


def commit_changes(eng: Engine) -> None:
    """Engine.commit_if_needed's work (its docstring)."""
    while eng._set_changed():
        with eng.commit_lock:
            if not eng._set_changed():
                return
            with eng.state_lock:
                members = [r for r in eng.replicas.values()
                           if r.mode == ReplicaMode.RW and r.client]
                names = frozenset(r.ref.name for r in members)
                joining = {n for n in eng._joining if n in names}
                wanted = (eng._rw_set, frozenset(eng._joining))
            short = [v for v in eng.prior_voters if not eng._started
                     and len(names & v) < generation.majority(len(v))]
            if (eng.cfg.quorum and len(names) < eng.majority) or short:
                # Not written at all: a commit of a minority would complete nothing, and
                # one left on replicas at the same generation as another engine's later
                # commit could leave no replica named by both (generation.newest_set).
                # Who left stays named by the last commit; they hold every acknowledged
                # write, since nothing is acknowledged from now until a majority is back.
                # The first commit after a change of the replicas also needs a majority of
                # the voters before it (generation.prior_voters).
                eng._unwritten = wanted
                log_quorum(eng, len(names), short)
                return
            if len(names) < eng.cfg.min_rw:
                raise ReplicaUnavailable(f"volume {eng.cfg.volume} is faulted: fewer than "
                                         f"{eng.cfg.min_rw} RW replicas")
            gen = max(eng.generation, eng._attempted) + 1
            eng._attempted = gen
            if eng.cfg.record:
                try:
                    generation.save_record(eng.cfg.record, gen, sorted(names),
                                           eng.cfg.epoch)
                except OSError as e:
                    raise BlockhornError(f"cannot write the generation record "
                                         f"{eng.cfg.record}: {e}", e.errno or errno.EIO
                                         ) from None
            stay = [r for r in members if r.ref.name not in joining]
            join = [r for r in members if r.ref.name in joining]
            failed = set_generation(eng, stay, gen, sorted(names), False)
            if not failed:
                failed = set_generation(eng, join, gen, sorted(names), True)
            if failed:
                continue      # the failed ones are ERR now: commit the smaller set
            if eng._adopt_pending in names:
                # The suspect source of a start that had no majority: adopted now that a
                # commit naming it and the replicas resynced from it is written, before any
                # write can reach it (writes wait for `_committed`).
                src = eng.replicas[eng._adopt_pending]
                try:
                    if src.client is None:
                        raise BlockhornError("not connected", errno.ENOTCONN)
                    src.stat = src.client.control({"op": "adopt"}, timeout=eng.cfg.timeout_s)
                except BlockhornError as e:
                    eng.set_error(src, f"adopt failed: {e}")
                    continue
            eng._adopt_pending = ""     # adopted, or it left: the others were resynced
            eng.generation = gen
            eng._committed = names
            with eng.state_lock:
                # A joiner that failed before its join commit is no longer joining (its
                # next resync adds it again): left here, it would keep a commit pending
                # forever, and every pass would commit another generation.
                eng._joining = {n for n in eng._joining - joining
                                if eng.replicas[n].mode == ReplicaMode.RW}
            eng._started = True
            eng._unwritten = None
            log.info("volume %s: generation %d, in sync: %s", eng.cfg.volume, gen,
                     sorted(names))
            log_quorum(eng, len(names))


def log_quorum(eng: Engine, in_sync: int, short: list[frozenset[str]] | None = None) -> None:
    """Log when writes stop for want of a majority, and when they resume (once each).
    `short`: earlier voter sets the first commit lacks a majority of."""
    if not eng.cfg.quorum and not short and not eng._quorum_note:
        return
    note = quorum_reason(eng, in_sync) if eng.cfg.quorum and in_sync < eng.majority else ""
    if short and not note:
        note = (f"volume {eng.cfg.volume}: the replicas or the commit quorum changed since "
                "the last quorum commit; the first commit needs a majority of its replicas "
                "too ("
                + "; ".join(f"{len(eng._rw_set & v)} of {', '.join(sorted(v))}"
                            for v in short)
                + "): writes fail until a resync brings one back")
    if note != eng._quorum_note:
        if note:
            log.error("%s", note)
        elif eng._quorum_note:
            log.warning("volume %s: %d of %d replicas in sync again: writes resume",
                        eng.cfg.volume, in_sync, len(eng.voters))
        eng._quorum_note = note


def set_generation(eng: Engine, targets: list[ReplicaState], gen: int, members: list[str],
                   clear_rebuilding: bool) -> bool:
    """Send set_generation to `targets` at once; set the ones that fail ERR. True when
    any failed."""
    # Voters only in quorum mode: a replica carrying them claims its commit held a
    # majority of them (generation.choose trusts that when members are missing).
    req = {"op": "set_generation", "generation": gen, "members": members,
           "voters": eng.voters if eng.cfg.quorum else [],
           "clear_rebuilding": clear_rebuilding, "start": not eng._started}
    body = proto_json(req)
    call = Call(len(targets))
    sent = [(r, r.client) for r in targets]
    for _, client in sent:
        client.submit(call, Op.CONTROL, data=body)  # type: ignore[union-attr]
    deadline = time.monotonic() + eng.cfg.timeout_s
    while targets and not call.wait(
            min(MAINT_TICK_S, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            break
        # A member whose ping was already unanswered for the timeout goes ERR now (its
        # connection closes, failing its part of this call) instead of getting a full
        # timeout of its own: two replicas silent at once stall writes one timeout.
        expire_pings(eng)
    failed = False
    for r, client in sent:
        status = call.results.get(r.ref.name, errno.ETIMEDOUT)
        if status:
            failed = True
            eng.set_error(r, f"generation {gen} not recorded: {os.strerror(status)}", client)
    return failed
