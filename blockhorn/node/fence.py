"""A cluster node fencing itself: what runs on it for its volumes stops before another node
may take them over (docs/DURABILITY.md, "A volume attached on a node that died").

Fencing kills, found by the paths in their command lines and the share configs in the home
(never by the store, which may be out of reach): every share manager first (it would start
Ganesha again), then Ganesha (no NFS reply after this), the engines (no write reaches a
replica after this) and the FUSE servers of their devices; then it removes the shares'
service addresses, and a process of its own (`python -m blockhorn.node.fence --release HOME
VOLUME...`, not waited for) releases the mounts and loop devices those volumes held here
(`release`). Replicas run on: they are fenced by epochs, and an engine elsewhere may need
them.

Two callers:
- the daemon's watchdog (manager/nodes.py `on_lost`), when its lease renewals have failed for
  SELF_FENCE_AFTER_S: the node is cut off from the store;
- the dead man's switch, when the daemon itself is gone: `python -m blockhorn.node.fence
  HOME`, started by a cluster daemon (`arm`) in a session of its own, its stdin a pipe whose
  only write end the daemon holds. After each lease renewal the daemon records when that
  renewal began (CLOCK_MONOTONIC, one clock for every process of the host) in
  `<home>/node.beat`. The helper fences when the last renewal is SELF_FENCE_AFTER_S old —
  the moment the daemon's own watchdog fences, before the lease can expire — which covers a
  daemon that died (EOF on the pipe: killed, crashed or stopped) and one frozen (SIGSTOP, a
  hung interpreter), whose watchdog cannot run. Once the daemon is gone, a renewal newer
  than its end makes the helper stand down instead: a daemon started again within the
  lease adopts the node's processes (and has its own switch).
Each share manager of a cluster node also reads the beat and stops its share at the same
deadline (sharemgr/server.py), which covers the daemon and its switch both gone.
A single host (SQLite) never fences: nothing else takes its volumes over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import time

from blockhorn import liveness
from blockhorn.manager.nbdproxy import local_socket
from blockhorn.manager.paths import Home
from blockhorn.manager.process import reap, spawn, spawn_switch
from blockhorn.sharemgr import control as shares

log = logging.getLogger("blockhorn.manager")

POLL_S = 0.25             # seconds between the helper's looks at the beat file


def volumes_in(home: Home) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(home.root, "volumes")))
    except FileNotFoundError:
        return []


def fence(home: Home, names: list[str], why: str) -> int:
    """SIGKILL the share managers, Ganesha, engines and device FUSE servers of volumes
    `names` in `home`, then remove their service addresses and start `release` of what they
    leave mounted (in a process of its own, not waited for). Returns how many processes it
    killed."""
    managers: set[str] = set()
    rest: set[str] = set()
    for n in names:
        share_managers, ganeshas = shares.fence_marks(home, n)
        managers |= share_managers
        # The engine by its config and sockets; the fuse-nbd holder (--socket) and nbdfuse
        # by their pid file beside the FUSE mount: their devices are dead without the engine;
        # the `nbd` frontend's local relay by its socket: it would keep /dev/nbdN waiting
        # for an engine that may now run on another node.
        rest |= ganeshas | {home.engine_config(n), home.nbd_socket(n), home.control_socket(n),
                            _pidfile(home, n), local_socket(home.nbd_socket(n))}
    killed = kill_marked(managers, why) + kill_marked(rest, why)
    for n in names:
        shares.drop_address(home, n)
    if names:
        spawn([sys.executable, "-m", "blockhorn.node.fence", "--release", home.root, *names],
              home.log("fence.log"))
    return killed


def _pidfile(home: Home, name: str) -> str:
    return home.fuse_dir(name).rstrip("/") + ".pid"   # nbd/attach.py: nbdfuse's, the holder's


# --- after the kill: what the fenced volumes held on this host --------------------------------

RELEASE_STEP_S = 10.0   # seconds one unmount or detach may take; a stuck one is left behind


def release(home: Home, names: list[str]) -> list[str]:
    """Let go of what fenced volumes `names` held here, now that their processes are dead:
    abort the FUSE connection of the device's mount (its server was killed; without the
    abort, the ext4's final flush below would wait for it for ever), unmount the share's
    ext4 lazily, detach the loop device on the FUSE file, unmount the FUSE mount; of the
    `nbd` frontend, disconnect /dev/nbdN (its relay was killed, so its requests fail now
    instead of waiting; a mount of it the operator made stays, failing I/O). Each step
    is bounded (RELEASE_STEP_S) and never waits on a command stuck in the kernel, so a dead
    device leaves at worst that command behind. Run by `fence` in a process of its own, so
    neither the daemon nor the switch waits on it. Returns what it did."""
    from blockhorn.fuse import FUSECTL, fuse_connection
    from blockhorn.nbd.attach import IMAGE_NAMES, loops_on
    done: list[str] = []
    for n in names:
        fuse_dir = home.fuse_dir(n)
        conn = fuse_connection(fuse_dir)
        if conn is not None:
            try:
                with open(os.path.join(FUSECTL, str(conn), "abort"), "w") as f:
                    f.write("1")
                done.append(f"aborted FUSE connection {conn} of {fuse_dir}")
            except OSError as e:
                log.warning("aborting FUSE connection %d of %s: %s", conn, fuse_dir, e)
        mount_dir = shares.mount_dir(home, n)
        if shares.mounted(mount_dir) and _bounded(["umount", "-l", mount_dir]):
            done.append(f"unmounted {mount_dir}")
        for image in IMAGE_NAMES:
            for loop in loops_on(os.path.join(fuse_dir, image)):
                if _bounded(["losetup", "-d", loop]):
                    done.append(f"detached {loop}")
        if conn is not None and _bounded(["umount", "-l", fuse_dir]):
            done.append(f"unmounted {fuse_dir}")
        device = _nbd_device(home, n)
        if device and _bounded(["nbd-client", "-d", device]):
            done.append(f"disconnected {device}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(home.nbd_device(n))
    return done


def _nbd_device(home: Home, name: str) -> str:
    """Volume `name`'s kernel NBD device (Home.nbd_device, written at attach), if it is
    still connected: an empty string otherwise."""
    from blockhorn.nbd.attach import nbd_connected
    try:
        with open(home.nbd_device(name)) as f:
            device = f.read().strip()
    except OSError:
        return ""
    return device if device.startswith("/dev/nbd") and nbd_connected(device) else ""


def _bounded(argv: list[str], timeout: float = RELEASE_STEP_S) -> bool:
    """Run `argv`; True when it succeeded within `timeout`. One that does not finish is
    killed and not waited for: a process in D state (an unmount flushing to a dead device)
    cannot die until the kernel lets it, and this one must go on."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except OSError as e:
        log.error("%s: %s", argv[0], e)
        return False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log.error("%s did not finish in %.0f s: left behind", " ".join(argv), timeout)
        return False
    if proc.returncode != 0:
        log.error("%s failed: %s", " ".join(argv), err.decode(errors="replace").strip())
    return proc.returncode == 0


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
    """After a lease renewal that began at `began` (time.monotonic()): blockhorn/liveness.py."""
    liveness.record_beat(liveness.beat_path(home.root), began)


def last_beat(home: Home) -> float:
    return liveness.last_beat(liveness.beat_path(home.root))


def arm(home: Home) -> tuple[subprocess.Popen[bytes], int]:
    """Start the dead man's switch for this daemon: (the helper, the pipe's write end, to be
    held open for the daemon's life)."""
    return spawn_switch([sys.executable, "-m", "blockhorn.node.fence", home.root],
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
        reap()   # a finished `release` of an earlier fence
        ready, _, _ = select.select([0] if gone is None else [], [], [], POLL_S)
        if ready and not os.read(0, 4096):
            gone = time.monotonic()   # the daemon exited: killed, crashed or stopped


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s fence[%(process)d]: %(message)s")
    if len(argv) >= 2 and argv[0] == "--release":
        done = release(Home.at(argv[1]), argv[2:])
        log.info("released after fencing %s: %s", ", ".join(argv[2:]),
                 "; ".join(done) or "nothing was left")
        return 0
    if len(argv) != 1:
        print("usage: python -m blockhorn.node.fence HOME  (stdin: the daemon's pipe)\n"
              "       python -m blockhorn.node.fence --release HOME VOLUME...",
              file=sys.stderr)
        return 2
    watch(Home.at(argv[0]), liveness.SELF_FENCE_AFTER_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
