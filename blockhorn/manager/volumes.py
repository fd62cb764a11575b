"""Volume lifecycle on one host: create, attach, detach, remove, show.

Everything here is synchronous (it starts processes, waits for sockets, runs losetup): the API
runs each call in a worker thread, the supervisor in its own. A per-volume lock serialises the
operations on one volume; different volumes proceed in parallel.

Attach order: replicas -> engine -> device. Detach undoes it in reverse, every step attempted
even when an earlier one failed, so a detach after a partial failure leaves nothing behind and
a second detach is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from blockhorn import liveness
from blockhorn.config import EngineConfig, ReplicaConfig, ReplicaRef, parse_address
from blockhorn.control.store import ProcessRecord, ReplicaRow, StateStore, VolumeRow
from blockhorn.fsutil import atomic_write
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.manager.settings import ENGINE_REPLICA_TIMEOUT, Settings, commit_quorum
from blockhorn.sharemgr.control import NotShared, ShareControl
from blockhorn.types import (
    BlockhornError,
    Busy,
    InvalidArgument,
    NotFound,
    check_name,
)

if TYPE_CHECKING:
    from blockhorn.control.scheduler import Placement
    from blockhorn.manager.nodes import NodeService

log = logging.getLogger("blockhorn.manager")

FRONTENDS = ("auto", "nbdfuse", "nbd", "fuse", "fuse-nbd", "none")
DEFAULT_REPLICAS = 3
STATUS_TIMEOUT_S = 3.0     # seconds to wait for the engine's status answer in `show`


def engine_status(control_socket: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    from blockhorn.engine.control import ControlClient
    return ControlClient(control_socket, timeout=timeout).call({"op": "status"})


def engine_rebuild(control_socket: str, replica: str) -> dict[str, Any]:
    from blockhorn.engine.control import ControlClient
    return ControlClient(control_socket).call({"op": "rebuild", "replica": replica})


def engine_replace(control_socket: str, replica: str, address: str,
                   path: str) -> dict[str, Any]:
    from blockhorn.engine.control import ControlClient
    return ControlClient(control_socket).call({"op": "replace_replica", "replica": replica,
                                               "address": address, "path": path})


class VolumeManager:
    def __init__(self, home: Home, store: StateStore) -> None:
        self.home = home
        self.store = store
        self.shares = ShareControl(home, store)
        # (size, count, node_selector, disk_selector) -> where replicas go (node, disk); set by
        # the daemon (manager/nodes.py) so that `create` without disks uses the scheduler; []
        # or None: the home, as before.
        self.placer: Callable[[int, int, list[str], list[str]], list[Placement]] | None = None
        # Set by the daemon on a cluster (`daemon run --etcd`): this node, its peers' addresses
        # and liveness. None: one host, where every replica and engine is local.
        self.cluster: NodeService | None = None
        # Set by the daemon, one host or many: this node's registered disks and the
        # scheduler's view of them (an expand's room: manager/capacity.py).
        self.nodes: NodeService | None = None
        # replica -> (volume, process) of the replica processes this daemon started on a
        # cluster: one moved to another node is stopped here (manager/across.py stop_strays)
        self.started: dict[str, tuple[str, ProcessRecord]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- where things run (a cluster: each node runs its own share) -------------------------

    @property
    def me(self) -> str | None:
        return self.cluster.name if self.cluster is not None else None

    def here(self, node: str | None) -> bool:
        """Node `node` is this one (one host: every node is; None: this one)."""
        return self.cluster is None or node in (None, self.cluster.name)

    def is_local(self, r: ReplicaRow) -> bool:
        return self.here(r.node)

    def engine_here(self, vol: VolumeRow) -> bool:
        return self.here(vol.node)

    def engine_elsewhere(self, vol: VolumeRow) -> str | None:
        """The other node that runs attached `vol`'s engine; None when it is detached or its
        engine runs here (on one host, always)."""
        return vol.node if vol.desired == "attached" and not self.engine_here(vol) else None

    def running(self, r: ReplicaRow) -> bool:
        """A local replica's process runs; a remote one's is recorded by its node."""
        return process.alive(r.process) if self.is_local(r) else r.process is not None

    @contextmanager
    def locked(self, name: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the volume's lock; yields False (lock not held) when not blocking and busy."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        got = lock.acquire(blocking)
        try:
            yield got
        finally:
            if got:
                lock.release()

    # --- create ----------------------------------------------------------------------------

    def create(self, name: str, size: int | str, replicas: int = DEFAULT_REPLICAS,
               disks: list[str] | None = None, transport: str = "auto", access: str = "rwo",
               share: dict[str, Any] | None = None, node_selector: Any = None,
               disk_selector: Any = None) -> dict[str, Any]:
        """Create volume `name` (manager/create.py: placed and recorded in one step)."""
        from blockhorn.manager.create import create_volume
        return create_volume(self, name, size, replicas, disks, transport, access, share,
                             node_selector, disk_selector)

    def write_configs(self, name: str) -> None:
        vol = self.store.volume(name)
        reps = self.store.replicas(name)
        settings = Settings.snapshot(self.store)
        for r in reps:
            if self.is_local(r):   # another node writes its replicas' configs
                self.write_replica_config(name, vol.size, r)
        EngineConfig(volume=name, size=vol.size,
                     replicas=[ReplicaRef(r.name, r.address, r.directory) for r in reps],
                     key_file=self.home.key, control_socket=self.home.control_socket(name),
                     record=self.home.generation_record(name),
                     rebuild_limits=self.home.rebuild_limits,
                     timeout_s=float(settings.get_int(ENGINE_REPLICA_TIMEOUT)),
                     epoch=vol.epoch,   # the replicas refuse engines of older attachments
                     salvage=(vol.salvage or {}).get("replica", ""),
                     salvage_id=(vol.salvage or {}).get("id", ""),
                     quorum=commit_quorum(settings, self.cluster is not None, len(reps)),
                     # A cluster node's engine stops itself when its node's fence is due
                     # and nobody ran it (engine/ping.py fence_if_lease_lost).
                     beat_file=liveness.beat_path(self.home.root) if self.cluster else "",
                     fence_after_s=liveness.SELF_FENCE_AFTER_S if self.cluster else 0.0,
                     moving=[ReplicaRef(r.name, r.moving.address, r.moving.directory)
                             for r in reps if r.moving is not None],
                     down=self._down_replicas(reps),
                     ).save(self.home.engine_config(name))

    def _down_replicas(self, reps: list[ReplicaRow]) -> list[str]:
        """Replicas on nodes whose lease expired (a cluster): an engine started from this
        config gives them only a short try (EngineConfig.down). A node that comes back before
        the engine starts only costs its replica that short try."""
        if self.cluster is None:
            return []
        up = self.cluster.up_nodes()
        return [r.name for r in reps if r.node and r.node not in up]

    def write_replica_config(self, name: str, size: int, r: ReplicaRow) -> None:
        ReplicaConfig(volume=name, name=r.name, directory=r.directory, size=size,
                      listen=r.address, key_file=self.home.key
                      ).save(self.home.replica_config(name, r.name))

    # --- attach ----------------------------------------------------------------------------

    def attach(self, name: str, frontend: str = "auto", tcp_port: int | None = None,
               tcp_address: str | None = None, tls: str | None = None,
               node: str | None = None, salvage: str | None = None) -> dict[str, Any]:
        """Attach volume `name` (on `node`, a cluster's, when given). `salvage`: the
        operator's override of the generation rule for this start: the engine takes that
        replica as the source and resyncs the others from it, whatever they hold."""
        request = self._salvage_request(name, salvage)
        if node is not None and node != self.me:
            if self.cluster is None:
                raise InvalidArgument("volume attach --node needs a cluster (daemon run "
                                      "--etcd): on one host the engine runs here")
            if tcp_port is not None or tls is not None:
                raise InvalidArgument("--port/--tls with --node: ask that node's API instead")
            from blockhorn.manager import across
            return across.attach_on(self, name, frontend, node, request)
        if frontend not in FRONTENDS:
            raise InvalidArgument(f"invalid frontend {frontend!r}: use one of "
                                  f"{', '.join(FRONTENDS)}")
        from blockhorn.nbd import tls as nbdtls
        check_name(name)
        tcp = nbdtls.settings(self.home.volume_dir(name), os.path.join(self.home.root, "tls"),
                              tcp_port, tcp_address, tls)
        if tcp is not None and frontend == "fuse":
            raise InvalidArgument("the fuse frontend serves no NBD: drop --port, or use "
                                  "--frontend nbdfuse/nbd/none")
        with self.locked(name):
            vol = self.store.volume(name)
            if vol.standby:
                raise Busy(f"volume {name!r} is a DR standby (it follows "
                           f"{vol.standby.get('source')}): `blockhorn volume activate {name}` "
                           "first")
            from blockhorn.manager.maintenance import check_attachable
            check_attachable(vol)   # a snapshot/expand/restore of a cluster's detached volume
            if vol.desired == "attached":
                where = (vol.attachment or {}).get("device") or self._endpoint(name)
                raise Busy(f"volume {name!r} is already attached"
                           + (f" ({where})" if where else "") + ": detach it first")
            check_system(frontend)
            if vol.access_mode == "rwx" and frontend == "none":
                raise InvalidArgument(f"volume {name!r} is RWX: its share needs a block "
                                      "device, so --frontend none cannot be used")
            # Decided once, here: the supervisor restarts the engine process of that frontend.
            from blockhorn.nbd.attach import choose_frontend
            frontend = choose_frontend(frontend)
            if tcp is not None:
                nbdtls.check_bindable(tcp["address"], tcp["port"])
                if tcp["address"] in ("0.0.0.0", "::"):
                    log.warning("volume %s: NBD over TLS on every interface (%s:%d), as asked",
                                name, tcp["address"], tcp["port"])
                nbdtls.save(self.home.volume_dir(name), tcp)
            self.store.claim_attachment(name, self.me, vol.node, detached=True, desired="attached",
                                        frontend=frontend, tcp_port=tcp_port, robustness=None,
                                        message=None, attachment=None, device_stale=False,
                                        salvage=request)
            try:
                self.bring_up(name, frontend, vol.access_mode)
            except BaseException as e:
                log.error("attach of %s failed: %s; undoing", name, e)
                self._teardown(name)
                self.store.update_volume(name, desired="detached", frontend=None,
                                         tcp_port=None, salvage=None)
                nbdtls.remove(self.home.volume_dir(name))
                raise
        log.info("attached volume %s (frontend %s)", name, frontend)
        return self.show(name)

    def _salvage_request(self, name: str, salvage: str | None) -> dict[str, str] | None:
        if salvage is None:
            return None
        names = [r.name for r in self.store.replicas(name)]   # NotFound for a bad volume
        if salvage not in names:
            raise InvalidArgument(f"--salvage {salvage!r} is not a replica of volume {name!r} "
                                  f"(its replicas: {', '.join(names)})")
        log.warning("volume %s: salvage from replica %s asked: writes the other replicas hold "
                    "and it does not are lost", name, salvage)
        return {"replica": salvage, "id": secrets.token_hex(8)}

    def bring_up(self, name: str, frontend: str, access_mode: str) -> None:
        """Replicas (this node's; the others' nodes start theirs), engine, device, share."""
        from blockhorn.manager import across
        across.create_missing_replicas(self, self.store.volume(name))
        if self.cluster is not None:   # the engine's sockets are in this node's home
            self.store.set_engine_sockets(name, self.home.nbd_socket(name),
                                          self.home.control_socket(name))
        self.write_configs(name)
        self.store.clear_failed(name)   # replenishment waits count from now
        # Not those running already: a volume moved here off a dead node (manager/leader.py)
        # is attached, so every node runs its replicas of it.
        self.start_replicas(name, [r for r in self.store.replicas(name)
                                   if self.is_local(r) and not process.alive(r.process)])
        across.wait_remote_replicas(self, name)
        self.start_engine(name)
        if self.store.volume(name).salvage:
            # The engine started from it: the next start (a restart) follows the rule again,
            # which trusts the salvaged replica now (the start commit made it the newest set).
            self.store.update_volume(name, salvage=None)
            self.write_configs(name)
        if frontend != "none":
            self._attach_device(name, frontend)
        if access_mode == "rwx":
            self.start_share(name)
        self.store.update_volume(name, fresh=False)

    def start_replicas(self, name: str, reps: list[ReplicaRow], restarted: bool = False) -> None:
        """Start the given replica processes (all at once) and wait until each accepts."""
        started = []
        os.makedirs(self.home.run_dir(name), mode=0o700, exist_ok=True)   # unix sockets
        size = self.store.volume(name).size
        for r in reps:
            self.write_replica_config(name, size, r)
            address = self._usable_address(name, r)
            log_path = self.home.log(f"{r.name}.log")   # replica names start with the volume name
            rec = self.spawn_replica(name, r.name)
            self.store.set_replica_process(r.name, rec, restarted=restarted)
            if self.cluster is not None:
                self.started[r.name] = (name, rec)
            log.info("started replica %s of %s: pid %d on %s", r.name, name, rec.pid, address)
            started.append((r.name, address, rec, log_path))
        for rname, address, rec, log_path in started:
            process.wait_ready(f"replica {rname}", address, rec, log_path)

    def spawn_replica(self, name: str, replica: str) -> ProcessRecord:
        """Start the process of replica `replica` of volume `name` from its config file
        (written before), logging to <home>/logs/<replica>.log; not waited for."""
        argv = [sys.executable, "-m", "blockhorn", "replica", "serve",
                "--config", self.home.replica_config(name, replica)]
        return process.spawn(argv, self.home.log(f"{replica}.log"))

    def _usable_address(self, name: str, r: ReplicaRow) -> str:
        """The replica's address, with a new TCP port if something else took the stored one
        (the engine config is rewritten to match), and no stale unix socket in the way."""
        host, port = parse_address(r.address)
        if host == "unix":
            _unlink_stale(str(port))
            return r.address
        if process.tcp_port_free(int(port), host):
            return r.address
        new = self.store.allocate_port(name, r.name, process.tcp_port_free)
        address = f"{host}:{new}"
        log.warning("port %s of replica %s is taken by another program: moving to %s",
                    port, r.name, address)
        self.store.set_replica_address(r.name, address)
        self.write_configs(name)
        return address

    def start_engine(self, name: str, restarted: bool = False) -> None:
        vol = self.store.volume(name)
        eng = self.store.engine(name)
        for sock in (eng.nbd_socket, eng.control_socket):
            _unlink_stale(sock)
        os.makedirs(os.path.dirname(eng.nbd_socket), mode=0o700, exist_ok=True)
        if vol.frontend == "fuse":
            # The engine runs inside the FUSE process; its control socket appears only once
            # the volume file is mounted (blockhorn/fuse/serve.py). No NBD socket.
            argv = [sys.executable, "-m", "blockhorn", "fuse", "serve",
                    "--config", self.home.engine_config(name), "--mount", self.home.fuse_dir(name)]
            ready = [f"unix:{eng.control_socket}"]
        else:
            # Through `engine serve --keeper`: nbdkit exits with its parent (see cli._keep), and
            # the daemon must not be that parent.
            argv = [sys.executable, "-m", "blockhorn", "engine", "serve", "--keeper",
                    "--config", self.home.engine_config(name), "--socket", eng.nbd_socket]
            ready = [f"unix:{eng.nbd_socket}", f"unix:{eng.control_socket}"]
        log_path = self.home.log(f"{name}-engine.log")
        rec = process.spawn(argv, log_path)
        self.store.set_engine_process(name, rec, restarted=restarted)
        log.info("started engine of %s: pid %d", name, rec.pid)
        for address in ready:
            process.wait_ready(f"engine of {name} ({os.path.basename(address)})", address,
                               rec, log_path)
        from blockhorn.manager.upgrade import record_version
        record_version(self.home, name)
        if vol.frontend != "fuse":
            # nbdkit creates its socket under the process umask; the directory (0700) already
            # keeps others out, and this keeps them out where a home was made world-readable.
            os.chmod(eng.nbd_socket, 0o600)
            if vol.tcp_port:
                # The TLS proxy (its own process: it outlives an engine restart) in front of
                # the unix socket; kept if it runs already (manager/nbdproxy.py).
                from blockhorn.manager import nbdproxy
                nbdproxy.ensure(self.home, name, eng.nbd_socket)

    def _attach_device(self, name: str, frontend: str) -> None:
        from blockhorn.nbd.attach import attach_device, choose_frontend
        eng = self.store.engine(name)
        fuse_dir = self.home.fuse_dir(name)
        os.makedirs(fuse_dir, mode=0o700, exist_ok=True)
        frontend = choose_frontend(frontend)
        target = relay = ""
        if frontend == "nbd":
            # nbd-client connects to the volume's local relay, not to the engine: the relay
            # (its own process) keeps the kernel's connection through an engine crash or
            # upgrade and re-sends what was not answered (manager/nbdproxy.py).
            from blockhorn.manager import nbdproxy
            nbdproxy.ensure(self.home, name, eng.nbd_socket, nbdproxy.LOCAL)
            target = relay = nbdproxy.local_socket(eng.nbd_socket)
        att = attach_device(self._uri(target or eng.nbd_socket), fuse_dir,
                            self.home.log(f"{name}-nbdfuse.log"), frontend=frontend)
        att.relay = relay
        if att.frontend == "nbd":
            atomic_write(self.home.nbd_device(name), f"{att.device}\n".encode())
        self.store.update_volume(name, attachment=att.to_dict())
        log.info("volume %s is %s (%s)", name, att.device, att.frontend)

    def start_share(self, name: str, restarted: bool = False) -> None:
        """Start the share manager of an RWX volume on its device (mkfs/fsck, mount, Ganesha)."""
        dev = (self.store.volume(name).attachment or {}).get("device")
        if not dev:
            raise NotShared(f"volume {name!r} has no block device to share")
        if self.cluster is not None and not restarted:
            # Attached here, perhaps moved off a node that died: its clients' records first
            # (a restart on this node keeps its own, newer ones).
            self.shares.restore_records(name)
        self.shares.start(name, dev, restarted=restarted)

    def share(self, name: str) -> dict[str, Any]:
        """The share of an RWX volume: endpoint, allow-list, health."""
        vol = self.store.volume(name)
        self.shares.require_rwx(name, vol.access_mode)
        if vol.desired != "attached":
            raise NotShared(f"volume {name!r} is detached, so it is not shared: "
                            f"`blockhorn volume attach {name}` starts its share")
        return self.shares.show(name, attached=True)

    # --- detach and remove -----------------------------------------------------------------

    def detach(self, name: str) -> dict[str, Any]:
        with self.locked(name):
            vol = self.store.volume(name)
            remote = self.engine_elsewhere(vol) is not None
            if remote:   # its node's supervisor stops the engine, then its replicas' nodes
                self.store.update_volume(name, desired="detached")
        if remote:
            from blockhorn.manager import across
            across.wait_detached(self, name, vol.node or "")
            with self.locked(name):
                # This node's replicas now, not a tick later: a `volume rm` right after the
                # detach must not find them running. (The other nodes stop theirs.)
                if self.store.volume(name).desired != "attached":
                    self._stop_replicas([r for r in self.store.replicas(name)
                                         if self.is_local(r)])
            return self.show(name)
        with self.locked(name):
            errors = self.stop_here(name)
            from blockhorn.nbd import tls as nbdtls
            nbdtls.remove(self.home.volume_dir(name))
        if errors:
            raise BlockhornError(f"detach of {name!r} incomplete: {'; '.join(errors)}; "
                                 "run detach again after fixing the cause", errno.EIO)
        log.info("detached volume %s", name)
        return self.show(name)

    def stop_here(self, name: str, **fields: Any) -> list[str]:
        """Stop this node's part of volume `name` (`_teardown`) and record it detached, with
        `fields` too; returns what failed. The caller holds the volume's lock."""
        last = self._robustness_from_engine(name)
        errors = self._teardown(name)
        self.store.update_volume(name, desired="detached", tcp_port=None, robustness=last,
                                 device_stale=False, message="; ".join(errors) or None,
                                 **fields)
        return errors

    def _teardown(self, name: str) -> list[str]:
        """Device, engine, replicas, in that order; every step tried; returns the errors.
        On a cluster only this node's part: the others' daemons stop theirs."""
        errors: list[str] = []
        vol = self.store.volume(name)
        reps = [r for r in self.store.replicas(name) if self.is_local(r)]
        if not self.engine_here(vol):
            return errors + self._stop_replicas(reps)
        if vol.access_mode == "rwx":
            errors += self.shares.stop(name)   # Ganesha and the mount go before the device
            if self.cluster is not None:
                self.shares.drop_records(name, vol.epoch)
        if vol.attachment and "maintenance" in vol.attachment:   # no device: maintenance.py
            self.store.update_volume(name, attachment=None)
        elif vol.attachment:
            try:
                from blockhorn.nbd.attach import Attachment, detach_device
                detach_device(Attachment.from_dict(vol.attachment))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.home.nbd_device(name))   # fence's record: released
                self.store.update_volume(name, attachment=None)
            except (BlockhornError, OSError, ImportError) as e:
                errors.append(f"device {vol.attachment.get('device')}: {e}")
        eng = self.store.engine(name)
        try:
            # The relays (TLS proxy, local relay) first: they are the engine's clients, and
            # nbdkit with a client does not stop on SIGTERM. The device is gone already, so
            # the local relay has no client left (even with no engine to forward to).
            from blockhorn.manager import nbdproxy
            nbdproxy.stop(self.home, name, eng.nbd_socket)
        except (BlockhornError, OSError) as e:
            errors.append(f"NBD relays: {e}")
        try:
            process.terminate([eng.process])
            self.store.set_engine_process(name, None)
            for sock in (eng.nbd_socket, eng.control_socket):
                _unlink_stale(sock)
        except (BlockhornError, OSError) as e:
            errors.append(f"engine: {e}")
        return errors + self._stop_replicas(reps)

    def _stop_replicas(self, reps: list[ReplicaRow]) -> list[str]:
        try:
            process.terminate([r.process for r in reps])
            for r in reps:
                self.store.set_replica_process(r.name, None)
        except (BlockhornError, OSError) as e:
            return [f"replicas: {e}"]
        return []

    def local_leftovers(self, vol: VolumeRow) -> bool:
        """A detached volume with processes of this node still running (a detach asked on
        another node, or a daemon that died in the middle of one)."""
        if self.engine_here(vol) and process.alive(self.store.engine(vol.name).process):
            return True
        return any(process.alive(r.process) for r in self.store.replicas(vol.name)
                   if self.is_local(r))

    def remove(self, name: str, force: bool = False) -> None:
        with self.locked(name):
            vol = self.store.volume(name)
            reps = self.store.replicas(name)
            if self.engine_elsewhere(vol):
                raise Busy(f"volume {name!r} is attached on node {vol.node}: detach it first")
            if vol.desired == "attached" or self._any_alive(name):
                if not force:
                    raise Busy(f"volume {name!r} is attached: detach it first, or use --force")
                errors = self._teardown(name)
                if errors:
                    raise BlockhornError(f"cannot remove {name!r}: detach failed: "
                                         f"{'; '.join(errors)}", errno.EBUSY)
                self.store.update_volume(name, desired="detached")
            # Another node's replica directories are its daemon's (left in place there).
            for path in [r.directory for r in reps if self.is_local(r)] + [
                    self.home.volume_dir(name), self.home.run_dir(name)]:
                shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)
            for r in reps:
                _rmdir_if_empty(os.path.dirname(r.directory))
            self.shares.remove_files(name)
            self.store.delete_volume(name)
        log.info("removed volume %s", name)

    def _any_alive(self, name: str) -> bool:
        eng = self.store.engine(name)
        return process.alive(eng.process) or any(
            process.alive(r.process) for r in self.store.replicas(name) if self.is_local(r))

    # --- show ------------------------------------------------------------------------------

    def show(self, name: str) -> dict[str, Any]:
        vol = self.store.volume(name)
        reps = self.store.replicas(name)
        eng = self.store.engine(name)
        here = self.engine_here(vol)
        engine_up = process.alive(eng.process) if here else eng.process is not None
        status: dict[str, Any] | None = None
        status_error = None
        if engine_up and here:   # another node's engine: its supervisor stores robustness
            try:
                status = engine_status(eng.control_socket)
            except (BlockhornError, OSError, ImportError) as e:
                status_error = f"engine status unavailable: {e}"
        by_name = {r.get("name"): r for r in (status or {}).get("replicas", [])}
        replicas = []
        for r in reps:
            st = by_name.get(r.name, {})
            up = self.running(r)
            from blockhorn.manager.replenish import disk_of
            # An engine that still runs a replica's old directory (moved to another node and
            # not yet swapped in) describes the old one: no mode for the new one yet. A
            # drain's move (manager/moves.py) swaps the replica while it stays in sync.
            m = r.moving
            current = st.get("path") in (None, r.directory) or (
                m is not None and st.get("path") == m.directory)
            replicas.append({
                "name": r.name, "mode": st.get("mode") if engine_up and current else None,
                "address": r.address, "path": r.directory,
                "node": r.node or self.me, "disk": disk_of(r.directory),
                "pid": r.process.pid if up and r.process else None,
                "revision": st.get("revision"), "rebuild": st.get("rebuild"),
                "restarts": r.restarts, "failed_since": r.failed_since,
                "moving": ({"node": m.node, "path": m.directory, "address": m.address,
                            "migration": st.get("migration"), "give_up": m.give_up}
                           if m is not None else None),
            })
        endpoints = []
        from blockhorn.nbd import tls as nbdtls
        tcp = nbdtls.load(self.home.volume_dir(name)) if vol.tcp_port else None
        tcp = nbdtls.describe(tcp) if tcp is not None else None
        if engine_up and here and vol.frontend != "fuse":   # the fuse frontend serves no NBD
            endpoints.append(self._uri(eng.nbd_socket))
            if tcp is not None:
                endpoints.append(tcp["uri"])
        return {
            "name": vol.name, "size": vol.size, "state": vol.desired,
            "robustness": self._robustness(vol, reps, engine_up, status),
            "endpoint": endpoints[0] if endpoints else None, "endpoints": endpoints,
            "device": (vol.attachment or {}).get("device"),
            "frontend": (vol.attachment or {}).get("frontend") or vol.frontend,
            "replicas": replicas, "replica_count": vol.replica_count,
            "access_mode": vol.access_mode, "created": vol.created,
            "share": (self.shares.show(name, attached=vol.desired == "attached")
                      if vol.access_mode == "rwx" else None),
            "engine": {"pid": eng.process.pid if engine_up and eng.process else None,
                       "restarts": eng.restarts, **_versions(self.home, name, engine_up)},
            "counters": (status or {}).get("counters"),
            "attachment": vol.attachment, "nbd_tcp": tcp,
            "groups": vol.groups, "standby": vol.standby,
            "node": (vol.node or self.me) if vol.desired == "attached" else None,
            "epoch": vol.epoch,   # the attach epoch (a cluster's; 0 on one host)
            "node_selector": vol.node_selector, "disk_selector": vol.disk_selector,
            "message": "; ".join(m for m in (vol.message, status_error) if m) or None,
        }

    def list_volumes(self) -> list[dict[str, Any]]:
        out = []
        for vol in self.store.volumes():
            try:
                out.append(self.show(vol.name))
            except NotFound:
                continue   # removed while we listed
        return out

    def _robustness(self, vol: VolumeRow, reps: list[ReplicaRow], engine_up: bool,
                    status: dict[str, Any] | None) -> str:
        if vol.desired == "attached" and vol.device_stale:
            return "faulted"   # the device lost its engine; only detach + attach recovers it
        if status and status.get("robustness"):
            return str(status["robustness"])
        if vol.desired == "attached":
            return "faulted" if not engine_up else (vol.robustness or "healthy")
        present = sum(not self.is_local(r)   # another node's: its daemon would say
                      or os.path.exists(os.path.join(r.directory, "volume.meta")) for r in reps)
        if present == 0:
            return "faulted"
        if present < len(reps):
            return "degraded"
        return vol.robustness or "healthy"

    def _robustness_from_engine(self, name: str) -> str | None:
        eng = self.store.engine(name)
        if not process.alive(eng.process):
            return self.store.volume(name).robustness
        try:
            return str(engine_status(eng.control_socket).get("robustness"))
        except (BlockhornError, OSError, ImportError):
            return None

    def _endpoint(self, name: str) -> str | None:
        eng = self.store.engine(name)
        vol = self.store.volume(name)
        up = process.alive(eng.process) and vol.frontend != "fuse"
        return self._uri(eng.nbd_socket) if up else None

    @staticmethod
    def _uri(nbd_socket: str) -> str:
        return f"nbd+unix:///?socket={os.path.abspath(nbd_socket)}"


def _versions(home: Home, name: str, engine_up: bool) -> dict[str, Any]:
    """The running engine's version and the installed one (manager/upgrade.py): when they
    differ, `blockhorn volume upgrade` would start the new code."""
    from blockhorn.manager.upgrade import installed_version, running_version
    return {"version": running_version(home, name) if engine_up else None,
            "installed_version": installed_version()}


def check_system(frontend: str) -> None:
    """Fail with the Debian package to install when a program the attach needs is missing."""
    if not shutil.which("nbdkit"):
        raise BlockhornError("nbdkit is not installed: apt-get install nbdkit "
                             "nbdkit-plugin-python", errno.ENOENT)
    if frontend != "none":
        from blockhorn.nbd.attach import check_dependencies
        check_dependencies(frontend)


def _unlink_stale(path: str) -> None:
    """Remove a unix socket file that nothing listens on any more."""
    if os.path.exists(path) and not process.accepts(f"unix:{path}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass   # removed concurrently: what we wanted


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass   # not empty (other volumes) or already gone: leave it
