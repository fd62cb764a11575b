"""The share manager process: `blockhorn share serve --config FILE`.

Start-up, in order: prepare the device (see `device`), write ganesha.conf, stop a ganesha.nfsd
that a killed predecessor left running, add the service address (if the volume has one; see
`address`; it is removed again at stop), start Ganesha and wait until its NFS port accepts, then
report `serving` (status file, and `READY=1` to systemd).

While serving, two tasks run in one nursery:
- the Ganesha task waits for ganesha.nfsd to exit and starts it again at once (backing off
  when it keeps dying right after start); every restart is counted and its outage — from the
  exit to the port accepting again — recorded.
- the health task, every HEALTH_INTERVAL_S: the device answers a read, the filesystem is
  mounted, answers statfs and a directory read (each in a thread, bounded by CHECK_TIMEOUT_S so
  a hung device shows as failed instead of hanging the loop), is remounted read-write when it
  went read-only after a transient error, and grown online when the device grew (an expand
  while attached), and Ganesha accepts connections.
On a cluster node a third task watches the node's liveness beat (blockhorn/liveness.py): once
the last lease renewal is SELF_FENCE_AFTER_S old, Ganesha is killed, the service address
dropped and the share manager exits (status `failed`, the reason in its message), at the
moment the node's daemon and its dead man's switch would fence it, and also when both are gone.

The status (`<state_dir>/status.json`, written atomically) is what `blockhorn share show` and
the daemon's API report. SIGTERM/SIGINT (detach): Ganesha is stopped, its client records
dropped (the share is going away, nobody is to reclaim), the filesystem unmounted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import trio

from blockhorn import liveness
from blockhorn.fsutil import atomic_write, atomic_write_json
from blockhorn.manager.process import accepts, log_tail
from blockhorn.sdnotify import notify
from blockhorn.sharemgr import address, device, ganesha
from blockhorn.sharemgr.config import ShareConfig
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.share")

HEALTH_INTERVAL_S = 2.0     # seconds between health checks
CHECK_TIMEOUT_S = 10.0      # seconds one check of the device or the mount may take
READY_TIMEOUT_S = 30.0      # seconds Ganesha has to accept connections after a start
POLL_S = 0.05               # seconds between readiness probes
QUICK_DEATH_S = 10.0        # a Ganesha that dies sooner than this after its start backs off
BACKOFF_MAX_S = 10.0
STOP_TIMEOUT_S = 10.0       # seconds between SIGTERM and SIGKILL for Ganesha
BEAT_POLL_S = 0.25          # seconds between looks at a cluster node's beat file
FENCED_UNMOUNT_S = 10.0     # seconds the unmount after a fence may take before it is left


class ShareServer:
    def __init__(self, cfg: ShareConfig) -> None:
        self.cfg = cfg
        self.proc: trio.Process | None = None
        self.stopping = False     # a requested stop (detach), not a crash
        self.fenced = False       # stopped because the node's lease may run out (_watch_beat)
        self._device_size = 0     # bytes, last seen by the health check (see _follow_growth)
        self._grow_error: str | None = None
        self.status: dict[str, Any] = {
            "volume": cfg.volume, "state": "starting", "health": "unknown", "checks": {},
            "ganesha_pid": None, "ganesha_restarts": 0, "last_outage_s": None,
            "prepared": [], "message": None, "pid": os.getpid(), "fs": None,
        }

    def publish(self, **changes: Any) -> None:
        self.status.update(changes, updated=time.time())
        atomic_write_json(self.cfg.status_file, self.status)

    @property
    def probe_address(self) -> str:
        host = "127.0.0.1" if self.cfg.bind in ("0.0.0.0", "::") else self.cfg.bind
        return f"{host}:{self.cfg.port}"

    # --- start and stop --------------------------------------------------------------------

    async def serve(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.recovery_dir, mode=0o700, exist_ok=True)
        self.publish()
        try:
            ganesha.argv(cfg)   # Ganesha missing: say so before the device is formatted
            done = await trio.to_thread.run_sync(device.prepare, cfg.device, cfg.mount_dir,
                                                 cfg.mkfs_options)
            log.info("%s on %s: %s", cfg.device, cfg.mount_dir, ", ".join(done))
            self.publish(prepared=done)
            atomic_write(cfg.ganesha_conf, ganesha.render(cfg).encode(), mode=0o600)
            await trio.to_thread.run_sync(ganesha.kill_stale, cfg)
            if cfg.service_address:
                cfg.interface = await trio.to_thread.run_sync(
                    address.pick_interface, cfg.interface, cfg.service_address)
                await trio.to_thread.run_sync(address.ensure, cfg.interface,
                                              cfg.service_address)
                log.info("service address %s on %s", cfg.service_address, cfg.interface)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_ganesha)
                self.publish(state="serving", health="healthy", message=None)
                log.info("serving nfs://%s/%s", self.probe_address, cfg.volume)
                notify("READY=1")
                nursery.start_soon(self._health_loop)
                nursery.start_soon(self._on_signals, nursery.cancel_scope)
                if cfg.beat_file:
                    nursery.start_soon(self._watch_beat, nursery.cancel_scope)
        except BlockhornError as e:
            self.publish(state="failed", health="failed", message=str(e), errno=e.errno)
            raise
        finally:
            with trio.CancelScope(shield=True):
                notify("STOPPING=1")
                await self._stop_ganesha()
                if cfg.service_address:
                    await trio.to_thread.run_sync(address.remove, cfg.interface,
                                                  cfg.service_address)
                if self.stopping:
                    # A requested stop (detach) ends every client's state on purpose: forget
                    # the clients, so the next start has no grace period waiting for them.
                    # After a crash the records stay and clients reclaim.
                    shutil.rmtree(cfg.recovery_dir, ignore_errors=True)
                if self.fenced:
                    # Its device may be dead (the volume moved, the engine fenced by epoch):
                    # an unmount stuck flushing is left to itself, this process goes.
                    with trio.move_on_after(FENCED_UNMOUNT_S):
                        await trio.to_thread.run_sync(device.unmount, cfg.mount_dir,
                                                      abandon_on_cancel=True)
                else:
                    await trio.to_thread.run_sync(device.unmount, cfg.mount_dir)
                if self.status["state"] != "failed":   # keep the reason for the daemon
                    self.publish(state="stopped", health="unknown", ganesha_pid=None)

    async def _on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: stopping", signal.Signals(signum).name)
                self.stopping = True
                scope.cancel()
                return

    async def _watch_beat(self, scope: trio.CancelScope) -> None:
        """A cluster node: stop serving once the node's last lease renewal is
        SELF_FENCE_AFTER_S old (blockhorn/liveness.py) — the moment its daemon's watchdog and
        its dead man's switch fence the node. This covers a host that stays up with both of
        them gone (killed), where nobody else would stop Ganesha, which would go on answering
        clients from the page cache of a device whose volume moved to another node."""
        while True:
            due = await trio.to_thread.run_sync(liveness.overdue_in, self.cfg.beat_file)
            if due <= 0:
                break
            await trio.sleep(min(BEAT_POLL_S, due))
        silent = liveness.SELF_FENCE_AFTER_S - due
        log.error("the node's lease was last renewed %.1f s ago: its daemon is cut off, or it "
                  "and its dead man's switch are gone; the lease may expire and the share move "
                  "elsewhere: stopping Ganesha and dropping the service address", silent)
        self.fenced = True
        self.publish(state="failed", health="failed", message=(
            f"stopped: the node's lease was not renewed for {silent:.1f} s (fenced; the daemon "
            "starts the share again if the volume is still attached here)"))
        scope.cancel()

    async def _stop_ganesha(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if self.fenced:   # no reply may leave it from now on: no graceful stop
            proc.kill()
            # A Ganesha stuck in the kernel on a dead device answers nothing but dies only
            # when the kernel lets it: the service address goes meanwhile.
            with trio.move_on_after(STOP_TIMEOUT_S):
                await proc.wait()
            return
        proc.terminate()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await proc.wait()
            return
        log.warning("ganesha.nfsd (pid %d) ignored SIGTERM: SIGKILL", proc.pid)
        proc.kill()
        await proc.wait()

    # --- Ganesha ---------------------------------------------------------------------------

    async def _start_ganesha(self) -> trio.Process:
        cfg = self.cfg
        proc = await trio.lowlevel.open_process(ganesha.argv(cfg), stdin=subprocess.DEVNULL)
        self.proc = proc
        deadline = trio.current_time() + READY_TIMEOUT_S
        while not await trio.to_thread.run_sync(accepts, self.probe_address):
            if proc.poll() is not None:
                raise BlockhornError(f"ganesha.nfsd exited with status {proc.returncode} "
                                     f"during start-up; last lines of {cfg.ganesha_log}:\n"
                                     f"{log_tail(cfg.ganesha_log)}")
            if trio.current_time() > deadline:
                proc.kill()
                await proc.wait()
                raise BlockhornError(f"ganesha.nfsd did not accept connections on "
                                     f"{self.probe_address} within {READY_TIMEOUT_S:.0f} s; "
                                     f"see {cfg.ganesha_log}")
            await trio.sleep(POLL_S)
        self.publish(ganesha_pid=proc.pid)
        return proc

    async def _run_ganesha(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        proc = await self._start_ganesha()
        task_status.started()
        while True:
            started = trio.current_time()
            rc = await proc.wait()
            died = trio.current_time()
            log.error("ganesha.nfsd (pid %d) exited with status %s: restarting", proc.pid, rc)
            self.publish(health="degraded", ganesha_pid=None,
                         ganesha_restarts=self.status["ganesha_restarts"] + 1,
                         message=f"ganesha.nfsd exited with status {rc}; restarting")
            # Restart at once, unless it died right after its start (a bad config, a port
            # taken): then back off, so a Ganesha that cannot run does not spin.
            delay = 0.0 if died - started >= QUICK_DEATH_S else 1.0
            while True:
                await trio.sleep(delay)
                try:
                    proc = await self._start_ganesha()
                    break
                except BlockhornError as e:
                    log.error("restarting ganesha.nfsd failed: %s", e)
                    self.publish(health="failed", message=f"restarting ganesha.nfsd failed: {e}")
                    delay = min(max(delay * 2, 1.0), BACKOFF_MAX_S)
            outage = round(trio.current_time() - died, 3)
            log.warning("ganesha.nfsd restarted (pid %d) after %.2f s", proc.pid, outage)
            self.publish(last_outage_s=outage, message=f"ganesha.nfsd restarted after it "
                         f"exited with status {rc}; outage {outage:.2f} s (clients then "
                         f"reclaim during the grace period of up to {self.cfg.grace_s} s)")

    # --- health ----------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await self._check_health()
            await trio.sleep(HEALTH_INTERVAL_S)

    async def _check_health(self) -> None:
        """One pass of the checks (the first right after start-up, so `share show` has
        them at once); the result goes to the status file."""
        checks: dict[str, str] = {}
        fs = None
        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                fs = await trio.to_thread.run_sync(self._check_storage, checks,
                                                   abandon_on_cancel=True)
        except trio.TooSlowError:
            checks.setdefault("mount", f"no answer within {CHECK_TIMEOUT_S:.0f} s")
        proc = self.proc
        if proc is None or proc.returncode is not None:
            checks["ganesha"] = "not running (being restarted)"
        elif not await trio.to_thread.run_sync(accepts, self.probe_address):
            checks["ganesha"] = f"does not accept connections on {self.probe_address}"
        else:
            checks["ganesha"] = "ok"
        bad = sorted(k for k, v in checks.items() if not v.startswith("ok"))
        # Ganesha alone down is being restarted (degraded); storage trouble is failed.
        health = "healthy" if not bad else "degraded" if bad == ["ganesha"] else "failed"
        self.publish(health=health, checks=checks, fs=fs)

    def _check_storage(self, checks: dict[str, str]) -> dict[str, int] | None:
        """Device, then mount (remounting rw when the filesystem went read-only)."""
        cfg = self.cfg
        try:
            fd = os.open(cfg.device, os.O_RDONLY)
            try:
                os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            checks["device"] = "ok"
        except OSError as e:
            checks["device"] = f"{cfg.device}: {e.strerror}"
        options = device.is_mounted(cfg.mount_dir)
        if options is None:
            checks["mount"] = f"{cfg.mount_dir} is not mounted"
            return None
        if "ro" in options.split(","):
            log.warning("%s went read-only: remounting read-write", cfg.mount_dir)
            try:
                device.remount_rw(cfg.mount_dir)
                checks["mount"] = "ok (remounted read-write)"
            except BlockhornError as e:
                checks["mount"] = f"read-only, remount failed: {e}"
                return None
        try:
            st = os.statvfs(cfg.mount_dir)
            os.listdir(cfg.mount_dir)
        except OSError as e:
            checks["mount"] = f"{cfg.mount_dir}: {e.strerror}"
            return None
        checks.setdefault("mount", "ok")
        self._follow_growth(checks)
        return {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}

    def _follow_growth(self, checks: dict[str, str]) -> None:
        """The device grew (an online expand): grow the filesystem to it, once per size. A
        failure (no CAP_SYS_RESOURCE) keeps the share serving at the old size and shows in
        the mount check until the next attach grows it offline."""
        try:
            size = device.device_size(self.cfg.device)
        except OSError:
            return   # the device check above reports it
        if size != self._device_size:
            self._device_size = size
            self._grow_error = None
            try:
                if device.grow_online(self.cfg.device):
                    log.info("%s grew to %d bytes: filesystem grown online", self.cfg.device,
                             size)
                    checks["mount"] = "ok (filesystem grown online)"
            except BlockhornError as e:
                log.warning("%s", e)
                self._grow_error = str(e)
        if self._grow_error:
            checks["mount"] = f"ok, but not grown to the device: {self._grow_error}"


def main(config_path: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s share[%(process)d]: %(message)s")
    cfg = ShareConfig.load(config_path)
    trio.run(ShareServer(cfg).serve)
    return 0
