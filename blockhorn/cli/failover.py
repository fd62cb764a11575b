"""`blockhorn share define|agent|owner`: shares that fail over between hosts, state in etcd."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, NotFound, check_name

FAILOVER_ACTIONS = ("define", "agent", "owner")

SPEC_HELP = """\
FILE is JSON: {"size": "10GiB", "replicas": ["data-r0=10.0.0.11:9500", ...],
"min_rw": 1, "timeout_s": 8, "nfs": {"clients": ["10.0.0.0/24", "10.0.1.5=ro"],
"port": 2049, "service_address": "10.0.0.50/24", "interface": "eth0", "squash":
"root_squash", "mkfs_options": [], "grace_s": 15, "lease_s": 10, "minor_versions": [1, 2]}}.
Replicas are replica servers reached over TCP (`blockhorn replica serve` on storage hosts);
clients, port, service_address and interface are required."""


def _etcd_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", required=True, metavar="URL",
                   help="etcd client URL(s), comma-separated, e.g. http://10.0.0.1:2379")


def add_failover_parsers(scmds: Any, home_arg: Any) -> None:
    """`home_arg(parser)` adds --home (the CLI's own helper)."""
    p = scmds.add_parser(
        "define", help="store a failover share's definition in etcd",
        description="Store (or replace) the definition of VOLUME in etcd, where every host's "
                    "`share agent` reads it. " + SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volume")
    _etcd_arg(p)
    p.add_argument("--spec", required=True, metavar="FILE", help="the definition (JSON)")

    p = scmds.add_parser(
        "agent", help="serve a share from whichever host is alive (one agent per host)",
        description="Run this host's failover agent for VOLUME in the foreground. Agents on "
                    "several hosts contend for the volume's owner key in etcd (a lease of "
                    "--ttl seconds, renewed every second). The owner connects an engine to "
                    "the replicas, attaches the volume (nbdfuse + loop), runs the share manager "
                    "and takes the service address; the others wait and take over when the "
                    "owner's lease ends. An owner that cannot renew its lease stops serving "
                    "(kills Ganesha and the engine, drops the address) 2 s before the lease "
                    "can expire in etcd; if the agent itself dies, a helper it started kills "
                    "them; the replicas refuse a former owner's engine (fencing epoch). "
                    "SIGTERM: stop serving and hand over at once. Status: "
                    "<home>/agent/VOLUME/agent.json.")
    p.add_argument("volume")
    _etcd_arg(p)
    p.add_argument("--host-id", required=True, metavar="ID",
                   help="this host's name in etcd: 1-63 of a-z 0-9 - . (unique per host)")
    p.add_argument("--key-file", metavar="FILE",
                   help="the cluster key the replicas use (default <home>/cluster.key)")
    p.add_argument("--ttl", type=int, default=None, metavar="SECONDS",
                   help="ownership lease, 4-60 s (default 5): the longest a dead owner "
                        "keeps the share from the others")
    home_arg(p)

    p = scmds.add_parser("owner", help="which host serves a failover share",
                         description="Print the host that owns VOLUME in etcd, or none.")
    p.add_argument("volume")
    _etcd_arg(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON: {volume, owner: {host, pid, since, service_address}|null}")


def run_failover(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.cluster import agent, spec
    from blockhorn.cluster.etcd import Etcd
    check_name(args.volume)
    if args.action == "agent":
        ttl = agent.TTL_S if args.ttl is None else args.ttl
        if not 4 <= ttl <= 60:
            raise InvalidArgument(f"--ttl {ttl}: use 4 to 60 seconds")
        check_name(args.host_id, "host")
        workdir = os.path.join(home.root, "agent", args.volume)
        key_file = args.key_file or os.path.join(home.root, "cluster.key")
        return agent.main(args.etcd, args.volume, args.host_id, workdir, key_file, ttl)
    with Etcd(args.etcd) as etcd:
        if args.action == "define":
            try:
                with open(args.spec) as f:
                    raw = json.load(f)
            except OSError as e:
                raise InvalidArgument(f"cannot read {args.spec}: {e.strerror}") from None
            except ValueError as e:
                raise InvalidArgument(f"{args.spec} is not valid JSON: {e}") from None
            definition = spec.validate(args.volume, raw)
            etcd.put(spec.spec_key(args.volume), json.dumps(definition, sort_keys=True))
            print(f"defined {args.volume}: {len(definition['replicas'])} replicas, service "
                  f"address {definition['nfs']['service_address']}")
            return 0
        kv = etcd.get(spec.owner_key(args.volume))
        if kv is None and etcd.get(spec.spec_key(args.volume)) is None:
            raise NotFound(f"volume {args.volume!r} is not defined in etcd")
        owner = json.loads(kv.value) if kv else None
        if args.json:
            print(json.dumps({"volume": args.volume, "owner": owner}, sort_keys=True))
        else:
            print(f"{args.volume}: " + (f"served by {owner['host']} (pid {owner['pid']})"
                                        if owner else "no owner"))
    return 0
