"""Real processes for tests and benchmarks: replica servers and an nbdkit engine.

No daemon involved: each piece is started the way the daemon and the systemd units start it,
so lower-tier tests exercise the same command lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from blockhorn.config import EngineConfig, ReplicaConfig, ReplicaRef, parse_address
from blockhorn.engine.control import ControlClient
from blockhorn.keys import ensure_key
from blockhorn.nbd.attach import nbd_uri, start_engine, wait_for
from blockhorn.replica.store import Replica

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_state(pid: int, tid: int | str | None = None) -> str:
    """The state letter (R, S, D, T, t, Z, X) of process `pid`, or of its thread `tid`, from
    /proc (after the command name's closing parenthesis: the name may hold spaces)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of `pid` is stopped. SIGSTOP is asynchronous: the kernel wakes one
    thread to start the group stop, and until that thread runs the others go on. On a loaded
    machine a replica's data thread could still receive a request and answer it after kill()
    returned (t3_engine_two_silent saw a replica stopped before a write acknowledge it)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    states.append(proc_state(pid, tid))
        if any(s in "tT" for s in states) and all(s in "tTZX" for s in states):
            return      # (a thread exiting meanwhile is Z or X)
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not stopped {timeout:g} s after SIGSTOP: "
                                 f"thread states {states}")
        time.sleep(0.002)


def connectable(address: str) -> bool:
    kind, where = parse_address(address)
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.connect(where if kind == "unix" else (kind, where))
        except OSError:
            return False
    return True


@dataclass
class ReplicaProc:
    cfg: ReplicaConfig
    config_path: str
    log_path: str
    proc: subprocess.Popen[bytes] | None = None
    members: list[str] = field(default_factory=list)   # the volume's replicas at creation
    # What runs the server: the production module, or a test server (tests/support/).
    program: tuple[str, ...] = ("-m", "blockhorn.replica")

    def create(self) -> None:
        """What `volume create` does for each replica: an empty replica, in sync at
        generation 0 with its siblings. `replica serve` refuses a directory without one."""
        if not os.path.exists(os.path.join(self.cfg.directory, "volume.meta")):
            Replica.create(self.cfg.directory, self.cfg.size, self.cfg.volume,
                           {"Members": self.members or [self.cfg.name]}).close()

    def start(self) -> None:
        self.create()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.program, self.config_path],
            stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
        log.close()
        wait_for(lambda: connectable(self.cfg.listen) or self.proc.poll() is not None,  # type: ignore[union-attr]
                 f"replica {self.cfg.name}", log_path=self.log_path)
        assert self.proc.poll() is None, open(self.log_path).read()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.proc.send_signal(signal.SIGCONT)   # a stopped replica ignores SIGTERM
            self.proc.send_signal(sig)
            if sig == signal.SIGSTOP:
                wait_stopped(self.proc.pid)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:   # teardown must not leak a replica
                    self.proc.kill()
                    self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@dataclass
class Cluster:
    """N replica processes plus one engine (nbdkit) for one volume, under `home`."""

    home: str
    volume: str = "vol"
    size: int = 64 << 20
    replicas: int = 3
    transport: str = "tcp"
    min_rw: int = 1
    timeout_s: float = 8.0
    local_reads: bool = True
    replica_program: tuple[str, ...] = ("-m", "blockhorn.replica")
    rebuild_limits: str = ""      # the node's rebuild limits file (engine/limits.py)
    reps: list[ReplicaProc] = field(default_factory=list)
    engine: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.key_file = ensure_key(os.path.join(self.home, "cluster.key"))
        self.nbd_socket = os.path.join(self.home, "nbd.sock")
        self.control_socket = os.path.join(self.home, "control.sock")
        self.engine_config = os.path.join(self.home, "engine.json")
        self.engine_log = os.path.join(self.home, "engine.log")
        self.record = os.path.join(self.home, "generation.json")
        names = [f"{self.volume}-r{i}" for i in range(self.replicas)]
        for i in range(self.replicas):
            name = f"{self.volume}-r{i}"
            listen = (f"unix:{self.home}/{name}.sock" if self.transport == "unix"
                      else f"127.0.0.1:{free_port()}")
            cfg = ReplicaConfig(self.volume, name, os.path.join(self.home, name), self.size,
                                listen, self.key_file)
            path = os.path.join(self.home, f"{name}.json")
            cfg.save(path)
            self.reps.append(ReplicaProc(cfg, path, os.path.join(self.home, f"{name}.log"),
                                         members=names, program=self.replica_program))
        self.write_engine_config()

    def write_engine_config(self, **extra: object) -> None:
        EngineConfig(self.volume, self.size,
                     [ReplicaRef(r.cfg.name, r.cfg.listen, r.cfg.directory) for r in self.reps],
                     self.key_file, self.control_socket, min_rw=self.min_rw,
                     timeout_s=self.timeout_s, local_reads=self.local_reads,
                     record=self.record, rebuild_limits=self.rebuild_limits,
                     **extra  # type: ignore[arg-type]
                     ).save(self.engine_config)

    @property
    def uri(self) -> str:
        return nbd_uri(self.nbd_socket)

    def start(self) -> Cluster:
        for r in self.reps:
            r.start()
        self.start_engine()
        return self

    def start_engine(self) -> None:
        self.engine = start_engine(self.engine_config, self.nbd_socket, self.engine_log)
        wait_for(lambda: os.path.exists(self.control_socket) or self.engine.poll() is not None,  # type: ignore[union-attr]
                 "engine", log_path=self.engine_log)
        assert self.engine.poll() is None, open(self.engine_log).read()

    def stop_engine(self, sig: int = signal.SIGTERM) -> None:
        """nbdkit waits for connected clients on SIGTERM; a client a test left open is cut
        off with SIGKILL after a grace period."""
        if self.engine and self.engine.poll() is None:
            self.engine.send_signal(sig)
            try:
                self.engine.wait(5)
            except subprocess.TimeoutExpired:
                self.engine.kill()
                self.engine.wait(10)
        if os.path.exists(self.control_socket):
            os.unlink(self.control_socket)

    def control(self) -> ControlClient:
        return ControlClient(self.control_socket)

    def status(self) -> dict:
        return self.control().call({"op": "status"})

    def modes(self) -> dict[str, str]:
        return {r["name"]: r["mode"] for r in self.status()["replicas"]}

    def wait_modes(self, want: dict[str, str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.modes() != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"modes {self.modes()} != {want}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.stop_engine()
        for r in self.reps:
            r.stop()
