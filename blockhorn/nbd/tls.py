"""The engine's NBD endpoint on TCP: TLS required, bound to one address.

The engine (nbdkit + the blockhorn plugin) listens on its unix socket only: the socket lives
in a 0700 directory of the home, so only root reaches it, and the local frontend (nbd-client,
nbdfuse) uses it in plain text at full speed. nbdkit cannot listen on a unix socket and a TCP
port at once (`-U` with `-p` is refused), and its TLS setting would apply to both anyway. So a
TCP endpoint is a second nbdkit in front of the unix socket — nbdkit's own `nbd` plugin, a
forwarding proxy, not a second engine — started with `--tls=require` (a client that does not
complete TLS gets no export at all) and `-i ADDRESS` (it listens on that address only).
Measured here (nbdcopy, 512 MiB, nbdkit memory plugin behind it): writes 1.7 s through the
proxy against 2.4 s for nbdkit's TLS directly on the port, reads 1.5 s against 1.4 s; TLS
itself (about 300 MB/s on this 2-core machine) is the cost, the extra hop is not. Through a
1-replica engine on a loaded machine: 85-120 MiB/s written over TLS, 240-510 over the socket.

Two kinds of credentials, as nbdkit offers them:
- `psk` (default): a pre-shared key per volume, `<home>/volumes/<vol>/nbd.psk` (0600, one line
  `blockhorn:<64 hex digits>`, psktool's format). libnbd (nbdsh, nbdcopy, nbdfuse, fio) and
  qemu speak TLS-PSK; the Linux `nbd-client` does not.
- `certificates`: an X.509 directory `<home>/tls/` with nbdkit's file names (`ca-cert.pem`,
  `server-cert.pem`, `server-key.pem`), and `--tls-verify-peer`: a client must present a
  certificate signed by that CA (`nbd-client -cacertfile -certfile -keyfile`), or it is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import stat
from typing import Any

from blockhorn.fsutil import atomic_write, atomic_write_json, read_json
from blockhorn.types import BlockhornError, InvalidArgument

TLS_MODES = ("psk", "certificates")
PSK_USER = "blockhorn"                 # the PSK identity clients name (nbds://blockhorn@...)
PSK_BYTES = 32                         # key length; psktool's default
DEFAULT_ADDRESS = "127.0.0.1"          # a TCP endpoint is local unless an address is asked for
CERT_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
PROXY_THREADS = 4                      # the proxy only forwards; the engine does the work
# The proxy's plugin (nbd/relay.py) forwards to the engine's unix socket and re-sends a
# request whose engine went away (died, or handing over in a live upgrade) on a new connection
# as soon as the next engine listens, for up to 60 s (fuse/holder.py RECONNECT_DEADLINE_S),
# so a client waits for the restarted engine instead of failing (docs/DURABILITY.md, "Which
# frontend survives what").
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")


def check_address(address: object) -> str:
    """An IP address (no host names: what nbdkit binds to must be exactly what was asked),
    in its normal form. 0.0.0.0 / :: are allowed when asked for explicitly."""
    try:
        return str(ipaddress.ip_address(address))   # type: ignore[arg-type]
    except ValueError:
        raise InvalidArgument(f"invalid NBD address {address!r}: use an IP address of this "
                              f"host, e.g. {DEFAULT_ADDRESS} (the default) or 10.0.0.5") from None


def check_mode(mode: object) -> str:
    if mode not in TLS_MODES:
        raise InvalidArgument(f"invalid TLS mode {mode!r}: use psk or certificates")
    return str(mode)


def check_bindable(address: str, port: int) -> None:
    """Fail with a clear message before any process starts when the port cannot be had."""
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BlockhornError(f"TCP port {port} on {address} is in use by another "
                                     "program: choose another --port", errno.EADDRINUSE) \
                    from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise InvalidArgument(f"{address} is not an address of this host: choose "
                                      "one it has (ip -brief address)") from None
            raise BlockhornError(f"cannot listen on {address}:{port}: {e.strerror}",
                                 e.errno) from None


def ensure_psk(path: str) -> str:
    """Create the volume's PSK file (0600) if missing; return its path."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        key = secrets.token_hex(PSK_BYTES)
        atomic_write(path, f"{PSK_USER}:{key}\n".encode(), mode=0o600)
    check_private(path)
    return path


def check_private(path: str) -> None:
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        raise BlockhornError(f"{path} is readable by others: chmod 600 {path}", errno.EACCES)


def check_certificates(directory: str) -> str:
    missing = [f for f in CERT_FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise BlockhornError(
            f"TLS certificates are missing in {directory}: {', '.join(missing)} (nbdkit's "
            "names; see nbdkit-tls(1), or use --tls psk)", errno.ENOENT)
    check_private(os.path.join(directory, "server-key.pem"))
    return directory


def proxy_argv(nbdkit: str, nbd_socket: str, address: str, port: int, psk_file: str = "",
               cert_dir: str = "") -> list[str]:
    """nbdkit forwarding TCP+TLS clients to the engine's unix socket, re-sending what the
    engine did not answer on a new connection (nbd/relay.py). The daemon runs it under a
    keeper of its own (manager/nbdproxy.py), not the engine's, so that it outlives an engine
    restart."""
    if bool(psk_file) == bool(cert_dir):
        raise InvalidArgument("a TCP NBD endpoint needs exactly one of a PSK file and a "
                              "certificate directory: TLS is not optional on TCP")
    listen = ["--tls=require", "-i", check_address(address), "--port", str(port)]
    if psk_file:
        listen.append(f"--tls-psk={os.path.abspath(psk_file)}")
    else:
        listen += [f"--tls-certificates={os.path.abspath(cert_dir)}", "--tls-verify-peer"]
    return relay_argv(nbdkit, nbd_socket, listen)


def relay_argv(nbdkit: str, nbd_socket: str, listen: list[str]) -> list[str]:
    """nbdkit with the relay plugin (nbd/relay.py) forwarding to the engine's unix socket,
    listening where `listen` says: the TCP+TLS endpoint (proxy_argv) or the `nbd` frontend's
    own unix socket (manager/nbdproxy.py LOCAL)."""
    return [nbdkit, "--foreground", "--exit-with-parent", "--threads", str(PROXY_THREADS),
            *listen, "python", RELAY, f"socket={os.path.abspath(nbd_socket)}"]


def endpoint(settings: dict[str, Any]) -> str:
    """The libnbd URI of a TCP endpoint (`nbdinfo`, `nbdcopy`, `nbdsh -u`, `nbdfuse`)."""
    host = settings["address"]
    if ":" in host:
        host = f"[{host}]"
    if settings["tls"] == "psk":
        return (f"nbds://{PSK_USER}@{host}:{settings['port']}/"
                f"?tls-psk-file={settings['psk_file']}")
    return f"nbds://{host}:{settings['port']}/"


# --- the TCP endpoint of one attachment, as the daemon keeps it ------------------------------

SETTINGS_FILE = "nbd-tcp.json"   # in the volume's config directory, while attached
PSK_FILE = "nbd.psk"             # in the volume's config directory, kept until the volume goes


def settings(volume_dir: str, tls_dir: str, port: object, address: object = None,
             mode: object = None) -> dict[str, Any] | None:
    """Validated settings of a TCP endpoint (None without a port):
    {address, port, tls, psk_file, certificates}."""
    if port is None:
        if address is not None or mode is not None:
            raise InvalidArgument("an NBD address or TLS mode needs a TCP port (--port)")
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(f"invalid TCP port {port!r}: use 1 to 65535")
    out: dict[str, Any] = {"address": check_address(address or DEFAULT_ADDRESS), "port": port,
                           "tls": check_mode(mode or "psk"), "psk_file": "", "certificates": ""}
    if out["tls"] == "psk":
        out["psk_file"] = os.path.join(volume_dir, PSK_FILE)
    else:
        out["certificates"] = check_certificates(tls_dir)
    return out


def save(volume_dir: str, data: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(volume_dir, SETTINGS_FILE), data, mode=0o600)


def load(volume_dir: str) -> dict[str, Any] | None:
    try:
        data = read_json(os.path.join(volume_dir, SETTINGS_FILE))
    except FileNotFoundError:
        return None
    return dict(data) if isinstance(data, dict) else None


def remove(volume_dir: str) -> None:
    try:
        os.unlink(os.path.join(volume_dir, SETTINGS_FILE))
    except FileNotFoundError:
        pass   # not attached over TCP: nothing to remove


def daemon_proxy_argv(data: dict[str, Any], nbdkit: str, nbd_socket: str) -> tuple[list[str], str]:
    """The proxy of an attached volume's endpoint (creating the PSK on first use), and the
    HOST:PORT address to wait on for readiness."""
    if data["tls"] == "psk":
        argv = proxy_argv(nbdkit, nbd_socket, data["address"], data["port"],
                          psk_file=ensure_psk(data["psk_file"]))
    else:
        argv = proxy_argv(nbdkit, nbd_socket, data["address"], data["port"],
                          cert_dir=data["certificates"])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(data["address"], data["address"])
    return argv, (f"[{host}]" if ":" in host else host) + f":{data['port']}"


def describe(data: dict[str, Any]) -> dict[str, Any]:
    """The endpoint as `volume show` reports it: the settings plus `uri` and `username`."""
    return dict(data, uri=endpoint(data), username=PSK_USER if data["tls"] == "psk" else None)
