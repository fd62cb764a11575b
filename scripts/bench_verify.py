"""Scrub benchmark (part of `make bench`): `volume verify` throughput on 3 replicas.

Measures MiB/s of volume compared (every replica reads that much) for a fully written volume
and a sparse one (10 % data: holes are not read), and the 4k random-write IOPS an application
gets while an unlimited verify runs beside it, against none. Data is freshly written, so most
of it is in the page cache: the numbers are the scrub's CPU/protocol ceiling on this machine,
not a disk's read speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from blockhorn.engine.control import ControlClient  # noqa: E402

MiB = 1 << 20
WRITE_SIZE = 4 * MiB


def verify(c, rate_mib_s: float = 0, timeout: float = 600.0) -> dict:
    st = ControlClient(c.control_socket, timeout=timeout + 5).call(
        {"op": "verify", "rate_mib_s": rate_mib_s, "wait": timeout})
    if st["verify"]["state"] != "done":
        raise RuntimeError(f"verify did not finish: {st['verify']}")
    report: dict = st["report"]
    if not report["ok"]:
        raise RuntimeError(f"verify found differences on a healthy volume: {report}")
    return report


def fill(c, size: int, fraction: float) -> None:
    import nbd
    h = nbd.NBD()
    h.connect_uri(c.uri)
    rng = random.Random(1)
    step = int(WRITE_SIZE / fraction)
    for off in range(0, size, step):
        h.pwrite(rng.randbytes(WRITE_SIZE), off)
    h.flush()
    h.shutdown()


def fio_randwrite(uri: str, size: int, runtime: int) -> float:
    out = subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          "--bs=4k", "--iodepth=16", f"--size={size}", "--time_based",
                          f"--runtime={runtime}", "--ramp_time=2", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"])


def run(workdir: str, name: str, size: int, fraction: float) -> dict:
    from harness import Cluster
    home = os.path.join(workdir, name)
    os.makedirs(home)
    c = Cluster(home=home, size=size, replicas=3, transport="unix").start()
    try:
        fill(c, size, fraction)
        runs = [verify(c) for _ in range(3)]
        best = max(runs, key=lambda r: r["throughput_mib_s"])
        return {"size": size, "fraction": fraction, "mib_s": best["throughput_mib_s"],
                "elapsed_s": best["elapsed_s"]}
    finally:
        c.stop()


def under_load(workdir: str, size: int, runtime: int,
               rate_mib_s: float) -> tuple[float, float, int]:
    """4k randwrite IOPS alone, then with verify running back to back beside it."""
    from harness import Cluster
    home = os.path.join(workdir, f"load{rate_mib_s:g}")
    os.makedirs(home)
    c = Cluster(home=home, size=size, replicas=3, transport="unix").start()
    try:
        fill(c, size, 1.0)
        alone = fio_randwrite(c.uri, size, runtime)
        stop = threading.Event()
        done = []

        def scrub() -> None:
            while not stop.is_set():
                done.append(verify(c, rate_mib_s))

        t = threading.Thread(target=scrub, daemon=True)
        t.start()
        try:
            busy = fio_randwrite(c.uri, size, runtime)
        finally:
            stop.set()
            t.join(600)
        return alone, busy, len(done)
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller volumes, shorter fio runs")
    args = ap.parse_args()
    size = (256 if args.quick else 1024) * MiB
    runtime = 5 if args.quick else 15
    workdir = tempfile.mkdtemp(prefix="blockhorn-verifybench-", dir="/var/tmp")
    try:
        for name, fraction in (("full", 1.0), ("sparse", 0.1)):
            r = run(workdir, name, size, fraction)
            print(f"verify, 3 replicas, {size // MiB} MiB volume, {fraction * 100:.0f} % "
                  f"written: {r['mib_s']:,.0f} MiB/s ({r['elapsed_s']} s, best of 3)")
        for rate in (0, 100):
            alone, busy, runs = under_load(workdir, 256 * MiB, runtime, rate)
            what = f"at {rate} MiB/s" if rate else "unlimited"
            print(f"4k randwrite QD16 on 3 replicas: {alone:,.0f} IOPS alone, {busy:,.0f} IOPS "
                  f"with verify ({what}) running back to back beside it ({runs} runs) = "
                  f"{busy / alone * 100:.0f} %")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
