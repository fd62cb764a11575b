"""`make bench`: replicas over TCP against replicas over unix sockets (issue 12).

Replicas on other hosts are reached over TCP, so TCP is the common case. The same 3-replica
volume, once with its replicas on TCP (127.0.0.1, frame MACs on: docs/SECURITY.md) and once on
unix sockets (MACs off, their default), fio --ioengine=nbd against the engine's NBD socket:
4k random writes QD32 (IOPS) and 1 MiB sequential writes QD16 (MB/s).

The machine is shared, so the two transports alternate within every round (the order flips
each round) and each round gives one TCP/unix ratio; the report is the median ratio with the
lowest and highest round. Targets: TCP >= 80 % of unix on 4k random writes and >= 90 % on
1 MiB writes. The CPU time the engine and the replicas spend per request (user + system) is
reported too: it does not swing with the neighbours' load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench import BenchError, parse_size, write_results  # noqa: E402
from bench_frames import measure, set_frame_auth  # noqa: E402
from harness import Cluster  # noqa: E402

JOBS = [  # (key, fio rw, bs, iodepth, metric, target TCP/unix ratio)
    ("randwrite4k", "randwrite", "4k", 32, "iops", 0.80),
    ("write1m", "write", "1M", 16, "bw", 0.90),
]
UNITS = {"iops": "IOPS", "bw": "MB/s"}
REPLICAS = 3


def run_once(workdir: str, variant: str, size: int, runtime: int,
             ramp: int) -> dict[str, float]:
    """`variant`: tcp (frame MACs on, TCP's default and what the targets are for), unix,
    tcp-nomac (MACs off on both sides: what TCP costs without them), or tcp-old (MACs on,
    replicas of the release before DIRECT_TAGS: what that feature saves)."""
    os.makedirs(workdir)
    extra = {}
    if variant == "tcp-old":
        from support.old_replica import BEFORE_DIRECT
        extra["replica_program"] = BEFORE_DIRECT
    cluster = Cluster(home=workdir, size=size, replicas=REPLICAS,
                      transport="unix" if variant == "unix" else "tcp", **extra)
    if variant != "unix":
        set_frame_auth(cluster, "off" if variant == "tcp-nomac" else "on")
    return measure(cluster, size, [job[:5] for job in JOBS], runtime, ramp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 5 s jobs, 256 MiB")
    ap.add_argument("--rounds", type=int, help="tcp/unix rounds (default 5, --quick 2)")
    ap.add_argument("--runtime", type=int, help="seconds per job (default 10, --quick 5)")
    ap.add_argument("--size", type=parse_size, help="volume size (default 512M, --quick 256M)")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--nomac", action="store_true",
                    help="also TCP with frame MACs off on both sides, in every round")
    ap.add_argument("--old", action="store_true",
                    help="also TCP with MACs against replicas of the release before the "
                    "DIRECT_TAGS feature, in every round")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    runtime = args.runtime or (5 if args.quick else 10)
    ramp = 1 if args.quick else 2
    size = args.size or (256 << 20 if args.quick else 512 << 20)
    work = tempfile.mkdtemp(prefix="blockhorn-bench-transport-", dir=args.dir)
    variants = ["tcp", "unix", *(["tcp-nomac"] if args.nomac else []),
                *(["tcp-old"] if args.old else [])]
    raw: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    print(f"transport bench: {REPLICAS} replicas, tcp (frame MACs on) vs unix, {rounds} "
          f"round(s), {runtime} s per job, {size >> 20} MiB", flush=True)
    try:
        for rnd in range(rounds):
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                t0 = time.monotonic()
                print(f"  round {rnd + 1}: {variant} ...", end=" ", flush=True)
                res = run_once(os.path.join(work, f"{rnd}-{variant}"), variant, size,
                               runtime, ramp)
                for key, value in res.items():
                    raw[variant].setdefault(key, []).append(value)
                print(f"{time.monotonic() - t0:.0f} s", flush=True)
    except (BenchError, OSError) as e:
        print(f"\nbench_transport: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_transport: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fmt = "{:<24} {:>8} {:>8} {:<11} {:>23} {:>14}"
    lines = [fmt.format("job", "tcp", "unix", "unit", "tcp/unix median [min-max]", "target")]
    ratios: dict[str, dict[str, float | bool]] = {}

    def spread(a: str, b: str, k: str) -> tuple[float, float, float]:
        per_round = [x / y for x, y in zip(raw[a][k], raw[b][k], strict=True) if y]
        return statistics.median(per_round), min(per_round), max(per_round)

    for key, _, _, _, metric, want in JOBS:
        for k, unit, target in ((key, UNITS[metric], want), (f"{key}-cpu", "µs CPU/req", None),
                                (f"{key}-cpu-engine", "µs CPU/req", None),
                                (f"{key}-cpu-replicas", "µs CPU/req", None)):
            med, lo, hi = spread("tcp", "unix", k)
            ok = target is None or med >= target
            ratios[k] = {"median": round(med, 3), "min": round(lo, 3), "max": round(hi, 3)}
            if target is not None:
                ratios[k] |= {"target": target, "pass": ok}
            for other in ("nomac", "old"):
                if f"tcp-{other}" in raw:
                    nm, nlo, nhi = spread(f"tcp-{other}", "unix", k)
                    ratios[k] |= {f"{other}_median": round(nm, 3), f"{other}_min": round(nlo, 3),
                                  f"{other}_max": round(nhi, 3)}
            lines.append(fmt.format(
                k, f"{statistics.median(raw['tcp'][k]):.0f}",
                f"{statistics.median(raw['unix'][k]):.0f}", unit,
                f"{100 * med:.0f} % [{100 * lo:.0f}-{100 * hi:.0f}]",
                "" if target is None else f">={100 * target:.0f} % {'PASS' if ok else 'FAIL'}"))
    text = "\n".join(lines) + (f"\n(medians of {rounds} round(s), the variants alternating; a "
                               "ratio is taken per round; CPU: engine + replicas per request, "
                               "where above 100 % means TCP costs more)")
    for other, what in (("nomac", "TCP with frame MACs off"),
                        ("old", "TCP with MACs, replicas before DIRECT_TAGS")):
        if f"tcp-{other}" in raw:
            text += f"\n{what}, against unix: " + ", ".join(
                f"{k} {100 * ratios[k][f'{other}_median']:.0f} % "
                f"[{100 * ratios[k][f'{other}_min']:.0f}-{100 * ratios[k][f'{other}_max']:.0f}]"
                for key, *_ in JOBS for k in (key, f"{key}-cpu"))
    print("\n" + text)
    write_results("bench-transport", {"rounds": rounds, "runtime_s": runtime, "size": size,
                                      "replicas": REPLICAS, "all": raw, "ratios": ratios}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
