"""One pipelined connection from the engine to one replica, driven by plain threads.

Why threads and not trio here: nbdkit calls the engine from its own worker threads. A hop into
an event loop and back per request costs about as much as the request itself; a blocking
`sendmsg` under a lock plus one receiver thread per replica that completes requests by sequence
number costs two syscalls. Many requests are in flight on the connection at once; the receiver
parses every complete reply in one `recv_into` (batching) and copies read data straight into
the caller's buffer.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import secrets
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from blockhorn.config import ReplicaRef, parse_address
from blockhorn.replica import proto
from blockhorn.replica.proto import HEADER_SIZE, REPLY, Op
from blockhorn.sockio import BUFFERS_PER_SEND, recv_exact, sendmsg_all
from blockhorn.types import BlockhornError, ProtocolError

log = logging.getLogger("blockhorn.engine")

RECV_BUFFER = 1 << 20        # bytes
SOCKET_BUFFER = 4 << 20      # bytes; SO_SNDBUF/SO_RCVBUF so 1 MiB writes rarely block
CONNECT_TIMEOUT_S = 5.0


class Call:
    """A request fanned out to `expected` replicas; the caller waits on `wait()`.

    Completion is counted with `itertools.count` (atomic under the GIL) and signalled by
    releasing a lock that was taken at creation: the cheapest wake-up CPython offers. A caller
    that cannot block (an event loop) passes `on_done` instead, called once by the thread that
    completes the call (it must be quick and must not raise)."""

    __slots__ = ("expected", "results", "_done", "_lock", "dest", "on_done", "digest")

    def __init__(self, expected: int, dest: memoryview | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        self.expected = expected
        self.on_done = on_done
        self.results: dict[str, int] = {}     # replica name -> status (0 ok, else errno)
        self._done = itertools.count(1)
        self._lock = threading.Lock()
        self._lock.acquire()
        self.dest = dest                      # READ: where the reply data goes
        # (payload, GMAC form, its digest) once a client computed it (FEATURE_PAYLOAD_DIGEST):
        # the other replicas' clients with the same digest form (FEATURE_GMAC_TAGS or not)
        # reuse it for the same payload object. Two clients racing both compute it, the same
        # value: harmless.
        self.digest: tuple[Any, bool, bytes] | None = None

    def complete(self, name: str, status: int) -> None:
        if name in self.results:
            return
        self.results[name] = status
        if next(self._done) == self.expected:
            self._lock.release()
            if self.on_done is not None:
                self.on_done()

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)


class ReplicaClient:
    """Connection to one replica. `submit` sends; replies complete `Call`s by sequence number.
    When the connection breaks, every pending call completes with an error and `on_lost` runs."""

    def __init__(self, ref: ReplicaRef, key: bytes, volume: str,
                 on_lost: Callable[[ReplicaClient, str], None] | None = None,
                 send_timeout: float = 8.0, receiver: Receiver | None = None) -> None:
        self.ref = ref
        self.send_timeout = max(1.0, send_timeout)
        self.name = ref.name
        self.key = key
        self.volume = volume
        self.on_lost = on_lost
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()      # held by the one thread sending (see pump)
        # (buffers to send, their call)
        self.queue: collections.deque[tuple[list[Any], Call]] = collections.deque()
        self.pending: dict[int, tuple[Call, bytearray | None]] = {}
        self._seq = itertools.count(1)
        self.closed = False
        self.receiver = receiver or Receiver()
        self.error = ""
        # The session features this client offers beyond frame MACs; a replica of an older
        # release refuses what it does not know (WELCOME 3) and the client connects again
        # offering less: first without FEATURE_DIRECT_TAGS, then without GMAC_TAGS, then
        # without PAYLOAD_DIGEST too.
        self.offer = proto.FEATURE_PAYLOAD_DIGEST | (
            proto.GMAC_FEATURES if proto.fast_gmac() else 0)
        # Frame MACs (proto.FrameMac), when the handshake turned them on: `tx` tags requests
        # in send order (under send_lock), `rx` checks replies (receiver thread only).
        self.tx: proto.FrameMac | None = None
        self.rx: proto.FrameMac | None = None
        self._mac: Any = None               # the MAC of the reply being received
        self._tag = bytearray(proto.TAG_SIZE)
        self._tag_have = 0
        # Reply parser state (only the receiver thread touches it).
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._scratch = memoryview(bytearray(65536))
        self._filled = self._pos = 0
        self._cur: tuple[Call | None, int] | None = None    # reply whose payload is arriving
        self._cur_dest: memoryview | None = None
        self._left = 0

    # --- connection --------------------------------------------------------------------------

    def connect(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        while True:
            try:
                self._connect(timeout)
                return
            except proto.FeatureRefused:
                if not self.offer:
                    raise
            # A replica of an older release (mid-upgrade): again, offering one feature less.
            # Frame MACs stay as negotiated; only the tag's form differs.
            drop = next(f for f in (proto.FEATURE_DIRECT_TAGS, proto.FEATURE_GMAC_TAGS,
                                    proto.FEATURE_PAYLOAD_DIGEST) if self.offer & f)
            log.info("replica %s does not take feature 0x%04x: connecting without",
                     self.name, drop)
            self.offer &= ~drop

    def _connect(self, timeout: float) -> None:
        kind, where = parse_address(self.ref.address)
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = where
        else:
            family = socket.AF_INET6 if ":" in kind else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            target = (kind, where)
        try:
            sock.settimeout(timeout)
            sock.connect(target)
            if kind != "unix":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self._handshake(sock)
            sock.settimeout(None)
            # A replica that stops reading must not block senders forever: bounded sends.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(self.send_timeout), 0))
        except OSError as e:
            sock.close()
            raise BlockhornError(f"replica {self.name} at {self.ref.address}: {e.strerror or e}",
                                 e.errno or errno.EIO) from None
        except BlockhornError:
            sock.close()
            raise
        self.sock = sock
        self.receiver.add(self)

    def _handshake(self, sock: socket.socket) -> None:
        """Authenticate both ways; with frame MACs (TCP by default: `ReplicaRef.frame_auth`,
        or when the replica requires them) derive the per-direction session keys."""
        server_nonce, required = proto.unpack_hello(recv_exact(sock, proto.HELLO.size))
        wanted = proto.frame_mac_wanted(self.ref.frame_auth, sock.family == socket.AF_UNIX)
        features = required | (proto.FEATURE_FRAME_MAC if wanted else 0)
        if features & proto.FEATURE_FRAME_MAC:
            features |= self.offer
        client_nonce = secrets.token_bytes(proto.NONCE_SIZE)
        sock.sendall(proto.pack_auth(self.key, self.volume, server_nonce, client_nonce,
                                     required, features))
        proto.verify_welcome(self.key, self.volume, server_nonce, client_nonce,
                             recv_exact(sock, proto.WELCOME_SIZE), features)
        if features & proto.FEATURE_FRAME_MAC:
            self.tx, self.rx = proto.session_macs(
                features, proto.session_keys(self.key, server_nonce, client_nonce, self.volume),
                proto.digest_key(self.key))

    def close(self, reason: str = "closed") -> None:
        """Drop the connection; pending calls fail with EIO. Safe to call more than once."""
        early = self.sock
        if early is not None and (reason != "closed" or self.pending):
            # A sender may hold send_lock blocked in sendmsg: the peer stopped reading (its
            # node died, its link is down) and the socket buffer is full. It would hold it up
            # to send_timeout per partial send, and every call pending here (writes among
            # them) with it: a shutdown wakes it at once (EPIPE). (A drain's target killed
            # mid-copy kept the volume's writes waiting 14 s longer: t5_cluster_drain.)
            with contextlib.suppress(OSError):
                early.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                early.shutdown(socket.SHUT_RDWR)
        with self.send_lock:
            if self.closed:
                return
            self.closed = True
            self.error = reason
            sock, self.sock = self.sock, None
            self.queue.clear()
        if sock is not None:
            self.receiver.remove(sock.fileno())
            if reason != "closed" or self.pending:
                # Given up on (ERR, timeout): close with a reset, which drops what the kernel
                # has not sent yet. An ordinary close keeps retransmitting it, and a replica
                # cut off by its link would receive those requests when the link returns,
                # after its resync, and apply stale writes over newer data
                # (tests/t5_fault_link_cut.py found it).
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected
            sock.close()
        self._fail_pending(errno.EIO)

    def _fail_pending(self, status: int) -> None:
        while self.pending:
            try:
                _, (call, _) = self.pending.popitem()
            except KeyError:
                break
            call.complete(self.name, status)

    # --- requests ----------------------------------------------------------------------------

    def enqueue(self, call: Call, op: int, offset: int = 0, length: int = 0,
                data: Any = None, flags: int = 0, reply_buf: bytearray | None = None) -> None:
        """Queue one request that completes `call` (no system call: cheap under a lock).
        `pump` sends it. `data` must stay valid until the call completes."""
        seq = next(self._seq)
        payload = len(data) if data is not None else 0
        self.pending[seq] = (call, reply_buf)
        if self.closed:
            # Closed before or while registering: _fail_pending may already have run.
            self.pending.pop(seq, None)
            call.complete(self.name, errno.EIO)
            return
        header = proto.pack(op, seq, offset, length, payload, flags)
        self.queue.append(([header] if data is None else [header, data], call))

    def pump(self) -> None:
        """Send everything queued. Flat combining: whoever holds `send_lock` sends the whole
        queue in one `sendmsg`; a thread that finds the lock taken leaves its request to the
        holder, which looks at the queue again after releasing. Under load one syscall carries
        many requests; never raises (a failed send drops the connection, failing its calls)."""
        queue = self.queue
        while queue:
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                buffers: list[Any] = []
                tx = self.tx
                while queue and len(buffers) < BUFFERS_PER_SEND:
                    item, call = queue.popleft()
                    if tx is not None:       # tags follow the send order: under send_lock
                        if len(item) == 1:
                            item.append(tx.tag_header(item[0]))
                        elif tx.digest is not None and len(item[1]) and not (
                                tx.direct and len(item[1]) < proto.BULK_MIN):
                            item.append(tx.tag_header(item[0], self._digest(item, call, tx)))
                        else:
                            item.append(tx.tag(item))
                    buffers += item
                if self.sock is None:
                    raise OSError(errno.EIO, self.error or "not connected")
                total = sum(len(b) for b in buffers)
                sent = self.sock.sendmsg(buffers)
                if sent != total:           # socket buffer full: send the rest
                    sendmsg_all(self.sock, buffers, sent)
            except OSError as e:
                self.send_lock.release()
                self._lost(f"send failed: {e}")
                self._fail_pending(errno.EIO)   # also calls queued after the connection closed
                return
            self.send_lock.release()

    @staticmethod
    def _digest(item: list[Any], call: Call, tx: proto.FrameMac) -> bytes:
        """The payload digest of a request [header, payload] (FEATURE_PAYLOAD_DIGEST on),
        computed once per call and payload: a write goes to every replica with the same
        payload object."""
        got, gmac = call.digest, tx.digest.gmac  # type: ignore[union-attr]  # caller checked
        if got is not None and got[0] is item[1] and got[1] == gmac:
            return got[2]
        d = tx.digest.of((item[1],), len(item[1]))  # type: ignore[union-attr]
        call.digest = (item[1], gmac, d)
        return d

    def submit(self, call: Call, op: int, offset: int = 0, length: int = 0,
               data: Any = None, flags: int = 0, reply_buf: bytearray | None = None) -> None:
        """Queue and send one request that completes `call`. Never raises."""
        self.enqueue(call, op, offset, length, data, flags, reply_buf)
        self.pump()

    def _lost(self, reason: str) -> None:
        if not self.closed:
            log.warning("replica %s lost: %s", self.name, reason)
            self.close(reason)
            if self.on_lost:
                self.on_lost(self, reason)

    def request(self, op: int, offset: int = 0, length: int = 0, data: Any = None,
                flags: int = 0, timeout: float = 30.0) -> bytearray:
        """Blocking single request (control path): returns the reply payload."""
        reply = bytearray()
        call = Call(1)
        self.submit(call, op, offset, length, data, flags, reply_buf=reply)
        if not call.wait(timeout):
            self._lost("control request timed out")
            raise BlockhornError(f"replica {self.name} did not answer", errno.ETIMEDOUT)
        status = call.results[self.name]
        if status:
            raise BlockhornError(f"replica {self.name}: {os.strerror(status)}", status)
        return reply

    def control(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        body = proto.encode_json(req)
        result: dict[str, Any] = proto.decode_json(
            self.request(Op.CONTROL, data=body, timeout=timeout))
        return result

    def claim(self, timeout: float = 10.0) -> dict[str, Any]:
        """The engine's first request on a new connection: the replica refuses, from now on,
        every request of the connections it admitted before (an old connection may still
        hold a write the replica received but did not execute: docs/DURABILITY.md, "Stale
        requests of an old connection"). Returns its stat. A replica older than `claim`
        (mid-upgrade) answers EINVAL: then a plain STAT."""
        try:
            return self.control({"op": "claim"}, timeout=timeout)
        except BlockhornError as e:
            if e.errno != errno.EINVAL:
                raise
            return self.stat(timeout)

    def stat(self, timeout: float = 10.0) -> dict[str, Any]:
        result: dict[str, Any] = proto.decode_json(self.request(Op.STAT, timeout=timeout))
        return result

    # --- receiving -------------------------------------------------------------------------

    def on_readable(self) -> None:
        """Called by the `Receiver` thread when the socket has data: parse every complete
        reply (batching), copy read data into the waiting caller's buffer, complete calls."""
        sock = self.sock
        if sock is None:
            return
        try:
            if self._cur is not None and self._pos == self._filled and self._left >= 65536:
                # A large payload with nothing buffered: receive straight into its buffer.
                dest = self._cur_dest
                into = (dest[len(dest) - self._left:] if dest is not None
                        else self._scratch[:min(self._left, len(self._scratch))])
                n = sock.recv_into(into, 0, socket.MSG_DONTWAIT)
                if n == 0:
                    raise ProtocolError("replica closed the connection")
                if self._mac is not None:
                    self._mac.update(into[:n])
                self._left -= n
                if self._left == 0 and self._mac is None:
                    self._finish()      # (with a MAC, its tag follows: `_parse` takes it)
                return
            n = sock.recv_into(self._view[self._filled:], 0, socket.MSG_DONTWAIT)
            if n == 0:
                raise ProtocolError("replica closed the connection")
            self._filled += n
            self._parse()
        except BlockingIOError:
            return
        except (OSError, BlockhornError) as e:
            self._lost(str(e))
        except Exception as e:     # a bug must cost this connection, not the receiver thread
            log.exception("replica %s: unexpected error receiving", self.name)
            self._lost(f"unexpected error: {e!r}")

    def _parse(self) -> None:
        view, filled = self._view, self._filled
        pos = self._pos
        while True:
            if self._cur is not None:
                take = min(self._left, filled - pos)
                if take:
                    chunk = view[pos:pos + take]
                    dest = self._cur_dest
                    if dest is not None:
                        at = len(dest) - self._left
                        dest[at:at + take] = chunk
                    if self._mac is not None:
                        self._mac.update(chunk)
                    pos += take
                    self._left -= take
                if self._left:
                    break
                if self._mac is not None:       # the reply's tag follows its payload
                    take = min(proto.TAG_SIZE - self._tag_have, filled - pos)
                    self._tag[self._tag_have:self._tag_have + take] = view[pos:pos + take]
                    self._tag_have += take
                    pos += take
                    if self._tag_have < proto.TAG_SIZE:
                        break
                self._finish()
            elif filled - pos >= HEADER_SIZE:
                h = proto.unpack(view, pos)
                if not h.op & REPLY:
                    raise ProtocolError(f"expected a reply, got op {h.op}")
                if not h.payload and (self.rx is None or filled - pos >= HEADER_SIZE
                                      + proto.TAG_SIZE):
                    # A bare reply (every write's acknowledgement) with its tag at hand: the
                    # whole reply in one step, without the streaming state below.
                    end = pos + HEADER_SIZE
                    entry = self.pending.pop(h.seq, None)
                    if self.rx is not None:
                        try:
                            self.rx.check_header(view[pos:end], b"",
                                                 view[end:end + proto.TAG_SIZE])
                        except ProtocolError:
                            if entry is not None:
                                entry[0].complete(self.name, errno.EIO)
                            raise
                        end += proto.TAG_SIZE
                    pos = end
                    if entry is not None:
                        entry[0].complete(self.name, h.status)
                    continue
                if self.rx is not None:
                    self._mac = self.rx.begin(h.payload)
                    self._mac.update(view[pos:pos + HEADER_SIZE])
                    self._tag_have = 0
                pos += HEADER_SIZE
                entry = self.pending.pop(h.seq, None)
                self._cur = (entry[0] if entry else None, h.status)
                self._left = h.payload
                self._cur_dest = None
                if entry is not None and h.payload:
                    call, reply_buf = entry
                    if call.dest is not None:
                        if h.payload > len(call.dest):
                            call.complete(self.name, errno.EIO)
                            raise ProtocolError(f"reply of {h.payload} bytes to a read of "
                                                f"{len(call.dest)}")
                        self._cur_dest = call.dest[:h.payload]
                    elif reply_buf is not None:
                        reply_buf[:] = bytes(h.payload)
                        self._cur_dest = memoryview(reply_buf)
            else:
                break
        if pos == filled:
            self._pos = self._filled = 0
        elif filled > len(view) // 2:
            view[:filled - pos] = view[pos:filled]      # keep room to receive into
            self._pos, self._filled = 0, filled - pos
        else:
            self._pos = pos

    def _finish(self) -> None:
        """The current reply is complete: check its tag (frame MACs), complete its call. A
        bad tag fails the call and raises, which drops the connection (replica lost)."""
        call, status = self._cur  # type: ignore[misc]
        self._cur = None
        self._cur_dest = None
        m, self._mac = self._mac, None
        if m is not None and self.rx is not None:
            try:
                self.rx.check(m, self._tag)
            except ProtocolError:
                if call is not None:
                    call.complete(self.name, errno.EIO)
                raise
        if call is not None:
            call.complete(self.name, status)


class Receiver:
    """One thread receiving the replies of every replica connection of an engine (epoll).
    One thread instead of one per replica: fewer wake-ups and less GIL contention.

    An event loop in the same process can take the receiving over (`hand_over`): it waits
    for the epoll descriptor to be readable and calls `poll_once`, so replies complete calls
    in the loop's own thread, with no thread switch at all; `take_back` gives it back."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.clients: dict[int, ReplicaClient] = {}
        self.lock = threading.Lock()
        self._own = threading.Event()        # set: the thread receives
        self._own.set()
        self._parked = threading.Event()     # set: the thread waits for `_own`
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self._wake_r, select.EPOLLIN)
        self.thread = threading.Thread(target=self._loop, name="receiver", daemon=True)
        self.thread.start()

    def add(self, client: ReplicaClient) -> None:
        assert client.sock is not None
        fd = client.sock.fileno()
        with self.lock:
            self.clients[fd] = client
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def remove(self, fd: int) -> None:
        with self.lock:
            if self.clients.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)

    def hand_over(self) -> None:
        """From now on the caller receives (`poll_once`); returns once the thread is idle."""
        self._parked.clear()
        self._own.clear()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._parked.wait()

    def take_back(self) -> None:
        self._own.set()

    def poll_once(self) -> None:
        """Handle every reply that has arrived, without waiting (after `hand_over`)."""
        self._dispatch(self.epoll.poll(0))

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            if fd == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                continue
            client = self.clients.get(fd)
            if client is not None:
                client.on_readable()

    def _loop(self) -> None:
        while True:
            if not self._own.is_set():
                self._parked.set()
                self._own.wait()
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # epoll closed
            if self._own.is_set():
                self._dispatch(events)

    def close(self) -> None:
        self._own.set()
        self.epoll.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
