"""Config files of the per-volume processes: one replica server, one engine.

The daemon writes them under its home; hand-run hosts write them for the systemd templates
(`blockhorn-replica@NAME.service` reads `/etc/blockhorn/replica/NAME.json`). JSON, one object.
Addresses are `HOST:PORT` (TCP) or `unix:/PATH` (a unix socket, same host only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Self

from blockhorn.fsutil import atomic_write_json
from blockhorn.replica.proto import FRAME_AUTH_SETTINGS  # docs/SECURITY.md
from blockhorn.types import InvalidArgument, NotFound, check_name

REPLICA_TIMEOUT_S = 8.0   # seconds a replica may take to answer before it is set ERR
MIN_RW = 1                # fewest RW replicas that still acknowledge I/O


# Full matches only (see types.NAME_RE): a host name, an IPv4 address or a bracketed IPv6 one,
# and a port of ASCII digits ('²'.isdigit() is true, and int('²') raises).
_HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_address(address: str) -> tuple[str, str | int]:
    """`unix:/p` -> ("unix", "/p"); `host:port` -> (host, port)."""
    if not isinstance(address, str):
        raise InvalidArgument(f"bad address {address!r}: use HOST:PORT or unix:/PATH")
    if address.startswith("unix:"):
        path = address[5:]
        if not path or not path.isprintable():
            raise InvalidArgument(f"bad address {address!r}: unix socket path missing or "
                                  "holding control characters")
        return "unix", path
    host, sep, port = address.rpartition(":")
    if (not sep or not _HOST_RE.fullmatch(host) or not _PORT_RE.fullmatch(port)
            or not 0 < int(port) < 65536):
        raise InvalidArgument(f"bad address {address!r}: use HOST:PORT or unix:/PATH")
    return host.strip("[]"), int(port)


class _Loadable:
    @classmethod
    def load(cls, path: str) -> Self:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise NotFound(f"config file {path} does not exist") from None
        except ValueError as e:
            raise InvalidArgument(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise InvalidArgument(f"{where}: unknown keys {sorted(unknown)}")
        try:
            obj = cls(**data)
        except TypeError as e:
            raise InvalidArgument(f"{where}: {e}") from None
        obj.validate()  # type: ignore[attr-defined]
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_json(path, self.to_dict(), mode=0o600)


@dataclass
class ReplicaConfig(_Loadable):
    volume: str
    name: str
    directory: str
    size: int
    listen: str          # address to listen on
    key_file: str
    frame_auth: str = "auto"   # frame MACs: "auto" (TCP yes, unix socket no), "on", "off"

    def validate(self) -> None:
        check_name(self.volume)
        check_name(self.name, "replica")
        parse_address(self.listen)
        check_frame_auth(self.frame_auth)


@dataclass
class ReplicaRef:
    name: str
    address: str
    path: str = ""       # directory, when the replica is on this host (enables local reads)
    frame_auth: str = "auto"   # frame MACs on this link: "auto" (TCP yes, unix no), "on", "off"


def check_frame_auth(value: str) -> None:
    if value not in FRAME_AUTH_SETTINGS:
        raise InvalidArgument(f"frame_auth must be one of {', '.join(FRAME_AUTH_SETTINGS)}, "
                              f"not {value!r}")


@dataclass
class EngineConfig(_Loadable):
    volume: str
    size: int
    replicas: list[ReplicaRef]
    key_file: str
    control_socket: str
    min_rw: int = MIN_RW
    timeout_s: float = REPLICA_TIMEOUT_S
    local_reads: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0       # fencing epoch sent to the replicas (failover owners; 0: none)
    record: str = ""     # generation record (engine/generation.py); "" = replicas' own sets
    salvage: str = ""    # operator override for one start: this replica is the source
    salvage_id: str = ""   # that salvage's token: an engine that started from it records it
    rebuild_limits: str = ""   # the node's rebuild limits file (engine/limits.py); "" = none
    # Commit quorum (docs/DURABILITY.md, "The commit quorum"): no write acknowledged unless a
    # majority of the replicas is in sync; a start may then trust a majority of them.
    quorum: bool = False
    # A cluster node's liveness beat (blockhorn/liveness.py) and how old its last lease renewal
    # may get: past that the engine kills itself (engine/ping.py fence_if_lease_lost). "": none.
    beat_file: str = ""
    fence_after_s: float = 0.0
    # Moves the daemon has not finished (a drain's: engine/migrate.py): each the target of
    # the replica of the same name, which may have been swapped in before this start.
    moving: list[ReplicaRef] = field(default_factory=list)
    # Replicas on nodes the store knew were down (lease expired) when the manager wrote this
    # config: the start gives each only a short try (DOWN_CONNECT_TIMEOUT_S in engine.py)
    # instead of waiting for a dead host's connection to time out. Only an engine's speed
    # depends on it: a replica the start does not reach is one the rule counts unreachable.
    down: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_name(self.volume)
        self.replicas = [r if isinstance(r, ReplicaRef) else ReplicaRef(**r)
                         for r in self.replicas]
        self.moving = [r if isinstance(r, ReplicaRef) else ReplicaRef(**r)
                       for r in self.moving]
        if {r.name for r in self.moving} - {r.name for r in self.replicas}:
            raise InvalidArgument("moving: a move target of a replica the volume does not have")
        if not self.replicas:
            raise InvalidArgument("engine config lists no replicas")
        for r in self.replicas:
            parse_address(r.address)
            check_frame_auth(r.frame_auth)
        if not 1 <= self.min_rw <= len(self.replicas):
            raise InvalidArgument(f"min_rw={self.min_rw} must be between 1 and the replica count")
        if self.timeout_s <= 0:
            raise InvalidArgument("timeout_s must be positive")
        if not isinstance(self.epoch, int) or self.epoch < 0:
            raise InvalidArgument("epoch must be a non-negative integer")
        if self.beat_file and not (isinstance(self.fence_after_s, int | float)
                                   and self.fence_after_s > 0):
            raise InvalidArgument("fence_after_s must be positive with a beat_file")
        if not isinstance(self.quorum, bool):
            raise InvalidArgument("quorum must be true or false")
        if not isinstance(self.down, list) or \
                set(self.down) - {r.name for r in self.replicas}:
            raise InvalidArgument(f"down: {self.down!r} must list replicas of this volume")
        if self.salvage and self.salvage not in {r.name for r in self.replicas}:
            raise InvalidArgument(f"salvage: {self.salvage!r} is not a replica of this volume")
