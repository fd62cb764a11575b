"""The engine <-> replica wire protocol: a pure codec (no I/O). See docs/FORMAT.md.

Every message, request or reply, starts with the same 28-byte little-endian header:

    magic u16 | version u8 | op u8 | flags u16 | status u16 | seq u32 | offset u64
    | length u32 | payload u32

A request's `op` is one of `Op`; its reply carries `op | REPLY` and the same `seq`. Replies may
arrive in any order. `status` is 0 in requests and an errno in replies. `payload` bytes follow
the header (write data in a WRITE request, read data in a READ reply, JSON in STAT/CONTROL).

Before any message, a mutual HMAC-SHA256 handshake proves both sides hold the cluster key and
names the volume, so a stranger can neither read nor write replica data.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import struct
from typing import Any, NamedTuple

from blockhorn.types import MAX_REQUEST, AuthError, ProtocolError

MAGIC = 0xB10C
VERSION = 1
HEADER = struct.Struct("<HBBHHIQII")
HEADER_SIZE = HEADER.size  # 28
REPLY = 0x80
FLAG_FUA = 0x0001          # WRITE/ZERO: data durable (fdatasync) before the reply
FLAG_MAY_TRIM = 0x0002     # ZERO: the replica may punch a hole instead of writing zeros
MAX_PAYLOAD = MAX_REQUEST + 4096


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    TRIM = 4
    ZERO = 5
    PING = 6
    STAT = 7       # reply payload: JSON object describing the replica
    CONTROL = 8    # request and reply payload: JSON object {"op": ..., ...}
    READ_LAYER = 9   # request payload: layer file name; reply: data of that layer only
    WRITE_LAYER = 10  # payload: u16 name length | layer name | data (rebuild target only)


class Header(NamedTuple):
    op: int
    flags: int
    status: int
    seq: int
    offset: int
    length: int
    payload: int

    @property
    def is_reply(self) -> bool:
        return bool(self.op & REPLY)


def pack(op: int, seq: int, offset: int = 0, length: int = 0, payload: int = 0,
         flags: int = 0, status: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, flags, status, seq, offset, length, payload)


def unpack(buf: bytes | bytearray | memoryview, pos: int = 0) -> Header:
    magic, version, op, flags, status, seq, offset, length, payload = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x} (not a blockhorn replica peer?)")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if payload > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {payload} bytes exceeds the limit")
    return Header(op, flags, status, seq, offset, length, payload)


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def decode_json(buf: bytes | bytearray | memoryview) -> Any:
    try:
        return json.loads(bytes(buf))
    except ValueError as e:
        raise ProtocolError(f"bad JSON payload: {e}") from e


# --- handshake -------------------------------------------------------------------------------
# server -> client: HELLO   = b"BHRP" | version u16 | reserved u16 | server nonce (32)
# client -> server: AUTH    = name length u16 | volume name (UTF-8) | client nonce (32) | mac_c (32)
# server -> client: WELCOME = status u8 (0 ok, 1 refused) | mac_s (32, zero when refused)
# mac_c = HMAC-SHA256(key, b"client" | server nonce | client nonce | name)
# mac_s = HMAC-SHA256(key, b"server" | client nonce | server nonce | name)

HELLO = struct.Struct("<4sHH32s")
HELLO_MAGIC = b"BHRP"
NONCE_SIZE = 32
MAC_SIZE = 32
WELCOME_SIZE = 1 + MAC_SIZE
MAX_NAME = 255
EPOCH_SEP = "@"         # AUTH name `vol@<epoch>`: an owner's fencing epoch (volume names have no @)
WELCOME_REFUSED = 1     # wrong key or volume name
WELCOME_FENCED = 2      # the epoch is below the highest this replica has seen


def mac(key: bytes, role: bytes, first: bytes, second: bytes, name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return hmac.new(key, role + first + second + raw, hashlib.sha256).digest()


def pack_hello(server_nonce: bytes) -> bytes:
    return HELLO.pack(HELLO_MAGIC, VERSION, 0, server_nonce)


def unpack_hello(buf: bytes) -> bytes:
    magic, version, _reserved, nonce = HELLO.unpack(buf)
    if magic != HELLO_MAGIC:
        raise ProtocolError("peer is not a blockhorn replica (bad hello)")
    if version != VERSION:
        raise ProtocolError(f"replica speaks protocol version {version}, we speak {VERSION}")
    return bytes(nonce)


def pack_auth(key: bytes, volume: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    name = volume.encode()
    return (struct.pack("<H", len(name)) + name + client_nonce
            + mac(key, b"client", server_nonce, client_nonce, volume))


def auth_size(name_len: int) -> int:
    return name_len + NONCE_SIZE + MAC_SIZE


def verify_auth(key: bytes, volume: str, server_nonce: bytes, body: bytes) -> bytes:
    """Check the AUTH body (after the u16 name length); return the client nonce."""
    return verify_auth_epoch(key, volume, server_nonce, body)[0]


def handshake_name(volume: str, epoch: int) -> str:
    """The name an owner with fencing epoch `epoch` (> 0) sends: `vol@epoch`; 0: `vol`."""
    return f"{volume}{EPOCH_SEP}{epoch}" if epoch else volume


# A volume name is ASCII (types.check_name); an epoch is decimal ASCII digits without sign,
# leading zero or `_`, below 2^63 (etcd revisions are int64). `str.isdigit` is not enough:
# '²'.isdigit() is true and int('²') raises.
NAME_RE = re.compile(rb"([\x21-\x3f\x41-\x7e]{1,255})(?:@([1-9][0-9]{0,18}))?")
MAX_EPOCH = (1 << 63) - 1


def split_name(name: str | bytes) -> tuple[str, int]:
    """`vol@7` -> ("vol", 7); `vol` -> ("vol", 0). Strict: printable ASCII, one `@`."""
    raw = name.encode(errors="replace") if isinstance(name, str) else name
    m = NAME_RE.fullmatch(raw)
    if m is None or (m.group(2) is not None and int(m.group(2)) > MAX_EPOCH):
        raise ProtocolError(f"bad volume name or fencing epoch in handshake name {raw!r}")
    return m.group(1).decode("ascii"), int(m.group(2) or 0)


def verify_auth_epoch(key: bytes, volume: str, server_nonce: bytes,
                      body: bytes) -> tuple[bytes, str, int]:
    """Check the AUTH body; (client nonce, the name as sent, its fencing epoch or 0).

    The MAC is checked over the raw name bytes before anything parses them: a stranger's
    bytes never reach a parser (the name parser once crashed the listener on `vol@²`)."""
    name_len = len(body) - NONCE_SIZE - MAC_SIZE
    if name_len < 0:
        raise ProtocolError("short AUTH message")
    raw = bytes(body[:name_len])
    client_nonce = bytes(body[name_len:name_len + NONCE_SIZE])
    got = bytes(body[name_len + NONCE_SIZE:])
    if not hmac.compare_digest(got, mac(key, b"client", server_nonce, client_nonce, raw)):
        raise AuthError("handshake refused: wrong cluster key or volume name")
    try:
        base, epoch = split_name(raw)
    except ProtocolError:
        raise AuthError(f"handshake refused: bad name {raw!r}") from None
    if base != volume:
        raise AuthError("handshake refused: wrong cluster key or volume name")
    return client_nonce, raw.decode("ascii"), epoch


def pack_welcome(key: bytes | None, volume: str, server_nonce: bytes,
                 client_nonce: bytes, status: int = WELCOME_REFUSED) -> bytes:
    """`key` None: a refusal (`status` WELCOME_REFUSED or WELCOME_FENCED)."""
    if key is None:
        return bytes([status]) + bytes(MAC_SIZE)
    return b"\x00" + mac(key, b"server", client_nonce, server_nonce, volume)


def verify_welcome(key: bytes, volume: str, server_nonce: bytes, client_nonce: bytes,
                   buf: bytes) -> None:
    if buf[0] == WELCOME_FENCED:
        raise AuthError(f"replica refused {volume!r}: fenced, a newer owner of the volume "
                        "(higher epoch) has connected to it")
    if buf[0] != 0:
        raise AuthError(f"replica refused the handshake for volume {volume!r}: "
                        "wrong cluster key or volume name")
    if not hmac.compare_digest(buf[1:], mac(key, b"server", client_nonce, server_nonce, volume)):
        raise AuthError("replica failed to prove it holds the cluster key")
