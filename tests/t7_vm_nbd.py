"""Tier 7 (real kernel, QEMU guest): a host attaches a volume with the Linux kernel's NBD client.

The volume is attached with `--frontend none --port P --tls certificates` (nbd-client 3.24
speaks TLS with X.509 certificates, not TLS-PSK); the guest runs the very `nbd-client` command
line `blockhorn.nbd.attach.nbd_client_argv` builds, measures raw device throughput, makes ext4,
writes files, syncs and disconnects. The host then reads the volume through the engine's unix
socket and compares every file (debugfs reads ext4 from the image, no mount) with the checksums
the guest printed, and e2fsck finds the filesystem clean.

Engine survival: under the guest's ext4 load (fsync'd writes), kill -9 of the engine and a
live `volume upgrade` must cost the guest a pause only (the TLS proxy outlives the engine and
its relay re-sends: docs/DURABILITY.md): no kernel I/O error, ext4 still rw, every file
the guest checksummed reads back the same on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from daemon_util import Env, wait_until
from harness import free_port
from support import vm
from t4_nbd_tls import make_certs

from blockhorn.nbd.attach import CLIENT_CERT_FILES, nbd_client_argv

pytestmark = pytest.mark.vm

MiB = 1 << 20
SIZE_MIB = 64
FILES = 3              # files of FILE_MIB written on ext4 by the guest
FILE_MIB = 4
RAW_MIB = 8            # raw device throughput, before mkfs


XFS_MIB = 320          # mkfs.xfs (xfsprogs 6.1) refuses filesystems under 300 MiB
DBENCH_S = 5
EXT4, XFS = ("nbd", "ext4"), ("nbd", "xfs")   # the guest's kernel modules (support/vm.py)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    vm.require_vm()
    with Env() as e:
        e.cli("volume", "create", "v", "--size", f"{SIZE_MIB}MiB", "--replicas", "2")
        e.cli("volume", "create", "x", "--size", f"{XFS_MIB}MiB", "--replicas", "2")
        yield e


@pytest.fixture(scope="module")
def certs(env: Env) -> dict[str, bytes]:
    return guest_certs(env)


def guest_certs(env: Env) -> dict[str, bytes]:
    """Server certificates in <home>/tls, a client certificate signed by the same CA, as guest
    files under /certs with libnbd's names (CLIENT_CERT_FILES). Also used by bench_vm.py."""
    server = os.path.join(env.home.root, "tls")
    make_certs(server, "server")
    client = os.path.join(env.root, "client")
    make_certs(client, "client", ca=server)
    files = {}
    for name in CLIENT_CERT_FILES:
        with open(os.path.join(client, name), "rb") as f:
            files[f"certs/{name}"] = f.read()
    return files


def attach_tcp(env: Env, name: str, extra: tuple[str, ...] = ()) -> str:
    """Attach `name` with a TLS (certificates) TCP endpoint only; the guest's nbd-client
    command line for it, as nbd_client_argv builds it. The server's certificate names
    127.0.0.1 and localhost; the guest reaches the host as 10.0.2.2, so it checks the name
    localhost."""
    port = free_port()
    env.cli("volume", "attach", name, "--frontend", "none", "--port", str(port),
            "--tls", "certificates")
    return shlex.join(nbd_client_argv("/dev/nbd0", host=vm.HOST, port=port, cert_dir="/certs",
                                      tls_hostname="localhost", export=name,
                                      nbd_client="nbd-client") + list(extra))


def test_kernel_nbd_client_over_tls(env: Env, certs: dict[str, bytes], tmp_path) -> None:
    files = certs
    connect = attach_tcp(env, "v")
    try:
        script = f"""
set -e
{connect}
t() {{ echo "${{EPOCHREALTIME/./}}"; }}
dd if=/dev/urandom of=/tmp/raw bs=1M count={RAW_MIB} status=none
a=$(t); dd if=/tmp/raw of=/dev/nbd0 bs=1M oflag=direct status=none; b=$(t)
dd if=/dev/nbd0 of=/tmp/back bs=1M count={RAW_MIB} iflag=direct status=none; c=$(t)
cmp /tmp/raw /tmp/back
echo "RAW write_us=$((b - a)) read_us=$((c - b))"
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt
for i in $(seq {FILES}); do dd if=/dev/urandom of=/tmp/f$i bs=1M count={FILE_MIB} status=none; done
a=$(t); cp /tmp/f* /mnt/; sync; b=$(t)
echo "EXT4 write_us=$((b - a))"
cd /mnt && sha256sum f* && cd /
umount /mnt
nbd-client -d /dev/nbd0
"""
        res = vm.run(str(tmp_path), script, timeout=150, files=files, modules=EXT4)
        assert "oldstyle" not in res.output and "Connected /dev/nbd0" in res.output
        raw = re.search(r"RAW write_us=(\d+) read_us=(\d+)", res.output)
        ext4 = re.search(r"EXT4 write_us=(\d+)", res.output)
        assert raw and ext4, res.output
        sums = dict((name, digest) for digest, name in
                    re.findall(r"^([0-9a-f]{64})  (f\d+)$", res.output, re.M))
        assert len(sums) == FILES, res.output
        print(f"\nvm nbd: boot {res.boot_s:.1f} s, script {res.run_s:.1f} s; raw O_DIRECT "
              f"write {RAW_MIB * 1e6 / int(raw.group(1)):.1f} MB/s, read "
              f"{RAW_MIB * 1e6 / int(raw.group(2)):.1f} MB/s; ext4 cp+sync "
              f"{FILES * FILE_MIB * 1e6 / int(ext4.group(1)):.1f} MB/s (MiB/s, TCG guest)")

        # What the guest wrote, read through the engine's unix socket on the host.
        image = str(tmp_path / "volume.img")
        sock = env.show("v")["endpoint"].split("socket=", 1)[1]
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", image], check=True,
                       timeout=60)
        fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True,
                              timeout=60)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        for name, digest in sums.items():
            got = subprocess.run(["debugfs", "-R", f"cat /{name}", image], check=True,
                                 capture_output=True, timeout=60).stdout
            assert len(got) == FILE_MIB * MiB and hashlib.sha256(got).hexdigest() == digest, name
    finally:
        env.cli("volume", "detach", "v")


def test_xfs_metadata_load_repair_clean(env: Env, certs: dict[str, bytes], tmp_path) -> None:
    """XFS on the kernel NBD device under dbench (metadata-heavy: creates, renames, unlinks,
    small writes); after unmounting, `xfs_repair -n` finds nothing to repair, and a file
    written before the load reads back the same after a fresh mount."""
    connect = attach_tcp(env, "x")
    try:
        script = f"""
set -e
{connect}
mkfs.xfs -q -f /dev/nbd0
mount -t xfs /dev/nbd0 /mnt
dd if=/dev/urandom of=/mnt/keep bs=1M count=2 status=none
sha256sum /mnt/keep
mkdir /mnt/db
dbench -c /usr/share/dbench/client.txt -D /mnt/db -t {DBENCH_S} 2 2>&1 | tail -n 4
umount /mnt
xfs_repair -n /dev/nbd0 >/tmp/repair 2>&1 && echo REPAIR-CLEAN ||
    {{ tail -20 /tmp/repair; exit 1; }}
mount -t xfs /dev/nbd0 /mnt
sha256sum /mnt/keep
umount /mnt
nbd-client -d /dev/nbd0
"""
        res = vm.run(str(tmp_path), script, timeout=180, files=certs, modules=XFS)
        assert "REPAIR-CLEAN" in res.output, res.output
        sums = re.findall(r"^([0-9a-f]{64})  /mnt/keep$", res.output, re.M)
        assert len(sums) == 2 and sums[0] == sums[1], res.output
        tput = re.search(r"Throughput ([0-9.]+ MB/sec)", res.output)
        assert tput, res.output
        print(f"\nvm xfs: dbench 2 clients {DBENCH_S} s: {tput.group(1)}; boot "
              f"{res.boot_s:.1f} s, script {res.run_s:.1f} s")
    finally:
        env.cli("volume", "detach", "x")


LOAD_S = 10   # seconds of fsync'd writes in the guest; the event comes 2 s in


def load_script(connect: str) -> str:
    """Guest: ext4 on the kernel NBD device, fsync'd 512 KiB files rewritten for LOAD_S
    seconds; prints the count, the errors and the longest write+fsync, the mount, checksums."""
    return f"""
{connect} || exit 1
mkfs.ext4 -q -F /dev/nbd0 && mount -t ext4 /dev/nbd0 /mnt || exit 1
echo LOAD
i=0; errs=0; gap=0; end=$((SECONDS + {LOAD_S}))
while [ $SECONDS -lt $end ]; do
    a=${{EPOCHREALTIME/./}}
    if dd if=/dev/urandom of=/mnt/f$((i % 8)) bs=64k count=8 conv=fsync status=none; then
        b=${{EPOCHREALTIME/./}}; [ $((b - a)) -gt $gap ] && gap=$((b - a))
    else
        errs=$((errs + 1)); rm -f /mnt/f$((i % 8))
    fi
    i=$((i + 1))
done
echo "WRITES $i ERRORS $errs MAXPAUSE_US $gap"
grep ' /mnt ' /proc/mounts
cd /mnt && sha256sum f* ; cd /
umount /mnt
nbd-client -d /dev/nbd0
"""


def run_through(env: Env, certs: dict[str, bytes], tmp_path, event, what: str,
                after=lambda: None) -> None:
    """Attach `v` over TLS, run load_script in the guest, call `event()` 2 s into the load;
    then: no kernel I/O error, no failed write, ext4 still rw, and every file the guest
    checksummed reads back the same on the host through the (new) engine's unix socket."""
    connect = attach_tcp(env, "v")
    try:
        with vm.Guest(str(tmp_path), load_script(connect), files=certs, modules=EXT4) as g:
            g.wait_for(r"^LOAD$", vm.BOOT_TIMEOUT_S + 60)
            time.sleep(2)
            event()
            # A kernel I/O error is the failure, whatever the script does after it (a dd can
            # hang in the kernel on the dead device): fail at once instead of at the deadline.
            done = wait_until(lambda: "I/O error, dev nbd0" in g.console_tail(1000) or
                              "BH-VM-EXIT" in g.output(), LOAD_S + 60, "the load's end")
            assert "I/O error, dev nbd0" not in g.console_tail(1000), g.console_tail(20)
            assert done
            res = g.wait(30)
        m = re.search(r"WRITES (\d+) ERRORS (\d+) MAXPAUSE_US (\d+)", res.output)
        assert m, res.output
        print(f"\nvm nbd {what}: {m.group(1)} writes, {m.group(2)} errors, longest "
              f"write+fsync {int(m.group(3)) / 1e6:.2f} s")
        assert int(m.group(2)) == 0, res.output
        assert re.search(r" /mnt ext4 rw[ ,]", res.output), res.output
        sums = dict((n, d) for d, n in re.findall(r"^([0-9a-f]{64})  (f\d+)$", res.output, re.M))
        assert sums, res.output
        image = str(tmp_path / "volume.img")
        sock = env.show("v")["endpoint"].split("socket=", 1)[1]
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", image], check=True, timeout=60)
        for name, digest in sums.items():
            got = subprocess.run(["debugfs", "-R", f"cat /{name}", image], check=True,
                                 capture_output=True, timeout=60).stdout
            assert hashlib.sha256(got).hexdigest() == digest, name
        after()
    finally:
        env.cli("volume", "detach", "v")


def test_engine_kill_under_kernel_nbd_load(env: Env, certs: dict[str, bytes], tmp_path) -> None:
    """kill -9 of the engine while the guest writes files with fsync on ext4 over the kernel
    NBD client: the daemon restarts the engine on the same endpoint (the TLS proxy stays, its
    relay re-sends); the guest sees a pause, no I/O error, ext4 still read-write, and
    every acknowledged file intact."""
    def kill() -> None:
        v = env.show("v")
        keeper = psutil.Process(v["engine"]["pid"])
        next(c for c in keeper.children() if "python" in c.cmdline()).kill()
        wait_until(lambda: env.show("v")["engine"]["restarts"] == v["engine"]["restarts"] + 1,
                   30, "engine restart")

    run_through(env, certs, tmp_path, kill, "engine kill -9")


def test_live_upgrade_under_kernel_nbd_load(env: Env, certs: dict[str, bytes],
                                            tmp_path) -> None:
    """`volume upgrade` of a `--frontend none --port` volume under the same guest load: the
    engine hands over (drained, closed cleanly, killed), the installed one starts; no I/O
    error in the guest, no rebuild, the same checks as for the kill."""
    out: dict[str, Any] = {}

    def upgrade() -> None:
        out["old"] = env.show("v")["engine"]
        out["r"] = json.loads(env.cli("volume", "upgrade", "v", "--json", timeout=60).stdout)

    def no_rebuild() -> None:
        v = env.show("v")
        assert v["engine"]["pid"] != out["old"]["pid"]
        assert v["engine"]["restarts"] == out["old"]["restarts"]
        assert {x["mode"] for x in v["replicas"]} == {"RW"}, v["replicas"]
        assert len({x["revision"] for x in v["replicas"]}) == 1, v["replicas"]
        assert all(x["rebuild"] is None for x in v["replicas"]), v["replicas"]

    run_through(env, certs, tmp_path, upgrade, "live upgrade", no_rebuild)
    r = out["r"]
    print(f"vm nbd live upgrade: daemon's pause {r['pause_s']:.2f} s (handover "
          f"{r['stop_s']:.2f} s, start {r['start_s']:.2f} s)")
    assert r["version"], r
