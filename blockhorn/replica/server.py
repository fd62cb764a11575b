"""The replica server: one process serving one replica directory over the wire protocol.

trio owns the process: listening, the authenticated handshake (with a timeout), signals and
shutdown. After the handshake a connection's data loop runs in a thread of its own with a
blocking socket: receive what the socket has, execute every complete request in arrival order,
answer them all with one `sendmsg`. That batching is what makes a pipelined engine fast
(docs/FORMAT.md). The data loop is not a trio task on purpose: measured with 3 replicas, a
blocking loop cut 4 KiB write latency at QD1 by a quarter (fewer wake-ups per request). A lock
keeps the store single-threaded when several connections are open.

Hostile peers (docs/SECURITY.md): nothing a connection does ends the server. Unauthenticated
connections are capped and timed out; the handshake MAC is checked before any parsing; with
frame MACs every request's tag is checked before it executes; every request is validated
before it allocates; fencing is checked under the store lock before every request.

Connections of one engine replace each other: the engine's first request on a new connection
is `claim` (and a resync's `set_rebuilding` claims too); from then on every request of a
connection admitted before it is refused ESTALE under the store lock, and those connections
are shut down (docs/DURABILITY.md, "Stale requests of an old connection").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import signal
import socket as stdsocket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import trio

from blockhorn.config import ReplicaConfig, parse_address
from blockhorn.fsutil import data_extents, preadv_full, punch_hole
from blockhorn.keys import load_key
from blockhorn.replica import digest, proto, snapshots
from blockhorn.replica.copymap import CopyMap
from blockhorn.replica.fencing import Fenced, Fencing, Superseded
from blockhorn.replica.proto import FLAG_FUA, FLAG_MAY_TRIM, FLAG_VECTOR, HEADER_SIZE, REPLY, Op
from blockhorn.replica.store import VOLUME_META, Replica
from blockhorn.sockio import BUFFERS_PER_SEND, advance, as_views, recv_into_exact, sendmsg_all
from blockhorn.types import (
    MAX_REQUEST,
    AuthError,
    BlockhornError,
    InvalidArgument,
    NoSpace,
    NotFound,
    ProtocolError,
)

log = logging.getLogger("blockhorn.replica")

RECV_BUFFER = 4 << 20        # bytes; one receive buffer per connection
WAITALL_MIN = 64 << 10       # bytes; the rest of a frame at least this big: one receive
LOWAT_WAIT_MS = 1000         # TCP: wait this long for the rest of a frame, then block on it
HANDSHAKE_TIMEOUT_S = 5.0    # a peer that has not authenticated by then is dropped
MAX_HANDSHAKES = 32          # connections not yet authenticated; more are closed at once
MAX_CONNECTIONS = 64         # concurrent data connections (one thread each)
REFUSAL_LOG_S = 10.0         # at most one log line about refused handshakes this often
ACCEPT_BACKOFF_S = 0.1       # pause after EMFILE/ENFILE in accept (descriptors run out)
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass
class Session:
    """What the handshake established for one connection."""
    epoch: int                            # the owner's fencing epoch (0: none)
    rx: proto.FrameMac | None = None      # checks request tags (frame MACs on)
    tx: proto.FrameMac | None = None      # tags replies
    admitted: int = 0                     # the server's `claims` when it was admitted


class ReplicaServer:
    def __init__(self, replica: Replica, key: bytes, volume: str,
                 frame_auth: str = "auto") -> None:
        self.replica = replica
        self.key = key
        self.volume = volume
        self.frame_auth = frame_auth          # "auto" (TCP yes, unix no), "on", "off"
        proto.frame_mac_wanted(frame_auth, False)    # reject a bad setting at start
        self.lock = threading.Lock()          # the store is single-threaded
        self.threads = trio.CapacityLimiter(MAX_CONNECTIONS)
        self.connections = 0
        self.handshakes = 0                   # connections not yet authenticated
        self.refused = 0                      # refusals not logged yet (log_refusal)
        self.refusal_logged = -REFUSAL_LOG_S
        self.fencing = Fencing(replica.directory)   # owners' epochs (replica/fencing.py)
        # Engine claims so far: a connection admitted before the latest one is superseded.
        # `sessions` and `claims` change under `sessions_lock`; `claims` also only under the
        # store lock (a claim is a request), so `execute` reads it consistently there.
        self.claims = 0
        self.sessions: dict[stdsocket.socket, Session] = {}
        self.sessions_lock = threading.Lock()
        self.executing: Session | None = None   # the request's connection (store lock held)
        self.purge_state: dict[str, Any] = {"state": "idle"}
        # The session features this server takes (tests run a server of an older release
        # with fewer); FEATURE_PAYLOAD_DIGEST's keys, derived once.
        self.features = proto.KNOWN_FEATURES if proto.fast_gmac() else (
            proto.KNOWN_FEATURES & ~proto.GMAC_FEATURES)
        self.digest_keys = proto.digest_key(key)

    async def serve(self, listen: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        kind, where = parse_address(listen)
        if kind == "unix":
            path = str(where)
            remove_socket(path)
            sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
            await sock.bind(path)
            os.chmod(path, 0o600)
        else:
            family = stdsocket.AF_INET6 if ":" in kind else stdsocket.AF_INET
            sock = trio.socket.socket(family, stdsocket.SOCK_STREAM)
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
            await sock.bind((kind, where))
        sock.listen(64)
        log.info("replica %s of %s listening on %s", self.replica.directory, self.volume, listen)
        async with trio.open_nursery() as nursery:
            task_status.started(listen)
            while True:
                conn = await self.accept(sock)
                if self.handshakes >= MAX_HANDSHAKES:
                    # Unauthenticated peers cost a descriptor each: cap them, so a flood of
                    # idle connections cannot starve the engine (it retries on refusal).
                    log.debug("too many handshakes in progress: closing a new connection")
                    conn.close()
                    continue
                self.handshakes += 1
                nursery.start_soon(self.handle, conn)

    async def accept(self, sock: trio.socket.SocketType) -> trio.socket.SocketType:
        """The next connection. Out of descriptors (EMFILE/ENFILE) or memory, wait and retry:
        connections that end (handshake timeouts) free descriptors; dying would not."""
        while True:
            try:
                conn, _ = await sock.accept()
                return conn
            except OSError as e:
                if e.errno not in ACCEPT_CAPACITY_ERRNOS:
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                        continue    # that peer went away before we took it
                    raise
                log.warning("accept: %s; retrying in %.1f s", os.strerror(e.errno),
                            ACCEPT_BACKOFF_S)
                await trio.sleep(ACCEPT_BACKOFF_S)

    async def handle(self, sock: trio.socket.SocketType) -> None:
        """One connection from accept to close. Nothing raised here may end the server: an
        unexpected error is logged with its traceback and closes this connection only."""
        authenticated = False
        try:
            try:
                if sock.family != stdsocket.AF_UNIX:
                    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    session = await self.handshake(sock)
            except (BlockhornError, OSError, trio.TooSlowError) as e:
                # Readiness probes connect and hang up: not worth a warning. Refusals are,
                # but a stranger must not fill the disk with them: at most one line per
                # REFUSAL_LOG_S, counting the rest.
                if isinstance(e, AuthError):
                    self.log_refusal(e)
                else:
                    log.debug("handshake failed: %s", e)
                return
            finally:
                self.handshakes -= 1
            authenticated = True
            self.connections += 1
            await self.loop(sock, session)
        except (BlockhornError, OSError) as e:
            log.warning("connection closed: %s", e)
        except Exception:
            log.exception("connection closed after an unexpected error")
        finally:
            if authenticated:
                self.connections -= 1
            sock.close()

    def log_refusal(self, e: BlockhornError) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.refusal_logged >= REFUSAL_LOG_S:
            more = f" (and {self.refused - 1} more since the last report)" if self.refused > 1 \
                else ""
            log.warning("refused a handshake: %s%s", e, more)
            self.refusal_logged, self.refused = now, 0

    async def handshake(self, sock: trio.socket.SocketType) -> Session:
        """Authenticate the peer: its fencing epoch (0: none) and, when the session uses
        frame MACs, one `FrameMac` per direction."""
        server_nonce = secrets.token_bytes(proto.NONCE_SIZE)
        required = (proto.FEATURE_FRAME_MAC
                    if proto.frame_mac_wanted(self.frame_auth, sock.family == stdsocket.AF_UNIX)
                    else 0)
        await send_all(sock, [proto.pack_hello(server_nonce, required)])
        name_len, features = proto.AUTH_PREFIX.unpack(
            await recv_exact(sock, proto.AUTH_PREFIX.size))
        if name_len > proto.MAX_NAME:
            raise ProtocolError("volume name too long in handshake")
        body = await recv_exact(sock, proto.auth_size(name_len))
        try:
            client_nonce, name, epoch = proto.verify_auth_epoch(
                self.key, self.volume, server_nonce, body, required, features, self.features)
            await trio.to_thread.run_sync(self.fencing.admit, epoch)
        except BlockhornError as e:
            status = (proto.WELCOME_FENCED if isinstance(e, Fenced) else
                      proto.WELCOME_FEATURES if isinstance(e, proto.FeatureRefused) else
                      proto.WELCOME_REFUSED)
            await send_all(sock, [proto.pack_welcome(None, self.volume, server_nonce, b"",
                                                     status)])
            raise
        await send_all(sock, [proto.pack_welcome(self.key, name, server_nonce, client_nonce,
                                                 features=features)])
        if not features & proto.FEATURE_FRAME_MAC:
            return Session(epoch)
        rx, tx = proto.session_macs(
            features, proto.session_keys(self.key, server_nonce, client_nonce, name),
            self.digest_keys)
        return Session(epoch, rx, tx)

    async def loop(self, sock: trio.socket.SocketType, session: Session) -> None:
        """Hand the authenticated connection to a worker thread running `serve_blocking`;
        on cancellation (shutdown) the socket is shut down, which ends the thread, as does
        a newer owner's epoch (`Fencing`)."""
        conn = stdsocket.socket(sock.family, sock.type, fileno=sock.detach())
        conn.setblocking(True)
        self.fencing.register(conn, session.epoch)
        with self.sessions_lock:
            session.admitted = self.claims
            self.sessions[conn] = session
        try:
            # abandon_on_cancel: at shutdown the `finally` shuts the socket down, which ends
            # the thread (a blocked recv returns); waiting for it first would wait forever
            # on an engine that keeps its connection open.
            await trio.to_thread.run_sync(self.serve_blocking, conn, session,
                                          limiter=self.threads, abandon_on_cancel=True)
        finally:
            self.fencing.unregister(conn)
            with self.sessions_lock:
                self.sessions.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.shutdown(stdsocket.SHUT_RDWR)

    def serve_blocking(self, sock: stdsocket.socket, session: Session | None = None) -> None:
        """The data loop of one connection, in its own thread: receive what the socket has,
        execute every complete request in order, answer them all with one sendmsg. With frame
        MACs each request's tag is checked before it executes (a bad one ends the connection)
        and each reply is tagged. A request of a fenced owner, or on a connection superseded
        by a newer claim, is answered ESTALE and ends it."""
        session = session or Session(0, admitted=self.claims)
        rx, tx = session.rx, session.tx
        tag = proto.TAG_SIZE if rx is not None else 0
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        filled = 0
        partial = 0       # end of a frame whose header is in, its rest not (0: none)
        # TCP: wait for the rest of a large frame with SO_RCVLOWAT and poll (below).
        ready = select.poll() if sock.family != stdsocket.AF_UNIX else None
        if ready is not None:
            ready.register(sock, select.POLLIN)
        while True:
            if partial - filled >= WAITALL_MIN and ready is not None:
                # The rest of a large frame over TCP, which arrives in 64 KiB segments. A
                # blocking receive (even with MSG_WAITALL) is woken by the kernel for every
                # segment; poll with SO_RCVLOWAT at the bytes missing wakes once, when they
                # are all in (or earlier, when the receive window is full: then the loop
                # comes back here for the rest). Measured, 1 MiB writes to 3 replicas:
                # 200-300 us less CPU per request, engine (whose sends do the wake-ups on
                # loopback) and replicas alike (docs/SECURITY.md). Shutdown (server stop,
                # fencing) still ends the wait: poll reports it.
                sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVLOWAT, partial - filled)
                woken = ready.poll(LOWAT_WAIT_MS)
                sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVLOWAT, 1)
                # Not woken in time (a slow peer, or a kernel that does not wake a reader
                # whose receive window is full before SO_RCVLOWAT bytes are in): a blocking
                # receive, as without it.
                try:
                    n = sock.recv_into(view[filled:partial], partial - filled,
                                       stdsocket.MSG_DONTWAIT if woken else stdsocket.MSG_WAITALL)
                except BlockingIOError:
                    continue        # woken without data (should not happen): wait again
            elif partial - filled >= WAITALL_MIN:
                # Over a unix socket: one receive for all of it (a loop turn per piece cost
                # more than the MAC).
                n = sock.recv_into(view[filled:partial], partial - filled, stdsocket.MSG_WAITALL)
            else:
                n = sock.recv_into(view[filled:])
            if n == 0:
                return
            filled += n
            pos = partial = 0
            replies: list[Any] = []
            fenced = False
            while filled - pos >= HEADER_SIZE and not fenced:
                h = proto.unpack(buf, pos)
                end = pos + HEADER_SIZE + h.payload + tag
                if end <= filled:
                    frame = view[pos:end]
                    pos = end
                elif end - pos > len(buf):
                    # Larger than the buffer (payload <= MAX_PAYLOAD): receive it into its own.
                    big = bytearray(end - pos)
                    big[:filled - pos] = view[pos:filled]
                    recv_into_exact(sock, memoryview(big)[filled - pos:])
                    frame, pos = memoryview(big), filled
                else:
                    partial = end - pos     # where it ends once the buffer is compacted
                    break
                if rx is not None:
                    rx.check_frame(frame[:len(frame) - tag], frame[len(frame) - tag:])
                try:
                    reply = self.execute(h, frame[HEADER_SIZE:HEADER_SIZE + h.payload],
                                         session)
                except (Fenced, Superseded) as e:
                    log.warning("op %d refused: %s", h.op, e)
                    reply = [proto.pack(h.op | REPLY, h.seq, h.offset, h.length,
                                        status=e.errno)]
                    fenced = True
                if tx is not None:
                    reply.append(tx.tag_header(reply[0]) if len(reply) == 1 else tx.tag(reply))
                replies += reply
            if pos:
                buf[:filled - pos] = view[pos:filled]
                filled -= pos
            if replies:
                sendmsg_all(sock, replies)
            if fenced:
                return

    def execute(self, h: proto.Header, payload: memoryview,
                session: Session | None = None) -> list[Any]:
        """Run one request under the store lock; return the reply buffers (header first).
        Every failure is an error reply: a peer can end its own connection, never the server.
        The fencing checks sit under the store lock, so once a newer owner has been admitted
        no request of an older one executes, not even one already queued (raises `Fenced`),
        and once an engine has claimed the replica on a new connection, no request of a
        connection admitted before that executes (raises `Superseded`)."""
        session = session or Session(0, admitted=self.claims)
        epoch = session.epoch
        try:
            with self.lock:
                if 0 < epoch < self.fencing.highest:
                    raise Fenced(f"epoch {epoch} is fenced: epoch {self.fencing.highest} "
                                 "has connected")
                if session.admitted < self.claims:
                    raise Superseded("a newer connection has claimed this replica: requests "
                                     "of older connections are refused")
                self.executing = session
                try:
                    return self._execute(h, payload)
                finally:
                    self.executing = None
        except (Fenced, Superseded):
            raise
        except BlockhornError as e:
            log.warning("op %d at %d+%d failed: %s", h.op, h.offset, h.length, e)
            return [proto.pack(h.op | REPLY, h.seq, h.offset, h.length, status=e.errno)]
        except OSError as e:
            log.error("op %d at %d+%d: I/O error: %s", h.op, h.offset, h.length, e)
            return [proto.pack(h.op | REPLY, h.seq, h.offset, h.length,
                               status=e.errno or errno.EIO)]
        except Exception:
            log.exception("op %d at %d+%d: unexpected error", h.op, h.offset, h.length)
            return [proto.pack(h.op | REPLY, h.seq, h.offset, h.length, status=errno.EIO)]

    def claim(self) -> None:
        """The engine's connection that sent this request replaces every connection admitted
        before it (store lock held): their requests are refused from now on, even those
        already received, and they are shut down. Connections admitted later are not
        affected (an engine's further connections are opened after its claim)."""
        session = self.executing
        if session is None:
            return
        with self.sessions_lock:
            self.claims += 1
            session.admitted = self.claims
            older = [c for c, s in self.sessions.items() if s.admitted < self.claims]
        for conn in older:
            with contextlib.suppress(OSError):
                conn.shutdown(stdsocket.SHUT_RDWR)   # its data loop sees EOF and ends
        if older:
            log.info("claimed by a new connection: %d older ones shut down", len(older))

    def check_range(self, offset: int, length: int) -> None:
        """Before any allocation: a request may move at most MAX_REQUEST bytes, inside the
        volume (the header's u64 offset and u32 length are the peer's to choose)."""
        if length > MAX_REQUEST:
            raise InvalidArgument(f"request of {length} bytes exceeds {MAX_REQUEST}")
        if offset + length > self.replica.size:
            raise NoSpace(f"range {offset}+{length} is past the end ({self.replica.size})")

    def vector(self, payload: memoryview, total: int
               ) -> tuple[str, list[tuple[int, int]], memoryview]:
        """A vector request's layer, ranges and what follows them (FLAG_VECTOR: u16 name
        length, name, u32 count, count x (u64 offset, u32 length)); the ranges' lengths add
        up to the header's `length`, each inside the volume."""
        if len(payload) < 2:
            raise InvalidArgument("vector request without a layer name")
        name_len = int.from_bytes(payload[:2], "little")
        table = 6 + name_len
        if len(payload) < table:
            raise InvalidArgument("vector request shorter than its header")
        name = layer_name(payload[2:2 + name_len])
        count = int.from_bytes(payload[2 + name_len:table], "little")
        size = proto.VECTOR_RANGE.size
        if count > proto.MAX_VECTOR or len(payload) < table + count * size:
            raise InvalidArgument(f"vector request of {count} ranges is malformed")
        ranges = [proto.VECTOR_RANGE.unpack_from(payload, table + i * size)
                  for i in range(count)]
        if sum(n for _, n in ranges) != total:
            raise InvalidArgument("vector ranges do not add up to the request's length")
        self.check_range(0, total)
        for offset, length in ranges:
            self.check_range(offset, length)
        return name, ranges, payload[table + count * size:]

    def _execute(self, h: proto.Header, payload: memoryview) -> list[Any]:
        r = self.replica
        op = h.op
        if op == Op.WRITE:
            if h.length != len(payload):
                raise InvalidArgument(f"WRITE of {h.length} bytes carries {len(payload)}")
            self.check_range(h.offset, h.length)
            r.write(h.offset, payload, fua=bool(h.flags & FLAG_FUA))
        elif op == Op.READ_LAYER and h.flags & FLAG_VECTOR:
            name, ranges, _ = self.vector(payload, h.length)
            fd = snapshots.layer_fd(r, name)
            data = bytearray(h.length)
            at = 0
            for offset, length in ranges:
                preadv_full(fd, memoryview(data)[at:at + length], offset)
                at += length
            return [proto.pack(op | REPLY, h.seq, h.offset, h.length, len(data)), data]
        elif op == Op.WRITE_LAYER and h.flags & FLAG_VECTOR:
            name, ranges, rest = self.vector(payload, h.length)
            if len(rest) != h.length:
                raise InvalidArgument(f"vector WRITE_LAYER of {h.length} bytes carries "
                                      f"{len(rest)}")
            pieces, at = [], 0
            for offset, length in ranges:
                pieces.append((offset, rest[at:at + length]))
                at += length
            snapshots.write_layer_many(r, name, pieces)
        elif op in (Op.READ, Op.READ_LAYER):
            self.check_range(h.offset, h.length)
            fd = snapshots.layer_fd(r, layer_name(payload)) if op == Op.READ_LAYER else -1
            data = bytearray(h.length)
            if op == Op.READ:
                r.read_into(memoryview(data), h.offset)
            else:
                preadv_full(fd, memoryview(data), h.offset)
            return [proto.pack(op | REPLY, h.seq, h.offset, h.length, len(data)), data]
        elif op == Op.FLUSH:
            r.flush()
        elif op == Op.TRIM:
            self.check_range(h.offset, 0)
            r.trim(h.offset, h.length, fua=bool(h.flags & FLAG_FUA))
        elif op == Op.ZERO:
            self.check_range(h.offset, 0)
            r.zero(h.offset, h.length, may_trim=bool(h.flags & FLAG_MAY_TRIM),
                   fua=bool(h.flags & FLAG_FUA))
        elif op == Op.PING:
            pass
        elif op == Op.WRITE_LAYER:
            name_len = int.from_bytes(payload[:2], "little")
            if len(payload) < 2 or len(payload) < 2 + name_len:
                raise InvalidArgument("WRITE_LAYER payload shorter than its layer name")
            layer_data = payload[2 + name_len:]
            self.check_range(h.offset, len(layer_data))
            snapshots.write_layer(r, layer_name(payload[2:2 + name_len]), h.offset, layer_data)
        elif op in (Op.STAT, Op.CONTROL):
            request = proto.decode_json(payload) if op == Op.CONTROL else {"op": "stat"}
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise InvalidArgument('a CONTROL payload is a JSON object with a string "op"')
            body = proto.encode_json(self.control(request))
            return [proto.pack(op | REPLY, h.seq, payload=len(body)), body]
        else:
            raise InvalidArgument(f"unknown op {op}")
        return [proto.pack(op | REPLY, h.seq, h.offset, h.length)]

    def start_purge(self) -> None:
        """Fold removed snapshots in a thread of its own: the copy runs beside I/O (it only
        touches data no read can reach); the store lock is taken for the commits."""
        if self.purge_state.get("state") == "running":
            return
        self.purge_state = {"state": "running", "folded": []}

        def work() -> None:
            try:
                folded = snapshots.purge(self.replica, self.lock)
                self.purge_state = {"state": "done", "folded": folded}
            except (BlockhornError, OSError) as e:
                log.error("purge failed: %s", e)
                self.purge_state = {"state": "failed", "error": str(e)}

        threading.Thread(target=work, name="purge", daemon=True).start()

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        """One CONTROL op (a plain dispatch; `field` checks each argument's type first)."""
        r = self.replica
        op = req["op"]
        if op == "stat":
            return dict(r.stat(), connections=self.connections)
        if op == "extents":
            offset, length = field(req, "offset", int), field(req, "length", int)
            if offset + length > r.size:
                raise NoSpace(f"range {offset}+{length} is past the end ({r.size})")
            if req.get("layer"):     # one layer only (a rebuild copies layer by layer)
                fd = snapshots.layer_fd(r, field(req, "layer", str))
                return {"extents": [[s, e - s] for s, e in data_extents(fd, offset, length)]}
            return {"extents": r.extents(offset, length)}
        if op == "snapshots":
            return {"snapshots": snapshots.list_snapshots(r), "purge": self.purge_state}
        if op == "chain":
            return {"chain": snapshots.chain_metas(r), "head": r.head.name}
        if op == "digest":   # the scrub and a resumed rebuild: blockhorn/replica/digest.py
            offset, length = field(req, "offset", int), field(req, "length", int)
            chunk = field(req, "chunk", int, digest.CHUNK_SIZE)
            if req.get("layer"):
                fd = snapshots.layer_fd(r, field(req, "layer", str))
                return {"digests": digest.layer_digests(r, fd, offset, length, chunk)}
            return {"digests": digest.chunk_digests(r, offset, length, chunk)}
        if op == "changes_since":
            return {"ranges": r.changes.since(field(req, "revision", int))}
        if op == "punch_head":
            # An incremental resync makes a range of the target's head exactly the source's:
            # holes first (this op), then the source's head data (WRITE). Rebuild targets only.
            # Today's engine uses punch_layer; this stays for an engine of the previous
            # release still running beside replicas restarted on new code (until `volume
            # upgrade`), whose resync would otherwise fail.
            if not r.meta.get("Rebuilding"):
                raise BlockhornError("punch_head: only a replica being rebuilt", errno.EROFS)
            offset, length = field(req, "offset", int), field(req, "length", int)
            if offset % 4096 or length % 4096 or offset + length > r.size:
                raise InvalidArgument(f"punch_head: bad range {offset}+{length}")
            punch_hole(r.head.fd, offset, length)
            return {}
        if op == "punch_layer":     # a rebuild copy: snapshots.punch_layer
            layer = field(req, "layer", str)
            if "ranges" in req:     # a resync: many ranges in one request
                ranges = field(req, "ranges", list)
                if len(ranges) > 65536 or not all(
                        isinstance(x, list) and len(x) == 2
                        and all(isinstance(v, int) and v >= 0 for v in x) for x in ranges):
                    raise InvalidArgument('punch_layer: "ranges" must list [offset, length]')
                for offset, length in ranges:
                    snapshots.punch_layer(r, layer, offset, length)
            else:
                snapshots.punch_layer(r, layer, field(req, "offset", int),
                                      field(req, "length", int))
            return {}
        if op == "rebuild_cursor":
            # A full rebuild's progress, durable: every layer before `layer` and that layer
            # below `offset` were copied. A resumed rebuild compares digests below it and
            # copies the rest (engine/rebuild.py). Data first, then the cursor.
            layer, offset = field(req, "layer", int), field(req, "offset", int)
            if not r.meta.get("Rebuilding"):
                raise BlockhornError("rebuild_cursor: only a replica being rebuilt", errno.EROFS)
            snapshots.sync_layers(r)
            r.update_meta(RebuildCursor=[layer, offset])
            return {}
        if op == "claim":
            # The engine's first request on a new connection (engine.connect_replica).
            self.claim()
        elif op == "set_rebuilding":
            # `since`: an incremental resync from that revision, which leaves the content in
            # place (a restart may resume it); absent: a full rebuild, which empties it.
            # A resync's start claims too: nothing an older connection still holds may land
            # after it (also with an engine that does not send `claim`).
            since = field(req, "since", int) if req.get("since") is not None else None
            value = field(req, "value", bool)
            if value:
                self.claim()
            r.update_meta(Rebuilding=value, ResyncSince=since)
        elif op == "begin_copy":
            # A rebuild copy session starts: sent by the engine in the same order-locked step
            # that makes this replica WO, so it precedes every mutation the copy races with.
            if not r.meta.get("Rebuilding"):
                raise BlockhornError("begin_copy: only a replica being rebuilt", errno.EROFS)
            r.copy_dirty = CopyMap()
        elif op == "reset_chain":
            chain = field(req, "chain", list)
            if not all(isinstance(m, dict) and isinstance(m.get("Name"), str) for m in chain):
                raise InvalidArgument('reset_chain: "chain" must list layer metas with a Name')
            snapshots.reset_chain(r, chain)
        elif op == "finish_rebuild":
            # The copy is complete; Rebuilding is cleared only by the engine's join commit
            # (set_generation with clear_rebuilding), so a crash in between leaves it untrusted.
            revision = field(req, "revision", int)
            snapshots.sync_layers(r)
            r.copy_dirty = None
            r.set_revision(revision)
            if r.meta.get("RebuildCursor") is not None:
                r.update_meta(RebuildCursor=None)
            r.reload()
        elif op == "set_generation":
            members = field(req, "members", list)
            voters = field(req, "voters", list, [])
            if not all(isinstance(m, str) for m in members + voters):
                raise InvalidArgument('set_generation: "members" and "voters" must list '
                                      "replica names")
            r.set_generation(field(req, "generation", int), members,
                             field(req, "clear_rebuilding", bool, False),
                             field(req, "start", bool, False), voters)
        elif op == "adopt":
            r.adopt()
        elif op == "snapshot":
            labels = req.get("labels") or None
            if labels is not None and not (isinstance(labels, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
                raise InvalidArgument('snapshot: "labels" must map strings to strings')
            snapshots.create_snapshot(r, field(req, "name", str),
                                      field(req, "user_created", bool, True), labels)
        elif op == "snapshot_rm":
            snapshots.mark_removed(r, field(req, "name", str))
        elif op == "purge":
            self.start_purge()
        elif op == "expand":
            snapshots.expand(r, field(req, "size", int))
        elif op == "revert":
            # The engine's revert of a detached volume (engine/revert.py): a new empty head
            # on the snapshot, counted as a mutation (snapshots.revert). A purge folding
            # layers beside it would race the chain it replaces: EBUSY, nothing changed.
            if self.purge_state.get("state") == "running":
                raise BlockhornError("revert: a purge is running, try again when it ends",
                                     errno.EBUSY)
            snapshots.revert(r, field(req, "name", str))
        else:
            raise InvalidArgument(f"unknown control op {op!r}")
        return dict(r.stat(), connections=self.connections)


_MISSING: Any = object()


def field(req: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    """`req[key]`, checked to be a `kind` (an int: not a bool, not negative); a missing or
    mistyped field is EINVAL, not an exception deep in the store."""
    value = req.get(key, default)
    if value is _MISSING:
        raise InvalidArgument(f"control {req['op']}: field {key!r} is missing")
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidArgument(f"control {req['op']}: field {key!r} must be a "
                              f"{'non-negative int' if kind is int else kind.__name__}")
    return value


def layer_name(raw: bytes | memoryview) -> str:
    """A layer file name from the wire: printable ASCII without '/', at most 255 bytes."""
    name = bytes(raw)
    if not 0 < len(name) <= proto.MAX_NAME or not all(0x20 < c < 0x7f for c in name) \
            or b"/" in name:
        raise InvalidArgument(f"bad layer name {name[:64]!r}")
    return name.decode("ascii")


async def recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = await sock.recv_into(view)
        if got == 0:
            raise ProtocolError("peer closed the connection mid-message", errno.ECONNRESET)
        view = view[got:]
    return bytes(buf)


async def send_all(sock: trio.socket.SocketType, buffers: list[Any]) -> None:
    views = as_views(buffers)
    while views:
        advance(views, await sock.sendmsg(views[:BUFFERS_PER_SEND]))


def open_replica(cfg: ReplicaConfig) -> Replica:
    """Open the configured replica directory. A directory without its metadata is an error,
    never a reason to start empty: an empty replica that opens cleanly could otherwise be
    taken for a current one (its disk not mounted, a wrong path). Replicas are created by
    `volume create`, `replica create` or the daemon's replacement of a failed replica."""
    if not os.path.exists(os.path.join(cfg.directory, VOLUME_META)):
        raise NotFound(f"{cfg.directory} holds no replica ({VOLUME_META} is missing): is its "
                       "disk mounted? A new replica is made with `blockhorn replica create "
                       "--config FILE` (it starts empty and is rebuilt by the engine)")
    replica = Replica.open(cfg.directory)
    if replica.meta.get("Volume") and replica.meta["Volume"] != cfg.volume:
        replica.close()
        raise InvalidArgument(f"{cfg.directory} is a replica of volume "
                              f"{replica.meta['Volume']!r}, not of {cfg.volume!r}")
    if replica.size < cfg.size:
        # The volume was expanded while this replica was away: catch up.
        log.info("expanding %s from %d to %d bytes", cfg.directory, replica.size, cfg.size)
        snapshots.expand(replica, cfg.size)
    return replica


async def run(cfg: ReplicaConfig, server_class: type[ReplicaServer] = ReplicaServer) -> None:
    replica = open_replica(cfg)
    server = server_class(replica, load_key(cfg.key_file), cfg.volume, cfg.frame_auth)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, cfg.listen)
                notify_ready()
                async for signum in signals:
                    log.info("signal %d: closing replica", signum)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with server.lock:        # a data thread still executing finishes its request first
            replica.close()
        kind, where = parse_address(cfg.listen)
        if kind == "unix":
            remove_socket(str(where))


def remove_socket(path: str) -> None:
    """Remove a stale unix socket file (a fast local call; fine on the trio thread)."""
    if os.path.exists(path):
        os.unlink(path)


def notify_ready() -> None:
    """Tell systemd (Type=notify units) we serve; a no-op elsewhere."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", path)


def main(config_path: str, server_class: type[ReplicaServer] = ReplicaServer) -> int:
    """Run one replica server; `server_class` lets tests run a subclass with fault hooks
    (tests/support/faulty_replica.py) through the same start-up path."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = ReplicaConfig.load(config_path)
        trio.run(run, cfg, server_class)
    except BlockhornError as e:
        log.error("%s", e)
        return 1
    return 0
