"""`make demo`: the main job end to end, with real parts.

A 3-replica volume is created, attached as a block device (nbdfuse + loop here, nbd-client
where the kernel has NBD), formatted ext4, mounted, written and read back; then its status is
shown, and how to clean up. Then an RWX volume is attached and shared over NFSv4 by
NFS-Ganesha; one NFS client (libnfs nfs-cp) writes a file, another (nfs-cat) reads it back.
Runs in its own home so it touches nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys

HOME = os.environ.get("BLOCKHORN_DEMO_HOME", "/var/tmp/blockhorn-demo")
BIN = os.path.join(os.path.dirname(sys.executable), "blockhorn")
VOLUME = "demo"
MOUNT = os.path.join(HOME, "mnt", VOLUME)
SHARED = "shared"


def step(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def run(*argv: str, check: bool = True, quiet: bool = False) -> str:
    if not quiet:
        print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"demo: {argv[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    if proc.stdout and not quiet:
        print(proc.stdout.rstrip())
    return proc.stdout.strip()


def bh(*argv: str, check: bool = True, quiet: bool = False) -> str:
    return run(BIN, "--home", HOME, *argv, check=check, quiet=quiet)


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it attaches a loop device and mounts ext4)")
    os.makedirs(MOUNT, exist_ok=True)
    # A previous demo run may have left its volume: put it away first.
    subprocess.run(["umount", MOUNT], capture_output=True)
    bh("volume", "rm", "--force", VOLUME, check=False, quiet=True)

    step("create a volume with 3 replicas")
    bh("volume", "create", VOLUME, "--size", "256MiB", "--replicas", "3")
    step("attach it: replica servers + nbdkit engine + block device")
    device = bh("volume", "attach", VOLUME).splitlines()[-1]
    step(f"format {device} ext4 and mount it at {MOUNT}")
    run("mkfs.ext4", "-q", "-F", device)
    run("mount", device, MOUNT)
    step("write a file, sync, remount, and read it back through the replicas")
    payload = os.urandom(8 << 20)
    path = os.path.join(MOUNT, "hello.bin")
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    run("umount", MOUNT)
    run("mount", device, MOUNT)
    with open(path, "rb") as f:
        same = hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    print(f"wrote 8 MiB to {path}; read back {'identical' if same else 'DIFFERENT'}")
    run("df", "-h", MOUNT)
    step("volume status")
    bh("volume", "show", VOLUME)
    shared = rwx_demo()
    step("clean up when done")
    print(f"  umount {MOUNT}\n"
          f"  {BIN} --home {HOME} volume detach {VOLUME}\n"
          f"  {BIN} --home {HOME} volume rm {VOLUME}\n"
          f"  {BIN} --home {HOME} volume rm --force {SHARED}\n"
          f"  {BIN} --home {HOME} daemon stop")
    return 0 if same and shared else 1


def rwx_demo() -> bool:
    """An RWX volume: exported over NFSv4 by NFS-Ganesha, written by one NFS client (libnfs
    nfs-cp) and read back by another (nfs-cat), both as uid 1000, the filesystem's owner.
    libnfs speaks only NFSv4.0, so this volume serves minor version 0 besides 1 and 2."""
    bh("volume", "rm", "--force", SHARED, check=False, quiet=True)
    step("create an RWX volume: exported over NFSv4 while attached, only to this host")
    bh("volume", "create", SHARED, "--size", "128MiB", "--replicas", "2", "--access", "rwx",
       "--mkfs-options", "-E root_owner=1000:1000", "--nfs-minor-versions", "0,1,2")
    step("attach it: device + ext4 (formatted, it is empty) + NFS-Ganesha")
    bh("volume", "attach", SHARED)
    share = json.loads(bh("share", "show", SHARED, "--json", quiet=True))
    bh("share", "show", SHARED)
    url = (f"nfs://127.0.0.1/{SHARED}/%s?version=4&nfsport={share['port']}&uid=1000&gid=1000")
    step("client 1 writes a file over NFSv4; client 2 lists and reads it")
    # libnfs 4.0 cannot encode an NFSv4 WRITE much over 2 KB and nfs-cp writes in one call:
    # a small file (kernel clients have no such limit).
    payload = os.urandom(1800)
    src = os.path.join(HOME, "nfs-src.bin")
    with open(src, "wb") as f:
        f.write(payload)
    run("nfs-cp", src, url % "from-client-1.bin")
    run("nfs-ls", url % "")
    got = subprocess.run(["nfs-cat", url % "from-client-1.bin"], capture_output=True).stdout
    same = hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    print(f"client 2 read {len(got)} bytes: {'identical' if same else 'DIFFERENT'}")
    return same


if __name__ == "__main__":
    sys.exit(main())
