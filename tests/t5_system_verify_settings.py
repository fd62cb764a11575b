"""Whole system: `volume verify` and `setting ...` through the real CLI and daemon, with data
written and read by a real NBD client (libnbd)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import nbd
import pytest
from daemon_util import Env

MiB = 1 << 20
NAMES = {"replica-replenishment-wait-interval": 600, "engine-replica-timeout": 8,
         "replica-rebuilding-bandwidth-limit": 0,
         "concurrent-replica-rebuild-per-node-limit": 5, "volume-verify-bandwidth-limit": 0,
         "replica-soft-anti-affinity": False, "replica-zone-soft-anti-affinity": True,
         "storage-over-provisioning-percentage": 100,
         "storage-minimal-available-percentage": 25, "default-data-locality": "best-effort",
         "engine-commit-quorum": "auto"}


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def engine_timeout(env: Env, vol: str) -> float:
    with open(env.home.engine_config(vol)) as f:
        return float(json.load(f)["timeout_s"])


def test_settings_through_the_cli(env: Env) -> None:
    listed = json.loads(env.cli("setting", "ls", "--json").stdout)
    assert {s["name"]: s["value"] for s in listed} == NAMES
    assert all(s["is_default"] and s["description"] for s in listed)
    assert "engine-replica-timeout" in env.cli("setting", "ls").stdout
    assert env.cli("setting", "get", "engine-replica-timeout").stdout.strip() == "8"

    # Bad input: one clear line, usage errors exit 2, an unknown name exits 1; nothing stored.
    for args, rc, words in [
            (("set", "no-such-setting", "1"), 1, "unknown setting 'no-such-setting'"),
            (("get", "no-such-setting"), 1, "known settings: concurrent-replica"),
            (("set", "engine-replica-timeout", "abc"), 2, "a whole number from 8 to 30 s"),
            (("set", "engine-replica-timeout", "31"), 2, "out of range"),
            (("set", "engine-replica-timeout", "7"), 2, "out of range"),
            (("set", "engine-replica-timeout", "8.5"), 2, "whole number"),
            (("set", "volume-verify-bandwidth-limit", "-1"), 2, "out of range")]:
        p = env.cli("setting", *args, check=False)
        assert p.returncode == rc and words in p.stderr, (args, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert json.loads(env.cli("setting", "ls", "--json").stdout) == listed

    # The engine-replica timeout reaches engines started afterwards (their config), both
    # for volumes created later and, on a change, for existing ones.
    env.cli("volume", "create", "old", "--size", "8MiB", "--replicas", "1")
    assert engine_timeout(env, "old") == 8
    out = env.cli("setting", "set", "engine-replica-timeout", "12").stdout
    assert "engine-replica-timeout = 12 s" in out and "engines started after" in out
    assert engine_timeout(env, "old") == 12
    env.cli("volume", "create", "new", "--size", "8MiB", "--replicas", "1")
    env.cli("volume", "attach", "new", "--frontend", "none")
    assert engine_timeout(env, "new") == 12
    env.cli("setting", "set", "volume-verify-bandwidth-limit", "50")
    got = json.loads(env.cli("setting", "get", "engine-replica-timeout", "--json").stdout)
    assert got["value"] == 12 and got["default"] == 8 and not got["is_default"]

    # Settings live in the state store: a new daemon reads them.
    env.cli("daemon", "stop")
    assert env.cli("setting", "get", "engine-replica-timeout").stdout.strip() == "12"
    assert "reset to its default, 8 s" in env.cli("setting", "reset",
                                                  "engine-replica-timeout").stdout
    assert env.cli("setting", "get", "engine-replica-timeout").stdout.strip() == "8"
    assert engine_timeout(env, "old") == 8 and engine_timeout(env, "new") == 8
    values = {s["name"]: s["value"] for s in json.loads(env.cli("setting", "ls", "--json").stdout)}
    assert values == dict(NAMES, **{"volume-verify-bandwidth-limit": 50})


def flip(path: str, offset: int) -> None:
    fd = os.open(os.path.join(path, "volume-head-000.img"), os.O_RDWR)
    try:
        old = os.pread(fd, 4, offset)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), offset)
    finally:
        os.close(fd)


def test_verify_and_repair_through_the_cli(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "3")
    p = env.cli("volume", "verify", "v", check=False)
    assert p.returncode == 1 and "is not attached" in p.stderr
    p = env.cli("volume", "verify", "nope", check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = env.cli("volume", "verify", "v", "--rate", "-2", check=False)
    assert p.returncode == 2 and "invalid --rate" in p.stderr

    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    data = os.urandom(10 * MiB)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, 2 * MiB)
    h.flush()
    report = json.loads(env.cli("volume", "verify", "v", "--json").stdout)
    assert report["ok"] and report["differing_chunks"] == 0 and len(report["replicas"]) == 3

    bad = env.show("v")["replicas"][2]
    flip(bad["path"], 5 * MiB + 99)
    p = env.cli("volume", "verify", "v", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 chunk(s) of 1 MiB differ" in p.stdout and "v-r2" in p.stdout
    assert "--repair" in p.stdout
    p = env.cli("volume", "verify", "v", "--repair", "--json", "--rate", "0")
    report = json.loads(p.stdout)
    assert [(d["offset"], d["minority"], d["repaired"]) for d in report["differences"]] == \
        [(5 * MiB, ["v-r2"], True)]
    assert report["ok"] and report["rate_limit_mib_s"] is None

    # The setting is the default rate: 16 MiB at 8 MiB/s takes over a second.
    env.cli("setting", "set", "volume-verify-bandwidth-limit", "8")
    report = json.loads(env.cli("volume", "verify", "v", "--json").stdout)
    assert report["ok"] and report["differing_chunks"] == 0
    assert report["rate_limit_mib_s"] == 8 and report["elapsed_s"] >= 1.0
    assert "every chunk agrees" in env.cli("volume", "verify", "v", "--rate", "0").stdout

    assert hashlib.sha256(h.pread(10 * MiB, 2 * MiB)).digest() == hashlib.sha256(data).digest()
    h.shutdown()
    assert env.show("v")["robustness"] == "healthy"
