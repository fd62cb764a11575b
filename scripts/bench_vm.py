"""`make bench`, real-kernel tier: what the Linux kernel's clients in a QEMU guest see
(tests/support/vm.py; root, qemu and the images of `make vm`, else skipped).

1. Kernel NBD: the guest attaches a `--frontend none --port` volume over TLS with nbd-client,
   makes ext4 and rewrites 512 KiB files with fsync in a loop, each write+fsync timed; the
   host kills the engine (kill -9 of nbdkit) ROUNDS times, then upgrades it live ROUNDS
   times. The pause of an event is the longest write+fsync among the ones that ended after
   it. At the end: no failed write, ext4 still rw, every file the guest checksummed reads back
   equal on the host.
2. Share failover with the kernel's NFSv4.2 client (tests/t7_vm_failover.py: node daemons,
   the share's default grace period): from the death of the share's host to the first guest
   write started after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench import write_results  # noqa: E402

ROUNDS = 5
SETTLE = 10   # writes after an event before the next one


def nbd_script(connect: str, port: int) -> str:
    from support import vm
    return f"""
{connect} || exit 1
mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 /dev/nbd0 /mnt || exit 1
echo LOAD
i=0; errs=0
while [ "$(echo q | nc {vm.HOST} {port})" != stop ]; do
    a=${{EPOCHREALTIME/./}}
    if dd if=/dev/urandom of=/mnt/f$((i % 8)) bs=64k count=8 conv=fsync status=none; then
        b=${{EPOCHREALTIME/./}}; echo "D $((b - a))"
    else
        errs=$((errs + 1)); rm -f /mnt/f$((i % 8)); echo E
    fi
    i=$((i + 1))
done
echo "ERRORS $errs"
grep ' /mnt ' /proc/mounts
cd /mnt && sha256sum f* ; cd /
umount /mnt
nbd-client -d /dev/nbd0
"""


def durations(out: str) -> list[float]:
    return [int(us) / 1e6 for us in re.findall(r"^D (\d+)$", out, re.M)]


def nbd_pauses(rounds: int) -> dict[str, object]:
    import psutil
    from daemon_util import Env, wait_until
    from support import vm
    from t7_vm_nbd import EXT4, attach_tcp, guest_certs

    with Env() as env:
        env.cli("volume", "create", "v", "--size", "64MiB", "--replicas", "2")
        certs = guest_certs(env)
        ctl = vm.Control()
        connect = attach_tcp(env, "v")
        kills: list[float] = []
        upgrades: list[float] = []
        reported: list[float] = []
        try:
            with vm.Guest(env.root, nbd_script(connect, ctl.port), files=certs,
                          modules=EXT4) as g:
                g.wait_for(r"^LOAD$", vm.BOOT_TIMEOUT_S + 60)

                def settle() -> int:
                    n = len(durations(g.output()))
                    wait_until(lambda: len(durations(g.output())) >= n + SETTLE, 90,
                               "guest writes")
                    return n

                def pause_after(n: int) -> float:
                    wait_until(lambda: len(durations(g.output())) >= n + SETTLE, 90,
                               "guest writes after the event")
                    return max(durations(g.output())[n:n + SETTLE])

                settle()
                for _ in range(rounds):
                    v = env.show("v")
                    n = len(durations(g.output()))
                    keeper = psutil.Process(v["engine"]["pid"])
                    next(c for c in keeper.children() if c.name() == "nbdkit").kill()
                    wait_until(lambda v=v: env.show("v")["engine"]["restarts"] ==
                               v["engine"]["restarts"] + 1, 30, "engine restart")
                    kills.append(pause_after(n))
                for _ in range(rounds):
                    n = len(durations(g.output()))
                    r = json.loads(env.cli("volume", "upgrade", "v", "--json",
                                           timeout=60).stdout)
                    reported.append(r["pause_s"])
                    upgrades.append(pause_after(n))
                ctl.stop.set()
                res = g.wait(120)
        finally:
            ctl.close()
        normal = statistics.median(durations(res.output)[:SETTLE])
        if res.status != 0 or "ERRORS 0" not in res.output or re.search(r"^E$", res.output, re.M):
            raise SystemExit(f"bench_vm: the guest saw errors:\n{res.output[-2000:]}")
        if not re.search(r" /mnt ext4 rw[ ,]", res.output):
            raise SystemExit(f"bench_vm: ext4 not rw:\n{res.output[-2000:]}")
        sums = dict((n, d) for d, n in re.findall(r"^([0-9a-f]{64})  (f\d+)$", res.output, re.M))
        image = os.path.join(env.root, "volume.img")
        sock = env.show("v")["endpoint"].split("socket=", 1)[1]
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", image], check=True, timeout=60)
        for name, digest in sums.items():
            got = subprocess.run(["debugfs", "-R", f"cat /{name}", image], check=True,
                                 capture_output=True, timeout=60).stdout
            if hashlib.sha256(got).hexdigest() != digest:
                raise SystemExit(f"bench_vm: {name} differs on the host")
        env.cli("volume", "detach", "v")
    return {"kill_pause_s": kills, "upgrade_pause_s": upgrades,
            "upgrade_reported_pause_s": reported, "normal_write_fsync_s": normal}


def failovers(runs: int) -> list[dict[str, float]]:
    from t7_vm_failover import kernel_client_site, lines, measure_failover
    out = []
    for _ in range(runs):
        with kernel_client_site(grace_s=0) as site:
            serving, written, acked, text = measure_failover(site, os.path.join(site.tmp, "vm"))
        back = lines(text, "R")
        if "FAIL" in text or any(back.get(i) != d for i, d in acked.items()):
            raise SystemExit(f"bench_vm: a write failed or differs after failover:\n{text}")
        print(f"  failover: served again after {serving:.1f} s, guest write after "
              f"{written:.1f} s",
              flush=True)
        out.append({"serving_s": round(serving, 2), "write_s": round(written, 2)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 events of each kind, 1 failover")
    args = ap.parse_args()
    from support import vm
    missing = [p for p in (vm.KERNEL, vm.INITRD) if not os.path.exists(p)]
    if os.geteuid() != 0 or not shutil.which(vm.QEMU) or missing:
        print(f"bench_vm: skipped (needs root, {vm.QEMU} and `make vm`)")
        return 0
    tempfile.tempdir = "/tmp"
    rounds, runs = (3, 1) if args.quick else (ROUNDS, 3)
    t0 = time.monotonic()
    print(f"blockhorn real-kernel bench: {rounds} engine kills and upgrades under the kernel "
          f"nbd-client, {runs} share failover(s) under the kernel NFS client", flush=True)
    nbd = nbd_pauses(rounds)
    print(f"  nbd-client: {json.dumps(nbd)}", flush=True)
    fo = failovers(runs)
    med = statistics.median
    fmt = ", ".join
    text = (
        f"Kernel nbd-client (QEMU guest, TLS proxy, ext4, 512 KiB write+fsync, normally "
        f"{nbd['normal_write_fsync_s']:.2f} s): longest write+fsync through a kill -9 of the "
        f"engine median {med(nbd['kill_pause_s']):.2f} s "
        f"({fmt(f'{x:.2f}' for x in nbd['kill_pause_s'])}), through a live upgrade median "
        f"{med(nbd['upgrade_pause_s']):.2f} s ({fmt(f'{x:.2f}' for x in nbd['upgrade_pause_s'])};"
        f" daemon's pause median {med(nbd['upgrade_reported_pause_s']):.2f} s). "
        f"Share failover under the kernel NFSv4.2 client (default grace): host B serving after "
        f"median {med(r['serving_s'] for r in fo):.1f} s, first guest write started after the "
        f"owner's death done after median {med(r['write_s'] for r in fo):.1f} s "
        f"({fmt(str(r['write_s']) for r in fo)}). ({time.monotonic() - t0:.0f} s)")
    print("\n" + text)
    write_results("vm", {"nbd": nbd, "failover": fo}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
