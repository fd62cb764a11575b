"""Rebuild limits of one node: a bandwidth cap per rebuild and a cap on rebuilds at once.

The daemon writes the node's limits file (`<home>/rebuild-limits.json`, from the settings
`replica-rebuilding-bandwidth-limit` and `concurrent-replica-rebuild-per-node-limit`) whenever
they change; every engine on the node names it in its config (`EngineConfig.rebuild_limits`)
and re-reads it at most once a second, so a change reaches running rebuilds. Rebuilds of all
engines of the node share slots: lock files beside it (`rebuild-slots/slot-K`), held with
`flock` for the length of a copy. The kernel drops the lock when an engine dies, so a killed
engine never leaks a slot. Without a limits file: unlimited, no slots.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from blockhorn.fsutil import atomic_write_json
from blockhorn.types import BlockhornError

MiB = 1 << 20
REREAD_S = 1.0               # how often a limits file is read again
SLOT_POLL_S = 0.2            # how often a queued rebuild tries the slots again
BURST_S = 0.25               # a rate limit lets this many seconds' worth through at once
DEFAULT_PER_NODE = 5         # Longhorn's default


class Limits:
    """The node's limits file, read lazily."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._read_at = -REREAD_S
        self._values: dict[str, Any] = {}

    def values(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.path and now - self._read_at >= REREAD_S:
            self._read_at = now
            try:
                with open(self.path) as f:
                    loaded = json.load(f)
                self._values = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._values = {}
        return self._values

    def bandwidth(self) -> float:
        """Bytes per second one rebuild may copy; 0 = unlimited."""
        value = self.values().get("bandwidth_mib_s", 0)
        return float(value) * MiB if isinstance(value, int | float) and value > 0 else 0.0

    def per_node(self) -> int | None:
        """Rebuilds at once on this node (0: none); None without a limits file."""
        if not self.path:
            return None
        value = self.values().get("per_node", DEFAULT_PER_NODE)
        return value if isinstance(value, int) and value >= 0 else DEFAULT_PER_NODE

    @contextlib.contextmanager
    def slot(self, stopping: Callable[[], bool], on_wait: Callable[[], None]) -> Iterator[None]:
        """Hold one of the node's rebuild slots (waiting, `on_wait` called once, until one is
        free or `stopping()`); no slot needed without a limits file."""
        if self.per_node() is None:
            yield
            return
        folder = os.path.join(os.path.dirname(os.path.abspath(self.path)), "rebuild-slots")
        os.makedirs(folder, exist_ok=True)
        waited = False
        while True:
            for k in range(self.per_node() or 0):
                fd = os.open(os.path.join(folder, f"slot-{k}"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                finally:
                    os.close(fd)     # releases the lock
                return
            if stopping():
                raise BlockhornError("stopping while waiting for a rebuild slot", errno.EINTR)
            if not waited:
                waited = True
                on_wait()
            time.sleep(SLOT_POLL_S)


def write_limits(path: str, bandwidth_mib_s: int, per_node: int) -> None:
    """The daemon's side: the node's limits, atomically."""
    atomic_write_json(path, {"bandwidth_mib_s": bandwidth_mib_s, "per_node": per_node})


class RateLimiter:
    """Paces one copy to the current bandwidth limit (token bucket, BURST_S deep)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.allowance = 0.0
        self.at = time.monotonic()

    def wait(self, n: int, stopping: Callable[[], bool]) -> None:
        rate = self.limits.bandwidth()
        now = time.monotonic()
        if not rate:
            self.at = now
            return
        self.allowance = min(rate * BURST_S, self.allowance + (now - self.at) * rate)
        self.at = now
        self.allowance -= n
        if self.allowance < 0:
            delay = -self.allowance / rate
            deadline = now + delay
            while not stopping() and time.monotonic() < deadline:
                time.sleep(min(0.1, deadline - time.monotonic()))
