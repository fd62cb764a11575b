"""Tier 2: frame MACs (wire protocol v2) between the engine's client and a real replica
process, with an on-path attacker (tests/support/mitm.py) that flips bits in transit, strips
the replica's requirement from HELLO, or replays a frame. Without MACs the same flip lands —
the control case shows each test can fail."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator

import pytest
from harness import Cluster, ReplicaProc
from support.mitm import Mitm, flip_at
from support.old_replica import BEFORE_DIRECT as OLD_BEFORE_DIRECT
from support.old_replica import BEFORE_GMAC as OLD_BEFORE_GMAC
from support.old_replica import PROGRAM as OLD_REPLICA
from support.rawpeer import RawPeer

from blockhorn.config import ReplicaRef, parse_address
from blockhorn.engine.client import Call, ReplicaClient
from blockhorn.keys import load_key
from blockhorn.nbd.attach import wait_for
from blockhorn.replica import proto, server
from blockhorn.replica.proto import Op
from blockhorn.types import AuthError, BlockhornError

MiB = 1 << 20
HELLO_FEATURES_AT = 6     # byte offset of HELLO's features u16 in the replica's stream


def start(home: str, transport: str = "tcp", frame_auth: str = "auto") -> ReplicaProc:
    c = Cluster(home, replicas=1, size=8 * MiB, transport=transport)
    rep = c.reps[0]
    rep.cfg.frame_auth = frame_auth
    rep.cfg.save(rep.config_path)
    rep.start()
    return rep


@pytest.fixture
def replica(tmp_path) -> Iterator[ReplicaProc]:
    rep = start(str(tmp_path))
    try:
        yield rep
    finally:
        rep.stop()


def client(rep: ReplicaProc, address: str | None = None, frame_auth: str = "auto"
           ) -> ReplicaClient:
    c = ReplicaClient(ReplicaRef(rep.cfg.name, address or rep.cfg.listen,
                                 frame_auth=frame_auth), load_key(rep.cfg.key_file), "vol")
    c.connect()
    return c


def read_back(c: ReplicaClient, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    call = Call(1, dest=memoryview(buf))
    c.submit(call, Op.READ, offset, length)
    assert call.wait(10) and call.results[c.name] == 0
    return bytes(buf)


def proxy(rep: ReplicaProc, **hooks) -> Mitm:
    host, port = parse_address(rep.cfg.listen)
    return Mitm((str(host), int(port)), **hooks)


@pytest.mark.parametrize("transport,replica_says,engine_says,on", [
    ("tcp", "auto", "auto", True), ("unix", "auto", "auto", False),
    ("unix", "on", "auto", True), ("unix", "auto", "on", True),
    ("tcp", "off", "off", False), ("tcp", "auto", "off", True), ("tcp", "off", "auto", True),
])
def test_negotiation(tmp_path, transport, replica_says, engine_says, on) -> None:
    rep = start(str(tmp_path), transport, replica_says)
    try:
        c = client(rep, frame_auth=engine_says)
        assert (c.tx is not None) == on
        data = os.urandom(MiB)           # the data path works either way (big + small frames)
        c.request(Op.WRITE, 0, MiB, data)
        assert read_back(c, 0, MiB) == data and c.stat()["volume"] == "vol"
        c.close()
    finally:
        rep.stop()


FLIP_AT = 1000            # the payload byte the attacker changes


def write_through_flipping_proxy(rep: ReplicaProc, frame_auth: str
                                 ) -> tuple[int, bytes, bytes, bytes]:
    """Write 64 KiB directly, then other 64 KiB there through a proxy that flips one payload
    bit; (status of the second write, what was there before, what was sent, what landed)."""
    direct = client(rep, frame_auth=frame_auth)
    before = os.urandom(65536)
    direct.request(Op.WRITE, MiB, len(before), before)
    # The client's stream: AUTH (4 + 3 + 32 + 32 bytes), then the WRITE header; flip a bit
    # in the middle of its payload.
    mitm = proxy(rep, c2s=flip_at(71 + proto.HEADER_SIZE + FLIP_AT))
    try:
        c = client(rep, mitm.address, frame_auth)
        payload = os.urandom(65536)
        call = Call(1)
        c.submit(call, Op.WRITE, MiB, len(payload), payload)
        assert call.wait(10)
        status = call.results[c.name]
        c.close()
    finally:
        mitm.close()
    landed = read_back(direct, MiB, 65536)
    direct.close()
    return status, before, payload, landed


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_on_path_bit_flip_in_a_write_is_refused(tmp_path) -> None:
    rep = start(str(tmp_path))
    try:
        status, before, _, landed = write_through_flipping_proxy(rep, "auto")
        assert status == errno.EIO                  # the connection was dropped
        assert digest(landed) == digest(before)     # nothing of the forged write landed
        # The replica logs after it dropped the connection: maybe after our read-back.
        wait_for(lambda: "failed authentication" in open(rep.log_path).read(),
                 "the replica's log of the refused frame", timeout=10)
    finally:
        rep.stop()


def test_without_frame_macs_the_flip_lands(tmp_path) -> None:
    """The control case: both sides off, the forged write is acknowledged and lands."""
    rep = start(str(tmp_path), frame_auth="off")
    try:
        status, _, sent, landed = write_through_flipping_proxy(rep, "off")
        forged = sent[:FLIP_AT] + bytes([sent[FLIP_AT] ^ 1]) + sent[FLIP_AT + 1:]
        assert status == 0 and digest(landed) == digest(forged)
    finally:
        rep.stop()


def test_forged_reply_fails_the_read(replica) -> None:
    c0 = client(replica)
    data = os.urandom(65536)
    c0.request(Op.WRITE, 0, len(data), data)
    # The replica's stream: HELLO (40), WELCOME (33), then the READ reply's header: flip a
    # data bit (the read goes straight into the caller's buffer: the tag still guards it).
    mitm = proxy(replica, s2c=flip_at(40 + 33 + proto.HEADER_SIZE + 5000))
    try:
        c = client(replica, mitm.address)
        buf = bytearray(len(data))
        call = Call(1, dest=memoryview(buf))
        c.submit(call, Op.READ, 0, len(data))
        assert call.wait(10)
        assert call.results[c.name] == errno.EIO
        wait_for(lambda: c.closed, "the client drops the connection", timeout=10)
    finally:
        mitm.close()
    assert read_back(c0, 0, len(data)) == data
    c0.close()


def test_stripped_requirement_is_a_failed_handshake(replica) -> None:
    """A downgrade: the attacker clears FRAME_MAC in HELLO; an engine that would not ask
    for MACs itself (frame_auth off) answers what it saw, and the replica's mac_c check
    (which covers the features it sent) refuses the handshake."""
    mitm = proxy(replica, s2c=flip_at(HELLO_FEATURES_AT))
    try:
        with pytest.raises(AuthError):
            client(replica, mitm.address, frame_auth="off")
    finally:
        mitm.close()
    client(replica, frame_auth="off").close()   # without the attacker: MACs on, accepted


def test_replayed_and_untagged_frames_close_the_connection(replica) -> None:
    key = load_key(replica.cfg.key_file)
    peer = RawPeer(replica.cfg.listen, key)
    assert peer.status == 0 and peer.tx is not None
    frame = proto.pack(Op.WRITE, 1, 0, 4096, 4096) + b"r" * 4096
    tagged = frame + peer.tx.tag([frame])
    peer.send_raw(tagged, tagged=False)
    h, _ = peer.reply()
    assert h.status == 0
    peer.send_raw(tagged, tagged=False)              # the same bytes again: a replay
    assert peer.closed_by_server()
    peer.close()
    peer = RawPeer(replica.cfg.listen, key)
    peer.send_raw(proto.pack(Op.PING, 1) + bytes(proto.TAG_SIZE), tagged=False)
    assert peer.closed_by_server()
    peer.close()
    peer = RawPeer(replica.cfg.listen, key, features=0)   # refuses the requirement
    assert peer.status == proto.WELCOME_FEATURES
    peer.close()
    with pytest.raises(BlockhornError):
        RawPeer(replica.cfg.listen, key, features=0x8001).reply()   # unknown feature bit


def test_engine_client_survives_an_oversized_reply(tmp_path, replica) -> None:
    """A key holder answering a 4 KiB READ with 8 KiB: that call fails, that connection
    drops, and the receiver thread (shared by every replica of an engine) keeps serving."""
    from support.evil_replica import EvilReplica

    key = load_key(replica.cfg.key_file)
    evil = EvilReplica(str(tmp_path / "evil.sock"), key,
                       proto.pack(Op.READ | proto.REPLY, 1, 0, 4096, 8192) + bytes(8192))
    try:
        good = client(replica)
        bad = ReplicaClient(ReplicaRef("evil", evil.address), key, "vol",
                            receiver=good.receiver)
        bad.connect()
        buf = bytearray(4096)
        call = Call(1, dest=memoryview(buf))
        bad.submit(call, Op.READ, 0, 4096)
        assert call.wait(10) and call.results["evil"] == errno.EIO
        wait_for(lambda: bad.closed, "the client drops the evil connection", timeout=10)
        data = os.urandom(4096)          # the shared receiver still completes good's calls
        good.request(Op.WRITE, 0, 4096, data)
        assert read_back(good, 0, 4096) == data
        good.close()
    finally:
        evil.close()


def test_payload_digest_is_used_and_an_older_replica_is_served_without(tmp_path) -> None:
    """FEATURE_PAYLOAD_DIGEST, GMAC_TAGS and DIRECT_TAGS: a current replica takes all three;
    one of the release before direct tags the first two, one of the release before GMAC tags
    the digest only, one of the release before that none (tests/support/old_replica.py):
    each refusal is WELCOME 3, and the client connects again offering one feature less.
    Frame MACs are on either way, and small and bulk frames in both directions carry the
    data intact."""
    digest, gmac = proto.FEATURE_PAYLOAD_DIGEST, proto.FEATURE_GMAC_TAGS
    direct = proto.FEATURE_DIRECT_TAGS
    for name, program, features in (("current", ("-m", "blockhorn.replica"),
                                     digest | gmac | direct),
                                    ("before-direct", OLD_BEFORE_DIRECT, digest | gmac),
                                    ("before-gmac", OLD_BEFORE_GMAC, digest),
                                    ("previous", OLD_REPLICA, 0)):
        digested = bool(features & digest)
        home = tmp_path / name
        home.mkdir()
        rep = Cluster(str(home), replicas=1, size=8 * MiB, replica_program=program).reps[0]
        rep.start()
        try:
            c = client(rep)
            assert c.tx is not None and (c.tx.digest is not None) == digested
            assert c.offer == features
            assert c.tx.digest is None or c.tx.digest.gmac == bool(features & gmac)
            assert c.tx.direct == c.rx.direct == bool(features & direct)
            for n in (4096, MiB):
                data = os.urandom(n)
                c.request(Op.WRITE, 0, n, data)
                assert read_back(c, 0, n) == data
            c.close()
        finally:
            rep.stop()


def test_a_large_frame_arriving_slowly_over_tcp_is_received_whole(tmp_path) -> None:
    """The replica waits for the rest of a large frame with SO_RCVLOWAT and poll: a frame
    whose rest trickles in (a piece, a pause longer than the poll's LOWAT_WAIT_MS, the rest
    in small pieces) is still received, checked and executed, and the next frame after it."""
    rep = start(str(tmp_path))
    peer = RawPeer(rep.cfg.listen, load_key(rep.cfg.key_file))
    try:
        assert peer.tx is not None
        data = os.urandom(256 << 10)
        frame = proto.pack(Op.WRITE, 1, 0, len(data), len(data)) + data
        frame += peer.tx.tag([frame])
        peer.sock.sendall(frame[:100 << 10])
        time.sleep(server.LOWAT_WAIT_MS / 1000 + 0.3)
        for at in range(100 << 10, len(frame), 50 << 10):
            peer.sock.sendall(frame[at:at + (50 << 10)])
            time.sleep(0.05)
        h, _ = peer.reply()
        assert (h.seq, h.status) == (1, 0)
        h, got = peer.call(Op.READ, 2, 0, len(data))
        assert (h.seq, h.status) == (2, 0) and got == data
    finally:
        peer.close()
        rep.stop()
