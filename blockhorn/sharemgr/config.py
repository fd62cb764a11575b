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
import re
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
# Linux interface names: at most IFNAMSIZ-1 = 15 bytes, no '/', no whitespace.
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# mke2fs options a share may add, each with its value's check. Everything else is refused:
# `-d DIR` would copy host files into the exported filesystem, `-z FILE` writes an undo file
# (as root, anywhere), `-c` runs badblocks, `-n`/`-S` do not make a usable filesystem, and a
# second device argument would format another device.
_UINT = re.compile(r"[0-9]{1,10}")
_FEATURES = re.compile(r"\^?[a-z0-9_]{1,32}(,\^?[a-z0-9_]{1,32}){0,31}")
_EXTENDED = {   # -E KEY[=VALUE]: the value's full-match pattern, None for a bare flag
    "root_owner": re.compile(r"[0-9]{1,10}:[0-9]{1,10}"),
    "stride": _UINT, "stripe_width": _UINT, "stripe-width": _UINT,
    "lazy_itable_init": re.compile(r"[01]"), "lazy_journal_init": re.compile(r"[01]"),
    "discard": None, "nodiscard": None,
}
_MKFS_HELP = ("allowed: -L LABEL, -b 1024|2048|4096, -i BYTES-PER-INODE, -I INODE-SIZE, -m PERCENT, "
              "-N INODES, -O FEATURE[,...], -E root_owner=UID:GID|stride=N|stripe_width=N|"
              "lazy_itable_init=0|1|lazy_journal_init=0|1|discard|nodiscard")


def parse_client(spec: str) -> dict[str, str]:
    """`10.0.0.0/24`, `10.0.0.5=ro`, `127.0.0.1/32=rw` -> {"cidr": ..., "access": ...}.
    The CIDR written to ganesha.conf is ipaddress's normal form, never the input text."""
    if not isinstance(spec, str):
        raise InvalidArgument(f"bad NFS client {spec!r}: use CIDR or CIDR=ro")
    cidr, _, access = spec.partition("=")
    access = access or "rw"
    if access not in ACCESS:
        raise InvalidArgument(f"bad NFS client {spec!r}: access must be rw or ro")
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise InvalidArgument(f"bad NFS client {spec!r}: use an address or CIDR, "
                              "e.g. 10.0.0.0/24 or 10.0.0.5=ro") from None
    return {"cidr": str(net), "access": access}


def _check_extended(value: str) -> None:
    for item in value.split(","):
        key, sep, arg = item.partition("=")
        if key not in _EXTENDED:
            raise InvalidArgument(f"mkfs option -E {item!r} is not allowed; {_MKFS_HELP}")
        pattern = _EXTENDED[key]
        if (pattern is None) != (not sep) or (pattern is not None
                                              and not pattern.fullmatch(arg)):
            raise InvalidArgument(f"bad value in mkfs option -E {item!r}; {_MKFS_HELP}")


def _check_mkfs_value(flag: str, value: str) -> None:
    ok = {
        "-b": lambda v: v in ("1024", "2048", "4096"),
        "-i": lambda v: bool(_UINT.fullmatch(v)) and 1024 <= int(v) <= 64 * 1024 * 1024,
        "-I": lambda v: v in ("128", "256", "512", "1024", "2048", "4096"),
        "-m": lambda v: bool(re.fullmatch(r"[0-9]{1,2}(\.[0-9]{1,3})?", v)) and float(v) <= 50,
        "-N": lambda v: bool(_UINT.fullmatch(v)) and int(v) > 0,
        "-O": lambda v: bool(_FEATURES.fullmatch(v)),
        "-L": lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]{1,16}", v)),
    }
    if flag == "-E":
        _check_extended(value)
    elif not ok[flag](value):
        raise InvalidArgument(f"bad value {value!r} for mkfs option {flag}; {_MKFS_HELP}")


def check_mkfs_options(options: object) -> list[str]:
    """The share's extra mke2fs options, validated against the allow-list and returned in
    `-X VALUE` form (`-b4096` becomes `-b 4096`); InvalidArgument for anything else."""
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise InvalidArgument("mkfs options must be a list of strings")
    out: list[str] = []
    i = 0
    while i < len(options):
        opt = options[i]
        flag, value = opt[:2], opt[2:]
        if flag not in ("-b", "-i", "-I", "-m", "-N", "-O", "-E", "-L"):
            raise InvalidArgument(f"mkfs option {opt!r} is not allowed; {_MKFS_HELP}")
        if not value:
            if i + 1 >= len(options):
                raise InvalidArgument(f"mkfs option {flag} needs a value; {_MKFS_HELP}")
            i += 1
            value = options[i]
        _check_mkfs_value(flag, value)
        out += [flag, value]
        i += 1
    return out


def _check_path(path: str) -> None:
    """Paths written into ganesha.conf between quotes: absolute, no quote, no backslash, no
    control character (a newline would end the line and start a new directive)."""
    if (not isinstance(path, str) or not os.path.isabs(path) or not path.isprintable()
            or any(c in path for c in '"\\{};#')):
        raise InvalidArgument(f"{path!r} cannot be used in a share: it must be an absolute "
                              "path without quotes, backslashes, braces, ';', '#' or control "
                              "characters (choose another --home)")


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
    # The interface named for the share; "" or one this host lacks: the one whose subnet
    # contains the service address (address.pick_interface, at each start).
    interface: str = ""
    log_file: str = ""     # Ganesha's own log; default <state_dir>/ganesha.log
    # A cluster node's liveness beat (blockhorn/liveness.py, `<home>/node.beat`): the share
    # stops serving once the node's last lease renewal is SELF_FENCE_AFTER_S old. "" on a
    # single host (no lease).
    beat_file: str = ""

    def validate(self) -> None:
        check_name(self.volume)
        _check(self.squash, self.port, self.lease_s, self.grace_s, self.minor_versions)
        self.mkfs_options = check_mkfs_options(self.mkfs_options)
        if not self.clients:
            raise InvalidArgument("a share needs at least one allowed client")
        _check_service(self.service_address, self.interface)
        if self.service_address:
            self.bind = parse_address(self.service_address)[0]
        self.clients = [parse_client(f"{c['cidr']}={c.get('access', 'rw')}")
                        for c in self.clients]
        try:
            self.bind = str(ipaddress.ip_address(self.bind))
        except ValueError:
            raise InvalidArgument(f"bad bind address {self.bind!r}") from None
        for p in (self.mount_dir, self.state_dir, self.ganesha_log):
            _check_path(p)

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
    if not isinstance(clients or [], list):
        raise InvalidArgument("NFS clients must be a list of CIDR[=ro] strings")
    return {"service_address": service_address, "interface": interface,
            "clients": [parse_client(c) for c in clients or []], "squash": squash,
            "mkfs_options": check_mkfs_options(mkfs_options or []), "port": port,
            "lease_s": lease_s, "grace_s": grace_s, "minor_versions": minor_versions}


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
    """An interface without an address is refused; an address without an interface goes on
    the interface whose subnet contains it (sharemgr/address.py `pick_interface`)."""
    if interface and not service_address:
        raise InvalidArgument("a service interface needs a service address "
                              "(--service-address CIDR [--service-interface IF])")
    if interface and (not isinstance(interface, str) or not IFNAME_RE.fullmatch(interface)):
        raise InvalidArgument(f"bad interface name {interface!r}: use up to 15 of "
                              "A-Z a-z 0-9 _ . -")
    if service_address:
        parse_address(service_address)
