"""`make bench`: what an engine crash and a live engine upgrade cost the device, and what the
device-holding frontend (fuse-nbd) costs against the in-process fuse frontend.

Needs root and /dev/fuse. Through the real CLI and daemon in a private home:
1. pause during an engine crash (kill -9 of nbdkit) and during `volume upgrade`, 5 of each:
   a writer does 4 KiB O_DIRECT writes with an fsync every 8 on the loop device of a fuse-nbd
   volume; the pause is its longest request around the event (median of 5). For the upgrade
   the daemon's own figure (`pause_s`: drain + stop + start) is printed too.
   The same for the `nbd` frontend's local relay (manager/nbdproxy.py LOCAL), with a libnbd
   writer in nbd-client's place (this kernel has no NBD; the real nbd-client runs in
   tests/t7_vm_host.py's guest, where TCG makes every pause seconds long).
2. fio (libaio, O_DIRECT) on the loop device of a 3-replica volume, fuse against fuse-nbd
   (and nbdfuse, the other frontend without kernel NBD):
   4k randread/randwrite QD32 (IOPS, mean latency) and 1M sequential read/write QD16 (MB/s).
Results go to stdout.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 4096
SIZE = 256 << 20
ROUNDS = 5


class Home:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="bhb", dir="/tmp")

    def cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "blockhorn", "--home",
                               os.path.join(self.root, "home"), *args],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"blockhorn {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("volume", "show", name, "--json")))

    def close(self) -> None:
        for vol in json.loads(self.cli("volume", "ls", "--json")):
            self.cli("volume", "rm", vol["name"], "--force")
        self.cli("daemon", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class Writer(threading.Thread):
    def __init__(self, dev: str, nbd_socket: str = "") -> None:
        """Writes to the block device `dev`, or over NBD to `nbd_socket` (libnbd)."""
        super().__init__(daemon=True)
        self.dev = dev
        self.nbd_socket = nbd_socket
        self.lat: list[tuple[float, float]] = []   # (start, seconds) per request
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.nbd_socket:
            return self._run_nbd()
        rng = random.Random(1)
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT)
        try:
            n = 0
            while not self.stop.is_set():
                buf[:] = os.urandom(BLOCK)
                t = time.monotonic()
                os.pwrite(fd, buf, rng.randrange(SIZE // BLOCK) * BLOCK)
                n += 1
                if n % 8 == 0:
                    os.fsync(fd)
                self.lat.append((t, time.monotonic() - t))
        except BaseException as e:
            self.error = e
        finally:
            os.close(fd)

    def _run_nbd(self) -> None:
        import nbd
        rng = random.Random(1)
        try:
            h = nbd.NBD()
            h.connect_unix(self.nbd_socket)
            n = 0
            while not self.stop.is_set():
                t = time.monotonic()
                h.pwrite(os.urandom(BLOCK), rng.randrange(SIZE // BLOCK) * BLOCK)
                n += 1
                if n % 8 == 0:
                    h.flush()
                self.lat.append((t, time.monotonic() - t))
            h.shutdown()
        except BaseException as e:
            self.error = e

    def longest_since(self, t0: float) -> float:
        return max((d for t, d in self.lat if t + d >= t0), default=0.0)


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def local_relay(home: Home, name: str) -> str:
    """Attach `name` with no device and put the `nbd` frontend's local relay in front of its
    engine, recorded as an `nbd` attach records it (so the daemon upgrades it live); returns
    the relay's socket."""
    sys.path.insert(0, ROOT)
    from blockhorn.control.store import SqliteStore
    from blockhorn.manager import nbdproxy
    from blockhorn.manager.paths import Home as Paths
    home.cli("volume", "attach", name, "--frontend", "none")
    engine_sock = home.show(name)["endpoint"].split("socket=", 1)[1]
    paths = Paths.at(os.path.join(home.root, "home"))
    nbdproxy.ensure(paths, name, engine_sock, nbdproxy.LOCAL)
    sock = nbdproxy.local_socket(engine_sock)
    SqliteStore(paths.db).update_volume(name, attachment={
        "device": "", "frontend": "nbd", "pids": {}, "fuse_dir": "", "relay": sock})
    return sock


def pauses(home: Home, name: str = "p", relay: bool = False) -> dict[str, Any]:
    home.cli("volume", "create", name, "--size", str(SIZE))
    if relay:
        w = Writer("", nbd_socket=local_relay(home, name))
    else:
        w = Writer(home.cli("volume", "attach", name, "--frontend", "fuse-nbd").strip())
    w.start()
    crash, upgrade, reported = [], [], []
    try:
        for _ in range(ROUNDS):
            time.sleep(1.0)
            keeper = home.show(name)["engine"]["pid"]
            nbdkit = [p for p in psutil.Process(keeper).children() if p.name() == "nbdkit"][0]
            t0 = time.monotonic()
            nbdkit.send_signal(signal.SIGKILL)
            wait(lambda k=keeper: home.show(name)["engine"]["pid"] not in (None, k), 60,
                 "engine restart")
            n = len(w.lat)
            wait(lambda n=n: len(w.lat) > n + 20 or w.error, 60, "writes after the restart")
            crash.append(w.longest_since(t0))
        for _ in range(ROUNDS):
            time.sleep(1.0)
            t0 = time.monotonic()
            out = json.loads(home.cli("volume", "upgrade", name, "--json"))
            reported.append(out["pause_s"])
            n = len(w.lat)
            wait(lambda n=n: len(w.lat) > n + 20 or w.error, 60, "writes after the upgrade")
            upgrade.append(w.longest_since(t0))
    finally:
        w.stop.set()
        w.join(60)
    if w.error:
        raise SystemExit(f"the writer saw an I/O error: {w.error!r}")
    if relay:
        home.cli("volume", "detach", name)
    return {"crash_pause_s": crash, "upgrade_pause_s": upgrade,
            "upgrade_reported_pause_s": reported,
            "normal_write_median_ms": statistics.median(d for _, d in w.lat[:200]) * 1000}


FIO_JOBS = [("randread4k", "randread", "4k", 32), ("randwrite4k", "randwrite", "4k", 32),
            ("read1m", "read", "1M", 16), ("write1m", "write", "1M", 16)]


def fio(dev: str, runtime: int) -> dict[str, dict[str, float]]:
    subprocess.run(["fio", "--name=fill", f"--filename={dev}", "--rw=write", "--bs=1M",
                    "--direct=1", "--ioengine=libaio", "--iodepth=16", f"--size={SIZE}",
                    "--output-format=json"], capture_output=True, check=True, timeout=600)
    out = {}
    for key, rw, bs, qd in FIO_JOBS:
        proc = subprocess.run(["fio", f"--name={key}", f"--filename={dev}", f"--rw={rw}",
                               f"--bs={bs}", f"--iodepth={qd}", "--direct=1",
                               "--ioengine=libaio", f"--size={SIZE}", "--time_based",
                               f"--runtime={runtime}", "--output-format=json"],
                              capture_output=True, text=True, check=True, timeout=600)
        job = json.loads(proc.stdout)["jobs"][0]
        side = job["read"] if "read" in rw else job["write"]
        out[key] = {"iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6,
                    "lat_us": side["clat_ns"]["mean"] / 1000}
    return out


def frontends(home: Home, runtime: int) -> dict[str, Any]:
    res = {}
    for fe in ("fuse", "fuse-nbd", "nbdfuse"):
        name = fe.replace("-", "")
        home.cli("volume", "create", name, "--size", str(SIZE))
        dev = home.cli("volume", "attach", name, "--frontend", fe).strip()
        try:
            res[fe] = fio(dev, runtime)
        finally:
            home.cli("volume", "detach", name)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 s fio jobs instead of 10 s")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_engine_survival: needs root and /dev/fuse: skipped")
        return 0
    home = Home()
    try:
        p = pauses(home)
        r = pauses(home, "r", relay=True)
        f = frontends(home, 3 if args.quick else 10)
    finally:
        home.close()
    med = statistics.median
    print("engine survival (3 replicas, 4k writes + flush/fsync every 8):")
    print(f"  normal write latency (median): fuse-nbd {p['normal_write_median_ms']:.2f} ms, "
          f"local relay {r['normal_write_median_ms']:.2f} ms")
    for what, x in (("fuse-nbd", p), ("nbd frontend's local relay, libnbd writer", r)):
        print(f"  {what}:")
        print(f"    pause during kill -9 of the engine: median {med(x['crash_pause_s']):.2f} s "
              f"({', '.join(f'{v:.2f}' for v in x['crash_pause_s'])})")
        print(f"    pause during live upgrade: median {med(x['upgrade_pause_s']):.2f} s "
              f"({', '.join(f'{v:.2f}' for v in x['upgrade_pause_s'])}); daemon's figure "
              f"median {med(x['upgrade_reported_pause_s']):.2f} s")
    print("frontend cost (fio libaio O_DIRECT on the loop device, 3 replicas):")
    print(f"  {'job':12} {'fuse':>22} {'fuse-nbd':>22} {'nbdfuse':>22}  fuse-nbd/fuse")
    for key, *_ in FIO_JOBS:
        metric = "iops" if "4k" in key else "mb_s"
        unit = "IOPS" if metric == "iops" else "MB/s"
        cells = " ".join(f"{f[fe][key][metric]:9.0f} {unit} {f[fe][key]['lat_us']:7.0f} µs"
                         for fe in ("fuse", "fuse-nbd", "nbdfuse"))
        print(f"  {key:12} {cells}  {f['fuse-nbd'][key][metric] / f['fuse'][key][metric]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
