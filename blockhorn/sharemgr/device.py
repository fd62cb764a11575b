"""The volume's block device under a share: probe, format, check, mount, grow, remount.

`blkid -p` (low-level probe, no cache) decides what happens to a device:
- nothing found            -> `mkfs.ext4 -F -m0` (+ the volume's extra mkfs options)
- ext4                     -> `fsck.ext4 -p` (repairs what is safe to repair without asking)
- anything else (another filesystem, a partition table, LVM, RAID...) -> refused, untouched.
An ext4 smaller than the device (the volume was expanded) is grown before it is mounted; one
that the device outgrows while mounted is grown online (`grow_online`, from the health check).
"""

from __future__ import annotations

import errno
import os
import subprocess

from blockhorn.types import BlockhornError, InvalidArgument

MiB = 1 << 20
EXT4_OPTIONS = "dirsync"    # mount options of a share's ext4 (prepare)
MIN_SIZE = 32 * MiB      # bytes; below this ext4 with a journal leaves next to nothing to share
COMMAND_TIMEOUT_S = 600.0  # seconds; mkfs and fsck of a large volume take a while


class ForeignDevice(BlockhornError):
    """The device holds something that is not ext4: we never format it."""

    errno = errno.EMEDIUMTYPE


def _run(argv: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise BlockhornError(f"{argv[0]} is not installed: apt-get install e2fsprogs "
                             "util-linux", errno.ENOENT) from None
    except subprocess.TimeoutExpired:
        raise BlockhornError(f"{argv[0]} did not finish in {COMMAND_TIMEOUT_S:.0f} s",
                             errno.ETIMEDOUT) from None
    if proc.returncode not in ok:
        out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise BlockhornError(f"{' '.join(argv)} failed ({proc.returncode}): {' | '.join(out)}",
                             errno.EIO)
    return proc


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def probe(device: str) -> dict[str, str]:
    """What blkid finds on `device`: {} for nothing, else e.g. {"TYPE": "ext4", ...} or
    {"PTTYPE": "gpt", ...}. blkid exits 2 when it finds nothing."""
    proc = _run(["blkid", "-p", "-o", "export", device], ok=(0, 2))
    info = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key] = value
    return info


def _mount(path: str) -> list[str] | None:
    """The /proc/self/mounts fields of the (last) mount at `path`, else None."""
    path = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1].replace("\\040", " ") == path:
                found = fields
    return found


def is_mounted(path: str) -> str | None:
    """The mount options of `path` if something is mounted there, else None."""
    fields = _mount(path)
    return fields[3] if fields else None


def prepare(device: str, mount_dir: str, mkfs_options: list[str] | None = None) -> list[str]:
    """Make `device` an ext4 filesystem mounted at `mount_dir`; returns what was done.
    Refuses (ForeignDevice / InvalidArgument) before writing anything to the device."""
    if not os.path.exists(device):
        raise BlockhornError(f"device {device} does not exist: is the volume attached?",
                             errno.ENODEV)
    done: list[str] = []
    os.makedirs(mount_dir, mode=0o755, exist_ok=True)
    stale = _mount(mount_dir)
    if stale is not None and os.path.realpath(stale[0]) != os.path.realpath(device):
        # Another device's filesystem: left by a share manager that was killed while the
        # volume was attached through an earlier device (a node that fenced itself, and the
        # volume now back on it). Its device is dead; serving it would serve a page cache.
        _run(["umount", "-l", mount_dir])
        done.append(f"unmounted a stale mount of {stale[0]}")
        if stale[0].startswith("/dev/loop"):
            # Else the loop device stays bound to the dead FUSE file until a reboot. On a
            # device still busy (the lazy unmount's last release) -d sets autoclear: the
            # kernel frees it when that ends. A failure leaves it as it was: only a leak.
            subprocess.run(["losetup", "-d", stale[0]], capture_output=True, check=False)
    if is_mounted(mount_dir) is not None:
        # A share manager restarted while the filesystem stayed mounted: keep it (fsck needs an
        # unmounted filesystem, and clients hold files open on it).
        done.append("already mounted")
    else:
        size = device_size(device)
        if size < MIN_SIZE:
            raise InvalidArgument(f"{device} has {size // MiB} MiB: an RWX volume needs at "
                                  f"least {MIN_SIZE // MiB} MiB; nothing was formatted")
        info = probe(device)
        if "PTTYPE" in info:
            raise ForeignDevice(f"{device} holds a {info['PTTYPE']} partition table: refusing "
                                "to format it (nothing was changed); use an empty volume or "
                                "one with ext4 on the whole device")
        fstype = info.get("TYPE")
        if fstype is None:
            # Checked again here, at the edge where the options reach a command line.
            from blockhorn.sharemgr.config import check_mkfs_options
            extra = check_mkfs_options(list(mkfs_options or []))
            _run(["mkfs.ext4", "-F", "-q", "-m0", *extra, "--", device])
            done.append("formatted ext4")
        elif fstype != "ext4":
            raise ForeignDevice(f"{device} holds a {fstype} filesystem: refusing to format or "
                                "share it (nothing was changed); an RWX volume must be empty "
                                "or ext4")
        else:
            # fsck -p: 0 clean, 1 errors corrected; 2 'reboot' only matters for a mounted root.
            proc = _run(["fsck.ext4", "-p", device], ok=(0, 1, 2, 4))
            if proc.returncode & 4:
                raise BlockhornError(f"{device}: the ext4 filesystem has errors that fsck -p "
                                     f"cannot repair; run `fsck.ext4 {device}` by hand",
                                     errno.EUCLEAN)
            done.append("checked" + (" and repaired" if proc.returncode else ""))
            if fs_size(device) < size:
                # Offline, before the mount, where that is possible (the volume grew while
                # detached): no CAP_SYS_RESOURCE needed. Online growth: `grow_online`.
                _run(["e2fsck", "-f", "-p", device], ok=(0, 1))
                _run(["resize2fs", device])
                done.append("grown to the device")
        # dirsync: NFS answers a create, remove or rename only once it is on stable storage,
        # so ext4 commits its journal (a FLUSH to every replica) before each returns. Without
        # it a file whose OPEN(create) was answered could be missing on the host the share
        # moved to (tests/t7_vm_failover.py saw it: the client's fsync then failed with EIO).
        _run(["mount", "-t", "ext4", "-o", EXT4_OPTIONS, device, mount_dir])
        done.append("mounted")
    return done


def fs_size(device: str) -> int:
    """Bytes the ext4 filesystem on `device` spans (from its superblock)."""
    blocks, block_size = _geometry(device)
    return blocks * block_size


def _geometry(device: str) -> tuple[int, int]:
    """(block count, block size) of the ext4 on `device`."""
    fields = {}
    for line in _run(["dumpe2fs", "-h", device]).stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return int(fields["Block count"]), int(fields["Block size"])


def grow_online(device: str) -> bool:
    """Grow the mounted ext4 on `device` to the device's size (the volume was expanded while
    attached); True when it grew. resize2fs grows a mounted ext4 in place (as root)."""
    blocks, block_size = _geometry(device)
    if blocks >= device_size(device) // block_size:
        return False
    try:
        _run(["resize2fs", device])
    except BlockhornError as e:
        if "Permission denied" in str(e):
            raise BlockhornError("growing a mounted ext4 needs CAP_SYS_RESOURCE, which this "
                                 "process lacks: the filesystem is grown at the next attach "
                                 "(offline)", errno.EPERM) from None
        raise
    return True


def remount_rw(mount_dir: str) -> None:
    _run(["mount", "-o", "remount,rw", mount_dir])


def unmount(mount_dir: str) -> None:
    """Unmount; a mount still busy (a stuck reader) is detached lazily so the device can go."""
    if is_mounted(mount_dir) is None:
        return
    try:
        _run(["umount", mount_dir])
    except BlockhornError:
        _run(["umount", "-l", mount_dir])
