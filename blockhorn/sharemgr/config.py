"""The share manager's config file (JSON, like the engine's and the replicas').

Vocabulary:
- *allow-list*: the client rules of a share, each a CIDR and an access (`rw` or `ro`). Ganesha
  gets one CLIENT block per access; every other host is refused (the export's own access is None).
- *squash*: `root_squash` (default: a client's uid 0 becomes the anonymous user) or
  `no_root_squash` (opt-in).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

from blockhorn.config import _Loadable
from blockhorn.sharemgr.address import parse as parse_address
from blockhorn.types import InvalidArgument, check_name

SQUASH = ("root_squash", "no_root_squash")
ACCESS = ("rw", "ro")
LEASE_S = 10          # seconds; NFSv4 lease: a silent client loses its state after this
GRACE_S = 15          # seconds; after a (re)start only reclaims are served, at most this long
# NFSv4 minor versions served. 4.1/4.2 by default (sessions, exactly-once semantics). libnfs
# (nfs-cp, nfs-ls, nfs-cat) speaks only 4.0, so volumes used with it add 0.
MINOR_VERSIONS = [1, 2]


def parse_client(spec: str) -> dict[str, str]:
    """`10.0.0.0/24`, `10.0.0.5=ro`, `127.0.0.1/32=rw` -> {"cidr": ..., "access": ...}."""
    cidr, _, access = spec.partition("=")
    access = access or "rw"
    if access not in ACCESS:
        raise InvalidArgument(f"bad NFS client {spec!r}: access must be rw or ro")
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise InvalidArgument(f"bad NFS client {spec!r}: use an address or CIDR, "
                              "e.g. 10.0.0.0/24 or 10.0.0.5=ro") from None
    return {"cidr": str(net), "access": access}


@dataclass
class ShareConfig(_Loadable):
    volume: str
    device: str            # the volume's block device (/dev/loopN, /dev/nbdN)
    mount_dir: str         # where the ext4 filesystem is mounted and exported from
    state_dir: str         # ganesha.conf, pid file, recovery database, status.json
    port: int              # NFS TCP port
    clients: list[dict[str, str]]
    bind: str = "0.0.0.0"
    squash: str = "root_squash"
    mkfs_options: list[str] = field(default_factory=list)
    lease_s: int = LEASE_S
    grace_s: int = GRACE_S
    minor_versions: list[int] = field(default_factory=lambda: list(MINOR_VERSIONS))
    service_address: str = ""   # CIDR added to `interface` while serving; Ganesha binds to it
    interface: str = ""
    log_file: str = ""     # Ganesha's own log; default <state_dir>/ganesha.log

    def validate(self) -> None:
        check_name(self.volume)
        _check(self.squash, self.port, self.lease_s, self.grace_s, self.minor_versions)
        if not self.clients:
            raise InvalidArgument("a share needs at least one allowed client")
        _check_service(self.service_address, self.interface)
        if self.service_address:
            self.bind = parse_address(self.service_address)[0]
        self.clients = [parse_client(f"{c['cidr']}={c.get('access', 'rw')}")
                        for c in self.clients]
        ipaddress.ip_address(self.bind)
        for p in (self.mount_dir, self.state_dir):
            if not os.path.isabs(p):
                raise InvalidArgument(f"{p} must be an absolute path")

    @property
    def ganesha_conf(self) -> str:
        return os.path.join(self.state_dir, "ganesha.conf")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.state_dir, "ganesha.pid")

    @property
    def recovery_dir(self) -> str:
        return os.path.join(self.state_dir, "recovery")

    @property
    def status_file(self) -> str:
        return os.path.join(self.state_dir, "status.json")

    @property
    def ganesha_log(self) -> str:
        return self.log_file or os.path.join(self.state_dir, "ganesha.log")


def share_options(clients: list[str] | None = None, squash: str = "root_squash",
                  mkfs_options: list[str] | None = None, port: int | None = None,
                  lease_s: int = LEASE_S, grace_s: int = GRACE_S,
                  minor_versions: list[int] | None = None, service_address: str = "",
                  interface: str = "") -> dict[str, Any]:
    """Validated per-volume share settings as stored by the daemon (JSON)."""
    minor_versions = sorted(set(minor_versions or MINOR_VERSIONS))
    _check(squash, port, lease_s, grace_s, minor_versions)
    _check_service(service_address, interface)
    return {"service_address": service_address, "interface": interface,"clients": [parse_client(c) for c in clients or []], "squash": squash,
            "mkfs_options": list(mkfs_options or []), "port": port, "lease_s": lease_s,
            "grace_s": grace_s, "minor_versions": minor_versions}


def _check(squash: str, port: int | None, lease_s: int, grace_s: int,
           minor_versions: list[int]) -> None:
    if squash not in SQUASH:
        raise InvalidArgument(f"invalid squash {squash!r}: use {' or '.join(SQUASH)}")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise InvalidArgument(f"invalid NFS port {port}")
    for name, value in (("lease", lease_s), ("grace", grace_s)):
        if not isinstance(value, int) or not 1 <= value <= 180:
            raise InvalidArgument(f"{name} must be 1 to 180 seconds")
    if not minor_versions or any(v not in (0, 1, 2) for v in minor_versions):
        raise InvalidArgument(f"invalid NFSv4 minor versions {minor_versions}: use 0, 1 and/or 2")


def _check_service(service_address: str, interface: str) -> None:
    if bool(service_address) != bool(interface):
        raise InvalidArgument("a service address needs its interface and the reverse "
                              "(--service-address CIDR --service-interface IF)")
    if service_address:
        parse_address(service_address)
