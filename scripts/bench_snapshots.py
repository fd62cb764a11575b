"""Snapshot benchmarks (part of `make bench`): layer-map memory per TiB with 10 and 1000
snapshots, 1000 real snapshots on one replica, and random-read IOPS through a 100-layer chain
against a 1-layer one.

Targets (issue #3): map memory <= 1/8 of Longhorn's 256 MiB per TiB, >= 1000 snapshots,
100-layer read IOPS >= 80 % of 1-layer.
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from blockhorn.replica import snapshots  # noqa: E402
from blockhorn.replica.extentmap import LayerMap  # noqa: E402
from blockhorn.replica.store import Replica  # noqa: E402

TiB = 1 << 40
MiB = 1 << 20
LONGHORN_BYTES_PER_TIB = 256 * MiB


def map_memory(layers: int, extents_per_layer: int) -> dict[str, float]:
    """Every layer holds `extents_per_layer` random 64 KiB extents of a 1 TiB volume."""
    rng = random.Random(layers)
    per_layer = []
    for _ in range(layers):
        starts = sorted({rng.randrange(TiB // 65536) * 65536 for _ in range(extents_per_layer)})
        per_layer.append([(s, s + 65536) for s in starts])
    t = time.monotonic()
    m = LayerMap.build(per_layer)
    took = time.monotonic() - t
    return {"layers": layers, "extents": len(m), "bytes_per_tib": m.memory(),
            "vs_longhorn": m.memory() / LONGHORN_BYTES_PER_TIB, "build_s": round(took, 2)}


def many_snapshots(workdir: str, count: int) -> dict[str, float]:
    d = os.path.join(workdir, "many")
    r = Replica.create(d, 64 * MiB)
    rng = random.Random(1)
    expect = {}
    t = time.monotonic()
    for i in range(count):
        off = rng.randrange(64 * MiB // 4096) * 4096
        data = rng.randbytes(4096)
        r.write(off, data)
        expect[off] = data
        snapshots.create_snapshot(r, f"s{i}")
    per_snapshot = (time.monotonic() - t) / count
    r.close()
    t = time.monotonic()
    r = Replica.open(d)
    open_s = time.monotonic() - t
    ok = all(bytes(r.read(off, 4096)) == data for off, data in expect.items())
    layers = len(r.layers)
    r.close()
    return {"snapshots": count, "layers": layers, "ms_per_snapshot": round(per_snapshot * 1e3, 1),
            "open_s": round(open_s, 2), "content_ok": ok}


def fio_randread(uri: str, size: int, runtime: int) -> float:
    out = subprocess.run(["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
                          "--bs=4k", "--iodepth=32", f"--size={size}", "--time_based",
                          f"--runtime={runtime}", "--ramp_time=2", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def chain_reads(workdir: str, layers: int, runtime: int) -> float:
    import nbd
    from harness import Cluster

    size = 256 * MiB
    home = os.path.join(workdir, f"chain{layers}")
    os.makedirs(home)
    # Network reads for both: the comparison is about chain depth, not local vs remote.
    c = Cluster(home=home, size=size, replicas=1, local_reads=False).start()
    try:
        h = nbd.NBD()
        h.connect_uri(c.uri)
        rng = random.Random(layers)
        for off in range(0, size, MiB):
            h.pwrite(rng.randbytes(MiB), off)
        for i in range(layers - 1):
            for _ in range(64):        # every layer holds some scattered blocks
                h.pwrite(rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
            h.flush()
            c.control().call({"op": "snapshot", "name": f"l{i}"})
        h.shutdown()
        return fio_randread(c.uri, size, runtime)
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer snapshots, shorter fio runs")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="blockhorn-snapbench-", dir="/var/tmp")
    try:
        print("layer map memory, 1 TiB volume, 1000 random 64 KiB extents per layer:")
        for layers in (10, 1000):
            m = map_memory(layers, 1000)
            print(f"  {layers:>5} snapshots: {m['extents']:>9,} extents, "
                  f"{m['bytes_per_tib'] / MiB:8.2f} MiB per TiB "
                  f"({m['vs_longhorn'] * 100:.1f} % of Longhorn's 256 MiB; target <= 12.5 %), "
                  f"built in {m['build_s']} s")
        count = 200 if args.quick else 1000
        s = many_snapshots(workdir, count)
        print(f"{s['snapshots']} snapshots on one replica: {s['ms_per_snapshot']} ms each, "
              f"reopen with {s['layers']} layers in {s['open_s']} s, content "
              f"{'ok' if s['content_ok'] else 'WRONG'}")
        runtime = 5 if args.quick else 15
        one = chain_reads(workdir, 1, runtime)
        deep = chain_reads(workdir, 100, runtime)
        print(f"4k randread QD32, 1 replica (network reads): 1 layer {one:,.0f} IOPS, "
              f"100 layers {deep:,.0f} IOPS = {deep / one * 100:.1f} % (target >= 80 %)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
