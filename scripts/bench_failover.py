"""Automatic failover outage of an RWX share (`make bench`; root, etcd, Ganesha, libnfs-utils).

A cluster of node daemons (tests/support/cluster_site.py: four network-namespace hosts on a
bridge, a three-member etcd). The share is attached on host A with a service address, with the
default NFS grace period (15 s); libnfs clients write files over NFSv4; A dies (every process
killed -9, its link down) and the leader moves the share to another host, which restores the
clients' records from etcd. Measured from A's death, as a client sees it
(tests/t5_cluster_share.py `kill_and_measure`): until the service address accepts NFS again,
and until a client reads a file again (after the grace period, which the new host keeps for
the clients whose records A had copied to etcd). Every acknowledged file is read back and
compared. Targets (Longhorn's fast-failover figures): service back < 20 s, total
interruption including grace < 60 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench import write_results  # noqa: E402

NEEDS = ("etcd", "ganesha.nfsd", "nfs-cp", "nfs-cat", "nbdkit", "nbdfuse")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one failover instead of three")
    ap.add_argument("--runs", type=int, help="failovers to measure (default 3, --quick 1)")
    args = ap.parse_args()
    missing = [c for c in NEEDS if not shutil.which(c)]
    if os.geteuid() != 0 or missing:
        print(f"bench_failover: skipped (needs root and {', '.join(missing) or 'nothing'})")
        return 0
    from support.cluster_site import cluster_site
    from t5_cluster_share import kill_and_measure, share_on

    runs = args.runs or (1 if args.quick else 3)
    print(f"blockhorn failover bench: {runs} run(s), node lease 4 s, NFS grace 15 s",
          flush=True)
    results = []
    for n in range(runs):
        work = tempfile.mkdtemp(prefix="bhfail-", dir="/tmp")   # short: unix socket paths
        try:
            with cluster_site(work, 4) as site:
                host = site.hosts[3]
                service, port = share_on(site, "sh", host, 200)
                r = kill_and_measure(site, "sh", host, service, port, work, 5)
        except AssertionError as e:
            print(f"bench_failover: run {n + 1} failed: {e}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  run {n + 1}: served again after {r['serving']:.1f} s, client reads after "
              f"{r['readable']:.1f} s; every acknowledged file the same", flush=True)
        results.append({"serving_s": round(r["serving"], 2),
                        "write_s": round(r["readable"], 2)})

    serving = statistics.median(r["serving_s"] for r in results)
    write = statistics.median(r["write_s"] for r in results)
    text = (f"Automatic failover of an RWX share (host killed -9, median of {runs}): service "
            f"back after {serving:.1f} s (target < 20 s), clients served again after "
            f"{write:.1f} s including the NFS grace period (target < 60 s).")
    print("\n" + text)
    write_results("failover", {"runs": results, "median_serving_s": serving,
                               "median_write_s": write}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
