"""The real-kernel tier's guests: QEMU (TCG) booting Debian's kernel with the initramfs that
`make vm` (scripts/build_vm.py) builds under .vm/.

A guest runs one bash script and powers off. The script goes in as a small uncompressed cpio
archive placed before the shared initramfs (the kernel unpacks both; the uncompressed one must
come first), along with any extra files. Its stdout and stderr come back on the second serial
port (a file here), framed by `BH-VM-START <guest uptime>` and `BH-VM-EXIT <status>` lines
that /init writes; the first serial port carries the kernel console (a file too, for
failures). Networking is QEMU's user mode: the guest is 10.0.2.15 and reaches the host's
127.0.0.1 as 10.0.2.2, so servers the tests start listen on 127.0.0.1 only.

Every wait has a deadline, and `Guest` is a context manager whose exit kills QEMU whatever
happened. /dev/kvm cannot run Debian's kernel on this machine (no VMX), hence TCG: a boot takes
a few seconds and data moves at ~15 MB/s, enough for correctness, not for benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VM_DIR = os.path.join(ROOT, ".vm")
KERNEL = os.path.join(VM_DIR, "vmlinuz")
INITRD = os.path.join(VM_DIR, "initrd.gz")
QEMU = "qemu-system-x86_64"
HOST = "10.0.2.2"             # the host's 127.0.0.1 as the guest sees it
GUEST_MEMORY_MIB = 512        # the initramfs (~60 MiB unpacked) lives in RAM, plus page cache
BOOT_TIMEOUT_S = 60.0         # to the script's first line; ~3-8 s on 2 loaded cores

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from build_vm import Cpio  # noqa: E402


def require_vm() -> None:
    """The tier never skips by itself: a missing image or QEMU is an error telling how to get
    it. A developer deselects the tier with `make test VM=0` (pytest -m "not vm")."""
    if not shutil.which(QEMU):
        pytest.fail(f"{QEMU} is missing: apt-get install --no-install-recommends "
                    "qemu-system-x86 (make setup), or skip the tier: make test VM=0")
    for path in (KERNEL, INITRD):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: run `make vm`, or skip the tier: make test VM=0")


@dataclass
class Result:
    status: int
    output: str          # the script's stdout + stderr
    boot_s: float        # QEMU start to the script's start (host clock)
    run_s: float         # the script's start to its end


class Guest:
    def __init__(self, workdir: str, script: str, files: dict[str, bytes] | None = None,
                 name: str = "guest", memory_mib: int = GUEST_MEMORY_MIB,
                 modules: tuple[str, ...] = (), host_root: bool = False,
                 cpus: int = 1) -> None:
        """`modules`: the kernel modules the script needs, of build_vm.MODULES (their
        dependencies come along; virtio-net always); none named: all of them. `host_root`:
        the host's / shared read-only over virtio-9p as mount tag `hostroot` (HOST_ROOT_SETUP
        mounts it as a writable root to chroot into). `cpus`: virtual CPUs, each a host thread
        (QEMU's multi-threaded TCG): 2 for a guest running many processes of its own."""
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.name = name
        self.out_path = os.path.join(self.dir, "out.log")
        self.console_path = os.path.join(self.dir, "console.log")
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.host_root = host_root
        extra = Cpio()
        # A host name of its own: the kernel's NFSv4 client names itself to the server by it
        # (EXCHANGE_ID), and two guests by the same name would be one client to Ganesha
        # (sharing, and stealing each other's, state: locks would not conflict).
        prefix = f"set -u\nhostname {name}-{os.getpid()}-{uuid.uuid4().hex[:8]}\n"
        extra.file("test.sh", (prefix + script).encode(), 0o755)
        if modules:
            extra.file("etc/modules.want", " ".join(modules).encode() + b"\n")
        for path, data in (files or {}).items():
            extra.file(path, data, 0o600)
        self.initrd = os.path.join(self.dir, "initrd.img")
        with open(self.initrd, "wb") as f:
            f.write(extra.finish())
            with open(INITRD, "rb") as base:
                shutil.copyfileobj(base, f)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.script_started = 0.0

    def start(self) -> Guest:
        require_vm()
        for p in (self.out_path, self.console_path):
            open(p, "wb").close()
        argv = [QEMU, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(self.cpus),
                "-m", str(self.memory_mib), "-nographic", "-no-reboot", "-monitor", "none",
                "-kernel", KERNEL, "-initrd", self.initrd,
                # panic=-1: a guest kernel panic reboots at once, which -no-reboot turns into
                # QEMU's exit instead of a hang until the timeout.
                "-append", "console=ttyS0 panic=-1 quiet",
                "-serial", f"file:{self.console_path}", "-serial", f"file:{self.out_path}",
                # romfile=: no PXE option ROM (ipxe-qemu is only a recommendation).
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="]
        if self.host_root:
            # multidevs=remap: the host's / spans several filesystems whose inode numbers
            # collide (/proc and /sys both have inode 1); unmapped, the guest took /proc for
            # /sys and mounted proc over the wrong directory.
            argv += ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                     "readonly=on,multidevs=remap"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.dir, "qemu.log"), "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def output(self) -> str:
        with open(self.out_path, "rb") as f:
            return f.read().decode(errors="replace").replace("\r\n", "\n")

    def console_tail(self, lines: int = 30) -> str:
        with open(self.console_path, "rb") as f:
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, what: str) -> None:
        self.kill()
        with open(os.path.join(self.dir, "qemu.log"), "rb") as f:
            qemu = f.read().decode(errors="replace").strip()
        raise AssertionError(f"{self.name}: {what}\n--- script output:\n{self.output()}\n"
                             f"--- kernel console (end):\n{self.console_tail()}"
                             + (f"\n--- QEMU:\n{qemu[-2000:]}" if qemu else ""))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line of the script's output matching `pattern` (a regex), waiting until
        it is there; fails if the guest ends or the deadline passes first."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while True:
            m = rx.search(self.output())
            if m:
                if not self.script_started and "BH-VM-START" in self.output():
                    self.script_started = time.monotonic()
                return m
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._fail(f"ended (QEMU status {self.proc.returncode}) before {pattern!r}")
            if time.monotonic() > deadline:
                self._fail(f"no {pattern!r} after {timeout:g} s")
            time.sleep(0.05)

    def wait(self, timeout: float) -> Result:
        """Wait for the script to end (and QEMU with it) within `timeout` s from now."""
        deadline = time.monotonic() + timeout
        self.wait_for(r"^BH-VM-START", max(1.0, min(BOOT_TIMEOUT_S, timeout)))
        boot_s = self.script_started - self.started
        m = self.wait_for(r"^BH-VM-EXIT (\d+)$", max(1.0, deadline - time.monotonic()))
        run_s = time.monotonic() - self.script_started
        assert self.proc is not None
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()   # the script is done; a guest slow to power off is not a failure
        text = self.output()
        body = text.split("BH-VM-START", 1)[1].split("\n", 1)[1] if "BH-VM-START" in text \
            else text
        body = body.rsplit("BH-VM-EXIT", 1)[0]
        return Result(int(m.group(1)), body, boot_s, run_s)


# A guest script's first lines for Guest(host_root=True): the host's root filesystem (9p,
# read-only) under an overlayfs whose upper layer is a tmpfs, at /hostroot, with the kernel
# filesystems, a fresh /tmp, /run and /var/tmp and the guest's /dev in it. `chroot /hostroot CMD`
# then runs the host's own programs (its python3, the checkout and .venv under test, nbdkit,
# nbd-client) in the guest's kernel; what they write stays in the guest's memory. msize and
# cache=loose: fewer, larger 9p round trips (the host's files do not change under the test).
HOST_ROOT_SETUP = """
mkdir -p /host /ov /hostroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host
mount -t tmpfs -o mode=0755 ov /ov
mkdir -p /ov/upper /ov/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ov/upper,workdir=/ov/work /hostroot
mount -t proc proc /hostroot/proc
mount -t sysfs sys /hostroot/sys
mount -o bind /dev /hostroot/dev
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 shm /dev/shm
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 "$d" "/hostroot/$d"; done
"""


def run(workdir: str, script: str, timeout: float, **kw) -> Result:
    """Boot a guest for `script`, wait for it, fail unless it exits 0; always kills QEMU."""
    with Guest(workdir, script, **kw) as g:
        res = g.wait(timeout)
        if res.status != 0:
            g._fail(f"script exited {res.status}")
        return res


class Control:
    """A guest's questions to the test, one line per connection on 127.0.0.1:`port` (in the
    guest: `echo LINE | nc 10.0.2.2 PORT`): `ready` is answered (`go`) once the test set
    `ready`; anything else at once, `stop` once the test set `stop`, else `go`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.ready = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return   # closed
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            try:
                line = conn.makefile().readline().strip()
                if line == "ready":
                    self.ready.wait(120)
                conn.sendall(b"stop\n" if self.stop.is_set() else b"go\n")
            except OSError:
                return

    def close(self) -> None:
        self.ready.set()
        self.stop.set()
        # shutdown first: close() alone leaves the port listening while a thread waits in
        # accept() on it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
