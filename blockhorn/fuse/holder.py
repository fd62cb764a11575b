"""The `fuse-nbd` frontend: a small process that holds the device while engines come and go.

    python -m blockhorn.fuse.holder --socket ENGINE.sock --mount DIR [--pidfile F]
        ->  DIR/volume, the volume (a loop device goes on it, as for the other FUSE frontends)

It owns the FUSE mount (the same one-file filesystem as the in-process `fuse` frontend,
`fs.VolumeFS`) and reaches the engine over NBD on its unix socket with libnbd: one connection
per worker thread, each request a blocking libnbd call (libnbd drops the GIL while it waits).
When the engine goes away (kill -9, a crash, the SIGTERM of a live upgrade) every request not
yet answered is retried on a new connection as soon as an engine listens on the socket again:
the daemon restarts the engine there. The kernel above sees a pause, not an I/O error, for up
to RECONNECT_DEADLINE_S; after that the request fails with EIO.

Retrying is safe because nothing not yet acknowledged can have been relied on: a write or
zero/trim re-sent writes the same bytes to the same place (the kernel has no second request on
those sectors until this one is answered), and a FLUSH re-sent is a FLUSH on the new engine,
which covers every write the old engine acknowledged (they sit in the replicas' page cache —
the replica processes outlived the engine — or on their disks).

An error the engine *answers* (EIO: no replica can take the write, ENOSPC, EINVAL) is not a
lost connection and is passed up unchanged.

An NBD connection learns the export size once, at its handshake, and libnbd refuses requests
past it. After an online expand the daemon sends SIGWINCH: the holder reads the size on a new
connection, moves every thread to a new connection, and has the kernel forget the file's
attributes, so the file (and, after `losetup -c`, the loop device on it) grows.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.holder")

RECONNECT_DEADLINE_S = 60.0   # seconds a request waits for an engine before it fails (EIO)
RECONNECT_FIRST_S = 0.005     # seconds between connection attempts, doubling ...
RECONNECT_MAX_S = 0.05        # ... up to this: the pause after a restart is what we measure
# Worker threads = NBD connections. Measured on 2 vCPUs, 3 replicas, fio QD32 on the loop
# device (scripts/bench_engine_survival.py): see docs/DURABILITY.md for the numbers.
HOLDER_THREADS = 16
CONNECT_TIMEOUT_S = 2.0  # seconds for one connection's handshake (then try again)
PAUSE_TIMEOUT_S = 30.0   # seconds a pause waits for the requests in flight
# errnos of a request whose connection broke (rather than an answer of the engine).
LOST = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN, errno.ECONNREFUSED,
        errno.ENOENT, errno.ECONNABORTED}


def import_nbd() -> Any:
    """libnbd's Python module (Debian python3-libnbd). A venv built from another interpreter
    of the same version does not see Debian's dist-packages: look there last."""
    try:
        import nbd
    except ImportError:
        dist = "/usr/lib/python3/dist-packages"
        if dist in sys.path or not os.path.isdir(dist):
            raise BlockhornError("python3-libnbd is not installed: apt-get install "
                                 "python3-libnbd", errno.ENOENT) from None
        sys.path.append(dist)   # after everything else: only modules missing elsewhere
        try:
            import nbd
        except ImportError:
            raise BlockhornError("python3-libnbd is not installed: apt-get install "
                                 "python3-libnbd", errno.ENOENT) from None
    return nbd


class NbdBackend:
    """What `fs.VolumeFS` needs of an engine (size, pread, pwrite, flush, trim, zero), done
    over NBD with reconnect-and-retry. Each thread has its own connection."""

    def __init__(self, socket_path: str, deadline_s: float = RECONNECT_DEADLINE_S) -> None:
        self.nbd = import_nbd()
        self.socket = socket_path
        self.deadline_s = deadline_s
        self.reconnects = 0           # connections made after a lost one (statistics)
        self.retried = 0              # requests re-sent on a new connection
        self._lock = threading.Lock()
        # Pause (live upgrade): no request is sent while paused; `pause` waits for the ones
        # in flight and closes every connection; each thread reconnects after `resume`.
        self._cv = threading.Condition()
        self._paused = False
        self._active = 0        # requests being sent or awaiting their answer
        self._epoch = 0         # bumped by pause: a thread's older connection is closed
        # thread id -> (its connection, the epoch it was made in); pause closes them. Not a
        # threading.local: in nbdkit's embedded Python (nbd/relay.py) a foreign thread's
        # Python state, and its locals with it, lives only as long as one callback.
        self._handles: dict[int, tuple[Any, int]] = {}
        h = self._connect_until(time.monotonic() + deadline_s)
        self.size = int(h.get_size())
        self._keep(h)

    # --- connections ---------------------------------------------------------------------

    def _connect_until(self, deadline: float) -> Any:
        delay = RECONNECT_FIRST_S
        while True:
            h = self.nbd.NBD()
            try:
                self._connect(h, min(CONNECT_TIMEOUT_S, max(deadline - time.monotonic(), 0.1)))
                return h
            except self.nbd.Error as e:
                del h   # (libnbd's Python handle has no close: freeing it closes)
                if time.monotonic() + delay > deadline:
                    raise BlockhornError(f"no engine on {self.socket} for "
                                         f"{self.deadline_s:g} s: {e.string}", errno.EIO) from None
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _keep(self, h: Any) -> None:
        with self._cv:
            self._handles[threading.get_ident()] = (h, self._epoch)

    def _connect(self, h: Any, timeout: float) -> None:
        """Connect and negotiate within `timeout`: a stopping nbdkit's socket may still take
        connections into its backlog and never answer the handshake."""
        h.aio_connect_unix(self.socket)
        end = time.monotonic() + timeout
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise self.nbd.Error("connection failed during the handshake", errno.ECONNRESET)
            left = end - time.monotonic()
            if left <= 0:
                raise self.nbd.Error(f"no handshake within {timeout:g} s", errno.ETIMEDOUT)
            h.poll(max(1, int(left * 1000)))

    def _drop(self) -> None:
        with self._cv:
            h, _ = self._handles.pop(threading.get_ident(), (None, 0))
        _close(h)

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Stop sending, wait for the requests in flight, close every connection. False
        when requests were still in flight after `timeout` (then nothing is closed)."""
        with self._cv:
            self._paused = True
            self._epoch += 1
            if not self._cv.wait_for(lambda: self._active == 0, timeout):
                return False
            handles, self._handles = [h for h, _ in self._handles.values()], {}
        for h in handles:   # idle: their threads wait in the condition or for work
            _close(h)
        return True

    def refresh_size(self) -> int:
        """The size the engine now reports to a new connection (it grew: an expand). Each
        thread's next request goes over a new connection, which knows the new size: libnbd
        refuses a request past the size its connection was told at its handshake."""
        h = self._connect_until(time.monotonic() + self.deadline_s)
        try:
            size = int(h.get_size())
        finally:
            _close(h)
        with self._cv:
            if size != self.size:
                self._epoch += 1   # (no request past the old size before the kernel knows)
                self.size = size
        return size

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def _lost(self, h: Any, e: Any) -> bool:
        if e.errnum in LOST:   # (nbd.Error.errno is the errno's name, errnum its number)
            return True
        try:
            return bool(h.aio_is_dead() or h.aio_is_closed())
        except Exception:
            return True

    def _do(self, op: str, *args: Any) -> Any:
        """`op(*args)` on this thread's connection; on a lost connection, again on a new one
        until RECONNECT_DEADLINE_S after the first loss."""
        with self._cv:
            self._cv.wait_for(lambda: not self._paused)
            self._active += 1
        try:
            return self._send(op, *args)
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def _send(self, op: str, *args: Any) -> Any:
        deadline = None
        delay = RECONNECT_FIRST_S
        while True:
            h, epoch = self._handles.get(threading.get_ident(), (None, 0))
            if h is not None and epoch != self._epoch:
                h = None   # closed by a pause, or older than an expand (replaced by _keep)
            if h is None:
                h = self._connect_until(deadline or time.monotonic() + self.deadline_s)
                self._keep(h)
                if deadline is not None:
                    with self._lock:
                        self.reconnects += 1
            try:
                return getattr(h, op)(*args)
            except self.nbd.Error as e:
                if not self._lost(h, e):
                    raise BlockhornError(f"{op}: {e.string}", e.errnum or errno.EIO) from None
                self._drop()
                if deadline is None:
                    deadline = time.monotonic() + self.deadline_s
                    log.warning("%s: connection to the engine lost (%s): retrying", op, e.string)
                    with self._lock:
                        self.retried += 1
                elif time.monotonic() > deadline:
                    raise BlockhornError(f"{op}: no engine for {self.deadline_s:g} s",
                                         errno.EIO) from None
                else:
                    # The engine still accepts but refuses (ESHUTDOWN: handing over to its
                    # successor): do not spin on it.
                    time.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX_S)

    # --- what VolumeFS calls -------------------------------------------------------------

    def pread_nowait(self, buf: bytearray, offset: int) -> bool:
        return False   # always through a worker: the data is in another process

    def pread(self, buf: bytearray, offset: int) -> None:
        buf[:] = self._do("pread", len(buf), offset)

    def pwrite_begin(self, *args: Any, on_done: Any = None) -> None:
        return None   # no asynchronous path: VolumeFS then calls pwrite in a worker

    def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        self._do("pwrite", buf, offset, flags)

    def flush_begin(self, *args: Any, on_done: Any = None) -> None:
        return None

    def flush(self) -> None:
        self._do("flush")

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self._do("trim", length, offset, flags)

    def zero(self, offset: int, length: int, flags: int = 0) -> None:
        self._do("zero", length, offset, flags)


def _close(h: Any) -> None:
    if h is not None:
        with contextlib.suppress(Exception):
            h.shutdown()   # NBD_CMD_DISC on a live connection; fails on a dead one
        del h              # (libnbd's Python handle has no close: freeing it closes)


def write_state(path: str, state: str) -> None:
    from blockhorn.fsutil import atomic_write
    atomic_write(path, state.encode() + b"\n")


def main(socket_path: str, mountpoint: str, pidfile: str = "",
         threads: int = HOLDER_THREADS) -> int:
    import pyfuse3
    import trio

    from blockhorn.fuse.fs import VolumeFS
    from blockhorn.fuse.serve import STOP_SIGNALS, _StopRequest, _terminate, tune_connection
    from blockhorn.nbd.attach import cleanup_stale_mount, is_mounted
    from blockhorn.types import Busy

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s holder %(levelname)s %(message)s")
    mountpoint = os.path.abspath(mountpoint)
    cleanup_stale_mount(mountpoint)
    if is_mounted(mountpoint):
        raise Busy(f"{mountpoint} is already mounted: is this volume attached elsewhere?")
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    backend = NbdBackend(socket_path)
    fs = VolumeFS(backend, threads, direct_io=True)  # type: ignore[arg-type]
    options = set(pyfuse3.default_options) | {"fsname=blockhorn-holder", "subtype=blockhorn"}
    try:
        pyfuse3.init(fs, mountpoint, options)
    except RuntimeError as e:
        raise BlockhornError(f"cannot mount FUSE on {mountpoint}: {e}", errno.EIO) from None
    try:
        tune_connection(mountpoint)
        stop = _StopRequest()
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop.handler)
        state = pidfile[:-4] + ".state" if pidfile.endswith(".pid") else ""

        def pause_resume(signum: int, frame: object) -> None:
            # Not in the handler itself (the loop's thread): the drain waits for workers.
            threading.Thread(target=_pause_resume, args=(backend, signum, state),
                             daemon=True).start()

        signal.signal(signal.SIGUSR1, pause_resume)
        signal.signal(signal.SIGUSR2, pause_resume)

        def grow(signum: int, frame: object) -> None:
            threading.Thread(target=_grow, args=(backend,), daemon=True).start()

        # SIGWINCH because its default action is to ignore it: the daemon sends it after every
        # expand, also to a holder started by an older release that may not handle it.
        signal.signal(signal.SIGWINCH, grow)
        if pidfile:   # the mount is there: what the attach waits for
            with open(pidfile + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(pidfile + ".tmp", pidfile)
        log.info("%s (%d bytes) mounted at %s", socket_path, backend.size, mountpoint)

        async def serve() -> None:
            stop.token = trio.lowlevel.current_trio_token()
            if stop.requested:
                _terminate(signal.SIGTERM)
            await pyfuse3.main(min_tasks=16)

        trio.run(serve)
    finally:
        fs.workers.stop()
        pyfuse3.close(unmount=True)
        log.info("stopped (%d requests retried, %d reconnects)", backend.retried,
                 backend.reconnects)
    return 0


def _grow(backend: NbdBackend) -> None:
    """SIGWINCH (after an expand): read the engine's size again; when it changed, have the
    kernel drop the file's cached attributes (never from the FUSE loop's thread: the kernel
    may be waiting for that thread's reply)."""
    import pyfuse3

    from blockhorn.fuse.fs import IMAGE_INODE
    old = backend.size
    try:
        size = backend.refresh_size()
    except BlockhornError as e:
        log.error("cannot read the volume's size: %s", e)
        return
    if size != old:
        log.info("volume grew from %d to %d bytes", old, size)
        pyfuse3.invalidate_inode(IMAGE_INODE, True)


def _pause_resume(backend: NbdBackend, signum: int, state: str) -> None:
    """SIGUSR1: pause (drained, disconnected: `paused` in the state file, or `busy`);
    SIGUSR2: resume (`running`). The daemon's live upgrade waits for `paused`."""
    if signum == signal.SIGUSR1:
        done = backend.pause()
        log.info("paused" if done else "pause: requests still in flight")
        result = "paused" if done else "busy"
    else:
        backend.resume()
        log.info("resumed")
        result = "running"
    if state:
        write_state(state, result)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m blockhorn.fuse.holder")
    ap.add_argument("--socket", required=True, help="the engine's NBD unix socket")
    ap.add_argument("--mount", required=True, help="directory to mount the volume file on")
    ap.add_argument("--pidfile", default="", help="written once the file is mounted")
    ap.add_argument("--threads", type=int, default=HOLDER_THREADS)
    a = ap.parse_args()
    try:
        sys.exit(main(a.socket, a.mount, a.pidfile, a.threads))
    except BlockhornError as err:
        print(f"holder: {err}", file=sys.stderr)
        sys.exit(1)
