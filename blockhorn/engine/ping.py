"""The engine's pings: a STAT to every live replica every PING_INTERVAL_S, each replica on its
own clock (it doubles as the ping and keeps `status()` current). A replica that leaves its
ping unanswered for `timeout_s` goes ERR. Not one replica after the other: a silent replica
would hold up the pings of the rest, and a second silent one would be noticed a timeout
later — and a generation commit waiting for it would give it a timeout of its own (two
replicas cut at once stalled writes two timeouts: docs/DURABILITY.md, "A link cut")."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from blockhorn import liveness
from blockhorn.engine.client import Call
from blockhorn.replica.proto import Op
from blockhorn.replica.proto import decode_json as proto_decode
from blockhorn.types import BlockhornError, ReplicaMode

if TYPE_CHECKING:
    from blockhorn.engine.engine import Engine

log = logging.getLogger("blockhorn.engine")

PING_INTERVAL_S = 2.0        # every live replica is pinged (STAT) this often to notice hangs
FENCED_EXIT_S = 2.0          # seconds a self-fenced engine fails requests before it exits
REBUILD_RETRY_S = 10.0       # an ERR replica is retried (reconnect + rebuild) this often
MAINT_TICK_S = 0.25          # how often outstanding pings are looked at (and a commit's wait)


def ping_replicas(eng: Engine) -> None:
    """Settle answered pings, expire silent ones, send the pings that are due (the
    maintenance thread, every MAINT_TICK_S)."""
    expire_pings(eng)
    now = time.monotonic()
    for r in list(eng.replicas.values()):
        ping = r.ping
        if ping is not None:
            sent_at, client, call, buf = ping
            status = call.results.get(r.ref.name)
            if status is None:
                continue                     # outstanding (`expire_pings` watches it)
            r.ping = None
            if status:
                eng.set_error(r, f"ping: {os.strerror(status)}", client)
                continue
            try:
                r.stat = proto_decode(buf)
            except BlockhornError as e:
                eng.set_error(r, f"ping: {e}", client)
                continue
            r.last_ping = sent_at
        client_now = r.client
        if r.mode == ReplicaMode.ERR or client_now is None \
                or now - r.last_ping < PING_INTERVAL_S:
            continue
        call, buf = Call(1), bytearray()
        r.ping = (now, client_now, call, buf)
        client_now.submit(call, Op.STAT, reply_buf=buf)


def expire_pings(eng: Engine) -> None:
    """Set ERR every replica whose ping has gone unanswered for `timeout_s` (from the
    maintenance thread, and from a commit waiting for its members). Closing its connection
    fails every call still waiting for it, the commit's too."""
    now = time.monotonic()
    for r in list(eng.replicas.values()):
        ping = r.ping
        if ping is not None and r.ref.name not in ping[2].results \
                and now - ping[0] >= eng.cfg.timeout_s:
            eng.set_error(r, f"ping: no answer within {eng.cfg.timeout_s:g} s", ping[1])


def fence_if_lease_lost(eng: Engine) -> None:
    """An engine on a cluster node (`beat_file` in its config; the maintenance thread, every
    MAINT_TICK_S): once the node's last lease renewal is `fence_after_s` old, the node's
    daemon and its dead man's switch kill this engine (node/fence.py), at that very moment.
    When both are gone (killed, with the host up), nobody would: the lease then expires, the
    leader attaches the volume elsewhere, and this engine, which the replicas refuse by epoch
    for anything they serve, could still answer reads from its local replica's files, which
    no longer change. So it fences itself: every request fails with EIO from then on (a
    share's Ganesha, killed by its share manager at the same deadline, is not left waiting on
    the device), and FENCED_EXIT_S later the process kills itself, as the fence would."""
    if eng.fenced:
        if time.monotonic() - eng.fenced_at >= FENCED_EXIT_S:
            for h in logging.getLogger().handlers + log.handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return
    due = liveness.overdue_in(eng.cfg.beat_file, eng.cfg.fence_after_s)
    if due > 0:
        return
    eng.fenced_at = time.monotonic()
    eng.fenced = (f"volume {eng.cfg.volume}: fenced: the node's lease was last renewed "
                  f"{eng.cfg.fence_after_s - due:.1f} s ago")
    log.critical("%s and nobody fenced this engine (its daemon and dead man's switch are gone, "
                 "or cut off): the volume may move to another node; every request fails from "
                 "now on, and the engine stops in %.0f s", eng.fenced, FENCED_EXIT_S)


def maintain(eng: Engine) -> None:
    """The engine's maintenance thread: ping live replicas; retry ERR ones (a restarted
    process, a healed network); on a cluster node, fence the engine when the node's lease
    may run out."""
    last_retry = last_chores = time.monotonic()
    while not eng._stop.wait(MAINT_TICK_S):
        if eng.cfg.beat_file:
            fence_if_lease_lost(eng)
        ping_replicas(eng)
        if time.monotonic() - last_chores < PING_INTERVAL_S:
            continue
        last_chores = time.monotonic()
        eng._close_retired()
        refresh_local(eng)
        # A replica lost while idle: record it before the next write needs to. Not while
        # another thread commits (its commit covers it): waiting here would stop the pings.
        if not eng.commit_lock.locked():
            try:
                eng.commit_if_needed(require_quorum=False)
            except BlockhornError as e:
                log.error("volume %s: commit failed: %s", eng.cfg.volume, e)
        if time.monotonic() - last_retry >= REBUILD_RETRY_S:
            last_retry = time.monotonic()
            for r in list(eng.replicas.values()):
                if r.mode == ReplicaMode.ERR and not r.resyncing:
                    eng.rebuild(r.ref.name)


def refresh_local(eng: Engine) -> None:
    """A purge changes a replica's chain behind the engine's back: when the chain the
    replica reports (STAT, every ping) differs from the files open here, reopen them — the
    old descriptors would keep folded-away files alive on disk."""
    for r in list(eng.replicas.values()):
        local = r.local
        if local is not None and r.mode == ReplicaMode.RW \
                and local.names != list(r.stat.get("chain") or []):
            with eng.state_lock:
                if r.local is local and r.mode == ReplicaMode.RW:
                    eng._open_local(r)
                    eng._update_readers()
