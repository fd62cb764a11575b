"""Tier 0: property-based fuzzing of the wire codec and the handshake parsers
(blockhorn/replica/proto.py). Whatever the bytes, a parser either returns a value of the
documented shape or raises a BlockhornError carrying an errno — never anything else.
FUZZ_EXAMPLES raises the example count (`make fuzz`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockhorn.replica import proto
from blockhorn.types import BlockhornError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
KEY = bytes(range(32))
SESSION_KEY = bytes(range(64))     # HMAC key | AES-256 key
NONCE = bytes(32)


@fuzz
@given(st.binary(min_size=proto.HEADER_SIZE, max_size=64))
def test_header_decoder(buf: bytes) -> None:
    try:
        h = proto.unpack(buf)
    except BlockhornError as e:
        assert e.errno
        return
    assert h.payload <= proto.MAX_PAYLOAD
    assert proto.unpack(proto.pack(h.op, h.seq, h.offset, h.length, h.payload, h.flags,
                                   h.status)) == h


@fuzz
@given(st.binary(min_size=proto.HELLO.size, max_size=proto.HELLO.size))
def test_hello_decoder(buf: bytes) -> None:
    try:
        nonce, features = proto.unpack_hello(buf)
    except BlockhornError:
        return
    assert len(nonce) == proto.NONCE_SIZE and not features & ~proto.KNOWN_FEATURES


@fuzz
@given(st.binary(max_size=proto.MAX_NAME + 80), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF))
def test_auth_decoder_without_the_key(body: bytes, hello: int, features: int) -> None:
    try:
        proto.verify_auth_epoch(KEY, "vol", NONCE, body, hello, features)
    except BlockhornError:
        return
    raise AssertionError("random bytes passed the AUTH check")


@fuzz
@given(st.binary(max_size=300), st.integers(0, 3), st.integers(0, 0xFFFF))
def test_auth_decoder_with_the_key(name: bytes, hello: int, features: int) -> None:
    """A peer holding the key may send any name: it parses strictly or is refused."""
    client_nonce = bytes(range(32, 64))
    body = name + client_nonce + proto.mac(KEY, b"client", NONCE, client_nonce, name,
                                           proto.AUTH_PREFIX.pack(hello, features))
    try:
        got_nonce, sent, epoch = proto.verify_auth_epoch(KEY, "vol", NONCE, body, hello,
                                                         features)
    except BlockhornError:
        return
    assert got_nonce == client_nonce and sent.encode("ascii") == name
    assert proto.handshake_name("vol", epoch) == sent and 0 <= epoch <= proto.MAX_EPOCH


@fuzz
@given(st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_name_parser(name: str) -> None:
    try:
        base, epoch = proto.split_name(name)
    except BlockhornError:
        return
    assert base.isascii() and "@" not in base and 0 <= epoch <= proto.MAX_EPOCH
    assert proto.handshake_name(base, epoch) == name


@fuzz
@given(st.binary(min_size=proto.WELCOME_SIZE, max_size=proto.WELCOME_SIZE), st.integers(0, 1))
def test_welcome_decoder(buf: bytes, features: int) -> None:
    try:
        proto.verify_welcome(KEY, "vol", NONCE, NONCE, buf, features)
    except BlockhornError:
        return
    raise AssertionError("a random WELCOME was accepted")


@fuzz
@given(st.binary(max_size=200))
def test_json_decoder(buf: bytes) -> None:
    try:
        proto.decode_json(buf)
    except BlockhornError:
        pass


FRAMES = st.binary(max_size=3000) | st.tuples(  # small frames (HMAC) and bulk ones (GMAC)
    st.binary(max_size=64), st.integers(proto.BULK_MIN, proto.BULK_MIN + 3000)).map(
        lambda t: t[0] + bytes(t[1]))


@fuzz
@given(st.lists(FRAMES, min_size=1, max_size=5), st.data())
def test_frame_mac_detects_any_change(frames: list[bytes], data: st.DataObject) -> None:
    """Tags verify in order; a flipped bit, a swapped pair or a dropped frame fails."""
    tx, rx = proto.FrameMac(SESSION_KEY), proto.FrameMac(SESSION_KEY)
    tags = [tx.tag([f]) for f in frames]
    for f, t in zip(frames, tags, strict=True):
        m = rx.begin(len(f) - proto.HEADER_SIZE)
        m.update(f)
        rx.check(m, t)
    victim = data.draw(st.integers(0, len(frames) - 1))
    change = data.draw(st.sampled_from(["flip", "drop"] + (["swap"] if len(frames) > 1 else [])))
    out = list(zip(frames, tags, strict=True))
    if change == "flip":
        if not frames[victim]:
            return
        bit = data.draw(st.integers(0, len(frames[victim]) * 8 - 1))
        f = bytearray(frames[victim])
        f[bit // 8] ^= 1 << (bit % 8)
        out[victim] = (bytes(f), tags[victim])
    elif change == "drop":
        del out[victim]
        if not out:
            return
    else:
        i = min(victim, len(frames) - 2)
        if out[i] == out[i + 1]:
            return
        out[i], out[i + 1] = out[i + 1], out[i]
    rx = proto.FrameMac(SESSION_KEY)
    failed = False
    for f, t in out:
        m = rx.begin(len(f) - proto.HEADER_SIZE)
        m.update(f)
        try:
            rx.check(m, t)
        except BlockhornError:
            failed = True
            break
    assert failed or change == "drop" and victim == len(frames) - 1  # a cut tail: timeouts


@fuzz
@given(st.lists(st.integers(0, proto.BULK_MIN + 3000) | st.integers(0, 5000), min_size=1,
                max_size=4), st.sampled_from(["none", "hmac", "gmac", "direct"]), st.data())
def test_one_call_forms_agree_with_the_streaming_form(sizes: list[int], form: str,
                                                      data: st.DataObject) -> None:
    """What the engine and the replica use on the data path (`tag_header` with the payload's
    digest, `check_header` for a bare reply, `check_frame` for a frame at hand) gives the tag
    of the streaming form (`begin`/`update`/`finish`), in both tag forms; a flipped bit of
    any frame fails `check_frame` and `check_header`. `form`: without payload digests, with
    them (HMAC-SHA256 tags), with them and FEATURE_GMAC_TAGS (GMAC tags), and with
    FEATURE_DIRECT_TAGS too (a small frame's tag over its payload, through `tag`)."""
    dg = (proto.PayloadDigest(proto.digest_key(KEY), form in ("gmac", "direct"))
          if form != "none" else None)
    direct = form == "direct"
    stream, fast, rx = (proto.FrameMac(SESSION_KEY, dg, direct) for _ in range(3))
    frames = []
    for seq, n in enumerate(sizes):
        head = proto.pack(proto.Op.WRITE if n else proto.Op.PING, seq, 0, n, n)
        payload = bytes([seq]) * n
        m = stream.begin(n)
        m.update(head)
        m.update(payload)
        want = stream.finish(m)
        if direct and n and n < proto.BULK_MIN:
            got = fast.tag([head, payload])
        elif dg is not None or not n:
            got = fast.tag_header(head, dg.of((payload,), n) if dg is not None else b"")
        else:
            got = fast.tag([head, payload])
        assert got == want
        frames.append((head + payload, want))
    victim = data.draw(st.integers(0, len(frames) - 1))
    for i, (frame, tag) in enumerate(frames):
        if i == victim:
            bit = data.draw(st.integers(0, len(frame) * 8 - 1))
            forged = bytearray(frame)
            forged[bit // 8] ^= 1 << (bit % 8)
            bad = proto.FrameMac(SESSION_KEY, dg, direct)
            bad.counter = rx.counter
            try:
                if len(forged) == proto.HEADER_SIZE and data.draw(st.booleans()):
                    bad.check_header(memoryview(forged), b"", tag)
                else:
                    bad.check_frame(memoryview(forged), tag)
            except BlockhornError as e:
                assert e.errno
            else:
                raise AssertionError("a flipped bit passed the check")
        if len(frame) == proto.HEADER_SIZE:
            rx.check_header(memoryview(frame), b"", tag)
        else:
            rx.check_frame(memoryview(frame), tag)
