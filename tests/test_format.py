"""Tier 0: the documented example bytes in docs/FORMAT.md decode as the text says."""

from __future__ import annotations

import json
import os
import re

import pytest

from blockhorn.replica import proto
from blockhorn.replica.proto import FLAG_FUA, REPLY, Op
from blockhorn.replica.store import decode_revision, encode_revision
from blockhorn.types import AuthError, ProtocolError

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def doc_blocks(tag: str) -> list[str]:
    with open(DOC) as f:
        return re.findall(rf"```{tag}\n(.*?)```", f.read(), re.S)


def hex_blocks() -> list[bytes]:
    return [bytes.fromhex(b.replace("\n", " ")) for b in doc_blocks("hex")]


def test_revision_counter_example() -> None:
    block = hex_blocks()[0]
    assert decode_revision(block + bytes(4096 - len(block))) == 42
    assert encode_revision(42)[: len(block)] == block


def test_hello_example() -> None:
    assert proto.unpack_hello(hex_blocks()[1]) == (bytes(range(32)), proto.FEATURE_FRAME_MAC)


def test_auth_example_verifies_and_wrong_key_is_refused() -> None:
    auth = hex_blocks()[2]
    key, server_nonce, mac_on = bytes(32), bytes(range(32)), proto.FEATURE_FRAME_MAC
    name_len, features = proto.AUTH_PREFIX.unpack(auth[:4])
    assert auth[4 : 4 + name_len] == b"vol" and features == mac_on
    client_nonce = proto.verify_auth(key, "vol", server_nonce, auth[4:], mac_on, features)
    assert client_nonce == bytes(range(32, 64))
    with pytest.raises(AuthError):
        proto.verify_auth(b"\x01" * 32, "vol", server_nonce, auth[4:], mac_on, features)
    with pytest.raises(AuthError):
        proto.verify_auth(key, "other", server_nonce, auth[4:], mac_on, features)
    with pytest.raises(AuthError):      # a stripped requirement (downgrade) breaks the MAC
        proto.verify_auth(key, "vol", server_nonce, auth[4:], 0, 0)
    assert proto.pack_auth(key, "vol", server_nonce, client_nonce, mac_on, mac_on) == auth


def test_frame_mac_examples() -> None:
    welcome, ping, pong, bulk_tag = hex_blocks()[6:10]
    key, server_nonce, client_nonce = bytes(32), bytes(range(32)), bytes(range(32, 64))
    mac_on = proto.FEATURE_FRAME_MAC
    proto.verify_welcome(key, "vol", server_nonce, client_nonce, welcome, mac_on)
    with pytest.raises(AuthError):      # the same WELCOME for a session without MACs
        proto.verify_welcome(key, "vol", server_nonce, client_nonce, welcome, 0)
    c2s, s2c = proto.session_keys(key, server_nonce, client_nonce, "vol")
    assert [c2s[:4].hex(), s2c[:4].hex(), c2s[32:36].hex(), s2c[32:36].hex()] == [
        "c4d3fe19", "90cb2692", "c5458e7b", "47ff4996"]
    for frame, k, op in ((ping, c2s, Op.PING), (pong, s2c, Op.PING | REPLY)):
        h = proto.unpack(frame)
        assert (h.op, h.seq, h.payload) == (op, 1, 0)
        rx = proto.FrameMac(k)
        m = rx.begin(0)
        m.update(frame[:proto.HEADER_SIZE])
        rx.check(m, frame[proto.HEADER_SIZE:])
        assert len(frame) == proto.HEADER_SIZE + proto.TAG_SIZE
        if k == c2s:                     # the client's second frame: a bulk WRITE (GMAC)
            write = proto.pack(Op.WRITE, 2, 0, 32768, 32768)
            assert proto.FrameMac(k).tag([write, bytes(32768)]) != bulk_tag   # counter 0
            m = rx.begin(32768)
            m.update(write)
            m.update(bytes(32768))
            rx.check(m, bulk_tag)
        m = rx.begin(0)                  # the first frame again (a replay) fails
        m.update(frame[:proto.HEADER_SIZE])
        with pytest.raises(ProtocolError):
            rx.check(m, frame[proto.HEADER_SIZE:])


def test_payload_digest_examples_verify() -> None:
    """FORMAT.md's PAYLOAD_DIGEST examples: the digest keys, and the tags of a bulk and a
    small WRITE as the client's second and third frames (the PING keeps its tag)."""
    ping, _, bulk_tag, digest_bulk, digest_small = hex_blocks()[7:12]
    key, server_nonce, client_nonce = bytes(32), bytes(range(32)), bytes(range(32, 64))
    keys = proto.digest_key(key)
    assert [keys[:4].hex(), keys[32:36].hex()] == ["b2d03a9f", "9f7e083b"]
    c2s, _ = proto.session_keys(key, server_nonce, client_nonce, "vol")
    rx = proto.FrameMac(c2s, proto.PayloadDigest(keys))
    rx.check_frame(ping[:proto.HEADER_SIZE], ping[proto.HEADER_SIZE:])
    bulk = proto.pack(Op.WRITE, 2, 0, 32768, 32768) + bytes(32768)
    assert digest_bulk != bulk_tag
    m = rx.begin(32768)                  # in pieces, as the engine's receiver feeds it
    m.update(bulk[:10])
    m.update(bulk[10:])
    rx.check(m, digest_bulk)
    small = proto.pack(Op.WRITE, 3, 32768, 4096, 4096) + bytes(4096)
    with pytest.raises(ProtocolError):   # one changed payload bit fails
        proto.FrameMac(c2s, proto.PayloadDigest(keys)).check_frame(
            small[:-1] + b"\x01", digest_small)
    rx.check_frame(small, digest_small)


def test_gmac_tags_examples_verify() -> None:
    """FORMAT.md's GMAC_TAGS examples: the PING, its reply and the bulk and small WRITEs of
    the same session, each checked in the one-call form (what the data path uses) and the
    streaming one; a changed payload bit fails, as does the PING's tag of the HMAC form."""
    blocks = hex_blocks()
    hmac_ping, digest_bulk = blocks[7], blocks[10]
    ping_tag, pong_tag, bulk_tag, small_tag = blocks[12:16]
    key, server_nonce, client_nonce = bytes(32), bytes(range(32)), bytes(range(32, 64))
    keys = proto.digest_key(key)
    c2s, s2c = proto.session_keys(key, server_nonce, client_nonce, "vol")
    rx = proto.FrameMac(c2s, proto.PayloadDigest(keys, gmac=True))
    ping = hmac_ping[:proto.HEADER_SIZE]
    with pytest.raises(ProtocolError):   # the HMAC form's tag of the same PING
        proto.FrameMac(c2s, proto.PayloadDigest(keys, gmac=True)).check_header(
            ping, b"", hmac_ping[proto.HEADER_SIZE:])
    rx.check_header(ping, b"", ping_tag)
    proto.FrameMac(s2c, proto.PayloadDigest(keys, gmac=True)).check_header(
        proto.pack(Op.PING | REPLY, 1), b"", pong_tag)
    bulk = proto.pack(Op.WRITE, 2, 0, 32768, 32768) + bytes(32768)
    assert bulk_tag != digest_bulk
    m = rx.begin(32768)                  # in pieces, as the engine's receiver feeds it
    m.update(bulk[:10])
    m.update(bulk[10:])
    rx.check(m, bulk_tag)
    small = proto.pack(Op.WRITE, 3, 32768, 4096, 4096) + bytes(4096)
    bad = proto.FrameMac(c2s, proto.PayloadDigest(keys, gmac=True))
    bad.counter = 2
    with pytest.raises(ProtocolError):   # one changed payload bit fails
        bad.check_frame(small[:-1] + b"\x01", small_tag)
    rx.check_frame(memoryview(small), small_tag)


def test_direct_tags_examples_verify() -> None:
    """FORMAT.md's DIRECT_TAGS examples: the small WRITE of the same session tagged over its
    payload (one-call and streaming forms agree), which is not its GMAC_TAGS tag; a changed
    payload bit fails; and a READ reply of 512 bytes, received in pieces as the engine does."""
    blocks = hex_blocks()
    gmac_small, direct_small, read_tag = blocks[15], blocks[16], blocks[17]
    key, server_nonce, client_nonce = bytes(32), bytes(range(32)), bytes(range(32, 64))
    keys = proto.digest_key(key)
    c2s, s2c = proto.session_keys(key, server_nonce, client_nonce, "vol")

    def at(counter: int, k: bytes = c2s) -> proto.FrameMac:
        mac = proto.FrameMac(k, proto.PayloadDigest(keys, gmac=True), direct=True)
        mac.counter = counter
        return mac

    small = proto.pack(Op.WRITE, 3, 32768, 4096, 4096) + bytes(4096)
    head, payload = small[:proto.HEADER_SIZE], small[proto.HEADER_SIZE:]
    assert direct_small != gmac_small
    assert at(2).tag([head, payload]) == direct_small
    m = at(2).begin(4096)
    m.update(small[:5])
    m.update(small[5:])
    assert at(2).finish(m) == direct_small
    with pytest.raises(ProtocolError):
        at(2).check_frame(small[:-1] + b"\x01", direct_small)
    at(2).check_frame(memoryview(small), direct_small)
    reply = proto.pack(Op.READ | REPLY, 4, 0, 512, 512) + bytes(512)
    with open(DOC) as f:
        assert reply[:proto.HEADER_SIZE].hex() in f.read().replace(" ", "")
    rx = at(3, s2c)
    m = rx.begin(512)
    m.update(reply[:proto.HEADER_SIZE])
    m.update(reply[proto.HEADER_SIZE:])
    rx.check(m, read_tag)
    with pytest.raises(ValueError):     # direct tags only with GMAC tags
        proto.FrameMac(c2s, proto.PayloadDigest(keys), direct=True)


def test_message_examples() -> None:
    write, reply, failed = hex_blocks()[3:6]
    h = proto.unpack(write)
    assert (h.op, h.seq, h.offset, h.length, h.payload) == (Op.WRITE, 7, 8192, 4096, 4096)
    assert h.flags & FLAG_FUA and not h.is_reply
    r = proto.unpack(reply)
    assert r.op == Op.WRITE | REPLY and r.seq == 7 and r.status == 0 and r.is_reply
    f = proto.unpack(failed)
    assert (f.op, f.seq, f.length, f.status) == (Op.READ | REPLY, 9, 512, 5)
    assert proto.pack(Op.WRITE, 7, 8192, 4096, 4096, flags=FLAG_FUA) == write
    assert len(write) == proto.HEADER_SIZE == 28


def test_bad_magic_and_version_are_protocol_errors() -> None:
    good = proto.pack(Op.PING, 1)
    with pytest.raises(ProtocolError, match="magic"):
        proto.unpack(b"\x00\x00" + good[2:])
    with pytest.raises(ProtocolError, match="version"):
        proto.unpack(good[:2] + b"\x09" + good[3:])


def test_volume_meta_example_matches_create(tmp_path) -> None:
    from blockhorn.replica.store import Replica

    documented = json.loads(doc_blocks("json")[0])
    r = Replica.create(str(tmp_path / "r"), 67108864, "vol")
    r.close()
    with open(tmp_path / "r" / "volume.meta") as f:
        assert json.load(f) == documented
