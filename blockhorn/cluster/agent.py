"""The per-host share failover agent: `blockhorn share agent VOLUME --etcd URL --host-id ID`.

One agent per host and shared volume. Every agent contends for the volume's owner key
(`spec.owner_key`) with a transaction that creates it only if it is absent, bound to a lease of
TTL_S seconds. The winner serves the share; the others poll the key every POLL_S and contend
again when it is gone — when the owner stepped down (lease revoked) or died (lease expired).

Serving, in order: a dead man's switch (`deadman`: kills what follows if this process
dies), an engine (nbdkit with the blockhorn plugin)
connected to the replicas over TCP; nbdfuse + a loop device on it; the share manager
(`ShareServer`, in this process) on that device: fsck/mount, the service address, Ganesha.
Stopping runs it backwards.

Fencing. The owner renews its lease every KEEPALIVE_S. Each renewal that etcd answers moves a
deadline to (time the renewal was *sent*) + TTL - FENCE_MARGIN_S; etcd counts the TTL from when
it *received* the renewal, so the deadline falls at least FENCE_MARGIN_S before the lease can
expire in etcd. When the deadline passes (etcd unreachable, this host cut off) or etcd says the
lease or the key is gone, the owner fences itself at once: SIGKILL Ganesha (no NFS reply after
this), SIGKILL the engine (no write reaches a replica after this), remove the service address;
unmounting and detaching follow. The replicas fence as well: the engine presents the owner
key's creation revision as its epoch, and a replica that has seen a newer owner's epoch refuses
and disconnects older ones (blockhorn/replica/fencing.py). What this guarantees and what it
does not: docs/DURABILITY.md.

NFSv4 reclaim needs Ganesha's client records where the next owner finds them: the owner copies
its recovery directory into etcd (`spec.recovery_key`, only while the owner key is still its
own) and a new owner writes them back before Ganesha starts, so clients of the old owner
reclaim their state during the grace period.

State for operators: `<workdir>/agent.json` (role standby/owner/fenced, the owner, times) and
the share manager's `<workdir>/share/status.json`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import trio

from blockhorn.cluster import deadman
from blockhorn.cluster import spec as spec_mod
from blockhorn.cluster.etcd import (
    Etcd,
    EtcdError,
    LeaseNotFound,
    cmp_create,
    dumps,
    op_put,
)
from blockhorn.config import EngineConfig, ReplicaRef
from blockhorn.fsutil import atomic_write_json
from blockhorn.manager.process import log_tail, spawn_switch
from blockhorn.nbd import attach
from blockhorn.sharemgr import address, device, ganesha
from blockhorn.sharemgr.config import ShareConfig
from blockhorn.sharemgr.server import ShareServer
from blockhorn.types import BlockhornError, Busy, NotFound, check_name

log = logging.getLogger("blockhorn.agent")

TTL_S = 5                # seconds; the owner's lease
KEEPALIVE_S = 1.0        # seconds between lease renewals
FENCE_MARGIN_S = 2.0     # seconds; serving stops this long before the lease can expire in etcd
POLL_S = 0.5             # seconds between reads of the owner key by a standby host
BACKOFF_S = 5.0          # seconds a host waits after it stepped down before contending again
RECOVERY_SYNC_S = 1.0    # seconds between copies of Ganesha's client records to etcd
ENGINE_STOP_S = 5.0      # seconds between SIGTERM and SIGKILL for the engine
ENGINE_READY_S = 30.0    # seconds the engine has to connect its replicas
ATTACHMENT = "attachment.json"   # the device attached while owning (for leftovers)
DEADMAN_EXIT_S = 10.0    # seconds the dead man's switch has to exit after a clean stop


class Agent:
    def __init__(self, etcd: Etcd, volume: str, host_id: str, workdir: str, key_file: str,
                 ttl: int = TTL_S) -> None:
        self.etcd = etcd
        self.volume = check_name(volume)
        self.host_id = check_name(host_id, "host")
        self.workdir = os.path.abspath(workdir)
        self.key_file = os.path.abspath(key_file)
        self.ttl = ttl
        self.owner_key = spec_mod.owner_key(volume)
        self.recovery_key = spec_mod.recovery_key(volume)
        self.spec: dict[str, Any] = {}
        self.engine: subprocess.Popen[bytes] | None = None
        self.server: ShareServer | None = None
        self.fenced = False
        self.fence_at = 0.0
        self._lock_fd = -1
        self.status: dict[str, Any] = {"volume": volume, "host": host_id, "pid": os.getpid(),
                                       "role": "starting", "owner": None, "message": None}

    # --- paths and status ----------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def publish(self, **changes: Any) -> None:
        self.status.update(changes, updated=time.time())
        atomic_write_json(self.path("agent.json"), self.status)

    async def _etcd(self, fn: Any, *args: Any) -> Any:
        """One etcd call in a worker thread (bounded by the client's timeout)."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             abandon_on_cancel=True)

    def load_spec(self) -> dict[str, Any]:
        kv = self.etcd.get(spec_mod.spec_key(self.volume))
        if kv is None:
            raise NotFound(f"volume {self.volume!r} is not defined in etcd "
                           f"({', '.join(self.etcd.endpoints)}): define it with "
                           f"`blockhorn share define {self.volume} --etcd URL --spec FILE`")
        try:
            return spec_mod.validate(self.volume, json.loads(kv.value))
        except ValueError as e:
            raise BlockhornError(f"the definition of {self.volume!r} in etcd is not valid "
                                 f"JSON: {e}", errno.EINVAL) from None

    def check(self) -> None:
        """Everything that can be wrong before the agent starts contending: a clear error."""
        self.spec = self.load_spec()
        if not os.path.isfile(self.key_file):
            raise NotFound(f"cluster key {self.key_file} does not exist: copy the key the "
                           "replicas use to this host (--key-file)")
        attach.check_dependencies("nbdfuse")
        ganesha.argv(self.share_config(""))

    def lock(self) -> None:
        """One agent per volume and home: a second one would take the first one's processes
        for leftovers of a dead agent. Held (flock) until this process exits."""
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        fd = os.open(self.path("agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"another agent for {self.volume!r} runs with this home "
                       f"({self.workdir}): see its agent.json") from None
        self._lock_fd = fd   # kept open: the lock lives as long as this process

    def share_config(self, dev: str) -> ShareConfig:
        nfs = self.spec["nfs"]
        cfg = ShareConfig(volume=self.volume, device=dev, mount_dir=self.path("export"),
                          state_dir=self.path("share"), port=nfs["port"],
                          clients=nfs["clients"], squash=nfs["squash"],
                          mkfs_options=nfs["mkfs_options"], lease_s=nfs["lease_s"],
                          grace_s=nfs["grace_s"], minor_versions=nfs["minor_versions"],
                          service_address=nfs["service_address"], interface=nfs["interface"])
        cfg.validate()
        return cfg

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        await trio.to_thread.run_sync(self.cleanup_leftovers)
        self.publish(role="standby")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_signals, nursery.cancel_scope)
            await self._contend_forever()

    async def _on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: stepping down", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _contend_forever(self) -> None:
        complained = ""
        while True:
            try:
                won = await self._contend()
                complained = ""
            except BlockhornError as e:
                if str(e) != complained:   # once per distinct problem, not every poll
                    log.warning("standby: %s", e)
                    complained = str(e)
                self.publish(role="standby", message=str(e))
                await trio.sleep(POLL_S)
                continue
            if won is None:
                await trio.sleep(POLL_S)
                continue
            if not await self._own(*won):
                await trio.sleep(BACKOFF_S)

    async def _contend(self) -> tuple[int, int, float, int] | None:
        """Try to become the owner: (lease, ttl, time the grant was sent, the owner key's
        create revision), or None while another host owns the share."""
        kv = await self._etcd(self.etcd.get, self.owner_key)
        if kv is not None:
            owner = _owner_host(kv.value)
            if self.status.get("owner") != owner or self.status["role"] != "standby":
                log.info("standby: %s serves %s", owner, self.volume)
                self.publish(role="standby", owner=owner, message=None)
            return None
        self.spec = await self._etcd(self.load_spec)
        sent = trio.current_time()
        lease, ttl = await self._etcd(self.etcd.grant, self.ttl)
        value = dumps({"host": self.host_id, "pid": os.getpid(), "since": time.time(),
                       "service_address": self.spec["nfs"]["service_address"]})
        won, kv = await self._etcd(self.etcd.create, self.owner_key, value, lease)
        if not won or kv is None:
            await self._etcd(self.etcd.revoke, lease)
            return None
        log.info("%s owns %s (lease %x, TTL %d s)", self.host_id, self.volume, lease, ttl)
        return lease, ttl, sent, kv.create_revision

    async def _own(self, lease: int, ttl: int, sent: float, rev: int) -> bool:
        """Serve until cancelled, fenced or failed; then release the lease. True after a
        clean stop."""
        self.fenced = False
        self.fence_at = sent + ttl - FENCE_MARGIN_S
        self.publish(role="owner", owner=self.host_id, state="attaching", owned_at=time.time(),
                     serving_since=None, fenced_at=None, message=None)
        ok = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, lease, rev, nursery.cancel_scope)
                nursery.start_soon(self._watchdog, nursery.cancel_scope)
                await self._serve(rev)
        except* (BlockhornError, OSError) as group:
            e = first_leaf(group)
            log.error("serving %s failed: %s", self.volume, e)
            self.publish(message=f"serving failed: {e}")
            ok = False
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.etcd.timeout):
                try:
                    await self._etcd(self.etcd.revoke, lease)   # hand over at once
                except EtcdError as e:
                    log.warning("could not release the lease (it expires by itself): %s", e)
            if not self.fenced:
                self.publish(role="standby", owner=None, state=None)
        return ok and not self.fenced

    async def _keepalive(self, lease: int, rev: int, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(KEEPALIVE_S)
            sent = trio.current_time()
            try:
                ttl = await self._etcd(self.etcd.keepalive, lease)
                kv = await self._etcd(self.etcd.get, self.owner_key)
            except LeaseNotFound:
                self.fence("the ownership lease expired in etcd", scope)
                return
            except EtcdError as e:
                log.warning("lease renewal failed (fencing in %.1f s): %s",
                            self.fence_at - trio.current_time(), e)
                continue
            if kv is None or kv.create_revision != rev:
                self.fence("the owner key was deleted or replaced", scope)
                return
            self.fence_at = sent + ttl - FENCE_MARGIN_S

    async def _watchdog(self, scope: trio.CancelScope) -> None:
        while True:   # keepalives move fence_at on while this sleeps
            await trio.sleep_until(self.fence_at)
            if trio.current_time() >= self.fence_at:
                break
        self.fence(f"no lease renewal answered by etcd for {self.ttl - FENCE_MARGIN_S:.0f} s",
                   scope)

    def fence(self, reason: str, scope: trio.CancelScope) -> None:
        """Stop serving now, without waiting for anything: synchronous on purpose (no
        checkpoint between deciding and killing). Unmount and detach follow in `_serve`."""
        if self.fenced:
            return
        self.fenced = True
        server, engine = self.server, self.engine
        if server is not None and server.proc is not None and server.proc.returncode is None:
            server.proc.kill()
        if engine is not None and engine.poll() is None:
            engine.kill()
        nfs = self.spec.get("nfs") or {}
        if nfs.get("service_address"):
            try:
                address.remove(nfs["interface"], nfs["service_address"])
            except BlockhornError as e:
                log.error("fencing: %s", e)
        log.error("fenced: %s", reason)
        self.publish(role="fenced", state="fenced", fenced_at=time.time(), message=reason)
        scope.cancel()

    # --- serving -------------------------------------------------------------------------------

    async def _serve(self, rev: int) -> None:
        spec = self.spec
        engine_cfg = EngineConfig(self.volume, spec["size"],
                                  [ReplicaRef(r["name"], r["address"]) for r in spec["replicas"]],
                                  self.key_file, self.path("control.sock"),
                                  min_rw=spec["min_rw"], timeout_s=spec["timeout_s"],
                                  local_reads=False, epoch=rev)
        engine_cfg.save(self.path("engine.json"))
        att: attach.Attachment | None = None
        switch, armed = self._arm_deadman()
        try:
            self.engine = attach.start_engine(self.path("engine.json"), self.path("nbd.sock"),
                                              self.path("engine.log"))
            await self._wait_engine()
            att = await trio.to_thread.run_sync(
                attach.attach_device, attach.nbd_uri(self.path("nbd.sock")), self.path("fuse"),
                self.path("nbdfuse.log"), "nbdfuse")
            atomic_write_json(self.path(ATTACHMENT), att.to_dict())   # for leftovers
            cfg = self.share_config(att.device)
            cfg.save(self.path("share.json"))
            await self._restore_records(cfg)
            self.server = ShareServer(cfg, handle_signals=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.server.serve)
                nursery.start_soon(self._watch_engine)
                nursery.start_soon(self._sync_records, cfg, rev)
                nursery.start_soon(self._report_serving)
        finally:
            with trio.CancelScope(shield=True):
                self.server = None
                if att is not None:
                    try:
                        await trio.to_thread.run_sync(attach.detach_device, att)
                        os.unlink(self.path(ATTACHMENT))
                    except (BlockhornError, OSError) as e:
                        log.error("detaching %s: %s", att.device, e)
                await trio.to_thread.run_sync(self._stop_engine)
                os.close(armed)   # a clean stop: the helper finds nothing left, and exits
                await trio.to_thread.run_sync(switch.wait, DEADMAN_EXIT_S)

    def _arm_deadman(self) -> tuple[subprocess.Popen[bytes], int]:
        """Start the dead man's switch (see `deadman`): (the helper, the pipe's write end,
        which only this process holds)."""
        nfs = self.spec["nfs"]
        return spawn_switch([sys.executable, "-m", "blockhorn.cluster.deadman", self.workdir,
                             nfs["interface"], nfs["service_address"]],
                            self.path("deadman.log"))

    async def _wait_engine(self) -> None:
        engine = self.engine
        assert engine is not None   # set by the caller just before
        sock = self.path("control.sock")
        await trio.to_thread.run_sync(
            attach.wait_for, lambda: os.path.exists(sock) or engine.poll() is not None,
            "the engine", ENGINE_READY_S, self.path("engine.log"))
        if engine.poll() is not None:
            raise BlockhornError(f"the engine exited with status {engine.poll()}; last lines "
                                 f"of {self.path('engine.log')}:\n"
                                 f"{log_tail(self.path('engine.log'))}", errno.EIO)

    async def _watch_engine(self) -> None:
        engine = self.engine
        assert engine is not None   # started before this task
        rc = await trio.to_thread.run_sync(engine.wait, abandon_on_cancel=True)
        raise BlockhornError(f"the engine exited with status {rc}; see "
                             f"{self.path('engine.log')}", errno.EIO)

    def _stop_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None or engine.poll() is not None:
            return
        engine.terminate()
        try:
            engine.wait(ENGINE_STOP_S)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()

    async def _report_serving(self) -> None:
        assert self.server is not None   # set before this task starts
        await self.server.serving.wait()
        log.info("%s serves %s", self.host_id, self.volume)
        self.publish(state="serving", serving_since=time.time())

    # --- Ganesha's client records in etcd ------------------------------------------------------

    async def _restore_records(self, cfg: ShareConfig) -> None:
        kv = await self._etcd(self.etcd.get, self.recovery_key)
        await trio.to_thread.run_sync(ganesha.restore_records, cfg.recovery_dir,
                                      json.loads(kv.value) if kv else {})

    async def _sync_records(self, cfg: ShareConfig, rev: int) -> None:
        last: dict[str, Any] | None = None
        while True:
            await trio.sleep(RECOVERY_SYNC_S)
            tree = await trio.to_thread.run_sync(ganesha.snapshot_records, cfg.recovery_dir)
            if tree == last:
                continue
            try:
                # Only while the owner key is still the one this host created.
                ok, _ = await self._etcd(self.etcd.txn,
                                         [cmp_create(self.owner_key, rev)],
                                         [op_put(self.recovery_key, dumps(tree))])
            except EtcdError as e:
                log.warning("copying the NFS client records to etcd: %s", e)
                continue
            if ok:
                last = tree

    # --- leftovers of an agent that was killed -------------------------------------------------

    def cleanup_leftovers(self) -> None:
        """Undo what a killed agent on this host left (its dead man's switch normally has):
        processes working in its directory (Ganesha, nbdfuse, the engine), the service
        address, the mount, loop devices on the nbdfuse file."""
        deadman.kill_all(self.workdir)
        try:
            old = ShareConfig.load(self.path("share.json"))
        except BlockhornError:
            old = None   # never served here
        if old is not None:
            if old.service_address:
                address.remove(old.interface, old.service_address)
            device.unmount(old.mount_dir)
        release_loop(self.workdir)
        fuse_dir = self.path("fuse")
        attach.detach_device(attach.Attachment(device="", frontend="nbdfuse", fuse_dir=fuse_dir))


def _owner_host(value: bytes) -> str:
    try:
        return str(json.loads(value).get("host"))
    except (ValueError, AttributeError):
        return "?"   # not written by an agent: still someone else's key


def first_leaf(group: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def recorded_loop(workdir: str) -> str:
    """The loop device an agent in `workdir` attached and that is still bound to an nbdfuse
    file ("" if none). Recorded in attachment.json: the backing file's path cannot be
    compared, because the FUSE mount lives in the agent's mount namespace and the kernel
    shows it from elsewhere as `/nbd`."""
    try:
        with open(os.path.join(workdir, ATTACHMENT)) as f:
            dev = str(json.load(f).get("device") or "")
    except (OSError, ValueError):
        return ""
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE", dev],
                         capture_output=True, text=True).stdout.split()
    return dev if len(out) == 2 and out[1].endswith("/nbd") else ""


def release_loop(workdir: str) -> None:
    """Detach the loop device a dead agent in `workdir` left (see `recorded_loop`)."""
    dev = recorded_loop(workdir)
    if dev:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(workdir, ATTACHMENT))


def main(etcd_urls: str, volume: str, host_id: str, workdir: str, key_file: str,
         ttl: int = TTL_S) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s agent[{host_id}/{volume}]: "
                               "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per etcd request
    with Etcd(etcd_urls) as etcd:
        agent = Agent(etcd, volume, host_id, workdir, key_file, ttl)
        agent.check()
        agent.lock()
        trio.run(agent.run)
    return 0
