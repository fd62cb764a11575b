"""A cluster node fencing itself: what runs on it for its volumes stops before another node
may take them over (docs/DURABILITY.md, "A volume attached on a node that died").

Fencing kills, found by the paths in their command lines and the share configs in the home
(never by the store, which may be out of reach): every share manager first (it would start
Ganesha again), then Ganesha (no NFS reply after this) and the engines (no write reaches a
replica after this); then it removes the shares' service addresses. Replicas run on: they are
fenced by epochs, and an engine elsewhere may need them.

Two callers:
- the daemon's watchdog (manager/nodes.py `on_lost`), when its lease renewals have failed for
  SELF_FENCE_AFTER_S: the node is cut off from the store;
- the dead man's switch, when the daemon itself is gone: `python -m blockhorn.manager.fence
  HOME`, started by a cluster daemon (`arm`) in a session of its own, its stdin a pipe whose
  only write end the daemon holds. After each lease renewal the daemon records when that
  renewal began (CLOCK_MONOTONIC, one clock for every process of the host) in
  `<home>/node.beat`. The helper fences when the last renewal is SELF_FENCE_AFTER_S old —
  the moment the daemon's own watchdog fences, before the lease can expire — which covers a
  daemon that died (EOF on the pipe: killed, crashed or stopped) and one frozen (SIGSTOP, a
  hung interpreter), whose watchdog cannot run. Once the daemon is gone, a renewal newer
  than its end makes the helper stand down instead: a daemon started again within the
  lease adopts the node's processes (and has its own switch).
A single host (SQLite) never fences: nothing else takes its volumes over.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time

from blockhorn.manager.paths import Home
from blockhorn.manager.process import spawn_switch
from blockhorn.sharemgr import control as shares

log = logging.getLogger("blockhorn.manager")

BEAT_FILE = "node.beat"   # in the home: CLOCK_MONOTONIC seconds of the last lease renewal
POLL_S = 0.25             # seconds between the helper's looks at the beat file


def volumes_in(home: Home) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(home.root, "volumes")))
    except FileNotFoundError:
        return []


def fence(home: Home, names: list[str], why: str) -> int:
    """SIGKILL the share managers, Ganesha and engines of volumes `names` in `home`, then
    remove their service addresses. Returns how many processes it killed."""
    managers: set[str] = set()
    rest: set[str] = set()
    for n in names:
        share_managers, ganeshas = shares.fence_marks(home, n)
        managers |= share_managers
        rest |= ganeshas | {home.engine_config(n), home.nbd_socket(n), home.control_socket(n)}
    killed = kill_marked(managers, why) + kill_marked(rest, why)
    for n in names:
        shares.drop_address(home, n)
    return killed


def self_fence(home: Home) -> int:
    """Fence every volume of this home (the node is cut off, or its daemon is gone)."""
    return fence(home, volumes_in(home), "self-fencing")


def kill_marked(marks: set[str], why: str) -> int:
    """SIGKILL every process with one of `marks` among its command-line arguments."""
    import psutil
    killed = 0
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and marks.intersection(p.info.get("cmdline") or []):
            try:
                p.kill()
                killed += 1
                log.error("%s: killed pid %d (%s)", why, p.pid,
                          " ".join((p.info.get("cmdline") or [])[:4]))
            except psutil.NoSuchProcess:
                pass   # exited meanwhile: what we wanted
    return killed


# --- the dead man's switch ---------------------------------------------------------------------

def record_beat(home: Home, began: float) -> None:
    """After a lease renewal that began at `began` (time.monotonic()). Overwritten in place,
    fixed width, not fsynced: the file matters only while this host runs, and an overwrite
    of its one block needs no free space. A failure is logged, not raised: the renewal did
    happen (the switch may then fence early, which is safe)."""
    try:
        fd = os.open(os.path.join(home.root, BEAT_FILE), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{began:20.3f}\n".encode(), 0)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("recording the lease renewal for the dead man's switch: %s", e)


def last_beat(home: Home) -> float:
    try:
        with open(os.path.join(home.root, BEAT_FILE)) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def arm(home: Home) -> tuple[subprocess.Popen[bytes], int]:
    """Start the dead man's switch for this daemon: (the helper, the pipe's write end, to be
    held open for the daemon's life)."""
    return spawn_switch([sys.executable, "-m", "blockhorn.manager.fence", home.root],
                        home.log("fence.log"))


def watch(home: Home, after_s: float) -> int:
    """The helper's life: fence once the last renewal is `after_s` old (the daemon is gone,
    or frozen: its own watchdog cannot run), again after each newer renewal that goes stale;
    exit once the daemon is gone and either it fenced or a renewal newer than the daemon's
    end shows another daemon running. Returns how many processes it killed in all."""
    import pyroute2  # noqa: F401  (imported now, so that removing addresses is quick later)
    gone: float | None = None   # when the daemon's pipe reached EOF
    fenced_for = -1.0           # the renewal whose staleness was acted on
    killed = 0
    while True:
        beat = last_beat(home)
        if gone is not None and beat > gone:
            log.info("the daemon is gone but another one renews the lease: standing down")
            return killed
        if time.monotonic() >= beat + after_s and beat != fenced_for:
            fenced_for = beat
            n = self_fence(home)
            killed += n
            log.error("no lease renewal for %.1f s (daemon %s): fenced, %d process(es) "
                      "killed", time.monotonic() - beat, "gone" if gone else "silent", n)
            if gone is not None:
                return killed
        ready, _, _ = select.select([0] if gone is None else [], [], [], POLL_S)
        if ready and not os.read(0, 4096):
            gone = time.monotonic()   # the daemon exited: killed, crashed or stopped


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m blockhorn.manager.fence HOME  (stdin: the daemon's pipe)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s fence[%(process)d]: %(message)s")
    from blockhorn.manager.nodes import SELF_FENCE_AFTER_S
    watch(Home.at(argv[0]), SELF_FENCE_AFTER_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
