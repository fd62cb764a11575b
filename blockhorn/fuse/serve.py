"""`blockhorn fuse serve`: the engine, its control socket and the FUSE mount in one process.

    blockhorn fuse serve --config ENGINE.json --mount DIR     ->  DIR/volume, the volume

Start order: engine (replicas connected, modes chosen) -> FUSE mount -> control socket ->
`READY=1`. The control socket appearing therefore means the file is there, which is what the
daemon waits for. Stop (SIGTERM/SIGINT/SIGHUP, or the mount being unmounted) runs it backwards
under one exit stack: control socket, FUSE unmount, engine close (final FLUSH to every replica).
Whoever put a loop device on the file detaches it first (`detach_device`); a SIGTERM with the
loop still attached unmounts lazily, and the loop device fails I/O from then on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys

import pyfuse3
import trio

from blockhorn import sdnotify
from blockhorn.config import EngineConfig
from blockhorn.engine.client import Receiver
from blockhorn.engine.control import ControlServer
from blockhorn.engine.engine import Engine
from blockhorn.fuse import FUSECTL, fuse_connection
from blockhorn.fuse.fs import IMAGE_INODE, VolumeFS
from blockhorn.nbd.attach import cleanup_stale_mount, is_mounted
from blockhorn.types import BlockhornError, Busy

log = logging.getLogger("blockhorn.fuse")

# Blocking engine calls in flight at once (worker threads; `--threads`): reads the page cache
# cannot serve, trims and zeroes, and writes/flushes only when they cannot be sent from the
# loop (see `VolumeFS._mutate`). Chosen when writes still went through these threads (2 vCPUs,
# 3 replicas, fio QD32: 4 and 8 within noise, 16 and 32 lower from GIL contention).
FUSE_THREADS = 8
# FOPEN_DIRECT_IO: every read/write of the file goes to the engine, never the page cache.
# The loop device's own O_DIRECT does that already; this covers plain opens of the file too,
# and measured no slower through the loop device (without it: 4k randread 6.6k vs 8.3k IOPS).
DIRECT_IO = True
# pyfuse3 tasks kept waiting for requests. With its default of 1, a task is started for
# nearly every request under load and ended after it; 16 keeps them (measured, 3 replicas,
# fio QD32 4k randwrite on the loop device: about 15 % more IOPS).
FUSE_TASKS = 16
# FUSE requests the kernel keeps in flight for asynchronous direct I/O (what the loop device
# issues). The kernel's default, 12, caps the writes replicated at once; 128 matches the loop
# device's queue depth. Measured, 3 replicas, fio QD32 4k randwrite on the loop device:
# 12 -> ~4.1k IOPS, 48 -> ~5.0k, 128 -> ~5.5-6.7k (noisy machine, interleaved runs).
MAX_BACKGROUND = 128
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SIZE_POLL_S = 1.0   # seconds between checks whether the volume grew (an expand)


def main(config_path: str, mountpoint: str, threads: int = FUSE_THREADS,
         direct_io: bool = DIRECT_IO) -> int:
    cfg = EngineConfig.load(config_path)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s fuse[{cfg.volume}] %(levelname)s %(message)s")
    mountpoint = os.path.abspath(mountpoint)
    cleanup_stale_mount(mountpoint)
    if is_mounted(mountpoint):
        raise Busy(f"{mountpoint} is already mounted: is this volume attached elsewhere?")
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    with contextlib.ExitStack() as stack:
        engine = Engine(cfg)
        stack.callback(engine.close)
        engine.start()
        fs = VolumeFS(engine, threads, direct_io)
        stack.callback(fs.workers.stop)
        options = set(pyfuse3.default_options)
        options |= {f"fsname=blockhorn:{cfg.volume}", "subtype=blockhorn"}
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as e:   # pyfuse3 says only "fuse_session_mount failed"
            raise BlockhornError(f"cannot mount FUSE on {mountpoint}: {e} (is /dev/fuse "
                                 "there, and are we root?)", errno.EIO) from None
        stack.callback(pyfuse3.close, unmount=True)
        tune_connection(mountpoint)
        stop = _StopRequest()
        for sig in STOP_SIGNALS:   # before the control socket: from then on we look ready
            signal.signal(sig, stop.handler)
        control = ControlServer(engine, cfg.control_socket)
        control.start()
        stack.callback(control.stop)
        log.info("volume %s (%d bytes) mounted at %s", cfg.volume, engine.size, mountpoint)
        trio.run(_serve, fs, stop)
        log.info("volume %s: stopping", cfg.volume)
    return 0


def tune_connection(mountpoint: str) -> None:
    """Raise the mount's `max_background` through fusectl (root; mounted here if it is not).
    Found through mountinfo (`fuse_connection`): a stat of the mount would send a request that
    this process cannot answer before its loop runs. Only speed depends on it: failures are logged."""
    conn = fuse_connection(mountpoint)
    where = os.path.join(FUSECTL, str(conn))
    if conn is not None and not os.path.isdir(where) and os.path.isdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    try:
        for name, value in (("max_background", MAX_BACKGROUND),
                            ("congestion_threshold", MAX_BACKGROUND * 3 // 4)):
            with open(os.path.join(where, name), "w") as f:
                f.write(str(value))
    except OSError as e:
        log.info("FUSE connection %s: max_background left at the kernel default (%s)",
                 conn, e.strerror or e)


class _StopRequest:
    """SIGTERM/SIGINT/SIGHUP -> `pyfuse3.terminate()` in the trio loop. A handler of our own
    rather than `trio.open_signal_receiver`, because it must be in place before the loop runs
    (a signal right after the control socket appeared would otherwise be lost or kill us) and
    after it (the daemon's SIGTERM right after its unmount must not kill the final FLUSH)."""

    def __init__(self) -> None:
        self.requested = False
        self.token: trio.lowlevel.TrioToken | None = None

    def handler(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.token is not None:
            try:
                self.token.run_sync_soon(_terminate, signum)   # safe from a signal handler
            except trio.RunFinishedError:
                pass   # the loop has ended: we are stopping already


def _terminate(signum: int) -> None:
    log.info("%s: stopping", signal.Signals(signum).name)
    sdnotify.notify("STOPPING=1")
    pyfuse3.terminate()


async def _serve(fs: VolumeFS, stop: _StopRequest) -> None:
    stop.token = trio.lowlevel.current_trio_token()
    if stop.requested:   # arrived before the loop ran
        _terminate(signal.SIGTERM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_follow_size, fs)
        nursery.start_soon(_receive, fs.engine.receiver)
        sdnotify.notify("READY=1")
        await pyfuse3.main(min_tasks=FUSE_TASKS)   # returns after terminate() or when the mount is unmounted
        nursery.cancel_scope.cancel()


async def _receive(receiver: Receiver) -> None:
    """Receive the replicas' replies in this thread, the one that answers FUSE: a write's
    completion then wakes its task directly, with no thread switch (see `Receiver`)."""
    receiver.hand_over()
    try:
        while True:
            await trio.lowlevel.wait_readable(receiver.epoll.fileno())
            receiver.poll_once()
    finally:
        receiver.take_back()   # the final FLUSH in engine.close() needs it, after the loop


async def _follow_size(fs: VolumeFS) -> None:
    """An expand (through the control socket) grows the engine; the kernel caches the file's
    attributes for long, so tell it to forget them: the file grows. A loop device above it
    sees the new size after `losetup -c DEVICE` (as an NBD client after reconnecting)."""
    known = fs.engine.size
    while True:
        await trio.sleep(SIZE_POLL_S)
        if fs.engine.size != known:
            known = fs.engine.size
            log.info("volume grew to %d bytes", known)
            # Never from the loop thread itself: the kernel may wait for a FUSE reply.
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, IMAGE_INODE, True)
