"""Whole system: a DR standby volume following a file backup target through three incremental
backups (explicit checks and the daemon's own), then activated, attached and read over NBD.
Every step compares the standby's data by checksum with the snapshot its backup was made of."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import nbd
import pytest
from daemon_util import Env, wait_until

from blockhorn.manager.client import Client
from blockhorn.replica.store import Replica

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 24 * MiB


# Longhorn's lock protocol waits 2 s after writing a lock; one process here, so no clock skew.
FAST_LOCKS = {"BLOCKHORN_BACKUP_LOCK_WAIT_S": "0.05"}


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        e.env.update(FAST_LOCKS)   # the daemon's backups and restores
        yield e


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def nbd_read(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(h.pread(4 * MiB, off) for off in range(0, SIZE, 4 * MiB))
    finally:
        h.shutdown()


def show(env: Env, vol: str) -> dict:  # type: ignore[type-arg]
    """The volume object from the daemon's REST API (cheap enough to poll)."""
    with Client(env.home) as c:
        return dict(c.request("GET", f"/volumes/{vol}"))


def offline_digests(env: Env, vol: str) -> set[str]:
    """The data of every replica of a detached volume, read from its directory."""
    out = set()
    for r in show(env, vol)["replicas"]:
        rep = Replica.open(r["path"])
        try:
            out.add(sha(rep.read(0, SIZE)))
        finally:
            rep.close()
    return out


def back_up(env: Env, snap: str) -> str:
    """A backup of snapshot `snap` of volume src to the only target."""
    out = env.cli("backup", "create", "src", "--snapshot", snap, "--json").stdout
    return str(json.loads(out)["name"])


def standby(env: Env, vol: str) -> dict:  # type: ignore[type-arg]
    return dict(show(env, vol)["standby"])


def test_standby_follows_three_incrementals_then_activates(env: Env) -> None:
    store = os.path.join(env.root, "store")
    os.makedirs(store)
    target_url = f"file://{store}"
    source = f"{target_url}?volume=src"
    model = bytearray(SIZE)

    def change(uri: str, offset: int, data: bytes) -> None:
        nbd_write(uri, offset, data)
        model[offset:offset + len(data)] = data

    env.cli("backup", "target", "set", "t", target_url)
    env.cli("volume", "create", "src", "--size", "24MiB", "--replicas", "1")
    uri = env.cli("volume", "attach", "src", "--frontend", "none").stdout.strip()
    for i in (0, 3, 5, 9):
        change(uri, i * BLOCK, os.urandom(BLOCK))
    env.cli("snapshot", "create", "src", "s0")
    b0 = back_up(env, "s0")

    r = env.cli("volume", "create", "dr", "--standby-from", f"{target_url}?backup={b0}&volume=src",
                check=False)
    assert r.returncode == 2 and "backup volume URL" in r.stderr
    out = env.cli("volume", "create", "dr", "--standby-from", source, "--replicas", "2").stdout
    assert b0 in out
    # A second standby the daemon keeps up to date on its own (a check every second).
    env.cli("volume", "create", "auto", "--standby-from", source, "--replicas", "1",
            "--standby-interval", "1")
    st = standby(env, "dr")
    assert st["last_backup"] == b0 and st["error"] is None and st["interval_s"] == 300
    assert show(env, "dr")["size"] == SIZE and show(env, "dr")["state"] == "detached"
    assert offline_digests(env, "dr") == {sha(model)}
    r = env.cli("volume", "attach", "dr", "--frontend", "none", check=False)
    assert r.returncode == 1 and "DR standby" in r.stderr and "activate" in r.stderr
    # Recurring jobs leave a standby alone (its data is the backup's, nothing else).
    env.cli("job", "create", "d", "--cron", "0 0 * * *", "--task", "snapshot", "--retain",
            "1", "--group", "default")
    run = json.loads(env.cli("job", "run", "d", "--json").stdout)
    assert run["state"] == "ok" and set(run["result"]["volumes"]) == {"src"}
    env.cli("job", "rm", "d")

    # Nothing new: a check reads volume.cfg and applies nothing.
    st = json.loads(env.cli("volume", "standby-sync", "dr", "--json").stdout)
    assert st["applied_now"] is None and st["last_backup"] == b0

    # Three incrementals: one block rewritten, one new, one half-block; each applied by
    # fetching only the changed blocks.
    steps = [[(3, os.urandom(BLOCK))], [(7, os.urandom(BLOCK))],
             [(9, os.urandom(MiB)), (0, bytes(BLOCK))]]
    backups = []
    for n, writes in enumerate(steps, 1):
        for block, data in writes:
            change(uri, block * BLOCK, data)
        env.cli("snapshot", "create", "src", f"s{n}")
        backups.append(back_up(env, f"s{n}"))
        if n == 3:
            break   # the last one is applied by `activate`
        st = json.loads(env.cli("volume", "standby-sync", "dr", "--json").stdout)
        assert st["last_backup"] == backups[-1] and st["applied_now"]["backup"] == backups[-1]
        # Only the changed block travelled (lz4 of random data: about its size).
        assert 0 < st["applied_bytes"] <= BLOCK + 64 * 1024, st
        assert offline_digests(env, "dr") == {sha(model)}
        assert "standby of" in env.cli("volume", "show", "dr").stdout
    assert any(line.split()[:1] == ["dr"] and "standby" in line.split()
               for line in env.cli("volume", "ls").stdout.splitlines())

    # The daemon's own follower brings `auto` to the newest backup by itself.
    wait_until(lambda: standby(env, "auto")["last_backup"] == backups[-1], 20,
               "the follower to apply the last backup")
    env.cli("volume", "rm", "auto")

    # No check is due for `dr` (300 s): a restarted daemon does not touch its target.
    before = standby(env, "dr")["last_check"]
    env.cli("daemon", "stop")
    assert env.show("dr")["standby"]["last_check"] == before   # the CLI starts a daemon

    out = env.cli("volume", "activate", "dr").stdout
    assert backups[-1] in out
    shown = env.show("dr")
    assert shown["standby"] is None and backups[-1] in shown["message"]
    dr_uri = env.cli("volume", "attach", "dr", "--frontend", "none").stdout.strip()
    assert sha(nbd_read(dr_uri)) == sha(model) == sha(nbd_read(uri))
    r = env.cli("volume", "activate", "dr", check=False)
    assert r.returncode == 2 and "not a standby" in r.stderr
