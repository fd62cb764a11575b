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
