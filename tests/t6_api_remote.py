"""Tier 6: the REST API on TCP (`daemon run --api-listen IP:PORT`) with the real daemon: TLS
with the generated CA, the bearer token in `<home>/api.token` (0600), the CLI's `--api` /
`--ca-file` / BLOCKHORN_TOKEN; requests without the token, or with a wrong one, get 401 and
change nothing; plain HTTP gets no answer; the unix socket keeps working without a token."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat

import httpx
import pytest
from daemon_util import Env
from harness import free_port
from support.daemon_proc import daemon


def test_remote_api_needs_tls_and_the_token() -> None:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    with Env() as env, daemon(env, "--api-listen", f"127.0.0.1:{port}"):
        token_file = os.path.join(env.home.root, "api.token")
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = open(token_file).read().strip()
        assert len(token) >= 40
        ca = os.path.join(env.home.root, "api-tls", "ca-cert.pem")
        key = os.path.join(env.home.root, "api-tls", "server-key.pem")
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600

        def remote(*args: str, tok: str | None = token, ca_file: str | None = ca,
                   check: bool = True) -> object:
            e = dict(env.env)
            e.pop("BLOCKHORN_TOKEN", None)
            if tok is not None:
                e["BLOCKHORN_TOKEN"] = tok
            opts = ["--api", url] + (["--ca-file", ca_file] if ca_file else [])
            return env.cli(*opts, *args, env=e, check=check)

        remote("volume", "create", "rv", "--size", "16MiB", "--replicas", "1")
        listed = json.loads(remote("volume", "ls", "--json").stdout)   # type: ignore[attr-defined]
        assert [v["name"] for v in listed] == ["rv"]

        for tok in (None, "wrong-" + token[6:], ""):
            no = remote("volume", "create", "rx", "--size", "16MiB", "--replicas", "1",
                        tok=tok, check=False)
            assert no.returncode == 1 and "missing or wrong API token" in no.stderr  # type: ignore[attr-defined]
        untrusted = remote("volume", "ls", ca_file=None, check=False)   # system CAs: refused
        assert untrusted.returncode != 0 and "rv" not in untrusted.stdout  # type: ignore[attr-defined]

        with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=10) as h:
            r = h.post(f"{url}/v1/volumes", json={"name": "ry", "size": "16MiB", "replicas": 1})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "EACCES"
            assert h.get(f"{url}/v1/health").status_code == 401
            assert h.get(f"{url}/v1/health",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with httpx.Client(timeout=5) as h, pytest.raises(httpx.TransportError):
            h.get(f"http://127.0.0.1:{port}/v1/health")   # no TLS: no answer

        # Nothing of the refused requests happened; the local socket needs no token.
        assert [v["name"] for v in env.ls()] == ["rv"]
        env.cli("volume", "rm", "rv")


def test_api_port_in_use_is_a_clear_error() -> None:
    """The daemon binds the API's port before anything else: a port another process holds
    is an error at start naming it, and no daemon runs."""
    with Env() as env, socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        got = env.cli("daemon", "run", "--quiet", "--api-listen", f"127.0.0.1:{port}",
                      check=False, timeout=60)
        assert got.returncode != 0, got.stdout
        assert f"cannot serve the API on 127.0.0.1:{port}" in got.stderr, got.stderr
        assert "--api-listen none" in got.stderr and "Traceback" not in got.stderr
        assert not os.path.exists(env.home.socket)
        bad = env.cli("daemon", "run", "--quiet", "--api-listen", "localhost:9443",
                      check=False, timeout=60)
        assert bad.returncode == 2 and "invalid --api-listen" in bad.stderr, bad.stderr
