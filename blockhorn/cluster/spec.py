"""A shared volume's definition in etcd, and the keys the failover agents use.

    /blockhorn/volumes/<vol>/spec       the definition (JSON, below); `blockhorn share define`
    /blockhorn/shares/<vol>/owner       the serving host; exists only while its lease lives
    /blockhorn/shares/<vol>/recovery    NFS-Ganesha's client records (NFSv4 reclaim), written
                                        by the owner only

The definition names what every host needs to serve the share and nothing host-local:

    {"size": "10GiB",
     "replicas": ["data-r0=10.0.0.11:9500", "data-r1=10.0.0.12:9500", "data-r2=10.0.0.13:9500"],
     "min_rw": 1, "timeout_s": 8,
     "nfs": {"clients": ["10.0.0.0/24", "10.0.1.5=ro"], "port": 2049,
             "service_address": "10.0.0.50/24", "interface": "eth0",
             "squash": "root_squash", "mkfs_options": [], "grace_s": 15, "lease_s": 10,
             "minor_versions": [1, 2]}}

Replicas are reached over TCP (they live on other hosts); every host needs the cluster key
(`--key-file`). The allow-list, the NFS port and the service address are required: a share
that follows its volume from host to host has no "this host" to default to.
"""

from __future__ import annotations

from typing import Any

from blockhorn.config import REPLICA_TIMEOUT_S, parse_address
from blockhorn.sharemgr.config import share_options
from blockhorn.types import InvalidArgument, check_name, parse_size

ROOT = "/blockhorn"


def spec_key(volume: str) -> str:
    return f"{ROOT}/volumes/{volume}/spec"


def owner_key(volume: str) -> str:
    return f"{ROOT}/shares/{volume}/owner"


def recovery_key(volume: str) -> str:
    return f"{ROOT}/shares/{volume}/recovery"


def _replica(entry: Any) -> dict[str, str]:
    if isinstance(entry, dict):
        name, addr = str(entry.get("name", "")), str(entry.get("address", ""))
    else:
        name, _, addr = str(entry).partition("=")
    check_name(name, "replica")
    kind, _ = parse_address(addr)
    if kind == "unix":
        raise InvalidArgument(f"replica {name}: {addr} is a unix socket; replicas of a "
                              "failover share are reached over TCP (HOST:PORT)")
    return {"name": name, "address": addr}


def validate(volume: str, spec: Any) -> dict[str, Any]:
    """The normalized definition of `volume`, or InvalidArgument saying what is wrong."""
    check_name(volume)
    if not isinstance(spec, dict):
        raise InvalidArgument("a volume definition is a JSON object (see `share define --help`)")
    unknown = set(spec) - {"size", "replicas", "min_rw", "timeout_s", "nfs"}
    if unknown:
        raise InvalidArgument(f"unknown keys in the volume definition: {sorted(unknown)}")
    if "size" not in spec or not spec.get("replicas"):
        raise InvalidArgument("a volume definition needs size and replicas")
    replicas = [_replica(r) for r in spec["replicas"]]
    if len({r["name"] for r in replicas}) != len(replicas):
        raise InvalidArgument("replica names must differ")
    min_rw, timeout_s = spec.get("min_rw", 1), spec.get("timeout_s", REPLICA_TIMEOUT_S)
    if not isinstance(min_rw, int) or not 1 <= min_rw <= len(replicas):
        raise InvalidArgument(f"min_rw={min_rw} must be between 1 and the replica count")
    if not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise InvalidArgument("timeout_s must be a positive number of seconds")
    nfs = spec.get("nfs")
    if not isinstance(nfs, dict):
        raise InvalidArgument("a volume definition needs an nfs object (clients, port, "
                              "service_address, interface)")
    for need in ("clients", "port", "service_address", "interface"):
        if not nfs.get(need):
            raise InvalidArgument(f"nfs.{need} is required: a failover share has no single "
                                  "host to default to")
    # Clients as written by a user ("10.0.0.0/24=ro") or as stored ({"cidr", "access"}).
    nfs = dict(nfs, clients=[f"{c.get('cidr')}={c.get('access', 'rw')}" if isinstance(c, dict)
                             else c for c in nfs["clients"]])
    try:
        options = share_options(**nfs)
    except TypeError as e:
        raise InvalidArgument(f"nfs: {e}") from None
    return {"size": parse_size(spec["size"]), "replicas": replicas, "min_rw": min_rw,
            "timeout_s": timeout_s, "nfs": options}
