"""Tier 2: a real replica server process against hostile peers (issue 10): names that once
crashed the listener, malformed and oversized requests from an authenticated peer, a fenced
owner's queued writes, TRIM with FUA. Each ends by showing that the replica still serves a
rightful engine, with checksums of what it wrote."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from harness import Cluster, ReplicaProc
from support.faulty_replica import PROGRAM as FAULTY
from support.rawpeer import RawPeer

from blockhorn.config import ReplicaRef, parse_address
from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.keys import load_key
from blockhorn.nbd.attach import wait_for
from blockhorn.replica import proto
from blockhorn.replica.proto import FLAG_FUA, REPLY, Op, handshake_name
from blockhorn.replica.server import HANDSHAKE_TIMEOUT_S, MAX_HANDSHAKES
from blockhorn.types import MAX_REQUEST, AuthError, BlockhornError

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB


def start_replica(home: str, program: tuple[str, ...] | None = None) -> ReplicaProc:
    kw = {"replica_program": program} if program else {}
    c = Cluster(home, replicas=1, size=SIZE, **kw)
    rep = c.reps[0]
    rep.start()
    return rep


@pytest.fixture
def replica(tmp_path) -> Iterator[ReplicaProc]:
    rep = start_replica(str(tmp_path))
    try:
        yield rep
    finally:
        rep.stop()


def key_of(rep: ReplicaProc) -> bytes:
    return load_key(rep.cfg.key_file)


def engine(rep: ReplicaProc, epoch: int = 0) -> ReplicaClient:
    c = ReplicaClient(ReplicaRef(rep.cfg.name, rep.cfg.listen), key_of(rep),
                      handshake_name("vol", epoch))
    c.connect()
    return c


def assert_serves(rep: ReplicaProc) -> None:
    """The replica process is alive and a rightful engine writes and reads back 1 MiB."""
    assert rep.proc is not None and rep.proc.poll() is None, "replica process ended"
    c = engine(rep)
    data = os.urandom(MiB)
    c.request(Op.WRITE, 2 * MiB, MiB, data, flags=FLAG_FUA)
    back = bytearray(MiB)
    call = Call(1, dest=memoryview(back))
    c.submit(call, Op.READ, 2 * MiB, MiB)
    assert call.wait(10) and call.results[c.name] == 0
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    c.close()


# --- item 1: nothing before the MAC ------------------------------------------------------------

HOSTILE_NAMES = [
    "vol@²".encode(),          # '²'.isdigit() but int('²') raises: once killed the listener
    b"vol@\xff", b"\xff\xfe\xfd", b"vol@+7", b"vol@07", b"vol@-1", b"vol@ 7", b"vol@7@8",
    b"vol@", b"vol@99999999999999999999999", b"vol\n", b"vol\x00", b"@7", b"",
]


def test_hostile_handshake_names_are_refused_and_the_server_lives(replica) -> None:
    held = engine(replica)    # the crash used to end the process when this one closed
    for name in HOSTILE_NAMES:
        for key in (key_of(replica), os.urandom(32)):    # with and without the cluster key
            peer = RawPeer(replica.cfg.listen, key, name)
            assert peer.status == proto.WELCOME_REFUSED, name
            assert peer.closed_by_server()
            peer.close()
    held.close()
    assert_serves(replica)
    # 28 refusals within seconds: logged once (rate-limited), not once each.
    assert open(replica.log_path).read().count("refused a handshake") == 1


# --- item 4: every request validated, every failure an error reply ----------------------------

def status(peer: RawPeer, op: int, offset: int = 0, length: int = 0, payload: bytes = b"",
           flags: int = 0) -> int:
    h, _ = peer.call(op, 5, offset, length, payload, flags)
    assert h.op == op | REPLY and h.seq == 5
    return h.status


def control(peer: RawPeer, req: object) -> int:
    return status(peer, Op.CONTROL, payload=json.dumps(req).encode())


def test_malformed_requests_get_error_replies(replica) -> None:
    peer = RawPeer(replica.cfg.listen, key_of(replica))
    assert peer.status == 0
    layer = "volume-head-000.img"
    cases = [
        (errno.EINVAL, (Op.READ, 0, MAX_REQUEST + 1)),               # before any allocation
        (errno.ENOSPC, (Op.READ, 1 << 63, 4096)),
        (errno.ENOSPC, (Op.READ, SIZE - 4096, 8192)),
        (errno.ENOSPC, (Op.READ_LAYER, 1 << 63, 4096, layer.encode())),
        (errno.EINVAL, (Op.READ_LAYER, 0, MAX_REQUEST + 1, layer.encode())),
        (errno.EINVAL, (Op.READ_LAYER, 0, 4096, b"../../etc/passwd")),
        (errno.EINVAL, (Op.READ_LAYER, 0, 4096, b"")),
        (errno.ENOENT, (Op.READ_LAYER, 0, 4096, b"volume-snap-nope.img")),
        (errno.EINVAL, (Op.WRITE_LAYER, 0, 0, b"\x05")),
        (errno.EINVAL, (Op.WRITE_LAYER, 0, 4, b"\xff\x00abcd")),
        (errno.ENOSPC, (Op.WRITE_LAYER, 1 << 63, 4, b"\x03\x00abcdefg")),
        (errno.EINVAL, (Op.WRITE, 0, 8192, b"x" * 4096)),            # length != payload
        (errno.ENOSPC, (Op.WRITE, SIZE, 4096, b"x" * 4096)),
        (errno.ENOSPC, (Op.TRIM, 1 << 63, 4096)),
        (errno.ENOSPC, (Op.ZERO, SIZE - 4096, 1 << 31)),
        (errno.EINVAL, (77, 0, 0)),                                   # unknown op
        (errno.EINVAL, (Op.READ | REPLY, 0, 0)),                      # a reply is no request
        (errno.EPROTO, (Op.CONTROL, 0, 0, b"{not json")),
    ]
    for want, args in cases:
        assert status(peer, *args) == want, args
    for want, req in [
        (errno.EINVAL, {"op": "extents"}),                            # field missing
        (errno.EINVAL, {"op": "extents", "offset": "0", "length": 4096}),
        (errno.EINVAL, {"op": "extents", "offset": -1, "length": 4096}),
        (errno.EINVAL, {"op": "extents", "offset": True, "length": 4096}),
        (errno.ENOSPC, {"op": "extents", "offset": 1 << 63, "length": 4096}),
        (errno.EINVAL, {"op": "expand", "size": 1.5}),
        (errno.EINVAL, {"op": "snapshot"}),
        (errno.EINVAL, {"op": "snapshot", "name": "s", "labels": {"a": 1}}),
        (errno.EINVAL, {"op": "reset_chain", "chain": [1]}),
        (errno.EINVAL, {"op": "finish_rebuild"}),
        (errno.EINVAL, {"op": "set_rebuilding"}),
        (errno.EINVAL, {"op": "fault", "delay_s": 5}),                # test-only: not here
        (errno.EINVAL, {"op": "no such op"}),
        (errno.EINVAL, {"op": 7}),
        (errno.EINVAL, ["op", "stat"]),
    ]:
        assert control(peer, req) == want, req
    assert status(peer, Op.PING) == 0            # the same connection still works
    peer.send_raw(b"\x00" * proto.HEADER_SIZE)   # bad magic: that connection ends, only it
    assert peer.closed_by_server()
    peer.close()
    assert_serves(replica)


# --- item 3: fencing per request ---------------------------------------------------------------

def test_fenced_owner_queued_writes_never_land(tmp_path) -> None:
    """The review's sequence: an owner has 30 writes queued on a slow replica when a newer
    owner registers and writes the same blocks; none of the old owner's writes may land
    after the switch, so every block reads as the new owner wrote it."""
    rep = start_replica(str(tmp_path), FAULTY)
    try:
        ctl = engine(rep)                            # epoch 0: never fenced
        ctl.control({"op": "fault", "delay_s": 0.05})
        old = engine(rep, 5)
        old_blocks = [os.urandom(4096) for _ in range(30)]
        calls = []
        for i, block in enumerate(old_blocks):
            call = Call(1)
            old.submit(call, Op.WRITE, i * 4096, 4096, block)
            calls.append(call)
        new = engine(rep, 7)                         # admitted while they are queued
        mine = os.urandom(30 * 4096)
        new.request(Op.WRITE, 0, len(mine), mine, flags=FLAG_FUA)
        for call in calls:
            assert call.wait(15)
        landed = sum(1 for call in calls if call.results[old.name] == 0)
        assert landed < 30, "the switch came after every queued write: nothing was tested"
        ctl.control({"op": "fault"})
        back = bytearray(len(mine))
        call = Call(1, dest=memoryview(back))
        new.submit(call, Op.READ, 0, len(mine))
        assert call.wait(10) and call.results[new.name] == 0
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(mine).hexdigest()
        with pytest.raises(AuthError, match="fenced"):
            engine(rep, 5)
        for c in (ctl, old, new):
            c.close()
        assert_serves(rep)
    finally:
        rep.stop()


def test_fenced_connection_gets_estale(tmp_path) -> None:
    """A request of an owner whose epoch was overtaken is answered ESTALE, then the
    connection closes (the raw peer reads the reply the engine would get)."""
    rep = start_replica(str(tmp_path))
    try:
        peer = RawPeer(rep.cfg.listen, key_of(rep), b"vol@3")
        assert peer.status == 0
        assert status(peer, Op.PING) == 0
        engine(rep, 4).close()
        try:
            h, _ = peer.call(Op.WRITE, 5, 0, 4096, b"y" * 4096)
            assert h.status == errno.ESTALE
        except (OSError, BlockhornError):
            pass     # the admission shut the connection down first: also refused
        assert peer.closed_by_server()
        peer.close()
        assert_serves(rep)
    finally:
        rep.stop()


# --- item 9: TRIM with FUA -------------------------------------------------------------------

def fdatasyncs_during(rep: ReplicaProc, peer: RawPeer, flags: int, log: str) -> int:
    """How many fdatasync calls the replica makes while it executes one TRIM (strace)."""
    assert rep.proc is not None
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync",
                               "-p", str(rep.proc.pid), "-o", log],
                              stderr=subprocess.DEVNULL)
    try:
        # strace attaches to every thread before it writes anything: PING until it logs.
        wait_for(lambda: status(peer, Op.FLUSH) == 0 and os.path.exists(log)
                 and "fdatasync" in open(log).read(), "strace attached", timeout=15)
        before = open(log).read().count("fdatasync(")
        assert status(peer, Op.TRIM, MiB, 64 * KiB, flags=flags) == 0
        assert status(peer, Op.PING) == 0
        return open(log).read().count("fdatasync(") - before
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)


def test_trim_with_fua_is_durable_before_the_reply(replica, tmp_path) -> None:
    peer = RawPeer(replica.cfg.listen, key_of(replica))
    assert status(peer, Op.WRITE, MiB, MiB, b"z" * MiB) == 0
    assert fdatasyncs_during(replica, peer, 0, str(tmp_path / "plain.strace")) == 0
    assert fdatasyncs_during(replica, peer, FLAG_FUA, str(tmp_path / "fua.strace")) >= 1
    h, data = peer.call(Op.READ, 6, MiB, 64 * KiB)
    assert h.status == 0 and data == bytes(64 * KiB)
    peer.close()
    assert_serves(replica)


# --- item 2: connection exhaustion --------------------------------------------------------------

def idle_connections(rep: ReplicaProc, n: int) -> list[socket.socket]:
    kind, port = parse_address(rep.cfg.listen)
    out = []
    for _ in range(n):
        s = socket.create_connection((kind, port), timeout=5)   # type: ignore[arg-type]
        out.append(s)
    return out


def greeted(s: socket.socket) -> bool:
    """True if the server sent HELLO, False if it closed the connection unanswered."""
    try:
        return len(s.recv(proto.HELLO.size)) > 0
    except ConnectionResetError:
        return False


def connects_within(rep: ReplicaProc, seconds: float) -> ReplicaClient:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return engine(rep)
        except BlockhornError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_unauthenticated_connections_are_capped_and_time_out(replica) -> None:
    idle = idle_connections(replica, MAX_HANDSHAKES + 8)
    answers = [greeted(s) for s in idle]
    assert answers.count(True) == MAX_HANDSHAKES and answers.count(False) == 8
    start = time.monotonic()
    c = connects_within(replica, HANDSHAKE_TIMEOUT_S + 10)   # once the idle ones time out
    assert time.monotonic() - start < HANDSHAKE_TIMEOUT_S + 5
    assert all(s.recv(1) == b"" for s in idle if s.fileno() >= 0)  # timed-out ones closed
    c.close()
    for s in idle:
        s.close()
    assert_serves(replica)


def test_out_of_descriptors_backs_off_instead_of_dying(replica) -> None:
    """At RLIMIT_NOFILE, accept() fails with EMFILE: the server waits and goes on."""
    assert replica.proc is not None
    pid = replica.proc.pid
    base = len(os.listdir(f"/proc/{pid}/fd"))
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (base + 8, hard))
    idle = idle_connections(replica, 40)
    wait_for(lambda: "Too many open files" in open(replica.log_path).read(),
             "EMFILE in the replica's log", timeout=10)
    assert replica.proc.poll() is None
    for s in idle:
        s.close()          # the flood goes away: descriptors free up
    connects_within(replica, 10).close()
    assert_serves(replica)


def test_sigterm_stops_a_replica_with_engines_connected(replica) -> None:
    """Shutdown does not wait for connected engines to hang up (their data threads are
    abandoned and their sockets shut down)."""
    held = [engine(replica), engine(replica)]
    held[0].request(Op.WRITE, 0, 4096, b"s" * 4096)
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGTERM)
    assert replica.proc.wait(10) == 0
    for c in held:
        c.close()
