"""`make bench`: the cost of frame MACs (wire protocol v2, docs/SECURITY.md) on the data path.

The same blockhorn volume over TCP, once with frame MACs (the default on TCP) and once with
them off on both sides (`frame_auth: off`), 1 and 3 replicas; fio --ioengine=nbd against the
engine's NBD socket: 4k random writes QD32 (IOPS), 1 MiB sequential writes QD16 (MB/s), 4k
random write latency at QD1 (µs). The machine is shared, so the two settings alternate, round
after round, and each result is the median of the rounds. Target: MACs cost < 10 %.

Throughput on a shared 2-core machine swings with the neighbours' load, so the bench also
reports what is independent of it: the CPU time the engine and the replicas spend per request
(user + system, psutil), with and without MACs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench import BenchError, parse_size, run_fio, stop_procs, wait_ready, write_results  # noqa: E402
from harness import Cluster  # noqa: E402

JOBS = [  # (key, fio rw, bs, iodepth, metric)
    ("randwrite4k", "randwrite", "4k", 32, "iops"),
    ("write1m", "write", "1M", 16, "bw"),
    ("latwrite", "randwrite", "4k", 1, "lat"),
]
UNITS = {"iops": "IOPS", "bw": "MB/s", "lat": "µs"}


def set_frame_auth(cluster: Cluster, setting: str) -> None:
    """Rewrite the replica and engine configs Cluster wrote (before it starts)."""
    for r in cluster.reps:
        r.cfg.frame_auth = setting
        r.cfg.save(r.config_path)
    with open(cluster.engine_config) as f:
        cfg = json.load(f)
    for ref in cfg["replicas"]:
        ref["frame_auth"] = setting
    with open(cluster.engine_config, "w") as f:
        json.dump(cfg, f)


def cpu_seconds(procs: list[Any]) -> float:
    total = 0.0
    for p in procs:
        t = psutil.Process(p.pid).cpu_times()
        total += t.user + t.system
    return total


def measure(cluster: Cluster, size: int, jobs: list[tuple[str, str, str, int, str]],
            runtime: int, ramp: int = 0) -> dict[str, float]:
    """Start `cluster` (configured, not started), fill the volume, run every fio job of
    `jobs` ((key, fio rw, bs, iodepth, metric)) against its NBD socket, each after `ramp`
    seconds of the same load; then stop it. Per job: the metric under `key`, and the CPU
    time per request of the engine and replicas together (`key-cpu`), of the engine
    (`key-cpu-engine`) and of the replicas (`key-cpu-replicas`), in µs. Also used by
    bench_transport.py."""
    try:
        cluster.start()
        wait_ready(lambda: os.path.exists(cluster.nbd_socket),
                   lambda: cluster.engine is not None and cluster.engine.poll() is None,
                   "blockhorn engine", cluster.engine_log)
        target = [f"--size={size}", "--ioengine=nbd", f"--uri={cluster.uri}"]
        run_fio([*target, "--name=prefill", "--rw=write", "--bs=1M", "--iodepth=16"],
                cluster.engine_log)
        reps = [r.proc for r in cluster.reps]
        results: dict[str, float] = {}
        for key, rw, bs, qd, metric in jobs:
            if ramp:   # outside the CPU count: that covers only the requests fio counts
                run_fio([*target, "--name=ramp", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                         "--time_based", f"--runtime={ramp}"], cluster.engine_log)
            eng0, rep0 = cpu_seconds([cluster.engine]), cpu_seconds(reps)
            out = run_fio([*target, f"--name={key}", f"--rw={rw}", f"--bs={bs}",
                           f"--iodepth={qd}", "--time_based", f"--runtime={runtime}"],
                          cluster.engine_log)
            eng, rep = cpu_seconds([cluster.engine]) - eng0, cpu_seconds(reps) - rep0
            w = out["jobs"][0]["write"]
            ios = max(1, w["total_ios"])
            results[key] = {"iops": w["iops"], "bw": w["bw_bytes"] / 1e6,
                            "lat": w["lat_ns"]["mean"] / 1e3}[metric]
            results[f"{key}-cpu"] = 1e6 * (eng + rep) / ios
            results[f"{key}-cpu-engine"] = 1e6 * eng / ios
            results[f"{key}-cpu-replicas"] = 1e6 * rep / ios
    finally:
        try:
            cluster.stop()
        finally:
            stop_procs([cluster.engine, *(r.proc for r in cluster.reps)])
    return results


def run_once(workdir: str, replicas: int, setting: str, size: int, runtime: int) -> dict[str, float]:
    os.makedirs(workdir)
    cluster = Cluster(home=workdir, size=size, replicas=replicas, transport="tcp")
    set_frame_auth(cluster, setting)
    return measure(cluster, size, JOBS, runtime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 5 s jobs, 256 MiB")
    ap.add_argument("--rounds", type=int, help="on/off rounds (default 3, --quick 1)")
    ap.add_argument("--runtime", type=int, help="seconds per job (default 15, --quick 5)")
    ap.add_argument("--size", type=parse_size, help="volume size (default 512M, --quick 256M)")
    ap.add_argument("--replicas", default="1,3", help="replica counts (default 1,3)")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    runtime = args.runtime or (5 if args.quick else 15)
    size = args.size or (256 << 20 if args.quick else 512 << 20)
    counts = [int(n) for n in args.replicas.split(",")]
    work = tempfile.mkdtemp(prefix="blockhorn-bench-frames-", dir=args.dir)
    raw: dict[str, dict[str, list[float]]] = {}
    print(f"frame MAC bench: {rounds} round(s), {runtime} s per job, {size >> 20} MiB, "
          f"replicas {counts}", flush=True)
    try:
        for rnd in range(rounds):
            for n in counts:
                for setting in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
                    name = f"{n}r-{setting}"
                    t0 = time.monotonic()
                    print(f"  round {rnd + 1}: {n} replica(s), MACs {setting} ...", end=" ",
                          flush=True)
                    res = run_once(os.path.join(work, f"{rnd}-{name}"), n, setting, size,
                                   runtime)
                    for key, value in res.items():
                        raw.setdefault(name, {}).setdefault(key, []).append(value)
                    print(f"{time.monotonic() - t0:.0f} s", flush=True)
    except (BenchError, OSError) as e:
        print(f"\nbench_frames: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench_frames: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: {k: statistics.median(v) for k, v in jobs.items()} for name, jobs in raw.items()}
    fmt = "{:<16} {:<9} {:>9} {:>9} {:<11} {:>8}"
    lines = [fmt.format("job", "replicas", "MACs on", "MACs off", "unit", "cost")]
    cost: dict[str, float] = {}
    for n in counts:
        for key, _, _, _, metric in JOBS:
            for k, unit, higher_is_better in ((key, UNITS[metric], metric != "lat"),
                                              (f"{key}-cpu", "µs CPU/req", False)):
                on, off = med[f"{n}r-on"][k], med[f"{n}r-off"][k]
                # Cost: throughput lost, or latency/CPU added, relative to MACs off.
                c = (off - on) / off if higher_is_better else (on - off) / off
                cost[f"{n}r-{k}"] = round(100 * c, 1)
                lines.append(fmt.format(k, n, f"{on:.0f}", f"{off:.0f}", unit,
                                        f"{100 * c:+.1f} %"))
    text = "\n".join(lines) + (f"\n(median of {rounds} alternating round(s); CPU: engine + "
                               "replicas, user + system, per request; "
                               "target: cost < 10 % on randwrite4k and write1m)")
    print("\n" + text)
    write_results("bench-frames", {"rounds": rounds, "runtime_s": runtime, "size": size,
                                   "median": med, "all": raw, "cost_pct": cost}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
