"""The REST API on TCP (`daemon run --api-listen IP:PORT`): TLS plus a bearer token.

The unix socket stays as it is (0600: root on this host, no token). On TCP:
- TLS always (hypercorn's `bind` with a certificate; the unix socket is its `insecure_bind`).
  The certificate is the home's own when there is one (`<home>/tls/server-cert.pem` and
  `server-key.pem`, as the NBD TCP endpoints use), else one generated on first use under
  `<home>/api-tls/`: a CA (`ca-cert.pem`, the file clients verify with, `--ca-file`) and a
  server certificate it signed for the listen address, 127.0.0.1 and localhost.
- every request carries `Authorization: Bearer <token>`; the token is `<home>/api.token`
  (0600, made on first use, 256 random bits). Anything else gets 401 before any handler runs,
  so an unauthenticated request changes nothing.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import ssl
from typing import Any

from blockhorn.fsutil import atomic_write
from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError, InvalidArgument

TOKEN_FILE = "api.token"
PEER_CONNECT_TIMEOUT_S = 5.0         # seconds to reach another node's API
DEFAULT_PORT = 9443                   # a cluster node's TCP API unless --api-listen says
TOKEN_BYTES = 32                      # 256 bits of randomness
CERT_DAYS = 3650                      # validity of a generated CA and server certificate
Scope = dict[str, Any]


def listen_address(api_listen: str | None, cluster: bool, address: str) -> str | None:
    """What `daemon run --api-listen` asks for: IP:PORT, or None for the unix socket only.
    A cluster node serves it by default on its own address (DEFAULT_PORT): peers forward
    engine requests to the node that runs the engine (manager/forward.py)."""
    if api_listen is None:
        return bind_text(address, DEFAULT_PORT) if cluster else None
    return None if api_listen.strip().lower() == "none" else api_listen


def parse_listen(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` -> (ip, port); host names are refused (bind what was asked)."""
    host, sep, port = text.rpartition(":")
    try:
        ip = str(ipaddress.ip_address(host.strip("[]")))
        number = int(port)
    except ValueError:
        raise InvalidArgument(f"invalid --api-listen {text!r}: use IP:PORT, e.g. "
                              "10.0.0.5:9443 or [::1]:9443") from None
    if not sep or not 0 < number < 65536:
        raise InvalidArgument(f"invalid --api-listen {text!r}: the port is 1-65535")
    return ip, number


def listen_socket(ip: str, port: int) -> socket.socket:
    """The API's TCP socket, bound here so that a port in use or an address this host lacks
    is a clear error (hypercorn is given it as fd://N)."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((ip, port))
    except OSError as e:
        sock.close()
        hint = ("another process holds it" if e.errno == errno.EADDRINUSE else
                "it is not an address of this host" if e.errno == errno.EADDRNOTAVAIL else
                e.strerror)
        raise BlockhornError(f"cannot serve the API on {bind_text(ip, port)}: {e.strerror} "
                             f"({hint}): choose another with --api-listen IP:PORT, or "
                             "--api-listen none", e.errno or errno.EINVAL) from None
    return sock


def bind_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def ensure_token(home: Home) -> str:
    path = os.path.join(home.root, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass   # first use: made below
    token = secrets.token_urlsafe(TOKEN_BYTES)
    atomic_write(path, (token + "\n").encode(), 0o600)
    return token


def ensure_certificate(home: Home, ip: str) -> tuple[str, str, str | None]:
    """(server certificate, key, CA file or None) for the TCP API."""
    own = os.path.join(home.root, "tls")
    cert, key = os.path.join(own, "server-cert.pem"), os.path.join(own, "server-key.pem")
    if os.path.exists(cert) and os.path.exists(key):
        ca = os.path.join(own, "ca-cert.pem")
        return cert, key, ca if os.path.exists(ca) else None
    gen = os.path.join(home.root, "api-tls")
    cert, key, ca = (os.path.join(gen, n) for n in ("server-cert.pem", "server-key.pem",
                                                    "ca-cert.pem"))
    meta = os.path.join(gen, "names.json")
    names = sorted({ip, "127.0.0.1", "localhost"})
    try:
        with open(meta) as f:
            if json.load(f) == names and os.path.exists(cert) and os.path.exists(key):
                return cert, key, ca
    except (FileNotFoundError, ValueError):
        pass   # none yet, or for other addresses: (re)generate
    os.makedirs(gen, mode=0o700, exist_ok=True)
    ca_pem, cert_pem, key_pem = _generate(names)
    atomic_write(ca, ca_pem, 0o644)
    atomic_write(key, key_pem, 0o600)
    atomic_write(cert, cert_pem, 0o644)
    atomic_write(meta, json.dumps(names).encode(), 0o644)
    return cert, key, ca


def _generate(names: list[str]) -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate it signs for `names` (IP addresses or DNS names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockhorn API CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockhorn API")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem


def cluster_token(key: bytes) -> str:
    """The token every node of a cluster accepts besides its own: derived from the cluster
    key (which every node holds, control/store shared_key), so peers can forward requests
    to each other (manager/forward.py) without sharing another secret."""
    return hmac.new(key, b"blockhorn cluster API token v1", hashlib.sha256).hexdigest()


def ca_pem(cert: str, ca: str | None) -> str:
    """The PEM peers verify this node's API certificate with: its CA's, or the certificate
    itself when there is no CA file (a self-signed one)."""
    with open(ca or cert) as f:
        return f.read()


class BearerAuth:
    """ASGI middleware: requests that came over TLS (the TCP listener) need the token (or,
    on a cluster, the cluster's token: `also`)."""

    def __init__(self, app: Any, token: str, also: str | None = None) -> None:
        self.app = app
        self.expected = [f"Bearer {t}".encode() for t in (token, also) if t]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("scheme") == "https":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            # Every candidate is compared (no early exit on the first match).
            if not [hmac.compare_digest(given, e) for e in self.expected].count(True):
                await _refuse(send, "missing or wrong API token: set BLOCKHORN_TOKEN to the "
                                    f"contents of the daemon's <home>/{TOKEN_FILE}")
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, message: str) -> None:
    body = json.dumps({"error": {"code": "EACCES", "errno": errno.EACCES, "message": message}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="blockhorn"'),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Peer:
    """Another node's API (its URL and CA in its node record), with the cluster token `token`
    (`cluster_token`); what it is asked it serves itself, never passing it on
    (manager/forward.py FORWARDED_HEADER). Errors are BlockhornErrors naming `where` (default
    "node N"): EHOSTDOWN when it has no endpoint or does not answer, else (`request`) the
    peer's own message and errno."""

    def __init__(self, store: Any, node: str, token: str, timeout_s: float,
                 connect_s: float = PEER_CONNECT_TIMEOUT_S, where: str = "") -> None:
        import httpx

        from blockhorn.manager.forward import FORWARDED_HEADER
        self.node = node
        self.where = where or f"node {node}"
        row = store.node(node)
        if not row.api or not row.api_ca:
            raise BlockhornError(f"{self.where}, which has no API endpoint to forward this "
                                 "request to: it runs with --api-listen none (or an older "
                                 "version)", errno.EHOSTDOWN)
        self.api = row.api
        self.http = httpx.Client(
            base_url=row.api.rstrip("/"), verify=ssl.create_default_context(cadata=row.api_ca),
            timeout=httpx.Timeout(timeout_s, connect=connect_s),
            headers={"Authorization": f"Bearer {token}", FORWARDED_HEADER.decode(): "1"})

    def send(self, method: str, path: str, **kw: Any) -> Any:
        """The response (httpx.Response), whatever its status."""
        import httpx
        try:
            return self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise BlockhornError(f"{self.where}, whose API at {self.api} does not answer: {e}",
                                 errno.EHOSTDOWN) from None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """The response (httpx.Response) of a request answered 2xx."""
        r = self.send(method, path, **kw)
        if not 200 <= r.status_code < 300:
            try:
                err = r.json()["error"]
                message, code = str(err["message"]), int(err["errno"])
            except (ValueError, KeyError, TypeError):
                message, code = f"HTTP {r.status_code}", errno.EIO
            raise BlockhornError(f"node {self.node}: {message}", code)
        return r

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
