"""Tier 1: the one `nbd-client` command line (blockhorn.nbd.attach.nbd_client_argv) that the
nbd frontend runs on the engine's unix socket and the real-kernel tier (t7_vm_nbd) runs in a
guest against the TCP+TLS endpoint; bad combinations are clear errors."""

from __future__ import annotations

import errno

import pytest

from blockhorn.nbd.attach import nbd_client_argv
from blockhorn.types import BlockhornError


def test_unix_socket_and_tcp_with_certificates() -> None:
    assert nbd_client_argv("/dev/nbd3", socket_path="/run/e.sock", nbd_client="nbd-client") == [
        "nbd-client", "-unix", "/run/e.sock", "/dev/nbd3", "-b", "4096", "-t", "180"]
    assert nbd_client_argv("/dev/nbd3", socket_path="/run/e.sock", nbd_client="nbd-client",
                           connections=2)[-2:] == ["-C", "2"]
    assert nbd_client_argv("/dev/nbd0", host="10.0.0.5", port=10809, cert_dir="/etc/bh",
                           tls_hostname="storage1", export="data", nbd_client="nbd-client") == [
        "nbd-client", "10.0.0.5", "10809", "/dev/nbd0", "-b", "4096", "-t", "180", "-N", "data",
        "-enable-tls", "-cacertfile", "/etc/bh/ca-cert.pem", "-certfile",
        "/etc/bh/client-cert.pem", "-keyfile", "/etc/bh/client-key.pem",
        "-tlshostname", "storage1"]


def test_bad_combinations_are_clear_errors() -> None:
    with pytest.raises(BlockhornError, match="unix socket or a host and port") as e:
        nbd_client_argv("/dev/nbd0", nbd_client="nbd-client")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(BlockhornError, match="needs TLS"):
        nbd_client_argv("/dev/nbd0", host="10.0.0.5", port=10809, nbd_client="nbd-client")
