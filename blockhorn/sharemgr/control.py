"""The daemon's side of shares: per-volume settings, the share manager process, show.

Settings live in the state store's shares (control/store; removing a volume removes its
share). On a cluster the share's Ganesha client records are kept in the store too
(`sync_records`, `restore_records`): the node a share moves to lets the clients reclaim. The NFS port is held in the store's ports under the owner `nfs`, so it stays the same across attaches and clients keep their URL.

Paths of a share of volume V:
    <home>/volumes/V/share.json     the share manager's config (rewritten at each start)
    <home>/volumes/V/share/         ganesha.conf, ganesha.pid, recovery/, status.json
    <home>/export/V/                the mount point Ganesha exports as /V
    <home>/logs/V-share.log         the share manager's log; ganesha.log in share/
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from typing import Any

import psutil

from blockhorn.control.store import ProcessRecord, StateStore
from blockhorn.fsutil import read_json
from blockhorn.manager import process
from blockhorn.manager.paths import Home
from blockhorn.sharemgr import device, ganesha
from blockhorn.sharemgr.address import remove as remove_address
from blockhorn.sharemgr.config import MINOR_VERSIONS, ShareConfig
from blockhorn.types import BlockhornError, InvalidArgument

log = logging.getLogger("blockhorn.manager")

START_TIMEOUT_S = 600.0   # seconds; mkfs + fsck of a large volume, then Ganesha's start
MOUNT_OPTIONS = "vers=4.1,noresvport,timeo=600,retrans=5,softerr"   # Longhorn's, see REFERENCE

class NotShared(BlockhornError):
    errno = errno.ENOTCONN


def host_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback first: the default allow-list ("the host that
    attached the volume") and the candidates for the endpoint address."""
    out = ["127.0.0.1"]
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.address not in out:
                out.append(a.address)
    return out


def allow_list(options: dict[str, Any]) -> list[dict[str, str]]:
    """The explicit allow-list, or by default this host's own addresses — never everyone."""
    return options["clients"] or [{"cidr": f"{a}/32", "access": "rw"}
                                  for a in host_addresses()]


def config_path(home: Home, name: str) -> str:
    return os.path.join(home.volume_dir(name), "share.json")


def state_dir(home: Home, name: str) -> str:
    return os.path.join(home.volume_dir(name), "share")


def mount_dir(home: Home, name: str) -> str:
    return os.path.join(home.root, "export", name)


def mounted(path: str) -> bool:
    return device.is_mounted(path) is not None


def fence_marks(home: Home, name: str) -> tuple[set[str], set[str]]:
    """Command-line arguments that name volume `name`'s share processes in `home`, for a
    kill that cannot ask the store (node/fence.py): (share managers, Ganesha)."""
    return {config_path(home, name)}, {os.path.join(state_dir(home, name), "ganesha.conf")}


def drop_address(home: Home, name: str) -> None:
    """Remove the share's service address from this node's interface (after Ganesha was
    killed): clients must not reach a node that no longer serves the share."""
    try:
        cfg = ShareConfig.load(config_path(home, name))
    except BlockhornError:
        return   # never served here
    if cfg.service_address:
        try:
            remove_address(cfg.interface, cfg.service_address)
        except BlockhornError as e:
            log.error("share of %s: %s", name, e)


class ShareControl:
    def __init__(self, home: Home, store: StateStore) -> None:
        self.home = home
        self.store = store
        self._synced: dict[str, dict[str, Any]] = {}   # volume -> records last stored
        # A cluster node's beat file (blockhorn/liveness.py), set by the daemon: each share
        # manager watches it and stops serving when the node's lease may run out.
        self.beat_file = ""

    # --- paths and settings ----------------------------------------------------------------

    def config_path(self, name: str) -> str:
        return config_path(self.home, name)

    def state_dir(self, name: str) -> str:
        return state_dir(self.home, name)

    def mount_dir(self, name: str) -> str:
        return mount_dir(self.home, name)

    def add(self, name: str, options: dict[str, Any]) -> None:
        self.store.add_share(name, options)

    def _row(self, name: str) -> tuple[dict[str, Any], ProcessRecord | None, int]:
        row = self.store.share(name)
        return row.options, row.process, row.restarts

    def _set_process(self, name: str, rec: ProcessRecord | None, restarted: bool) -> None:
        self.store.set_share_process(name, rec, restarted)

    def _port(self, name: str, options: dict[str, Any]) -> int:
        if options.get("port"):
            return int(options["port"])
        port = self.store.ports(name).get("nfs")
        if port is None or not process.tcp_port_free(port, "0.0.0.0"):
            port = self.store.allocate_port(
                name, "nfs", lambda p: process.tcp_port_free(p, "0.0.0.0"))
        return port

    def config(self, name: str, dev: str) -> ShareConfig:
        options, _, _ = self._row(name)
        cfg = ShareConfig(volume=name, device=dev, mount_dir=self.mount_dir(name),
                          state_dir=self.state_dir(name), port=self._port(name, options),
                          clients=allow_list(options), squash=options["squash"],
                          mkfs_options=options["mkfs_options"], lease_s=options["lease_s"],
                          grace_s=options["grace_s"],
                          minor_versions=options.get("minor_versions") or MINOR_VERSIONS,
                          service_address=options.get("service_address") or "",
                          interface=options.get("interface") or "",
                          beat_file=self.beat_file)
        cfg.validate()
        return cfg

    # --- process ---------------------------------------------------------------------------

    def alive(self, name: str) -> bool:
        return process.alive(self._row(name)[1])

    def start(self, name: str, dev: str, restarted: bool = False) -> None:
        """Start the share manager on `dev` and wait until it serves (or says why not)."""
        self._kill_stale_ganesha(name)   # it holds the port, which the volume keeps
        cfg = self.config(name, dev)
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        cfg.save(self.config_path(name))
        try:
            os.unlink(cfg.status_file)
        except FileNotFoundError:
            pass   # first start
        log_path = self.home.log(f"{name}-share.log")
        rec = process.spawn([sys.executable, "-m", "blockhorn", "share", "serve", "--config",
                             self.config_path(name)], log_path)
        self._set_process(name, rec, restarted)
        log.info("started share manager of %s: pid %d, NFS port %d", name, rec.pid, cfg.port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            status = self._status(cfg.status_file)
            if status.get("state") == "serving":
                return
            if status.get("state") == "failed":
                process.terminate([rec])
                raise BlockhornError(f"share of {name!r}: {status.get('message')}",
                                     int(status.get("errno") or errno.EIO))
            if not process.alive(rec):
                raise BlockhornError(f"the share manager of {name!r} exited during start-up; "
                                     f"last lines of {log_path}:\n{process.log_tail(log_path)}",
                                     errno.EIO)
            if time.monotonic() > deadline:
                process.terminate([rec])
                raise BlockhornError(f"the share manager of {name!r} did not serve within "
                                     f"{START_TIMEOUT_S:.0f} s; see {log_path}", errno.ETIMEDOUT)
            time.sleep(0.1)

    def stop(self, name: str) -> list[str]:
        """Stop the share manager (it stops Ganesha and unmounts); then make sure of both,
        for a share manager that was killed. Returns the errors; every step is tried."""
        errors: list[str] = []
        _, rec, _ = self._row(name)
        try:
            process.terminate([rec])
            self._set_process(name, None, False)
        except (BlockhornError, OSError) as e:
            errors.append(f"share manager: {e}")
        cfg = self._kill_stale_ganesha(name)
        if cfg is not None:
            try:
                device.unmount(cfg.mount_dir)
            except BlockhornError as e:
                errors.append(f"unmount {cfg.mount_dir}: {e}")
        return errors

    def _kill_stale_ganesha(self, name: str) -> ShareConfig | None:
        """Stop a Ganesha that a killed share manager left running; the last config."""
        try:
            cfg = ShareConfig.load(self.config_path(name))
        except BlockhornError:
            return None   # never started
        ganesha.kill_stale(cfg)
        return cfg

    # --- a cluster: what moves with the share to another node -------------------------------

    def restore_records(self, name: str) -> None:
        """Before Ganesha starts on a node the share moved to: write back the client
        recovery records its last node stored (`sync_records`), so NFSv4 clients of the dead
        node reclaim their state in the grace period."""
        records = self.store.share_records(name) or {"dirs": [], "files": {}}
        # None stored (detached since): no client is to reclaim, whatever an earlier
        # attachment on this node left in its directory (it would hold Ganesha in its grace
        # period for clients that never come).
        ganesha.restore_records(os.path.join(self.state_dir(name), "recovery"), records)
        self._synced[name] = records
        log.info("share of %s: NFS client records restored (%d entries)", name,
                 len(records["dirs"]) + len(records["files"]))

    def sync_records(self, name: str, epoch: int) -> None:
        """Copy Ganesha's client recovery records into the store when they changed, only
        while the volume is still attached under `epoch` (the store checks)."""
        records = ganesha.snapshot_records(os.path.join(self.state_dir(name), "recovery"))
        if records != self._synced.get(name) and \
                self.store.put_share_records(name, records, epoch):
            self._synced[name] = records

    def drop_records(self, name: str, epoch: int) -> None:
        """A detach: nobody is to reclaim (the share manager removed its copy too)."""
        self._synced.pop(name, None)
        self.store.put_share_records(name, None, epoch)

    def remove_files(self, name: str) -> None:
        try:
            os.rmdir(self.mount_dir(name))
        except FileNotFoundError:
            pass   # never attached

    @staticmethod
    def _status(path: str) -> dict[str, Any]:
        try:
            return dict(read_json(path))
        except (OSError, ValueError):
            return {}

    # --- show ------------------------------------------------------------------------------

    def show(self, name: str, attached: bool) -> dict[str, Any]:
        options, rec, restarts = self._row(name)
        up = attached and process.alive(rec)
        status = self._status(os.path.join(self.state_dir(name), "status.json")) if up else {}
        port = options.get("port") or self.store.ports(name).get("nfs")
        addresses = host_addresses()
        address = next((a for a in addresses if not a.startswith("127.")), addresses[0])
        if options.get("service_address"):
            address = options["service_address"].split("/")[0]
        if not attached:
            health = "detached"
        elif not up:
            health = "failed"
        else:
            health = status.get("health") or "unknown"
        endpoint = f"nfs://{address}:{port}/{name}" if up and port else None
        return {
            "volume": name, "health": health, "state": status.get("state"),
            "endpoint": endpoint, "address": address if up else None, "port": port,
            "mount_command": (f"mount -t nfs4 -o {MOUNT_OPTIONS},port={port} "
                              f"{address}:/{name} /mnt/{name}") if endpoint else None,
            "export": f"/{name}", "mount_dir": self.mount_dir(name),
            "clients": allow_list(options), "squash": options["squash"],
            "mkfs_options": options["mkfs_options"],
            "lease_s": options["lease_s"], "grace_s": options["grace_s"],
            "minor_versions": options.get("minor_versions") or MINOR_VERSIONS,
            "service_address": options.get("service_address") or None,
            "interface": options.get("interface") or None,
            "pid": rec.pid if up and rec else None, "restarts": restarts,
            "ganesha": {"pid": status.get("ganesha_pid"),
                        "restarts": status.get("ganesha_restarts", 0),
                        "last_outage_s": status.get("last_outage_s")},
            "checks": status.get("checks") or {}, "fs": status.get("fs"),
            "checked": status.get("updated"),
            "message": status.get("message"),
        }

    def require_rwx(self, name: str, access_mode: str) -> None:
        if access_mode != "rwx":
            raise InvalidArgument(f"volume {name!r} is RWO and has no share: create an RWX "
                                  "volume with `volume create NAME --size S --access rwx`")
