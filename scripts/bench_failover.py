"""Automatic failover outage of an RWX share (`make bench`; root, etcd, Ganesha, libnfs-utils).

Hosts are network namespaces on a bridge; etcd and three replica servers run in the root
namespace (tests/failover_site.py, the same site as tests/test_share_failover.py). Host A serves
the share, host B's agent stands by; A dies (every process killed -9, its namespace deleted).
Measured from A's death: until B's share manager serves (Ganesha accepts on the service
address), and until an NFSv4 client's write succeeds again (after the grace period, which B
keeps for the clients whose records A had copied to etcd). Every acknowledged file is read
back and compared. Targets (Longhorn's fast-failover figures): service back < 20 s, total
interruption including grace < 60 s.
"""

from __future__ import annotations

import argparse
import hashlib
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
    from failover_site import cat, failover_site, run_failover

    runs = args.runs or (1 if args.quick else 3)
    print(f"blockhorn failover bench: {runs} run(s), TTL 5 s, NFS grace 15 s", flush=True)
    results = []
    for n in range(runs):
        work = tempfile.mkdtemp(prefix="bhfail-", dir="/tmp")   # short: unix socket paths
        try:
            with failover_site(work) as site:
                r = run_failover(site)
                bad = [k for k, v in r.acked.items() if hashlib.sha256(cat(k)).hexdigest() != v]
        except AssertionError as e:
            print(f"bench_failover: run {n + 1} failed: {e}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  run {n + 1}: host B serving after {r.serving_s:.1f} s, client writes after "
              f"{r.write_s:.1f} s; {len(r.acked)} acknowledged files, {len(bad)} differ",
              flush=True)
        if bad:
            print(f"bench_failover: acknowledged files differ after failover: {bad}",
                  file=sys.stderr)
            return 1
        results.append({"serving_s": round(r.serving_s, 2), "write_s": round(r.write_s, 2)})

    serving = statistics.median(r["serving_s"] for r in results)
    write = statistics.median(r["write_s"] for r in results)
    text = (f"Automatic failover of an RWX share (host killed -9, median of {runs}): service "
            f"back after {serving:.1f} s (target < 20 s), client writes again after "
            f"{write:.1f} s including the NFS grace period (target < 60 s).")
    print("\n" + text)
    write_results("failover", {"runs": results, "median_serving_s": serving,
                               "median_write_s": write}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
