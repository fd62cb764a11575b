#!/usr/bin/python3
"""Build the real-kernel test tier's guest: Debian's kernel and an initramfs, under .vm/.

The host's kernel has no nbd or nfs client module, so tests/t7_vm_*.py boot QEMU (TCG) with
Debian's own `linux-image-6.1.0-*-amd64` instead. Everything comes from Debian packages fetched
with `apt-get download` and unpacked with dpkg-deb, never installed on the host:
- the kernel image and the modules the tests need (nbd, ext4, xfs, nfsv4, virtio-net, 9p over
  virtio and overlay, and their
  dependencies, read from each module's .modinfo: the package ships no modules.dep, depmod
  writes it at install time), loaded in dependency order by the guest's /init;
- busybox-static for /init and the small tools, Debian's bash for test scripts (busybox sh's
  built-in applets would shadow the real tools), nbd-client, e2fsprogs, mount.nfs, xfsprogs,
  dbench, flock and coreutils' dd, each with the shared libraries `ldd` names (from the
  downloaded packages, else the host's: both are Debian 12).
The result is `.vm/vmlinuz` and `.vm/initrd.gz` (cpio newc, gzip). Idempotent: a stamp holding
this script's digest skips the whole build (no apt, no network), so `make test` calls it every
time; a newer kernel in apt is picked up by `--force` (or `make clean`). Stdlib only: it runs
with Debian's python3 before any venv.
Usage: build_vm.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages whose files go into the guest (the kernel's is chosen by pick_kernel()).
TOOL_PACKAGES = ["busybox-static", "bash", "nbd-client", "e2fsprogs", "nfs-common", "xfsprogs",
                 "dbench", "util-linux", "mount", "coreutils", "libc-bin"]
# Binaries copied in (path inside the unpacked packages -> path in the guest).
BINARIES = {
    "bin/busybox": "bin/busybox",
    "bin/bash": "bin/bash",
    "sbin/nbd-client": "sbin/nbd-client",
    "sbin/mke2fs": "sbin/mke2fs",
    "sbin/e2fsck": "sbin/e2fsck",
    "sbin/mount.nfs": "sbin/mount.nfs",
    "sbin/mkfs.xfs": "sbin/mkfs.xfs",
    "sbin/xfs_repair": "sbin/xfs_repair",
    "usr/bin/dbench": "usr/bin/dbench",
    "usr/bin/flock": "usr/bin/flock",
    "bin/dd": "bin/dd",
    "bin/mount": "bin/mount",
    "bin/umount": "bin/umount",
    "usr/bin/sha256sum": "usr/bin/sha256sum",
}
LINKS = {  # extra names of the real tools
    "sbin/mkfs.ext4": "mke2fs", "sbin/fsck.ext4": "e2fsck", "sbin/mount.nfs4": "mount.nfs",
}
# dbench's NetBench load file is 25 MiB; the tests run it for seconds, so its first lines do
# (a smaller initramfs boots faster: the guest unpacks it at TCG speed).
DBENCH_LOAD = "usr/share/dbench/client.txt"
DBENCH_LOAD_BYTES = 2 << 20
# Modules the guest can load at boot, with their dependencies: BASE_MODULES always, the others
# when a test asks (/etc/modules.want lists them; without it, all: loading all takes ~3 s of
# TCG time, xfs alone 1.3 s). crc32c is asked for by name at mount time (ext4, xfs metadata
# checksums): loaded up front because the guest has no modprobe.
# 9p + 9pnet_virtio + overlay: a guest that is a whole blockhorn host (tests/t7_vm_host.py)
# runs the host's root filesystem, shared read-only over virtio-9p, under an overlayfs.
BASE_MODULES = ["crc32c_generic", "virtio_pci", "virtio_net"]
MODULES = [*BASE_MODULES, "nbd", "ext4", "xfs", "nfsv4", "9p", "9pnet_virtio", "overlay"]
MODULE_DIRS = ["fs", "net", "crypto", "lib", "drivers/block", "drivers/net", "drivers/virtio",
               "arch/x86/crypto"]

INIT = r"""#!/bin/busybox sh
# blockhorn test guest: mount the kernel filesystems, load modules, configure QEMU's user-mode
# network (the host is 10.0.2.2), run /test.sh with bash writing to the second serial port
# (the first one is the kernel console), report its exit status, power off.
# Busybox's applets live in /bbin, last in PATH: the real tools (bash, nbd-client, mount,
# dd ...) win over the applets of the same name.
/bin/busybox mkdir -p /bbin
/bin/busybox --install -s /bbin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /mnt
mount -t tmpfs tmp /tmp
want=$(cat /etc/modules.want 2>/dev/null || echo all)
for w in $want; do cat "/etc/modules/$w.order"; done >/tmp/modules
while read -r m; do
    n=${m##*/}; n=${n%.ko}
    [ -d "/sys/module/$(echo "$n" | tr - _)" ] && continue   # loaded for an earlier one
    insmod "/lib/modules/$m" || echo "insmod $m failed" >/dev/ttyS1
done </tmp/modules
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "BH-VM-START $(cut -d' ' -f1 /proc/uptime)" >/dev/ttyS1
cd /tmp
/bin/bash /test.sh >/dev/ttyS1 2>&1 </dev/null
echo "BH-VM-EXIT $?" >/dev/ttyS1
sync
poweroff -f
"""


def log(msg: str) -> None:
    print(f"build_vm: {msg}", flush=True)


def run(argv: list[str], **kw) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


def apt_lists() -> None:
    """A machine whose packages were all installed already may have no package lists (make
    setup runs apt-get update only to install): fetch them once, as root."""
    p = subprocess.run(["apt-cache", "policy", "linux-image-amd64"], capture_output=True,
                       text=True)
    if "Candidate:" in p.stdout and "(none)" not in p.stdout:
        return
    if os.geteuid() != 0:
        sys.exit("build_vm: apt has no package lists; run `apt-get update` as root")
    log("apt-get update (no package lists)")
    subprocess.run(["apt-get", "update", "-qq"], check=True)


def pick_kernel() -> str:
    """The kernel package Debian's metapackage points at now (versions come and go)."""
    if os.environ.get("VM_KERNEL_PKG"):
        return os.environ["VM_KERNEL_PKG"]
    apt_lists()
    out = run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-6\.1\.0-[0-9.]+-amd64)\b", out)
    if m:
        return m.group(1)
    names = run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9.]+-amd64$"])
    found = sorted((n.split()[0] for n in names.splitlines()),
                   key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
    if not found:
        sys.exit("build_vm: apt knows no linux-image-6.1.0-*-amd64 (apt-get update?)")
    return found[-1]


def download(debs: str, packages: list[str]) -> dict[str, str]:
    """apt-get download what is not in `debs` yet; returns package -> .deb path."""
    os.makedirs(debs, exist_ok=True)
    have = {os.path.basename(p).split("_")[0]: p for p in glob.glob(f"{debs}/*.deb")}
    missing = [p for p in packages if p not in have]
    if missing:
        log(f"apt-get download {' '.join(missing)}")
        # (apt warns that root downloads unsandboxed into a directory _apt cannot write.)
        p = subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs,
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"build_vm: apt-get download failed:\n{p.stderr}")
        have = {os.path.basename(p).split("_")[0]: p for p in glob.glob(f"{debs}/*.deb")}
    return {p: have[p] for p in packages}


def lib_deps(package: str) -> list[str]:
    out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
               "--no-breaks", "--no-replaces", "--no-enhances", package])
    return sorted({m for m in re.findall(r"Depends: (lib[^\s<>]+)", out)})


def installed(package: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                       text=True)
    return "install ok installed" in p.stdout


# --- kernel modules ----------------------------------------------------------------------------

def modinfo(path: str) -> dict[str, list[str]]:
    """The .modinfo strings of an uncompressed .ko (key=value, NUL separated)."""
    with open(path, "rb") as f:
        data = f.read()
    info: dict[str, list[str]] = {}
    for key in (b"depends", b"softdep"):
        for m in re.finditer(b"\0" + key + b"=([^\0]*)\0", data):
            info.setdefault(key.decode(), []).append(m.group(1).decode())
    return info


def module_order(moddir: str, wanted: list[str]) -> list[str]:
    """Paths (relative to moddir) of `wanted` and everything they depend on, dependencies
    first. Module names treat - and _ alike, as the kernel does."""
    index = {}
    for path in glob.glob(f"{moddir}/kernel/**/*.ko", recursive=True):
        index[os.path.basename(path)[:-3].replace("-", "_")] = path
    builtin = set()
    with open(f"{moddir}/modules.builtin") as f:
        for line in f:
            builtin.add(os.path.basename(line.strip())[:-3].replace("-", "_"))
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            sys.exit(f"build_vm: module {name} is neither built in nor in {MODULE_DIRS}")
        info = modinfo(index[name])
        deps = [d for s in info.get("depends", []) for d in s.split(",") if d]
        for soft in info.get("softdep", []):   # "pre: a b post: c": the pre ones load first
            m = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            deps += m.group(1).split() if m else []
        for d in deps:
            if d.replace("-", "_") in index or d.replace("-", "_") in builtin:
                visit(d)
        order.append(os.path.relpath(index[name], moddir))

    for w in wanted:
        visit(w)
    return order


def unpack_kernel(deb: str, dest: str) -> tuple[str, str]:
    """vmlinuz and the module subtrees the guest may need; returns (vmlinuz, moddir)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    pats = ["./boot/vmlinuz-*", "./lib/modules/*/modules.builtin"]
    pats += [f"./lib/modules/*/kernel/{d}/*" for d in MODULE_DIRS]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest, "--wildcards", *pats], stdin=tar.stdout,
                   check=True)
    if tar.wait() != 0:
        sys.exit(f"build_vm: dpkg-deb --fsys-tarfile {deb} failed")
    vmlinuz = glob.glob(f"{dest}/boot/vmlinuz-*")[0]
    return vmlinuz, glob.glob(f"{dest}/lib/modules/*")[0]


# --- the initramfs -------------------------------------------------------------------------

class Cpio:
    """A cpio archive in the kernel's `newc` format (no cpio(1) on a minimal host)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.buf.write(hdr + b"\0" * (-len(hdr) % 4))
        self.buf.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.names:
                self.names.add(d)
                self._entry(d, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        if "/" in name:
            self.dir(os.path.dirname(name))
        self.names.add(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if name in self.names:
            return
        if "/" in name:
            self.dir(os.path.dirname(name))
        self.names.add(name)
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def needed_libs(binary: str, lib_dirs: list[str]) -> tuple[list[str], list[str]]:
    """ldd's answer for `binary`, downloaded libraries first: (paths found, sonames missing)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(lib_dirs))
    p = subprocess.run(["ldd", binary], capture_output=True, text=True, env=env)
    if "not a dynamic executable" in p.stdout + p.stderr:
        return [], []
    found, missing = [], []
    for line in p.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            missing.append(line.split()[0])
        elif "=>" in line and "/" in line:
            found.append(line.split("=>")[1].split()[0])
        elif line.startswith("/"):
            found.append(line.split()[0])   # the dynamic loader
    return found, missing


def build(out: str) -> str:
    t0 = time.monotonic()
    kernel_pkg = pick_kernel()
    debs = download(os.path.join(out, "debs"), [kernel_pkg, *TOOL_PACKAGES])
    stage = os.path.join(out, "stage")
    shutil.rmtree(stage, ignore_errors=True)
    for pkg in TOOL_PACKAGES:
        subprocess.run(["dpkg-deb", "-x", debs[pkg], stage], check=True)
    lib_dirs = [os.path.join(stage, d)
                for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]

    # Libraries: ldd of every binary; a soname neither downloaded nor on the host comes from
    # the tools' library dependencies that the host lacks, fetched and unpacked, until none is
    # missing (the same Debian release on both sides, so the ABI is the same).
    tried: set[str] = set()
    while True:
        libs: set[str] = set()
        missing: set[str] = set()
        for src in BINARIES:
            found, miss = needed_libs(os.path.join(stage, src), lib_dirs)
            libs.update(found)
            missing.update(miss)
        if not missing:
            break
        candidates = sorted({d for p in TOOL_PACKAGES + sorted(tried) for d in lib_deps(p)
                             if d not in tried and not installed(d)})
        if not candidates:
            sys.exit(f"build_vm: no package found for {sorted(missing)}")
        tried.update(candidates)
        for deb in download(os.path.join(out, "debs"), candidates).values():
            subprocess.run(["dpkg-deb", "-x", deb, stage], check=True)

    vmlinuz, moddir = unpack_kernel(debs[kernel_pkg], os.path.join(out, "kernel"))
    order = module_order(moddir, MODULES)

    cpio = Cpio()
    for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "etc", "root", "bin", "sbin",
              "usr/bin", "usr/sbin"):
        cpio.dir(d)
    cpio.file("init", INIT.encode(), 0o755)
    for src, dst in BINARIES.items():
        with open(os.path.join(stage, src), "rb") as f:
            cpio.file(dst, f.read(), 0o755)
    for name, target in LINKS.items():
        cpio.symlink(name, target)
    with open(os.path.join(stage, DBENCH_LOAD), "rb") as f:
        head = f.read(DBENCH_LOAD_BYTES)
    cpio.file(DBENCH_LOAD, head[:head.rfind(b"\n") + 1])
    for lib in sorted(libs):
        real = os.path.realpath(lib)
        # Every library goes to /lib/x86_64-linux-gnu under its soname (Debian 12 has /lib
        # and /usr/lib merged: /usr/lib is a link), the loader too, linked from /lib64.
        with open(real, "rb") as f:
            cpio.file(f"lib/x86_64-linux-gnu/{os.path.basename(lib)}", f.read(), 0o755)
    cpio.symlink("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    cpio.symlink("usr/lib", "../lib")
    for rel in order:
        with open(os.path.join(moddir, rel), "rb") as f:
            cpio.file(f"lib/modules/{rel}", f.read())
    cpio.file("etc/modules/all.order", "".join(r + "\n" for r in order).encode())
    for top in MODULES:
        closure = module_order(moddir, [*BASE_MODULES, top])
        cpio.file(f"etc/modules/{top}.order", "".join(r + "\n" for r in closure).encode())
    cpio.file("etc/passwd",
              b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/bin/false\n")
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    cpio.file("etc/netconfig", open("/etc/netconfig", "rb").read()
              if os.path.exists("/etc/netconfig") else b"")
    data = cpio.finish()
    with open(os.path.join(out, "initrd.gz.tmp"), "wb") as f:
        f.write(gzip.compress(data, compresslevel=1))
    os.replace(os.path.join(out, "initrd.gz.tmp"), os.path.join(out, "initrd.gz"))
    shutil.copy(vmlinuz, os.path.join(out, "vmlinuz"))
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(os.path.join(out, "kernel"), ignore_errors=True)
    # Packages of an earlier build (a kernel apt has since replaced: 70 MB each) go.
    keep = {kernel_pkg, *TOOL_PACKAGES, *tried}
    for deb in glob.glob(os.path.join(out, "debs", "*.deb")):
        if os.path.basename(deb).split("_")[0] not in keep:
            os.unlink(deb)
    log(f"{kernel_pkg}: {len(order)} modules, {len(libs)} libraries, initramfs "
        f"{len(data) >> 20} MiB, built in {time.monotonic() - t0:.1f} s")
    return kernel_pkg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, ".vm"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    with open(os.path.abspath(__file__), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(out, "stamp.json")
    if not args.force and os.path.exists(stamp):
        try:
            with open(stamp) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get("script") == digest and all(
                os.path.exists(os.path.join(out, n)) for n in ("vmlinuz", "initrd.gz")):
            return
    os.makedirs(out, exist_ok=True)
    kernel_pkg = build(out)
    with open(stamp + ".tmp", "w") as f:
        json.dump({"script": digest, "kernel": kernel_pkg}, f)
    os.replace(stamp + ".tmp", stamp)


if __name__ == "__main__":
    main()
