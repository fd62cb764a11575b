"""The daemon's home: where every file of a single-host blockhorn lives.

    <home>/blockhorn.db            SQLite state (WAL); not used with `daemon run --etcd`
    <home>/cluster.key             shared key of engines and replicas (0600)
    <home>/daemon.sock             REST API (0600)
    <home>/daemon.lock             flock held by the running daemon (one daemon per home)
    <home>/logs/                   daemon.log, <vol>-engine.log, <vol>-<replica>.log, <vol>-nbdfuse.log
    <home>/volumes/<vol>/          engine.json and <replica>.json process configs
    <home>/run/<vol>/              nbd.sock, control.sock, fuse/ (nbdfuse mount point)
    <home>/replicas/<vol>/<rep>/   replica data when no --disk was given
    <home>/export/<vol>/           RWX: the volume's ext4, mounted while its share serves
    <home>/volumes/<vol>/share.json, share/   RWX: share manager config; ganesha.conf,
                                   ganesha.log, status.json, recovery/ (blockhorn.sharemgr)
    <home>/node.beat               a cluster node: when its last lease renewal began
                                   (blockhorn/liveness.py; node/fence.py, logs/fence.log)

With `--disk PATH` a replica lives in `PATH/replicas/<vol>/<rep>/` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_HOME = "/var/lib/blockhorn"
HOME_ENV = "BLOCKHORN_HOME"
UNIX_PATH_MAX = 107   # bytes; sun_path is 108 bytes including the terminating NUL


def default_home() -> str:
    return os.path.abspath(os.environ.get(HOME_ENV) or DEFAULT_HOME)


@dataclass(frozen=True)
class Home:
    root: str

    @classmethod
    def at(cls, root: str | None = None) -> Home:
        return cls(os.path.abspath(root) if root else default_home())

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def db(self) -> str:
        return self._p("blockhorn.db")

    @property
    def key(self) -> str:
        return self._p("cluster.key")

    @property
    def socket(self) -> str:
        return self._p("daemon.sock")

    @property
    def lock(self) -> str:
        return self._p("daemon.lock")

    @property
    def logs(self) -> str:
        return self._p("logs")

    def log(self, name: str) -> str:
        return self._p("logs", name)

    @property
    def rebuild_limits(self) -> str:
        """The node's rebuild limits (engine/limits.py): written by the daemon, read by engines."""
        return self._p("rebuild-limits.json")

    def volume_dir(self, vol: str) -> str:
        return self._p("volumes", vol)

    def engine_config(self, vol: str) -> str:
        return self._p("volumes", vol, "engine.json")

    def generation_record(self, vol: str) -> str:
        """The engine's generation record (engine/generation.py): written before replicas."""
        return self._p("volumes", vol, "generation.json")

    def replica_config(self, vol: str, replica: str) -> str:
        return self._p("volumes", vol, f"{replica}.json")

    def replica_made(self, vol: str, replica: str) -> str:
        """A cluster node's note of the directory where it holds (held) that replica
        (manager/across.py create_missing_replicas: a replica gone from it is not made again
        empty while the start rule may still need it)."""
        return self._p("volumes", vol, f"{replica}.made")

    def run_dir(self, vol: str) -> str:
        return self._p("run", vol)

    def nbd_socket(self, vol: str) -> str:
        return self._p("run", vol, "nbd.sock")

    def control_socket(self, vol: str) -> str:
        return self._p("run", vol, "control.sock")

    def replica_socket(self, vol: str, replica: str) -> str:
        return self._p("run", vol, f"{replica}.sock")

    def nbd_device(self, vol: str) -> str:
        """The kernel NBD device of the volume's `nbd` frontend, for the fence (node/fence.py),
        which must not need the store to find it."""
        return self._p("run", vol, "nbd-device")

    def fuse_dir(self, vol: str) -> str:
        return self._p("run", vol, "fuse")

    def replica_dir(self, vol: str, replica: str, disk: str | None = None) -> str:
        base = os.path.abspath(disk) if disk else self.root
        return os.path.join(base, "replicas", vol, replica)

    def ensure(self) -> None:
        """Create the home and its fixed sub-directories (private to the owner)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for sub in ("logs", "volumes", "run", "replicas"):
            os.makedirs(self._p(sub), mode=0o700, exist_ok=True)
