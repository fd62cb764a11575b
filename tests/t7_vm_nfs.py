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
from collections.abc import Iterator
from typing import Any

import pytest
from daemon_util import Env
from support import vm
from test_share_nfs import MISSING, REASON, _safety_net

pytestmark = [pytest.mark.vm, pytest.mark.skipif(bool(MISSING), reason=REASON)]

MiB = 1 << 20
FILE_MIB = 8
VERSIONS = ("4.1", "4.2")


@pytest.fixture
def env() -> Iterator[Env]:
    vm.require_vm()
    e = Env()
    try:
        yield e
    finally:
        try:
            if os.path.exists(e.home.db):
                for v in e.ls():
                    e.cli("volume", "rm", v["name"], "--force", check=False)
        finally:
            _safety_net(e)
            e.close()


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
    res = vm.run(str(tmp_path), "\n".join(lines) + "\n", timeout=150)
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
