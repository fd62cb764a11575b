"""Rebuild and resync benchmark (part of `make bench`).

- Full rebuild: a volume half full of data (3 replicas over unix sockets), one replica emptied
  (`replica create`, Rebuilding) and rebuilt from a RW one; its rate against `cp --sparse` of
  the same head file plus fsync on the same disk, in the same run.
- Incremental catch-up after a blip: a replica SIGSTOPped for BLIP_S seconds under fio 4k
  random writes (QD16) goes ERR; after SIGCONT it resyncs from the source's change log. Printed:
  the bytes written while it was away (fio's own count, over the blip) and the bytes resynced.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

MiB = 1 << 20
BLIP_S = 10.0


def fill_half(c, size: int) -> None:
    import nbd
    h = nbd.NBD()
    h.connect_uri(c.uri)
    rng = random.Random(1)
    chunk = 4 * MiB
    for off in range(0, size, 2 * chunk):       # every other 4 MiB: 50 % data
        h.pwrite(rng.randbytes(chunk), off)
    h.flush()
    h.shutdown()


def wait_rebuilt(c, name: str, timeout: float = 3600.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = {r["name"]: r for r in c.status()["replicas"]}[name]
        rb = st.get("rebuild") or {}
        if st["mode"] == "RW" and rb.get("state") == "done":
            return rb
        if rb.get("state") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"rebuild of {name} did not finish: {st}")
        time.sleep(0.05)


def full_rebuild(work: str, size: int) -> dict:
    from harness import Cluster
    home = os.path.join(work, "full")
    os.makedirs(home, exist_ok=True)
    c = Cluster(home=home, size=size, replicas=3, transport="unix").start()
    try:
        fill_half(c, size)
        r2 = c.reps[2]
        src = c.reps[0].cfg.directory
        # Baseline: cp --sparse of the source's head file, plus fsync, on the same disk.
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        dst = os.path.join(work, "cp-copy.img")
        subprocess.run(["cp", "--sparse=always", os.path.join(src, "volume-head-000.img"), dst],
                       check=True)
        subprocess.run(["sync", dst], check=True)
        cp_s = time.monotonic() - t0
        os.unlink(dst)
        r2.kill(signal.SIGKILL)
        shutil.rmtree(r2.cfg.directory)
        subprocess.run([sys.executable, "-m", "blockhorn", "replica", "create", "--config",
                        r2.config_path], cwd=ROOT, check=True, capture_output=True)
        r2.start()
        t0 = time.monotonic()
        c.control().call({"op": "rebuild", "replica": r2.cfg.name})
        rb = wait_rebuilt(c, r2.cfg.name)
        rebuild_s = time.monotonic() - t0
    finally:
        c.stop()
    data = size // 2
    return {"size": size, "data": data, "mode": rb.get("mode"), "copied": rb.get("done"),
            "rebuild_s": rebuild_s, "rebuild_mb_s": data / rebuild_s / 1e6,
            "cp_s": cp_s, "cp_mb_s": data / cp_s / 1e6, "ratio": cp_s / rebuild_s}


def blip(work: str, size: int) -> dict:
    from harness import Cluster
    home = os.path.join(work, "blip")
    os.makedirs(home, exist_ok=True)
    c = Cluster(home=home, size=size, replicas=3, transport="unix", timeout_s=2.0).start()
    try:
        fill_half(c, size)
        runtime = int(BLIP_S + 6)
        fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri={c.uri}",
                                "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}",
                                "--time_based", f"--runtime={runtime}", "--output-format=json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        r1 = c.reps[1]
        # Bytes written while it was away: the engine's own count of acknowledged writes.
        before = c.status()["counters"]["write_bytes"]
        r1.kill(signal.SIGSTOP)
        time.sleep(BLIP_S)
        written = c.status()["counters"]["write_bytes"] - before
        r1.kill(signal.SIGCONT)
        t_cont = time.monotonic()
        c.control().call({"op": "rebuild", "replica": r1.cfg.name})
        rb = wait_rebuilt(c, r1.cfg.name)
        caught_s = time.monotonic() - t_cont
        out, _ = fio.communicate(timeout=runtime + 60)
        job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    finally:
        c.stop()
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(c.engine_log, os.environ["BENCH_KEEP_LOG"])
    return {"blip_s": BLIP_S, "mode": rb.get("mode"), "written_while_away": int(written),
            "examined": rb.get("done"), "resynced": rb.get("copied"),
            "ratio": (rb.get("copied") or 0) / max(written, 1),
            "caught_up_s": caught_s, "iops": job["iops"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB instead of 4 GiB")
    ap.add_argument("--size", type=int, help="volume size in MiB (half of it data)")
    ap.add_argument("--full-only", action="store_true", help="skip the blip measurement")
    ap.add_argument("--blip-only", action="store_true", help="skip the full rebuild")
    args = ap.parse_args()
    size = (args.size or (512 if args.quick else 4096)) * MiB
    work = tempfile.mkdtemp(prefix="bh-resync-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        if args.blip_only:
            print(json.dumps(blip(work, min(size, 1024 * MiB)), indent=1))
            return 0
        full = full_rebuild(work, size)
        if args.full_only:
            print(json.dumps(full, indent=1))
            return 0
        inc = blip(work, min(size, 1024 * MiB))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (f"full rebuild of {full['size'] >> 20} MiB ({full['data'] >> 20} MiB data, "
            f"{full['mode']}): {full['rebuild_s']:.1f} s = {full['rebuild_mb_s']:.0f} MB/s; "
            f"cp --sparse + sync: {full['cp_mb_s']:.0f} MB/s; ratio {full['ratio'] * 100:.0f} %\n"
            f"blip of {inc['blip_s']:.0f} s under 4k random writes: {inc['mode']} resync of "
            f"{inc['resynced']} bytes ({inc['examined']} examined) for "
            f"{inc['written_while_away']} bytes written while away "
            f"({inc['ratio']:.2f}x), caught up in {inc['caught_up_s']:.1f} s")
    print(text)
    from bench import write_results
    write_results("resync", {"full": full, "blip": inc}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
