"""The etcd client against a real etcd (one member on 127.0.0.1), the failover definition and
the records copy, and the CLI's answers to bad input (no root needed)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from daemon_util import ROOT

from blockhorn.cluster import spec
from blockhorn.cluster.agent import Agent
from blockhorn.cluster.etcd import Etcd, EtcdUnavailable, LeaseNotFound, prefix_end
from blockhorn.sharemgr.ganesha import restore_records, snapshot_records
from blockhorn.types import InvalidArgument

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd not installed (apt-get install etcd-server)")

SPEC = {"size": "64MiB", "replicas": ["vol-r0=10.0.0.11:9500", "vol-r1=10.0.0.12:9500"],
        "nfs": {"clients": ["10.0.0.0/24", "10.0.1.5=ro"], "port": 2049,
                "service_address": "10.0.0.50/24", "interface": "eth0"}}


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


def test_definition_is_validated() -> None:
    d = spec.validate("vol", SPEC)
    assert d["size"] == 64 << 20 and d["min_rw"] == 1
    assert d["nfs"]["clients"][1] == {"cidr": "10.0.1.5/32", "access": "ro"}
    assert spec.validate("vol", d) == d   # stored form validates to itself
    bad = [({**SPEC, "replicas": ["vol-r0=unix:/x.sock"]}, "over TCP"),
           ({**SPEC, "nfs": {**SPEC["nfs"], "service_address": ""}}, "service_address"),
           ({**SPEC, "size": "12345"}, "multiple of 4096"),
           ({**SPEC, "min_rw": 3}, "min_rw"),
           ({**SPEC, "extra": 1}, "unknown keys"),
           ({**SPEC, "nfs": {**SPEC["nfs"], "colour": "red"}}, "nfs:")]
    for body, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            spec.validate("vol", body)


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


async def test_one_owner_at_a_time(etcd: Etcd, tmp_path: object) -> None:
    etcd.put(spec.spec_key("vol"), json.dumps(SPEC))
    a = Agent(etcd, "vol", "host-a", os.path.join(str(tmp_path), "a"), "/nonexistent")
    b = Agent(etcd, "vol", "host-b", os.path.join(str(tmp_path), "b"), "/nonexistent")
    for agent in (a, b):
        os.makedirs(agent.workdir)
    won = await a._contend()
    assert won is not None
    assert await b._contend() is None and b.status["owner"] == "host-a"
    etcd.revoke(won[0])   # A steps down (or its lease expires)
    assert await b._contend() is not None
    assert json.loads(etcd.get(spec.owner_key("vol")).value)["host"] == "host-b"


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockhorn", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_input_is_one_clear_line(etcd: Etcd, etcd_url: str, tmp_path: object) -> None:
    home = str(tmp_path)
    cases = [
        (("share", "agent", "vol", "--etcd", "http://127.0.0.1:9", "--host-id", "a"), 1,
         "etcd is unreachable"),
        (("share", "agent", "vol", "--etcd", etcd_url, "--host-id", "a"), 1,
         "volume 'vol' is not defined in etcd"),
        (("share", "agent", "vol", "--etcd", etcd_url, "--host-id", "Host_1"), 2,
         "invalid host name"),
        (("share", "agent", "vol", "--etcd", etcd_url, "--host-id", "a", "--ttl", "2"), 2,
         "--ttl 2"),
        (("share", "agent", "vol", "--etcd", "nope", "--host-id", "a"), 2, "bad etcd URL"),
        (("share", "owner", "vol", "--etcd", etcd_url), 1, "not defined"),
        (("share", "define", "vol", "--etcd", etcd_url, "--spec", "/nonexistent.json"), 2,
         "cannot read"),
    ]
    for argv, rc, message in cases:
        got = cli("--home", home, *argv)
        assert got.returncode == rc and message in got.stderr, (argv, got.stderr)
        assert "Traceback" not in got.stderr
    path = os.path.join(home, "spec.json")
    with open(path, "w") as f:
        json.dump(SPEC, f)
    got = cli("share", "define", "vol", "--etcd", etcd_url, "--spec", path)
    assert got.returncode == 0, got.stderr
    assert cli("share", "owner", "vol", "--etcd", etcd_url).stdout.strip() == "vol: no owner"
    got = cli("--home", home, "share", "agent", "vol", "--etcd", etcd_url, "--host-id", "a",
              "--key-file", "/nonexistent.key")
    assert got.returncode == 1 and "cluster key /nonexistent.key does not exist" in got.stderr
    # A second agent for the same volume and home is refused before it touches anything.
    key = os.path.join(home, "cluster.key")
    with open(key, "w") as f:
        f.write("00" * 32)
    os.makedirs(os.path.join(home, "agent", "vol"))
    with open(os.path.join(home, "agent", "vol", "agent.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        got = cli("--home", home, "share", "agent", "vol", "--etcd", etcd_url, "--host-id", "a")
    assert got.returncode == 1 and "another agent for 'vol' runs" in got.stderr, got.stderr
