"""The etcd client against a real etcd (one member on 127.0.0.1), and the copy of Ganesha's
client records that the etcd store keeps for a share (no root needed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

from blockhorn.cluster.etcd import Etcd, EtcdUnavailable, LeaseNotFound, prefix_end
from blockhorn.sharemgr.ganesha import restore_records, snapshot_records
from blockhorn.types import InvalidArgument

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd not installed (apt-get install etcd-server)")

@pytest.fixture
def etcd(etcd_url: str) -> Iterator[Etcd]:
    with Etcd(etcd_url) as e:
        e.delete("/", prefix=True)
        yield e


def test_keys_prefix_and_transactions(etcd: Etcd) -> None:
    rev = etcd.put("/t/a", "1")
    etcd.put("/t/b", b"\x00\xff")
    assert etcd.get("/t/a").value == b"1" and etcd.get("/t/a").mod_revision == rev
    assert [kv.key for kv in etcd.get_prefix("/t/")] == [b"/t/a", b"/t/b"]
    assert etcd.get("/t/b").value == b"\x00\xff"
    assert etcd.get("/t/none") is None
    won, kv = etcd.create("/t/owner", "me")
    assert won and kv is not None and kv.value == b"me"
    won, holder = etcd.create("/t/owner", "you")
    assert not won and holder is not None and holder.value == b"me"
    assert etcd.delete("/t/", prefix=True) == 3
    assert prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff") == b"\0"


def test_lease_binds_keys_and_ends(etcd: Etcd) -> None:
    lease, ttl = etcd.grant(5)
    assert ttl == 5
    assert etcd.create("/t/owner", "me", lease)[0]
    assert etcd.get("/t/owner").lease == lease
    assert 0 < etcd.keepalive(lease) <= 5
    etcd.revoke(lease)
    assert etcd.get("/t/owner") is None
    with pytest.raises(LeaseNotFound):
        etcd.keepalive(lease)
    etcd.revoke(lease)   # revoking an ended lease is not an error
    lease, _ = etcd.grant(2)
    etcd.put("/t/short", "x", lease)
    deadline = time.monotonic() + 10
    while etcd.get("/t/short") is not None:   # expiry deletes it, with no revoke
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_unreachable_etcd_is_a_clear_bounded_error(etcd_url: str) -> None:
    with socket.socket() as silent:   # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with Etcd(f"http://127.0.0.1:{port}", timeout=0.5) as e, \
                pytest.raises(EtcdUnavailable, match="unreachable"):
            e.get("/x")
        assert time.monotonic() - t0 < 3
        # Several endpoints: a dead one is skipped.
        with Etcd(f"http://127.0.0.1:{port},{etcd_url}", timeout=0.5) as e:
            e.put("/t/x", "1")
            assert e.endpoints[0] == etcd_url   # the one that answered goes first
    with pytest.raises(InvalidArgument, match="bad etcd URL"):
        Etcd("localhost:2379")


class ElectingProxy:
    """An HTTP proxy to a real etcd that answers the next `refuse` requests the way etcd's
    gateway does while its members elect a leader (gRPC UNAVAILABLE, "leader changed")."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        import httpx
        self.refuse, self.refused = 0, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.refuse > 0:
                    proxy.refuse -= 1
                    proxy.refused += 1
                    status, out = 503, json.dumps({"error": "etcdserver: leader changed",
                                                   "code": 14,
                                                   "message": "etcdserver: leader changed"})
                else:
                    r = httpx.post(upstream + self.path, content=body)
                    status, out = r.status_code, r.text
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_read_rides_out_a_leader_election_a_write_does_not(etcd: Etcd, etcd_url: str) -> None:
    """A member died and the others elect a leader: a read is tried again (a drain polling
    its move failed on one 'leader changed' when the dead target node was an etcd member:
    t5_cluster_drain); a write is not (it may have been applied: its caller decides)."""
    from blockhorn.cluster.etcd import EtcdError
    etcd.put("/t/e", "1")
    proxy = ElectingProxy(etcd_url)
    try:
        with Etcd(proxy.url) as e:
            proxy.refuse = 3
            t0 = time.monotonic()
            kv = e.get("/t/e")
            assert kv is not None and kv.value == b"1" and proxy.refused == 3
            assert time.monotonic() - t0 < 3
            proxy.refuse, proxy.refused = 1, 0
            with pytest.raises(EtcdError, match="leader changed"):
                e.put("/t/e", "2")
            assert proxy.refused == 1 and etcd.get("/t/e").value == b"1"
    finally:
        proxy.close()


def test_records_copy_round_trip(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "recovery")
    os.makedirs(os.path.join(root, "v4recov", "node0", "::ffff:10.0.0.3-(27:Libnfs pid:1 2)"))
    os.makedirs(os.path.join(root, "v4old", "node0"))
    with open(os.path.join(root, "v4recov", "file"), "wb") as f:
        f.write(b"\x00data")
    tree = snapshot_records(root)
    copy = os.path.join(str(tmp_path), "copy")
    restore_records(copy, json.loads(json.dumps(tree)))
    assert snapshot_records(copy) == tree
    restore_records(copy, {"dirs": ["../escaped"], "files": {"../../evil": ""}})
    assert not os.path.exists(os.path.join(str(tmp_path), "escaped"))
    assert snapshot_records(copy) == {"dirs": [], "files": {}}
