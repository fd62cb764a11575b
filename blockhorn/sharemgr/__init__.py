"""The share manager: an RWX volume exported over NFSv4 by NFS-Ganesha.

One share manager process per RWX volume (`blockhorn share serve --config FILE`), started by the
daemon when the volume is attached (or by `blockhorn-share@.service` on hand-run hosts):

- `device`:  blkid decides; no filesystem -> mkfs.ext4, ext4 -> fsck, mount, grow; anything
             else is refused and left untouched.
- `ganesha`: the generated ganesha.conf (NFSv4.1/4.2 only, one EXPORT, CLIENT blocks from the
             allow-list) and the ganesha.nfsd process.
- `server`:  the share manager process: prepares the device, runs Ganesha, restarts it when it
             dies, checks the mount, publishes its health in a status file.
- `control`: the daemon's side: per-volume share settings, starting/stopping the process, show.
"""
