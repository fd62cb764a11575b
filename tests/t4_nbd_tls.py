"""Tier 4: `volume attach --port`: the NBD endpoint on TCP requires TLS and listens only on the
address asked for. Real clients: libnbd (the `nbd` module, as nbdsh uses it) and nbdcopy, with
TLS-PSK and with X.509 certificates (client certificate required); a plain client, a client
with the wrong key and one without a client certificate are refused. One daemon for the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator

import nbd
import psutil
import pytest
from daemon_util import Env, wait_until
from harness import free_port

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with Env() as e:
        e.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
        yield e


def tls_client(port: int, psk_file: str = "", cert_dir: str = "",
               host: str = "127.0.0.1") -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    if psk_file:
        h.set_tls_psk_file(psk_file)
        h.set_tls_username("blockhorn")
    else:
        h.set_tls_certificates(cert_dir)
    h.connect_tcp(host, str(port))
    return h


def _try(fn: Callable[[], nbd.NBD]) -> nbd.NBD | None:
    try:
        return fn()
    except nbd.Error:
        return None


def plain_refused(port: int) -> str:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    with pytest.raises(nbd.Error) as e:
        h.connect_tcp("127.0.0.1", str(port))
    return str(e.value)


def unix_read(env: Env, name: str) -> bytes:
    sock = env.show(name)["endpoint"].split("socket=", 1)[1]
    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        return bytes(h.pread(SIZE, 0))
    finally:
        h.shutdown()


def tls_proxy(port: int) -> psutil.Process:
    """The TLS proxy nbdkit listening on `port`."""
    for p in psutil.process_iter(["name", "cmdline"]):
        argv = p.info["cmdline"] or []
        if p.info["name"] == "nbdkit" and "--tls=require" in argv and str(port) in argv:
            return p
    raise AssertionError(f"no TLS proxy on port {port}")


def pause_through_kill(engine: psutil.Process, h: nbd.NBD, data: bytes) -> float:
    """kill -9 of the engine under connected client `h` (through a relay): seconds until
    the first read after it returned `data`, which the relay re-sent to the next engine; a
    write after it must go through too."""
    engine.kill()
    engine.wait(10)
    t0 = time.monotonic()
    assert hashlib.sha256(h.pread(len(data), 0)).digest() == hashlib.sha256(data).digest()
    pause = time.monotonic() - t0
    h.pwrite(data[:MiB], len(data) - MiB)
    h.flush()
    return pause


def test_tcp_endpoint_psk(env: Env) -> None:
    port = free_port()
    out = env.cli("volume", "attach", "v", "--frontend", "none", "--port", str(port)).stdout
    try:
        v = env.show("v")
        tcp = v["nbd_tcp"]
        assert tcp["address"] == "127.0.0.1" and tcp["port"] == port and tcp["tls"] == "psk"
        assert tcp["uri"] in out.splitlines() and tcp["uri"] in v["endpoints"]
        assert f"TCP (TLS):   {tcp['uri']}" in env.cli("volume", "show", "v").stdout
        psk = tcp["psk_file"]
        assert stat.S_IMODE(os.stat(psk).st_mode) == 0o600
        user, key = open(psk).read().strip().split(":")
        assert user == "blockhorn" and len(bytes.fromhex(key)) == 32

        # Writes and reads over TCP+TLS, compared with what the engine's unix socket reads.
        data = os.urandom(SIZE)
        h = tls_client(port, psk_file=psk)
        assert h.get_tls_negotiated()
        for off in range(0, SIZE, 4 * MiB):
            h.pwrite(data[off:off + 4 * MiB], off, nbd.CMD_FLAG_FUA if off else 0)
        h.flush()
        assert hashlib.sha256(h.pread(SIZE, 0)).digest() == hashlib.sha256(data).digest()
        h.shutdown()
        assert unix_read(env, "v") == data

        # nbdcopy with the URI `volume show` prints (a real tool, its own TLS setup).
        copy = os.path.join(env.root, "copy.img")
        subprocess.run(["nbdcopy", tcp["uri"], copy], check=True, timeout=60)
        assert hashlib.sha256(open(copy, "rb").read()).digest() == hashlib.sha256(data).digest()

        # Refused: no TLS, the wrong key, and any address other than the one asked for.
        assert "requires TLS" in plain_refused(port)
        wrong = os.path.join(env.root, "wrong.psk")
        with open(wrong, "w") as f:
            f.write(f"blockhorn:{os.urandom(32).hex()}\n")
        with pytest.raises(nbd.Error):
            tls_client(port, psk_file=wrong)
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.2", port))

        # Malformed requests through the proxy get the engine's answers (t4_nbd_malformed).
        h = tls_client(port, psk_file=psk)
        h.set_strict_mode(0)
        for flags, want in ((nbd.CMD_FLAG_FAST_ZERO, "ENOTSUP"), (1 << 7, "EINVAL")):
            with pytest.raises(nbd.Error) as e:
                h.zero(4096, 0, flags)
            assert e.value.errno == want
        # A write past the end: nbdkit 1.32 loses its place in a TLS stream while it skips
        # the payload (plain sockets get ENOSPC: t4_nbd_malformed), so this one connection
        # ends; every other client and the engine carry on.
        with pytest.raises(nbd.Error):
            h.pwrite(bytes(16 * MiB), SIZE - 4096)
        del h   # (the handle closes when it goes)

        # The proxy is a process of its own, not the engine keeper's child. It dies: the
        # supervisor starts it again and leaves the engine (and any device on its unix
        # socket) alone.
        keeper = psutil.Process(v["engine"]["pid"])
        engine = next(c for c in keeper.children() if "python" in c.cmdline())
        proxy = tls_proxy(port)
        assert proxy.pid not in (c.pid for c in keeper.children())
        proxy.kill()
        h = wait_until(lambda: _try(lambda: tls_client(port, psk_file=psk)), 20,
                       "the TLS proxy back")
        assert tls_proxy(port).pid != proxy.pid
        assert hashlib.sha256(h.pread(SIZE, 0)).digest() == hashlib.sha256(data).digest()
        assert engine.is_running() and env.show("v")["engine"]["restarts"] == 0

        # The engine dies under a connected client: the proxy stays, its relay re-sends
        # the requests to the engine the daemon restarts on the same socket, and the client
        # sees a pause, no error; what was acknowledged reads back.
        proxy = tls_proxy(port)
        pause = pause_through_kill(engine, h, data)
        assert env.show("v")["engine"]["restarts"] == 1 and proxy.is_running()
        # The daemon dies: the proxy (own session) serves on; the next daemon adopts it.
        env.kill_daemon(signal.SIGKILL)
        assert bytes(h.pread(MiB, SIZE - MiB)) == data[:MiB]
        h.shutdown()
        assert env.show("v")["state"] == "attached" and tls_proxy(port).pid == proxy.pid
        assert unix_read(env, "v") == data[:SIZE - MiB] + data[:MiB]
        print(f"\nTLS client through an engine kill -9: first read after {pause:.2f} s")
    finally:
        env.cli("volume", "detach", "v")
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    assert env.show("v")["nbd_tcp"] is None
    # The key survives the detach: clients keep their configuration across attaches.
    assert open(psk).read().strip() == f"{user}:{key}"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_certs(d: str, name: str, ca: str = "") -> str:
    """A CA in `d` (unless `ca` names one) plus a certificate `name` signed by it (EC keys:
    generated in milliseconds). Returns the CA directory."""
    os.makedirs(d, exist_ok=True)
    ca = ca or d
    if not os.path.exists(os.path.join(ca, "ca-cert.pem")):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-days", "2", "-subj", "/CN=blockhorn test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-keyout", os.path.join(ca, "ca-key.pem"), "-out", os.path.join(ca, "ca-cert.pem"))
    key, csr = os.path.join(d, f"{name}-key.pem"), os.path.join(d, f"{name}.csr")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        usage = "serverAuth" if name == "server" else "clientAuth"
        f.write(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    _openssl("x509", "-req", "-in", csr, "-CA", os.path.join(ca, "ca-cert.pem"),
             "-CAkey", os.path.join(ca, "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-extfile", ext, "-out", os.path.join(d, f"{name}-cert.pem"))
    os.chmod(key, 0o600)
    if ca != d:
        os.link(os.path.join(ca, "ca-cert.pem"), os.path.join(d, "ca-cert.pem"))
    return ca


def test_tcp_endpoint_certificates(env: Env) -> None:
    """Certificates (what nbd-client speaks): the server presents one, and a client must
    present one signed by the same CA."""
    server = os.path.join(env.home.root, "tls")
    make_certs(server, "server")
    good = os.path.join(env.root, "client")
    make_certs(good, "client", ca=server)
    # A client that trusts the server but whose certificate another CA signed.
    other = os.path.join(env.root, "other")
    make_certs(other, "client")
    shutil.copy(os.path.join(server, "ca-cert.pem"), os.path.join(other, "ca-cert.pem"))
    nocert = os.path.join(env.root, "nocert")
    os.makedirs(nocert)
    os.link(os.path.join(server, "ca-cert.pem"), os.path.join(nocert, "ca-cert.pem"))

    port = free_port()
    env.cli("volume", "attach", "v", "--frontend", "none", "--port", str(port),
            "--tls", "certificates")
    try:
        tcp = env.show("v")["nbd_tcp"]
        assert tcp["tls"] == "certificates" and tcp["psk_file"] == ""
        data = os.urandom(MiB)
        h = tls_client(port, cert_dir=good)
        h.pwrite(data, 5 * MiB)
        h.flush()
        assert bytes(h.pread(MiB, 5 * MiB)) == data
        # An online expand: the proxy's relay asks the engine again for a client's next
        # connection (a connection learns the size at its handshake).
        size = h.get_size()
        h.shutdown()
        env.cli("volume", "expand", "v", "--size", str(size + 4 * MiB))
        h = tls_client(port, cert_dir=good)
        assert h.get_size() == size + 4 * MiB
        h.pwrite(data, size + 3 * MiB)
        assert bytes(h.pread(MiB, size + 3 * MiB)) == data
        h.shutdown()
        assert unix_read(env, "v")[5 * MiB:6 * MiB] == data
        for bad in (other, nocert):
            with pytest.raises(nbd.Error) as e:
                tls_client(port, cert_dir=bad)
            assert "gnutls_record_" in str(e.value)   # the server hung up on it
        assert "requires TLS" in plain_refused(port)
    finally:
        env.cli("volume", "detach", "v")


def test_tcp_endpoint_bad_requests(env: Env) -> None:
    """Wrong --port/--address/--tls combinations: a clear error, nothing started."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        cases = [
            (["--port", str(port)], "in use by another program"),
            (["--port", "70000"], "invalid TCP port"),
            (["--port", str(free_port()), "--address", "example.com"], "invalid NBD address"),
            (["--port", str(free_port()), "--address", "192.0.2.1"],
             "not an address of this host"),
            (["--address", "127.0.0.1"], "go with --port"),
            (["--port", str(free_port()), "--frontend", "fuse"], "serves no NBD"),
        ]
        for args, needle in cases:
            argv = ["volume", "attach", "v", *args]
            if "--frontend" not in args:
                argv += ["--frontend", "none"]
            p = env.cli(*argv, check=False)
            assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr, \
                (args, p.stderr)
            assert env.show("v")["state"] == "detached"
    # The process entry point (systemd units) has no plain-text TCP either.
    p = env.cli("engine", "serve", "--config", os.path.join(env.root, "none.json"), "--socket",
                os.path.join(env.root, "none.sock"), "--port", str(free_port()), check=False)
    assert p.returncode == 2 and "TLS is not optional" in p.stderr, p.stderr
    # Certificates asked for where there are none (a fresh home has no <home>/tls).
    moved = os.path.join(env.root, "tls-away")
    tls_dir = os.path.join(env.home.root, "tls")
    if os.path.exists(tls_dir):
        os.rename(tls_dir, moved)
    try:
        p = env.cli("volume", "attach", "v", "--frontend", "none", "--port", str(free_port()),
                    "--tls", "certificates", check=False)
        assert p.returncode == 1 and "ca-cert.pem" in p.stderr, p.stderr
    finally:
        if os.path.exists(moved):
            os.rename(moved, tls_dir)
    assert json.loads(env.cli("volume", "show", "v", "--json").stdout)["state"] == "detached"
