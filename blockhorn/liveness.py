"""A cluster node's liveness: its lease's timing, and the beat file through which the node's
processes learn, without asking the store, when the lease was last renewed.

The node daemon renews its lease every HEARTBEAT_S (manager/nodes.py). After each successful
renewal it records when that renewal *began* (CLOCK_MONOTONIC: one clock for every process of
the host, unaffected by wall-clock steps) in `<home>/node.beat`. Whoever must stop serving
before the lease can expire reads it and acts once the last renewal is SELF_FENCE_AFTER_S
old: the daemon's watchdog, its dead man's switch (node/fence.py) and each share manager
(sharemgr/server.py, which stops Ganesha and drops the service address even when the daemon
and its switch are both gone). A single host (SQLite) has no lease and no beat file.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("blockhorn.manager")

# Seconds: a node silent this long is down (its etcd lease's TTL). BLOCKHORN_NODE_TTL_S
# shortens it for tests and demos on one machine, where no network hiccup needs riding out.
NODE_DOWN_AFTER_S = max(3, int(os.environ.get("BLOCKHORN_NODE_TTL_S", "15")))


def heartbeat_s(ttl_s: float) -> float:
    """Seconds between a node's lease renewals for a lease of `ttl_s` seconds."""
    return min(5.0, ttl_s / 3)


def self_fence_after(ttl_s: float) -> float:
    """Seconds without a successful renewal after which a node with a lease of `ttl_s`
    seconds stops its engines and shares: before its lease can expire (the lease runs from
    the renewal's arrival, after the moment the beat records), so before the leader can see
    it down and move its volumes; a margin for the kill itself, and at least two missed
    beats."""
    return ttl_s - min(1.0, heartbeat_s(ttl_s) / 4)


HEARTBEAT_S = heartbeat_s(NODE_DOWN_AFTER_S)        # seconds between this node's renewals
SELF_FENCE_AFTER_S = self_fence_after(NODE_DOWN_AFTER_S)

BEAT_FILE = "node.beat"   # in the home: CLOCK_MONOTONIC seconds of the last lease renewal


def beat_path(home_root: str) -> str:
    return os.path.join(home_root, BEAT_FILE)


def record_beat(path: str, began: float) -> None:
    """After a lease renewal that began at `began` (time.monotonic()). Overwritten in place,
    fixed width, not fsynced: the file matters only while this host runs, and an overwrite
    of its one block needs no free space. A failure is logged, not raised: the renewal did
    happen (its readers may then stop early, which is safe)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{began:20.3f}\n".encode(), 0)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("recording the lease renewal in %s: %s", path, e)


def last_beat(path: str) -> float:
    """When the last recorded renewal began (time.monotonic()); 0.0 when none is readable,
    which every reader takes as long overdue."""
    try:
        with open(path) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def overdue_in(path: str, after_s: float = SELF_FENCE_AFTER_S) -> float:
    """Seconds until the last renewal recorded in `path` is `after_s` old; <= 0: it is."""
    return last_beat(path) + after_s - time.monotonic()
