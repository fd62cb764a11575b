"""systemd readiness notification (sd_notify) without a dependency.

With `Type=notify`, systemd sets `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) and
waits for a datagram `READY=1` before it considers the service started. Outside systemd the
variable is unset and `notify` does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to systemd; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]   # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False   # systemd went away; readiness is best effort outside a unit
    return True
