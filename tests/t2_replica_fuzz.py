"""Tier 2: fuzzing a live replica server process (hypothesis): the handshake with arbitrary
bytes, and every request type — including CONTROL messages with arbitrary fields — from an
authenticated peer whose frames carry valid MACs, so the fuzz reaches the request handlers.
Every well-formed frame must get its reply (same seq, op | REPLY); nothing may end the server
or hang it; afterwards a rightful engine writes and reads back with equal checksums.
Bounded for `make test`; FUZZ_EXAMPLES raises the example count (`make fuzz`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from harness import Cluster, ReplicaProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.rawpeer import RawPeer, dial
from t2_replica_hostile import assert_serves, key_of

from blockhorn.replica import proto
from blockhorn.replica.proto import REPLY, Op
from blockhorn.sockio import recv_exact
from blockhorn.types import MAX_REQUEST

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
SIZE = 8 << 20


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[ReplicaProc]:
    rep = Cluster(str(tmp_path_factory.mktemp("fuzz")), replicas=1, size=SIZE).reps[0]
    rep.start()
    try:
        yield rep
    finally:
        rep.stop()


def alive(rep: ReplicaProc) -> None:
    assert rep.proc is not None and rep.proc.poll() is None, open(rep.log_path).read()[-3000:]


@fuzz
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_handshake(replica, junk: bytes, wait_answer: bool) -> None:
    """Arbitrary bytes after HELLO: refused or timed out, never a dead server."""
    s = dial(replica.cfg.listen, timeout=proto.HELLO.size and 8.0)
    try:
        recv_exact(s, proto.HELLO.size)
        s.sendall(junk)
        if wait_answer and len(junk) >= 4:
            name_len = int.from_bytes(junk[:2], "little")
            if len(junk) >= 4 + proto.auth_size(name_len) and name_len <= proto.MAX_NAME:
                # A complete AUTH without the key: WELCOME refused, then the server closes.
                assert s.recv(1) in (bytes([proto.WELCOME_REFUSED]), b"")
    except OSError:
        pass          # the server closed first (a name too long, a refusal): fine
    finally:
        s.close()
    alive(replica)


OFFSETS = st.sampled_from([0, 4096, SIZE - 4096, SIZE - 1, SIZE, 1 << 32, (1 << 63) - 1,
                           (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1)
LENGTHS = st.sampled_from([0, 1, 4096, 1 << 20, MAX_REQUEST, MAX_REQUEST + 1, (1 << 32) - 1]) \
    | st.integers(0, (1 << 32) - 1)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=8)
CONTROL_OPS = ["stat", "extents", "snapshots", "chain", "set_rebuilding", "reset_chain",
               "finish_rebuild", "snapshot", "snapshot_rm", "purge", "expand",
               "bump_generation", "fault", "nope"]
FIELDS = ["offset", "length", "layer", "value", "chain", "revision", "name", "user_created",
          "labels", "size"]
CONTROL = st.builds(lambda op, extra: {"op": op, **extra}, st.sampled_from(CONTROL_OPS),
                    st.dictionaries(st.sampled_from(FIELDS), JSON | OFFSETS, max_size=3))
LAYER = st.sampled_from([b"volume-head-000.img", b"volume-snap-a.img", b"../x", b""]) \
    | st.binary(max_size=20)


@st.composite
def frames(draw: st.DrawFn) -> tuple[int, int, int, int, bytes]:
    op = draw(st.sampled_from(list(Op)) | st.integers(0, 255))
    flags = draw(st.sampled_from([0, proto.FLAG_FUA, proto.FLAG_MAY_TRIM]) | st.integers(0, 0xFFFF))
    offset, length = draw(OFFSETS), draw(LENGTHS)
    if op == Op.CONTROL:
        payload = json.dumps(draw(CONTROL | JSON)).encode()
    elif op == Op.WRITE:
        payload = draw(st.binary(max_size=8192))
        length = draw(st.sampled_from([len(payload)]) | LENGTHS)
    elif op == Op.READ_LAYER:
        payload = draw(LAYER)
    elif op == Op.WRITE_LAYER:
        name = draw(LAYER)
        payload = draw(st.sampled_from([len(name)]) | st.integers(0, 0xFFFF)).to_bytes(2, "little") \
            + name + draw(st.binary(max_size=4096))
    else:
        payload = draw(st.binary(max_size=64))
    # Keep reads the fuzz asks for modest: a 32 MiB reply is allowed but slow to drain.
    if op in (Op.READ, Op.READ_LAYER) and length > 1 << 20 and offset + length <= SIZE:
        length = 1 << 20
    return op, flags, offset, length, payload


@fuzz
@given(st.lists(frames(), min_size=1, max_size=5))
def test_fuzz_requests(replica, batch: list[tuple[int, int, int, int, bytes]]) -> None:
    """A pipelined batch of arbitrary requests, sent in one write; each gets its reply."""
    peer = RawPeer(replica.cfg.listen, key_of(replica))
    assert peer.status == 0 and peer.tx is not None      # TCP: MACs on, the fuzz tags
    try:
        wire = b""
        for seq, (op, flags, offset, length, payload) in enumerate(batch, 1):
            frame = proto.pack(op, seq, offset, length, len(payload), flags) + payload
            wire += frame + peer.tx.tag([frame])
        peer.send_raw(wire, tagged=False)
        for seq, (op, *_rest) in enumerate(batch, 1):
            h, _ = peer.reply()
            assert (h.op, h.seq) == (op | REPLY, seq)
    except TimeoutError:
        raise AssertionError(f"replica hung on {batch!r}") from None
    finally:
        peer.close()
    alive(replica)


def test_after_the_fuzz_the_replica_serves_an_engine(replica) -> None:
    alive(replica)
    peer = RawPeer(replica.cfg.listen, key_of(replica))
    h, _ = peer.call(Op.CONTROL, 1, payload=b'{"op":"set_rebuilding","value":false}')
    peer.close()
    assert h.status == 0
    assert_serves(replica)
