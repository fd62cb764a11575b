"""Tier 4: malformed NBD requests against the engine, in the style of libnbd's and
qemu-iotests' error-server cases. libnbd with `set_strict_mode(0)` sends what a careful client
would not (past the end, oversized, flags the server did not advertise); a raw socket sends what
no library will (a write cut off mid-payload, a request beyond nbdkit's own limit, garbage).
Each gets the NBD error the spec names, and afterwards the engine still serves: the same
connection that was open from the start, every replica still RW, and a write/read round trip
whose checksum matches.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterator

import nbd
import pytest
from harness import Cluster

from blockhorn.types import MAX_REQUEST

MiB = 1 << 20
SIZE = 64 * MiB
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE = 0, 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path_factory.mktemp("malformed")), size=SIZE, replicas=2,
                transport="unix")
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def witness(cluster: Cluster) -> Iterator[tuple[nbd.NBD, bytes]]:
    """A well-behaved client connected for the whole module, and what it wrote at 8 MiB."""
    h = nbd.NBD()
    h.connect_unix(cluster.nbd_socket)
    data = os.urandom(MiB)
    h.pwrite(data, 8 * MiB, nbd.CMD_FLAG_FUA)
    yield h, data
    h.shutdown()


def loose(cluster: Cluster) -> nbd.NBD:
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_unix(cluster.nbd_socket)
    return h


def assert_still_serving(cluster: Cluster, witness: tuple[nbd.NBD, bytes]) -> None:
    assert cluster.engine is not None and cluster.engine.poll() is None
    assert set(cluster.modes().values()) == {"RW"}
    h, kept = witness
    assert bytes(h.pread(MiB, 8 * MiB)) == kept
    data = os.urandom(MiB + 4096)
    off = 20 * MiB + 512   # unaligned on purpose
    h.pwrite(data, off)
    h.flush()
    fresh = nbd.NBD()
    fresh.connect_unix(cluster.nbd_socket)
    got = bytes(fresh.pread(len(data), off))
    fresh.shutdown()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def expect(err: int, fn: Callable[[], object]) -> None:
    with pytest.raises(nbd.Error) as e:
        fn()
    assert e.value.errno == errno.errorcode[err], (e.value.string, errno.errorcode[err])


@pytest.mark.parametrize("case", [
    # Past the end: writes ENOSPC, reads and trims EINVAL (NBD spec, "Error values").
    ("read past the end", errno.EINVAL, lambda h: h.pread(4096, SIZE)),
    ("read across the end", errno.EINVAL, lambda h: h.pread(8192, SIZE - 4096)),
    ("read at 2^63", errno.EINVAL, lambda h: h.pread(4096, (1 << 63) - 4096)),
    ("write past the end", errno.ENOSPC, lambda h: h.pwrite(b"x" * 4096, SIZE)),
    ("write across the end", errno.ENOSPC, lambda h: h.pwrite(b"x" * 8192, SIZE - 4096)),
    ("zero past the end", errno.ENOSPC, lambda h: h.zero(4096, SIZE)),
    ("trim past the end", errno.EINVAL, lambda h: h.trim(4096, SIZE)),
    # Larger than the advertised maximum block size (32 MiB): EINVAL, and nothing reaches
    # the replicas (before the fix a 33 MiB write set every replica ERR).
    ("write 33 MiB", errno.EINVAL, lambda h: h.pwrite(bytes(33 * MiB), 0)),
    ("read 48 MiB", errno.EINVAL, lambda h: h.pread(48 * MiB, 0)),
    # Flags the server did not advertise or that do not belong to the command.
    ("fast zero", errno.ENOTSUP, lambda h: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
    ("unknown flag", errno.EINVAL, lambda h: h.pwrite(b"q" * 4096, 0, 1 << 7)),
    ("NO_HOLE on a write", errno.EINVAL, lambda h: h.pwrite(b"q" * 4096, 0,
                                                          nbd.CMD_FLAG_NO_HOLE)),
    ("cache, not advertised", errno.EINVAL, lambda h: h.cache(4096, 0)),
    ("empty read", errno.EINVAL, lambda h: h.pread(0, 0)),
    ("empty trim", errno.EINVAL, lambda h: h.trim(0, 0)),
], ids=lambda c: c[0])
def test_bad_request_answered(cluster: Cluster, witness: tuple[nbd.NBD, bytes],
                              case: tuple[str, int, Callable[[nbd.NBD], object]]) -> None:
    _, err, fn = case
    h = loose(cluster)
    expect(err, lambda: fn(h))
    # The connection that sent it stays usable too.
    assert bytes(h.pread(MiB, 8 * MiB)) == witness[1]
    h.shutdown()
    assert_still_serving(cluster, witness)


def test_advertised_limits(cluster: Cluster) -> None:
    h = nbd.NBD()
    h.connect_unix(cluster.nbd_socket)
    assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
            h.get_block_size(nbd.SIZE_MAXIMUM)) == (1, 4096, MAX_REQUEST)
    assert h.can_fast_zero() and not h.can_cache()
    # Exactly the maximum works (the NBD spec requires 32 MiB payloads to work).
    data = os.urandom(MAX_REQUEST)
    h.pwrite(data, SIZE - MAX_REQUEST)   # clear of the witness's 8 MiB
    got = h.pread(MAX_REQUEST, SIZE - MAX_REQUEST)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    h.shutdown()


# --- raw sockets: what no client library sends -------------------------------------------------

def raw_connect(cluster: Cluster) -> tuple[socket.socket, int]:
    """Fixed-newstyle handshake by hand (NBD_OPT_EXPORT_NAME, no zero padding)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(cluster.nbd_socket)
    hello = _recv(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))   # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))   # EXPORT_NAME ""
    size, _flags = struct.unpack(">QH", _recv(s, 10))
    return s, size


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length)


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_disconnect_mid_write_applies_nothing(cluster: Cluster,
                                              witness: tuple[nbd.NBD, bytes]) -> None:
    off = 30 * MiB
    before = bytes(witness[0].pread(MiB, off))
    s, size = raw_connect(cluster)
    assert size == SIZE
    s.sendall(request(NBD_CMD_WRITE, 1, off, MiB) + b"\xee" * 1000)
    s.close()
    # And a read whose reply is never collected.
    s, _ = raw_connect(cluster)
    s.sendall(request(NBD_CMD_READ, 2, 0, MAX_REQUEST))
    s.close()
    assert_still_serving(cluster, witness)
    assert bytes(witness[0].pread(MiB, off)) == before


def test_request_beyond_nbdkit_limit_and_garbage(cluster: Cluster,
                                                 witness: tuple[nbd.NBD, bytes]) -> None:
    # A 100 MiB write, larger than nbdkit accepts at all (64 MiB) and than the volume: nbdkit
    # reads and drops the payload, then answers with an error (libnbd refuses to send this).
    s, _ = raw_connect(cluster)
    s.sendall(request(NBD_CMD_WRITE, 3, 0, 100 * MiB) + bytes(100 * MiB))
    magic, err, handle = struct.unpack(">IIQ", _recv(s, 16))
    assert (magic, handle) == (NBD_SIMPLE_REPLY_MAGIC, 3)
    assert err in (errno.EINVAL, errno.ENOSPC)   # NBD error values are Linux's for these
    s.close()
    # A request with a wrong magic: the server hangs up.
    s, _ = raw_connect(cluster)
    s.sendall(b"\x00" * 28)
    assert closed_by_server(s)
    s.close()
    # A client that stops in the middle of the handshake.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cluster.nbd_socket)
    s.recv(18)
    s.sendall(b"\x00\x00")
    s.close()
    assert_still_serving(cluster, witness)
