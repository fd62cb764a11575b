"""The pyfuse3 frontend: one volume as one regular file in a FUSE mount, with the engine in the
same process (no NBD hop); a loop device on that file is the block device.

`fs.VolumeFS` is the filesystem (handlers delegate to one `Engine`), `serve.main` the process
(`blockhorn fuse serve`) that the daemon and `systemd/blockhorn-fuse@.service` run.
"""

import os

IMAGE = "volume"   # the name of the one file in the mount: <mountpoint>/volume
FUSECTL = "/sys/fs/fuse/connections"   # fusectl: one directory per FUSE connection


def fuse_connection(mountpoint: str) -> int | None:
    """The FUSE connection number (the mount's minor device number, its directory under
    FUSECTL) of the last mount at `mountpoint` in this mount namespace, else None. Found
    through /proc/self/mountinfo: a stat of the mount would send a request that a busy or
    dead FUSE server may never answer."""
    conn = None
    mountpoint = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == mountpoint:
                conn = int(fields[2].split(":")[1])
    return conn
