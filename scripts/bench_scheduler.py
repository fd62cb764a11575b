"""`make bench`: replica scheduling time (control/scheduler.py) for 1000 volumes on 10
simulated nodes (2 disks of 8 TiB each, 5 zones), 3 replicas each, sizes 1-64 GiB, placed one
after the other as `volume create` would (each placement adds to the disks' scheduled bytes).
Reports the total and per-volume time and how evenly the disks were filled."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench import write_results  # noqa: E402

from blockhorn.control.scheduler import Disk, Node, Policy, Unschedulable, place, schedule  # noqa: E402

GiB = 1 << 30
TiB = 1 << 40


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100 volumes instead of 1000")
    ap.add_argument("--volumes", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=10)
    args = ap.parse_args()
    count = args.volumes or (100 if args.quick else 1000)
    rng = random.Random(12)   # the same sizes every run
    nodes = [Node(f"node{i}", tuple(Disk(f"/disk{j}", 8 * TiB, 8 * TiB) for j in range(2)),
                  zone=f"zone{i % 5}") for i in range(args.nodes)]
    sizes = [rng.randint(1, 64) * GiB for _ in range(count)]
    policy = Policy()
    placed = refused = 0
    per: list[float] = []
    t0 = time.perf_counter()
    for size in sizes:
        t = time.perf_counter()
        try:
            got = schedule(size, 3, nodes, policy)
        except Unschedulable:
            refused += 1
            continue
        finally:
            per.append(time.perf_counter() - t)
        nodes = place(nodes, got, size)
        placed += 1
    total = time.perf_counter() - t0
    fill = [d.scheduled / d.capacity * 100 for n in nodes for d in n.disks]
    text = (f"scheduled {placed} volumes x 3 replicas on {args.nodes} nodes "
            f"({refused} refused for room) in {total * 1000:.0f} ms: "
            f"{statistics.mean(per) * 1e6:.0f} us mean, {max(per) * 1e6:.0f} us max per volume;"
            f" disks filled {min(fill):.1f}-{max(fill):.1f} % (scheduled / capacity)")
    print(text)
    write_results("bench-scheduler", {"volumes": count, "nodes": args.nodes, "placed": placed,
                                      "refused": refused, "total_s": total,
                                      "mean_us": statistics.mean(per) * 1e6,
                                      "max_us": max(per) * 1e6,
                                      "fill_pct": [min(fill), max(fill)]}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
