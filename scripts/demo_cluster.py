"""`make demo-cluster`: one volume across hosts, a host killed, the volume healthy again.

Four hosts (network namespaces on a bridge, each with its own home, disk and node daemon) on
a three-member etcd, as in tests/t5_cluster_hosts.py (tests/support/cluster_site.py; root, etcd,
nbdkit). A 3-replica volume is placed on three distinct nodes, attached on the first host
(`--frontend none`: the NBD endpoint), written while one of the other replica nodes dies
(every process killed -9, its link down); the leader replaces its replica on the fourth node
after `replica-replenishment-wait-interval` (2 s here), the engine rebuilds it, and every
acknowledged write reads back the same. Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.cluster_site import Site, cluster_site  # noqa: E402

VOLUME = "demo"


def step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def show(site: Site, cmd: list[str]) -> None:
    h = site.hosts[0]
    print(f"[{h.name}]$ blockhorn {' '.join(cmd)}")
    print(site.cli(h, *cmd).stdout.rstrip())


# Seconds: the node leases. The host killed holds an etcd member (the first three hosts do):
# etcd then elects a leader, and no node can renew its lease meanwhile; with the site's
# 4 s leases the engine's node fenced itself (its dead man's switch: 3.8 s without a
# renewal) in 2 of 5 runs of the demo, and the writes failed; with 6 s in 1 of 3 more,
# until the etcd client stopped waiting 2 s for a connect to the dead member
# (cluster/etcd.py CONNECT_TIMEOUT_S): then 4 of 4 passed. A real node lease is 15 s.
NODE_TTL_S = 6


def main() -> int:
    missing = [c for c in ("etcd", "nbdkit") if not shutil.which(c)]
    if os.geteuid() != 0 or missing:
        sys.exit("demo-cluster needs root (network namespaces) and "
                 + (", ".join(missing) or "nothing else") + " (make setup installs them)")
    root = tempfile.mkdtemp(prefix="bhdc", dir="/tmp")   # short: sockets live under it
    try:
        step("four hosts: network namespaces on a bridge, a node daemon each, a three-member etcd")
        with cluster_site(root, 4, {"replica-replenishment-wait-interval": "2"},
                          node_ttl_s=NODE_TTL_S) as site:
            a = site.hosts[0]
            show(site, ["node", "ls"])
            step("a volume with 3 replicas: the scheduler puts them on 3 distinct nodes")
            show(site, ["volume", "create", VOLUME, "--size", "64MiB", "--replicas", "3"])
            show(site, ["volume", "attach", VOLUME, "--frontend", "none"])
            v = site.show(a, VOLUME)
            for r in v["replicas"]:
                say(f"{r['name']}: node {r['node']}, disk {r['disk']}, {r['address']}")
            victim = next(site.host(r["node"]) for r in v["replicas"] if r["node"] != a.name)
            step(f"writes through the engine on {a.name}; {victim.name} dies meanwhile")
            t = site.kill_and_heal(a, VOLUME, victim, say)
            show(site, ["node", "ls"])
            v = site.show(a, VOLUME)
            for r in v["replicas"]:
                say(f"{r['name']}: node {r['node']}, {r['mode']}")
            step("summary")
            say(json.dumps({k: round(x, 1) for k, x in t.items()}))
            site.cli(a, "volume", "detach", VOLUME)
        step("cleaned up: daemons, replicas, namespaces, etcd")
        return 0
    finally:
        if os.environ.get("BLOCKHORN_KEEP_SITE"):   # the daemons' logs, for a post-mortem
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
