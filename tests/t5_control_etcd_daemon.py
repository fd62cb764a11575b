"""Tier 5: the real daemon keeping its state in a real etcd (`daemon run --etcd URL`): a
volume made through the CLI lives in etcd, not in the home's SQLite file, and a daemon of
another home on the same etcd (another host, later) sees it, its settings and its removal."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid

import pytest
from daemon_util import Env
from support.daemon_proc import daemon

from blockhorn.cluster.etcd import Etcd

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd not installed (apt-get install etcd-server)")

def test_daemon_state_lives_in_etcd(etcd_url: str) -> None:
    prefix = f"/bh-daemon-{uuid.uuid4().hex[:12]}/"
    with Env() as a, Env() as b:
        with daemon(a, "--etcd", etcd_url, "--etcd-prefix", prefix, "--node", "hosta",
                    "--api-listen", "none"):   # 127.0.0.1:9443 may be another run's
            disk = os.path.join(a.root, "disk")
            os.makedirs(disk)
            a.cli("volume", "create", "ev", "--size", "16MiB", "--replicas", "1", "--disk", disk)
            a.cli("setting", "set", "replica-replenishment-wait-interval", "30")
            assert [v["name"] for v in a.ls()] == ["ev"]
            assert not os.path.exists(a.home.db)   # no SQLite state beside etcd
            with Etcd(etcd_url) as e:
                doc = json.loads(e.get(f"{prefix}volumes/ev").value)   # type: ignore[union-attr]
                assert doc["size"] == 16 << 20 and doc["replica_count"] == 1
                # As an expand that hostb's daemon ran and died in leaves it (capacity.py):
                # room promised for 32 MiB, released when hostb's daemon starts again.
                e.put(f"{prefix}volumes/ev", json.dumps({**doc, "expanding": 32 << 20,
                                                         "expanding_node": "hostb"}))
        # Another home (another host) on the same etcd: the same cluster state.
        with daemon(b, "--etcd", etcd_url, "--etcd-prefix", prefix, "--node", "hostb",
                    "--api-listen", "none"):
            assert [v["name"] for v in b.ls()] == ["ev"]
            with Etcd(etcd_url) as e:
                doc = json.loads(e.get(f"{prefix}volumes/ev").value)   # type: ignore[union-attr]
                assert (doc["expanding"], doc["expanding_node"]) == (None, None), doc
            with open(b.home.log("daemon.log")) as f:
                assert "expand that a previous daemon left unfinished" in f.read()
            got = json.loads(b.cli("setting", "get", "replica-replenishment-wait-interval",
                                   "--json").stdout)
            assert got["value"] == 30
            b.cli("volume", "rm", "ev")
            assert b.ls() == []
            with Etcd(etcd_url) as e:
                assert [kv.key for kv in e.get_prefix(f"{prefix}volumes/")] == []
                assert [kv.key for kv in e.get_prefix(f"{prefix}replicas/")] == []
            nodes = {n["name"]: n for n in json.loads(b.cli("node", "ls", "--json").stdout)}
            assert sorted(nodes) == ["hosta", "hostb"]    # a's node is known to b
            assert nodes["hostb"]["state"] == "up"


def test_daemon_with_unreachable_etcd_is_a_clear_error() -> None:
    with Env() as env:
        with socket.socket() as s:   # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        got = env.cli("daemon", "run", "--quiet", "--etcd", f"http://127.0.0.1:{port}",
                      check=False, timeout=60)
        assert got.returncode != 0 and "etcd is unreachable" in got.stderr
        assert "Traceback" not in got.stderr and not os.path.exists(env.home.db)
        bad = env.cli("daemon", "run", "--quiet", "--etcd", "localhost:2379", check=False)
        assert bad.returncode == 2 and "bad etcd URL" in bad.stderr
