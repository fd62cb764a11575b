"""Backup benchmarks (part of `make bench`), issue #13's acceptance numbers:

1. Throughput of a full backup of a 1 GiB snapshot (random data: lz4 cannot shrink it) to a
   file target, and of its restore into a new replica, against reading and writing the same
   bytes locally (read the snapshot + write a file + fsync; read the file + write a replica +
   flush). Target >= 70 %. The same backup and restore to SeaweedFS's S3 on 127.0.0.1.
2. S3 requests of an incremental backup after changing 1 % of the volume, counted per
   operation by a botocore event hook (`before-call.s3`), and the bytes uploaded. Two shapes of
   change: 1 % as whole 2 MiB blocks, and 1 % as 1 MiB writes at random offsets. Targets: PUTs
   <= 2 % of the blocks, a constant number of other requests, bytes <= 2 % of the volume.

Writes bench-results/backup-STAMP.json and .txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.s3server import S3Server  # noqa: E402

from blockhorn import backup as bk  # noqa: E402
from blockhorn.replica import snapshots as store_snaps  # noqa: E402
from blockhorn.replica.store import Replica  # noqa: E402

MiB = 1 << 20
BLOCK = 2 * MiB
COPY_CHUNK = 4 * MiB      # bytes per read/write in the local baselines


def fill(r: Replica, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for off in range(0, size, COPY_CHUNK):
        r.write(off, rng.randbytes(min(COPY_CHUNK, size - off)))
    r.flush()


def local_copy_out(directory: str, snap: str, path: str) -> float:
    """Seconds to read the snapshot and write the same bytes to a file (+ fsync)."""
    t = time.monotonic()
    view = store_snaps.snapshot_view(directory, snap)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, view.size, COPY_CHUNK):
            os.pwrite(fd, view.read(off, min(COPY_CHUNK, view.size - off)), off)
        os.fsync(fd)
    finally:
        os.close(fd)
        for layer in view.layers:
            os.close(layer.fd)
    return time.monotonic() - t


def sha512_seconds(directory: str, snap: str) -> float:
    """CPU seconds SHA-512 (the checksum Longhorn's format names blocks by) takes over the
    snapshot's bytes in one thread: a floor no implementation of the format goes below."""
    view = store_snaps.snapshot_view(directory, snap)
    try:
        data = [view.read(off, BLOCK) for off in range(0, view.size, BLOCK)]
    finally:
        for layer in view.layers:
            os.close(layer.fd)
    t = time.process_time()
    for d in data:
        hashlib.sha512(d).digest()
    return time.process_time() - t


def s3_raw(target: bk.Target, size: int) -> tuple[float, float]:
    """Seconds to PUT and then GET `size` bytes as 2 MiB objects with the backup's number of
    workers: what this S3 server (on the same two cores) can take, without any backup work."""
    data = os.urandom(BLOCK)
    keys = [f"raw/{i}" for i in range(size // BLOCK)]
    with ThreadPoolExecutor(target.workers) as pool:
        t = time.monotonic()
        list(pool.map(lambda k: target.put(k, data), keys))
        put = time.monotonic() - t
        t = time.monotonic()
        list(pool.map(target.get, keys))
        get = time.monotonic() - t
    target.delete_many(keys)
    return put, get


def local_copy_in(path: str, directory: str, size: int) -> float:
    """Seconds to read a file and write it into a new replica (+ flush)."""
    r = Replica.create(directory, size)
    t = time.monotonic()
    with open(path, "rb") as f:
        for off in range(0, size, COPY_CHUNK):
            r.write(off, f.read(COPY_CHUNK))
    r.flush()
    took = time.monotonic() - t
    r.close()
    return took


def timed_backup(target: bk.Target, directory: str, snap: str) -> tuple[float, dict[str, Any]]:
    src = bk.open_snapshot([directory], snap)
    t = time.monotonic()
    try:
        res = bk.create_backup(target, "bench", src)
    finally:
        src.close()
    return time.monotonic() - t, res


def timed_restore(target: bk.Target, name: str, directory: str, size: int) -> float:
    Replica.create(directory, size).close()
    sink = bk.ReplicaSink([directory])
    t = time.monotonic()
    try:
        bk.restore(target, "bench", name, sink)
    finally:
        sink.close()
    return time.monotonic() - t


def throughput(work: str, size: int, s3: S3Server, rounds: int) -> dict[str, Any]:
    """Backup/restore against the local copy of the same bytes, interleaved round by round
    (the machine is shared: the load changes between minutes, so each ratio compares runs made
    seconds apart) and reported as medians. S3 once: SeaweedFS shares the two cores.
    The lock protocol's fixed 2 s wait (Longhorn's LOCK_CHECK_WAIT_TIME, once per backup or
    restore) is set to 0 here: this measures the data path; the incremental run keeps it."""
    os.environ["BLOCKHORN_BACKUP_LOCK_WAIT_S"] = "0"
    src_dir = os.path.join(work, "src")
    r = Replica.create(src_dir, size, "bench")
    fill(r, size, 1)
    store_snaps.create_snapshot(r, "full", True, None)
    r.close()
    runs: dict[str, list[float]] = {k: [] for k in (
        "local_read_write_s", "local_restore_s", "file_backup_s", "file_backup_cpu_s",
        "file_restore_s")}
    sha512_cpu = sha512_seconds(src_dir, "full")
    copy = os.path.join(work, "copy.img")
    for i in range(rounds):
        runs["local_read_write_s"].append(local_copy_out(src_dir, "full", copy))
        runs["local_restore_s"].append(local_copy_in(copy, os.path.join(work, "copy-in"), size))
        os.unlink(copy)
        shutil.rmtree(os.path.join(work, "copy-in"))
        store = os.path.join(work, f"store{i}")
        os.makedirs(store)
        target = bk.open_target(f"file://{store}")
        cpu = time.process_time()
        took, res = timed_backup(target, src_dir, "full")
        runs["file_backup_s"].append(took)
        runs["file_backup_cpu_s"].append(time.process_time() - cpu)
        runs["file_restore_s"].append(timed_restore(target, res["name"],
                                                    os.path.join(work, "restore"), size))
        shutil.rmtree(os.path.join(work, "restore"))
        shutil.rmtree(store)
        target.close()
    out: dict[str, Any] = {"bytes": size, "rounds": rounds, "runs": runs,
                           "sha512_cpu_s": sha512_cpu}
    for k, v in runs.items():
        out[k] = statistics.median(v)
    out["file_backup_ratio"] = statistics.median(
        a / b for a, b in zip(runs["local_read_write_s"], runs["file_backup_s"], strict=True))
    out["file_restore_ratio"] = statistics.median(
        a / b for a, b in zip(runs["local_restore_s"], runs["file_restore_s"], strict=True))
    target = bk.open_target(f"s3://{s3.bucket()}@us-east-1/bench/", s3.env())
    out["s3_raw_put_s"], out["s3_raw_get_s"] = s3_raw(target, size)
    out["s3_backup_s"], res = timed_backup(target, src_dir, "full")
    out["s3_restore_s"] = timed_restore(target, res["name"], os.path.join(work, "restore-s3"),
                                        size)
    shutil.rmtree(os.path.join(work, "restore-s3"))
    target.close()
    out["s3_backup_ratio"] = out["local_read_write_s"] / out["s3_backup_s"]
    out["s3_restore_ratio"] = out["local_restore_s"] / out["s3_restore_s"]
    out["s3_backup_vs_raw_put"] = out["s3_raw_put_s"] / out["s3_backup_s"]
    out["s3_restore_vs_raw_get"] = out["s3_raw_get_s"] / out["s3_restore_s"]
    shutil.rmtree(src_dir)
    os.environ["BLOCKHORN_BACKUP_LOCK_WAIT_S"] = "2"
    return out


def incremental_requests(work: str, size: int, s3: S3Server) -> dict[str, Any]:
    """Requests of an incremental backup after changing 1 % of the volume, two ways."""
    d = os.path.join(work, "inc")
    r = Replica.create(d, size, "bench")
    fill(r, size, 2)
    store_snaps.create_snapshot(r, "base", True, None)
    target = bk.open_target(f"s3://{s3.bucket()}@us-east-1/inc/", s3.env())
    _, base = timed_backup(target, d, "base")
    blocks = size // BLOCK
    rng = random.Random(3)
    out: dict[str, Any] = {"volume_blocks": blocks, "full_backup_requests":
                           dict(target.requests)}
    shapes = {
        "whole_blocks": [(b * BLOCK, BLOCK) for b in rng.sample(range(blocks),
                                                                 max(1, blocks // 100))],
        "random_1MiB": [(rng.randrange(size // MiB - 1) * MiB, MiB)
                        for _ in range(max(1, size // MiB // 100))],
    }
    for i, (shape, writes) in enumerate(shapes.items()):
        for off, n in writes:
            r.write(off, rng.randbytes(n))
        r.flush()
        store_snaps.create_snapshot(r, f"inc{i}", True, None)
        target.requests.clear()
        took, res = timed_backup(target, d, f"inc{i}")
        reqs = dict(target.requests)
        puts = reqs.get("PutObject", 0)
        out[shape] = {
            "changed_bytes": sum(n for _, n in writes), "seconds": round(took, 3),
            "requests": reqs, "block_puts": res["new_blocks"],
            "block_puts_pct_of_blocks": 100 * res["new_blocks"] / blocks,
            "other_requests": sum(reqs.values()) - res["new_blocks"],
            "uploaded_bytes": res["transferred_bytes"],
            "uploaded_pct_of_volume": 100 * res["transferred_bytes"] / size,
            "put_total": puts,
        }
    target.close()
    r.close()
    out["base_backup"] = base["name"]
    shutil.rmtree(d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    ap.add_argument("--size-mib", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, "
                    "quick 1)")
    args = ap.parse_args()
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    work = tempfile.mkdtemp(prefix="bh-bench-backup-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    s3 = S3Server(os.path.join(work, "seaweedfs")).start()
    try:
        tp = throughput(work, size, s3, args.rounds or (1 if args.quick else 3))
        inc = incremental_requests(work, size, s3)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    mb = size / 1e6
    lines = [
        f"backup benchmarks, {size // MiB} MiB of random data, 2 MiB blocks, lz4, medians of "
        f"{tp['rounds']} interleaved rounds (load average {os.getloadavg()[0]:.1f} at the end)",
        f"local read snapshot + write file: {mb / tp['local_read_write_s']:.0f} MB/s; "
        f"local read file + write replica: {mb / tp['local_restore_s']:.0f} MB/s",
    ]
    lines.append(f"file backup CPU: {tp['file_backup_cpu_s']:.2f} s (all threads); SHA-512 "
                 f"alone, which the format requires: {tp['sha512_cpu_s']:.2f} s")
    lines.append(f"  s3 server alone (2 MiB objects, {bk.targets.S3Target.workers} threads): PUT "
                 f"{mb / tp['s3_raw_put_s']:.0f} MB/s, GET {mb / tp['s3_raw_get_s']:.0f} MB/s; "
                 f"backup reaches {100 * tp['s3_backup_vs_raw_put']:.0f} % of plain PUTs, "
                 f"restore {100 * tp['s3_restore_vs_raw_get']:.0f} % of plain GETs")
    for kind in ("file", "s3"):
        lines.append(
            f"{kind:>4} target: backup {mb / tp[f'{kind}_backup_s']:.0f} MB/s "
            f"({100 * tp[f'{kind}_backup_ratio']:.0f} % of local), restore "
            f"{mb / tp[f'{kind}_restore_s']:.0f} MB/s ({100 * tp[f'{kind}_restore_ratio']:.0f} %)")
    for shape in ("whole_blocks", "random_1MiB"):
        s = inc[shape]
        lines.append(
            f"incremental after 1 % changed ({shape}, {s['changed_bytes'] // MiB} MiB): "
            f"{s['block_puts']} block PUTs = {s['block_puts_pct_of_blocks']:.2f} % of "
            f"{inc['volume_blocks']} blocks, {s['other_requests']} other requests "
            f"{ {k: v for k, v in s['requests'].items()} }, uploaded "
            f"{s['uploaded_bytes'] / MiB:.1f} MiB = {s['uploaded_pct_of_volume']:.2f} % of the "
            f"volume, {s['seconds']} s")
    text = "\n".join(lines)
    print(text)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench import write_results
    write_results("backup", {"throughput": tp, "incremental": inc}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
