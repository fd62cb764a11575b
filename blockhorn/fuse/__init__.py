"""The pyfuse3 frontend: one volume as one regular file in a FUSE mount, with the engine in the
same process (no NBD hop); a loop device on that file is the block device.

`fs.VolumeFS` is the filesystem (handlers delegate to one `Engine`), `serve.main` the process
(`blockhorn fuse serve`) that the daemon and `systemd/blockhorn-fuse@.service` run.
"""

IMAGE = "volume"   # the name of the one file in the mount: <mountpoint>/volume
