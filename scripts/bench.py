"""`make bench`: fio against the local file, nbdkit's C file plugin and blockhorn, in one run.

Targets: (a) local file, O_DIRECT via io_uring (libaio if refused); (b) nbdkit `file` plugin on
the same disk; (p) nbdkit Python plugin doing plain pread/pwrite on a file (the ceiling of any
Python plugin); (c) blockhorn 1 replica; (d) blockhorn 3 replicas (tcp); (e) 3 replicas (unix);
(f) 3 replicas (tcp) through nbdfuse + loop device and (g) through the pyfuse3 frontend + loop
device, both with fio libaio O_DIRECT on the loop device (root only).
As root with NFS-Ganesha and libnfs-utils: sequential read (nfs-cat, NFSv4.0, cold caches) and
write (nfs-cp + sync, NFSv3: see bench_nfs) of one file through Ganesha against the same ext4
used locally (--no-nfs skips it).
Each target's data area is prefilled with one sequential 1 MiB pass, then every job runs
time_based and stonewalled. Results go to stdout and to bench-results/ as JSON and text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blockhorn.nbd.attach import NBDKIT_THREADS  # noqa: E402  (same thread count as the engine)


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Job:
    key: str
    label: str
    rw: str
    bs: str
    qd: int
    metric: str  # "iops", "bw" (MB/s) or "lat" (mean µs)

    @property
    def unit(self) -> str:
        return {"iops": "IOPS", "bw": "MB/s", "lat": "µs"}[self.metric]


JOBS = [
    Job("randread4k", "4k randread QD32", "randread", "4k", 32, "iops"),
    Job("randwrite4k", "4k randwrite QD32", "randwrite", "4k", 32, "iops"),
    Job("read1m", "1M seq read QD16", "read", "1M", 16, "bw"),
    Job("write1m", "1M seq write QD16", "write", "1M", 16, "bw"),
    Job("latwrite", "4k randwrite QD1 lat", "randwrite", "4k", 1, "lat"),
    Job("latread", "4k randread QD1 lat", "randread", "4k", 1, "lat"),
]
TARGETS = {
    "a": "local file O_DIRECT",
    "b": "nbdkit C file plugin",
    "p": "nbdkit Python plugin, plain file",
    "c": "blockhorn 1 replica tcp",
    "d": "blockhorn 3 replicas tcp",
    "e": "blockhorn 3 replicas unix (default)",
    "f": "blockhorn 3 tcp, nbdfuse + loop",
    "g": "blockhorn 3 tcp, fuse frontend + loop",
}
FLOORS = {"randread4k": 25.0, "randwrite4k": 15.0, "read1m": 50.0, "write1m": 30.0}  # % of (b), by (d)
FUSE_TARGETS = {"randread4k": 1.5, "randwrite4k": 1.5, "read1m": 1.0, "write1m": 1.0}  # (g)/(f)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    if n <= 0 or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB: {text}")
    return n


def check_deps(targets: str) -> None:
    fio = shutil.which("fio")
    if not fio:
        raise BenchError("fio not found: install the Debian package 'fio'")
    engines = subprocess.run([fio, "--enghelp"], capture_output=True, text=True).stdout.split()
    if "nbd" not in engines:
        raise BenchError("fio lacks the nbd ioengine: install Debian's 'fio' (built with libnbd)")
    if set(targets) & set("bcde") and not shutil.which("nbdkit"):
        raise BenchError("nbdkit not found: install the Debian package 'nbdkit'")
    if set(targets) & set("fg") and os.geteuid() != 0:
        raise BenchError("targets f and g attach loop devices and mount FUSE: run as root")
    if set(targets) & set("cdefg"):
        probe = subprocess.run(["nbdkit", "--dump-plugin", "python"], capture_output=True)
        if probe.returncode != 0:
            raise BenchError("nbdkit python plugin missing: install 'nbdkit-plugin-python'")
        try:
            import blockhorn  # noqa: F401
        except ImportError:
            raise BenchError("blockhorn is not importable: run via `make bench` "
                             "(or .venv/bin/python after `make setup`)") from None


def make_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def wait_ready(ready: Callable[[], bool], proc_alive: Callable[[], bool], what: str,
               log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc_alive() or time.monotonic() > deadline:
            raise BenchError(f"{what} did not start; log tail:\n{tail(log)}")
        time.sleep(0.05)


def tail(path: str, lines: int = 8) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "\n".join(f.read().splitlines()[-lines:])
    return "(no log)"


def run_fio(argv: list[str], log: str = "") -> dict[str, Any]:
    proc = subprocess.run(["fio", "--eta=never", "--output-format=json", *argv],
                          capture_output=True, text=True)
    start = proc.stdout.find("{")
    if proc.returncode != 0 or start < 0:
        msg = f"fio failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        raise BenchError(msg + (f"\ntarget log tail:\n{tail(log)}" if log else ""))
    return dict(json.loads(proc.stdout[start:]))


def probe_engine(path: str) -> str:
    """io_uring unless the kernel or a sandbox refuses it; then libaio."""
    for engine in ("io_uring", "libaio"):
        probe = subprocess.run(["fio", "--name=probe", f"--filename={path}", f"--ioengine={engine}",
                                "--direct=1", "--rw=read", "--bs=4k", "--size=1M"],
                               capture_output=True)
        if probe.returncode == 0:
            return engine
    raise BenchError("fio can use neither io_uring nor libaio with O_DIRECT on " + path)


@contextlib.contextmanager
def serve(key: str, workdir: str, size: int) -> Iterator[tuple[list[str], str, str]]:
    """Start target `key`; yield (fio target options, label, log path). Stops it on exit."""
    os.makedirs(workdir)
    if key == "a":
        path = os.path.join(workdir, "local.img")
        make_file(path, size)
        engine = probe_engine(path)
        yield [f"--ioengine={engine}", "--direct=1", f"--filename={path}"], f"{TARGETS[key]} ({engine})", ""
    elif key in "bp":
        path, sock, log = (os.path.join(workdir, n) for n in ("file.img", "nbd.sock", "nbdkit.log"))
        make_file(path, size)
        plugin = ["file", path] if key == "b" else [
            "--threads", str(NBDKIT_THREADS), "python",
            os.path.join(ROOT, "scripts", "plain_plugin.py"), f"file={path}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", sock, *plugin],
                                    stdout=out, stderr=out, start_new_session=True)
        try:
            wait_ready(lambda: os.path.exists(sock), lambda: proc.poll() is None, "nbdkit file", log)
            yield ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}"], TARGETS[key], log
        finally:
            stop_procs([proc])
    elif key in "fg":
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from fuse_harness import FuseCluster
        from harness import Cluster

        from blockhorn.nbd.attach import attach_device, detach_device

        fuse = key == "g"
        cluster = (FuseCluster if fuse else Cluster)(home=workdir, size=size, replicas=3)
        try:
            cluster.start()
            att = attach_device(cluster.uri,
                                cluster.mount if fuse else os.path.join(workdir, "fuse"),  # type: ignore[attr-defined]
                                os.path.join(workdir, "attach.log"), "fuse" if fuse else "nbdfuse")
            try:
                yield (["--ioengine=libaio", "--direct=1", f"--filename={att.device}"],
                       TARGETS[key], cluster.engine_log)
            finally:
                detach_device(att)
        finally:
            try:
                cluster.stop()
            finally:
                stop_procs([cluster.engine, *(r.proc for r in cluster.reps)])
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from harness import Cluster

        cluster = Cluster(home=workdir, size=size, replicas=1 if key == "c" else 3,
                          transport="unix" if key == "e" else "tcp")
        try:
            cluster.start()
            wait_ready(lambda: os.path.exists(cluster.nbd_socket),
                       lambda: cluster.engine is not None and cluster.engine.poll() is None,
                       "blockhorn engine", cluster.engine_log)
            yield ["--ioengine=nbd", f"--uri={cluster.uri}"], TARGETS[key], cluster.engine_log
        finally:
            try:
                cluster.stop()
            finally:
                stop_procs([cluster.engine, *(r.proc for r in cluster.reps)])


def stop_procs(procs: list[subprocess.Popen[bytes] | None]) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def bench_target(opts: list[str], log: str, size: int, ramp: int, runtime: int) -> dict[str, float]:
    argv = [f"--size={size}", *opts, "--name=prefill", "--rw=write", "--bs=1M", "--iodepth=16"]
    for j in JOBS:
        argv += [f"--name={j.key}", "--stonewall", f"--rw={j.rw}", f"--bs={j.bs}",
                 f"--iodepth={j.qd}", "--time_based", f"--ramp_time={ramp}", f"--runtime={runtime}"]
    out = run_fio(argv, log)
    by_name = {job["jobname"]: job for job in out["jobs"]}
    results: dict[str, float] = {}
    for j in JOBS:
        if by_name[j.key].get("error"):
            raise BenchError(f"fio job {j.key} reported error {by_name[j.key]['error']}")
        stats = by_name[j.key]["read" if "read" in j.rw else "write"]
        results[j.key] = {"iops": stats["iops"], "bw": stats["bw_bytes"] / 1e6,
                          "lat": stats["lat_ns"]["mean"] / 1e3}[j.metric]
    return results


def pct(value: float, base: float | None) -> float | None:
    return round(100.0 * value / base, 1) if base else None


def render(results: dict[str, dict[str, float]], labels: dict[str, str]) -> tuple[str, dict[str, Any]]:
    fmt = "{:<22} {:<38} {:>10} {:<5} {:>8} {:>8} {:>8}"
    lines = [fmt.format("job", "target", "value", "unit", "% of b", "% of a", "% of p"),
             "-" * 105]
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for j in JOBS:
        for key, res in results.items():
            vb, va, vp = (pct(res[j.key], results.get(t, {}).get(j.key)) for t in "bap")
            if key in "cdefg":
                ratios.setdefault(key, {})[j.key] = {"vs_b": vb, "vs_a": va, "vs_p": vp}
            show = [f"{v:.1f} %" if key in "cdefgp" and v is not None else "" for v in (vb, va, vp)]
            if key == "p":
                show[2] = ""
            lines.append(fmt.format(j.label if key == next(iter(results)) else "",
                                    f"({key}) {labels[key]}", f"{res[j.key]:,.0f}", j.unit, *show))
    lines.append("(latency rows: lower is better, so % of b/a above 100 means slower)")
    floors: dict[str, Any] = {}
    # (e), unix sockets, is what the daemon uses for replicas on its own host; (d) is TCP.
    for row in [k for k in ("e", "d") if k in results and "b" in results]:
        lines += ["", f"Issue #2 floors, ({row}) {labels[row]} vs (b) nbdkit file plugin "
                      "(informational):"]
        for key, floor in FLOORS.items():
            got = pct(results[row][key], results["b"][key]) or 0.0
            ok = got >= floor
            floors.setdefault(row, {})[key] = {"floor_pct": floor, "got_pct": got, "pass": ok}
            label = next(j.label for j in JOBS if j.key == key)
            lines.append(f"  {label:<22} {got:6.1f} % (floor {floor:.0f} %)  {'PASS' if ok else 'FAIL'}")
    if not floors:
        lines.append("\n(floors need target b and d or e)")
    fuse: dict[str, Any] = {}
    if "f" in results and "g" in results:
        lines += ["", "Issue #5 targets, (g) fuse frontend vs (f) nbdfuse, both + loop:"]
        for key, want in FUSE_TARGETS.items():
            got = results["g"][key] / results["f"][key] if results["f"][key] else 0.0
            fuse[key] = {"target_ratio": want, "ratio": round(got, 2), "pass": got >= want}
            label = next(j.label for j in JOBS if j.key == key)
            lines.append(f"  {label:<22} {got:5.2f} x (target {want:.1f} x)  "
                         f"{'PASS' if got >= want else 'FAIL'}")
    return "\n".join(lines), {"ratios": ratios, "floors": floors, "fuse_vs_nbdfuse": fuse}


NFS3_PORTS = (20749, 20750)   # NFS and MOUNT ports of the write-measuring Ganesha
NFS_WRITERS = 4               # files written at once (nfs-cp has one WRITE in flight)


def bench_nfs(work: str, size: int) -> dict[str, float]:
    """Sequential read and write of one `size` file through Ganesha and locally on the same
    ext4 (a 1-replica RWX volume), with cold page caches for the reads; bytes/s.

    Reads go through the share's own Ganesha (NFSv4.0, nfs-cat). libnfs 4.0, the only NFS
    client here, cannot send an NFSv4 WRITE over about 2 KB, so writes are measured through
    a second Ganesha on the same export directory, same FSAL VFS, speaking NFSv3 (which needs
    rpcbind): NFS_WRITERS nfs-cp at once (each keeps one WRITE in flight, where a kernel
    client keeps many), each of a size/NFS_WRITERS file from tmpfs, then syncfs on the server,
    against the same files written locally by as many threads, then syncfs."""
    home = os.path.join(work, "nfs")
    bh = [sys.executable, "-m", "blockhorn", "--home", home]
    procs: list[subprocess.Popen[bytes]] = []

    def run(*argv: str) -> str:
        return subprocess.run([*bh, *argv], check=True, capture_output=True, text=True,
                              cwd=ROOT).stdout

    def cold() -> None:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")

    def syncfs(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)   # the directory; then the whole filesystem:
            subprocess.run(["sync", "-f", path], check=True)
        finally:
            os.close(fd)

    src = os.path.join("/dev/shm", f"bh-nfs-src-{os.getpid()}")
    part = size // NFS_WRITERS
    try:
        run("volume", "create", "nfsbench", "--size", str(2 * size + (256 << 20)),
            "--replicas", "1", "--access", "rwx", "--nfs-minor-versions", "0,1,2")
        run("volume", "attach", "nfsbench")
        share = json.loads(run("share", "show", "nfsbench", "--json"))
        export = share["mount_dir"]
        path = os.path.join(export, "seq")
        chunk = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for _ in range(part >> 20):
                f.write(chunk)

        def write_local(i: int) -> None:
            with open(os.path.join(export, f"local-{i}"), "wb") as f:
                for _ in range(part >> 20):
                    f.write(chunk)

        t0 = time.monotonic()
        with ThreadPoolExecutor(NFS_WRITERS) as pool:
            list(pool.map(write_local, range(NFS_WRITERS)))
        syncfs(export)
        local_write = size / (time.monotonic() - t0)
        for i in range(NFS_WRITERS):
            os.unlink(os.path.join(export, f"local-{i}"))   # room for the NFS copies
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
            os.fsync(f.fileno())
        cold()
        t0 = time.monotonic()
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        local = size / (time.monotonic() - t0)
        cold()
        t0 = time.monotonic()
        subprocess.run(["nfs-cat", f"nfs://127.0.0.1/nfsbench/seq?version=4&nfsport={share['port']}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        nfs = size / (time.monotonic() - t0)
        out: dict[str, float] = {"local_read": local, "nfs_read": nfs, "local_write": local_write}
        if shutil.which("rpcbind"):
            procs += start_nfs3_ganesha(work, export)
            os.chmod(export, 0o777)
            t0 = time.monotonic()
            writers = [subprocess.Popen(["nfs-cp", src, f"nfs://127.0.0.1{export}/nfs-{i}?"
                                         f"version=3&nfsport={NFS3_PORTS[0]}&mountport="
                                         f"{NFS3_PORTS[1]}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for i in range(NFS_WRITERS)]
            for w in writers:
                _, err = w.communicate()
                if w.returncode:
                    raise BenchError(f"NFS bench: nfs-cp failed: {err.decode(errors='replace')}")
            syncfs(export)
            out["nfs_write"] = size / (time.monotonic() - t0)
            if any(os.path.getsize(os.path.join(export, f"nfs-{i}")) != part
                   for i in range(NFS_WRITERS)):
                raise BenchError("NFS bench: a file written over NFS has the wrong size")
        return out
    except subprocess.CalledProcessError as e:
        raise BenchError(f"NFS bench: {' '.join(map(str, e.cmd))}: {e.stderr}") from None
    finally:
        stop_procs(procs)
        with contextlib.suppress(OSError):
            os.unlink(src)
        subprocess.run([*bh, "volume", "rm", "--force", "nfsbench"], capture_output=True, cwd=ROOT)
        subprocess.run([*bh, "daemon", "stop"], capture_output=True, cwd=ROOT)


def start_nfs3_ganesha(work: str, export: str) -> list[subprocess.Popen[bytes]]:
    """rpcbind (unless one runs) and a Ganesha exporting `export` over NFSv3 on loopback."""
    d = os.path.join(work, "nfs3")
    os.makedirs(os.path.join(d, "recovery"), exist_ok=True)
    conf = os.path.join(d, "ganesha.conf")
    with open(conf, "w") as f:
        f.write(f"""NFS_CORE_PARAM {{
    Protocols = 3;
    NFS_Port = {NFS3_PORTS[0]};
    MNT_Port = {NFS3_PORTS[1]};
    Bind_addr = 127.0.0.1;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSv4 {{
    RecoveryBackend = fs;
    RecoveryRoot = "{d}/recovery";
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
EXPORT {{
    Export_Id = 3;
    Path = "{export}";
    Pseudo = "/bench3";
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    Access_Type = RW;
    Squash = No_Root_Squash;
    CLIENT {{
        Clients = 127.0.0.1;
        Access_Type = RW;
    }}
    FSAL {{
        Name = VFS;
    }}
}}
""")
    procs: list[subprocess.Popen[bytes]] = []
    if subprocess.run(["pgrep", "-x", "rpcbind"], capture_output=True).returncode != 0:
        procs.append(subprocess.Popen([shutil.which("rpcbind") or "rpcbind", "-f", "-w"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
    log = os.path.join(d, "ganesha.log")
    procs.append(subprocess.Popen(["ganesha.nfsd", "-F", "-L", log, "-f", conf,
                                   "-p", os.path.join(d, "ganesha.pid")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while subprocess.run(["nfs-ls", f"nfs://127.0.0.1{export}?version=3&nfsport="
                          f"{NFS3_PORTS[0]}&mountport={NFS3_PORTS[1]}"],
                         capture_output=True).returncode != 0:
        if procs[-1].poll() is not None or time.monotonic() > deadline:
            stop_procs(procs)
            raise BenchError(f"the NFSv3 Ganesha for the write bench did not start:\n{tail(log)}")
        time.sleep(0.5)
    return procs


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind the finally blocks: stop every process, remove the work dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: 5 s jobs, 2 s ramp, 256 MiB")
    ap.add_argument("--runtime", type=int, help="seconds per job (default 20, --quick 5)")
    ap.add_argument("--size", type=parse_size, help="data size per target (default 1G, --quick 256M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the temporary work dir goes (default /var/tmp)")
    ap.add_argument("--only", default=",".join(k for k in TARGETS if k not in "fg" or os.geteuid() == 0),
                    help=f"comma-separated targets from {','.join(TARGETS)} (default: all; f and g only as root)")
    ap.add_argument("--no-nfs", action="store_true", help="skip the NFS read through an RWX share")
    args = ap.parse_args()
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    if not keys or set(keys) - set(TARGETS):
        ap.error(f"--only takes a comma-separated subset of {','.join(TARGETS)}")
    keys = [k for k in TARGETS if k in keys]
    size = args.size or (256 << 20 if args.quick else 1 << 30)
    runtime = args.runtime or (5 if args.quick else 20)
    ramp = 2 if args.quick else 5
    signal.signal(signal.SIGTERM, on_sigterm)

    work = ""
    try:
        check_deps("".join(keys))
        work = tempfile.mkdtemp(prefix="blockhorn-bench-", dir=args.dir)
        print(f"blockhorn bench: size {size >> 20} MiB, {runtime} s per job (+{ramp} s ramp), "
              f"targets {','.join(keys)}, work dir {work}", flush=True)
        results: dict[str, dict[str, float]] = {}
        labels: dict[str, str] = {}
        for key in keys:
            t0 = time.monotonic()
            print(f"  ({key}) {TARGETS[key]} ...", end=" ", flush=True)
            tdir = os.path.join(work, key)
            with serve(key, tdir, size) as (opts, label, log):
                results[key] = bench_target(opts, log, size, ramp, runtime)
            labels[key] = label
            shutil.rmtree(tdir, ignore_errors=True)
            print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
        nfs: dict[str, float] = {}
        if not args.no_nfs and os.geteuid() == 0 and shutil.which("ganesha.nfsd") and \
                shutil.which("nfs-cat"):
            print("  (n) NFS sequential read and write through an RWX share ...", end=" ", flush=True)
            nfs = bench_nfs(work, size)
            print("done", flush=True)
    except (BenchError, OSError) as e:
        print(f"\nbench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)

    text, extra = render(results, labels)
    if nfs:
        text += (f"\n\nNFS sequential read, one file, cold caches: through Ganesha (nfs-cat, "
                 f"NFSv4.0) {nfs['nfs_read'] / 1e6:.0f} MB/s, the same ext4 locally "
                 f"{nfs['local_read'] / 1e6:.0f} MB/s: {100 * nfs['nfs_read'] / nfs['local_read']:.0f} % "
                 "(target >= 50 %).")
        if "nfs_write" in nfs:
            text += (f"\nNFS sequential write, {NFS_WRITERS} files at once + sync: through Ganesha "
                     f"(nfs-cp, NFSv3: "
                     f"libnfs 4.0 cannot send an NFSv4 WRITE over ~2 KB) "
                     f"{nfs['nfs_write'] / 1e6:.0f} MB/s, locally + fsync "
                     f"{nfs['local_write'] / 1e6:.0f} MB/s: "
                     f"{100 * nfs['nfs_write'] / nfs['local_write']:.0f} % (target >= 50 %).")
        else:
            text += "\nNFS writes not measured: rpcbind (for the NFSv3 Ganesha) is missing."
        extra["nfs"] = nfs
    print("\n" + text)
    meta = {"size": size, "runtime_s": runtime, "ramp_s": ramp, "targets": labels,
            "jobs": {j.key: {"label": j.label, "unit": j.unit} for j in JOBS}, "results": results}
    write_results("bench", meta | extra, text)
    return 0


def write_results(prefix: str, data: dict[str, Any], text: str) -> None:
    """bench-results/PREFIX-STAMP.json (`data` plus the stamp) and .txt (`text`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(ROOT, "bench-results")
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{prefix}-{stamp}.json"), "w") as f:
        json.dump({"timestamp": stamp} | data, f, indent=2)
    with open(os.path.join(outdir, f"{prefix}-{stamp}.txt"), "w") as f:
        f.write(text + "\n")
    print(f"\nwritten: bench-results/{prefix}-{stamp}.json and .txt")


if __name__ == "__main__":
    sys.exit(main())
