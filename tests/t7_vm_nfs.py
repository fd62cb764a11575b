"""Tier 7 (real kernel, QEMU guest): RWX shares mounted by the Linux kernel's NFS client.

The share manager serves an RWX volume with NFS-Ganesha on this host; the guest reaches it as
10.0.2.2 (QEMU user-mode networking, which Ganesha sees as 127.0.0.1, the attaching host on
the default allow list). The guest mounts with the command `share show` prints, as NFSv4.1 and
as NFSv4.2: large writes with dd and fsync, read back after dropping its caches, checksums.
The host then detaches the volume (unmount, engine stopped), attaches it again and compares
the files, read from the freshly mounted filesystem on the device, with the guest's checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from daemon_util import Env, wait_until
from support import vm
from test_share_nfs import MISSING, REASON, share_env

pytestmark = [pytest.mark.vm, pytest.mark.skipif(bool(MISSING), reason=REASON)]

MiB = 1 << 20
FILE_MIB = 8
VERSIONS = ("4.1", "4.2")
NFS = ("nfsv4",)     # the guest's kernel modules (support/vm.py)


@pytest.fixture
def env() -> Iterator[Env]:
    vm.require_vm()
    with share_env() as e:
        yield e


def share_of(env: Env, name: str) -> dict[str, Any]:
    return dict(json.loads(env.cli("share", "show", name, "--json").stdout))


def guest_mount(share: dict[str, Any], version: str, where: str) -> str:
    """`share show`'s mount command, for the guest: the host's address as QEMU maps it, the
    NFS minor version asked for, a mount point of the guest's."""
    cmd = share["mount_command"].replace(f"{share['address']}:", f"{vm.HOST}:")
    cmd = re.sub(r"vers=4\.\d", f"vers={version}", cmd)
    return cmd.rsplit(" ", 1)[0] + f" {where}"


def test_kernel_nfs_v41_v42_large_writes(env: Env, tmp_path) -> None:
    env.cli("volume", "create", "rwx", "--access", "rwx", "--replicas", "2", "--size", "64MiB",
            "--no-root-squash")
    env.cli("volume", "attach", "rwx")
    share = share_of(env, "rwx")
    assert share["health"] == "healthy", share
    lines = ["set -e", "t() { echo \"${EPOCHREALTIME/./}\"; }",
             f"dd if=/dev/urandom of=/tmp/src bs=1M count={FILE_MIB} status=none"]
    for v in VERSIONS:
        d = f"/mnt/v{v.replace('.', '')}"
        lines += [
            f"mkdir -p {d}", guest_mount(share, v, d),
            f"grep ' {d} ' /proc/mounts",
            # Large sequential writes, fsync'd by dd before it exits.
            f"a=$(t); dd if=/tmp/src of={d}/big-{v} bs=1M conv=fsync status=none; b=$(t)",
            f"echo \"WRITE {v} $((b - a))\"",
            f"umount {d}", guest_mount(share, v, d),    # a new mount: nothing cached
            f"a=$(t); sha256sum {d}/big-{v}; b=$(t)",
            f"echo \"READ {v} $((b - a))\"",
            f"umount {d}",
        ]
    lines.append("sha256sum /tmp/src")
    res = vm.run(str(tmp_path), "\n".join(lines) + "\n", timeout=150, modules=NFS)
    src = re.search(r"^([0-9a-f]{64})  /tmp/src$", res.output, re.M)
    assert src, res.output
    for v in VERSIONS:
        assert re.search(rf" nfs4 \S*vers={v}\b", res.output), (v, res.output)
        got = re.search(rf"^([0-9a-f]{{64}})  \S+/big-{v}$", res.output, re.M)
        assert got and got.group(1) == src.group(1), (v, res.output)
    speeds = {f"{kind.lower()} {v}": FILE_MIB * 1e6 / int(us)
              for kind, v, us in re.findall(r"^(WRITE|READ) (4\.\d) (\d+)$", res.output, re.M)}
    print(f"\nvm nfs: boot {res.boot_s:.1f} s, script {res.run_s:.1f} s; " +
          ", ".join(f"{k} {s:.1f} MiB/s" for k, s in speeds.items()))

    # On the device: detach (unmount, engine stops), attach again, read the files there.
    env.cli("volume", "detach", "rwx")
    env.cli("volume", "attach", "rwx")
    mount_dir = share_of(env, "rwx")["mount_dir"]
    for v in VERSIONS:
        with open(os.path.join(mount_dir, f"big-{v}"), "rb") as f:
            data = f.read()
        assert len(data) == FILE_MIB * MiB and hashlib.sha256(data).hexdigest() == src.group(1)


class Barrier:
    """A rendezvous on 127.0.0.1 for guests (busybox nc to 10.0.2.2): a guest sends a name and
    gets an answer when `parties` guests have sent that name — or, for names in `host_gates`,
    when the test also opened the gate. Runs in a thread; `close()` stops it."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.cond = threading.Condition()
        self.arrived: dict[str, int] = {}
        self.gates: dict[str, bool] = {}
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def gate(self, name: str) -> None:
        """`name` opens only after this is called too (the host's own step)."""
        with self.cond:
            self.gates.setdefault(name, False)

    def open(self, name: str) -> None:
        with self.cond:
            self.gates[name] = True
            self.cond.notify_all()

    def wait_arrived(self, name: str, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.arrived.get(name, 0) > 0, timeout):
                raise AssertionError(f"no guest reached {name!r} in {timeout:g} s")

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            try:
                name = conn.makefile().readline().strip()
            except OSError:
                return
            with self.cond:
                self.arrived[name] = self.arrived.get(name, 0) + 1
                self.cond.notify_all()
                ok = self.cond.wait_for(lambda: self.closed or (
                    self.arrived[name] >= self.parties and self.gates.get(name, True)), 120)
            if ok and not self.closed:
                conn.sendall(b"go\n")

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.sock.close()


ROUNDS = 3
LEASE_S, GRACE_S = 5, 8     # short, so a restart's grace period fits the test's budget


def test_kernel_nfs_two_guests_close_to_open_and_lock_reclaim(env: Env, tmp_path) -> None:
    """Two guests mount the share (NFSv4.2) at once. Close-to-open: in each round one writes
    a file and closes it, the other then opens it and must read exactly those bytes (each
    guest still holds the previous round's pages). Then guest A holds a POSIX lock (flock,
    which the NFS client maps to a whole-file lock) while the host kills Ganesha; the share
    manager restarts it, A reclaims the lock in the grace period, and B cannot take it until
    A lets go."""
    env.cli("volume", "create", "cto", "--access", "rwx", "--replicas", "1", "--size", "64MiB",
            "--no-root-squash", "--lease", str(LEASE_S), "--grace", str(GRACE_S))
    env.cli("volume", "attach", "cto")
    share = share_of(env, "cto")
    bar = Barrier(2)
    bar.gate("restarted")
    common = [f"bar() {{ echo \"$1\" | nc {vm.HOST} {bar.port} >/dev/null; }}",
              "mkdir -p /mnt/s", guest_mount(share, "4.2", "/mnt/s"), "bar mounted"]
    a, b = list(common), list(common)
    for r in range(1, ROUNDS + 1):
        writer, reader = (a, b) if r % 2 else (b, a)
        writer += ["dd if=/dev/urandom of=/mnt/s/shared bs=64k count=16 status=none",
                   f"echo \"ROUND {r} W $(sha256sum </mnt/s/shared | cut -c1-64)\""]
        for g in (a, b):
            g.append(f"bar wrote{r}")
        reader.append(f"echo \"ROUND {r} R $(sha256sum </mnt/s/shared | cut -c1-64)\"")
        for g in (a, b):
            g.append(f"bar read{r}")
    a += ["exec 9>>/mnt/s/lock", "flock -x 9 && echo A-LOCKED", "bar locked", "bar triedbefore",
          "bar restarted",
          # An operation on the file after the restart: the client notices the new server
          # instance and reclaims its state (the open and the lock) in the grace period.
          "echo after-restart >&9 && sync && echo A-WROTE-AFTER-RESTART", "bar reclaimed",
          "bar tried", "exec 9>&-", "echo A-RELEASED", "bar released"]
    b += ["bar locked",
          "flock -n -x /mnt/s/lock true && echo B-GOT-HELD-LOCK || echo B-REFUSED-BEFORE",
          "bar triedbefore",
          "bar restarted", "bar reclaimed",
          "flock -n -x /mnt/s/lock true && echo B-GOT-RECLAIMED-LOCK || echo B-REFUSED",
          "bar tried", "bar released",
          "flock -w 30 -x /mnt/s/lock true && echo B-GOT-FREE-LOCK", "umount /mnt/s"]
    a.append("umount /mnt/s")
    try:
        with vm.Guest(str(tmp_path), "\n".join(a) + "\n", name="a", modules=NFS) as ga, \
                vm.Guest(str(tmp_path), "\n".join(b) + "\n", name="b",
                         modules=NFS) as gb:
            bar.wait_arrived("triedbefore", 180)
            ga.wait_for(r"^A-LOCKED$", 30)
            before = share["ganesha"]["pid"]
            os.kill(before, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: share_of(env, "cto")["ganesha"]["restarts"] >= 1 and
                       share_of(env, "cto")["ganesha"]["pid"] not in (None, before), 60,
                       "Ganesha restarted")
            bar.open("restarted")
            ga.wait_for(r"^A-WROTE-AFTER-RESTART$", 60 + GRACE_S)
            resumed = time.monotonic() - killed
            ra, rb = ga.wait(90), gb.wait(90)
    finally:
        bar.close()
    assert ra.status == 0 and rb.status == 0, (ra.output, rb.output)
    for r in range(1, ROUNDS + 1):
        w = re.findall(rf"^ROUND {r} W (\w+)$", ra.output + rb.output, re.M)
        rd = re.findall(rf"^ROUND {r} R (\w+)$", ra.output + rb.output, re.M)
        assert len(w) == 1 and rd == w, (r, ra.output, rb.output)
    assert "B-REFUSED-BEFORE" in rb.output, rb.output   # A's lock holds B off
    assert "B-REFUSED\n" in rb.output, rb.output        # and so does the reclaimed lock
    assert "A-RELEASED" in ra.output and "B-GOT-FREE-LOCK" in rb.output, rb.output
    print(f"\nvm nfs two guests: {ROUNDS} close-to-open rounds; Ganesha kill -9 -> A's write "
          f"on its locked file back after {resumed:.1f} s (grace {GRACE_S} s); boots "
          f"{ra.boot_s:.1f}/{rb.boot_s:.1f} s")
