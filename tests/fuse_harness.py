"""`Cluster` with the engine inside `blockhorn fuse serve` instead of nbdkit: the same replica
processes and engine config, the volume as `<home>/fuse/volume` (no NBD socket)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from harness import ROOT, Cluster

from blockhorn.fuse import IMAGE
from blockhorn.nbd.attach import cleanup_stale_mount, wait_for


class FuseCluster(Cluster):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.mount = os.path.join(self.home, "fuse")
        self.image = os.path.join(self.mount, IMAGE)

    def start_engine(self) -> None:
        if os.path.exists(self.control_socket):   # left by a killed engine: not a sign of life
            os.unlink(self.control_socket)
        with open(self.engine_log, "ab") as log:
            self.engine = subprocess.Popen(
                [sys.executable, "-m", "blockhorn", "fuse", "serve",
                 "--config", self.engine_config, "--mount", self.mount],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                start_new_session=True)
        # The control socket appears after the mount (blockhorn/fuse/serve.py).
        wait_for(lambda: os.path.exists(self.control_socket) or self.engine.poll() is not None,  # type: ignore[union-attr]
                 "fuse engine", log_path=self.engine_log)
        assert self.engine.poll() is None, open(self.engine_log).read()

    def stop_engine(self, sig: int = signal.SIGTERM) -> None:
        super().stop_engine(sig)
        cleanup_stale_mount(self.mount)   # left behind when the process was killed
