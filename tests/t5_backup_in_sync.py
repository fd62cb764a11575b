"""Tier 5: on one host, a backup reads only a replica in sync (manager/backups.py
`open_source`, manager/backup_peer.py `readable_replicas`; docs/DURABILITY.md, "Backups"),
through the real daemon and CLI.

A stale replica can hold a snapshot of the same name with older data: it was away (its
process killed while no rebuild may run) while the snapshot was removed and made again. The
backup reader used to take the first replica directory that was not Rebuilding — here the
stale one — and the restored backup held the older data. Now it reads one the engine holds
RW (attached) or one the generation rule would start from (detached): the restored backup
equals the data acknowledged before the second snapshot, both ways.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import needs_root
from daemon_util import Env, wait_until
from support.backup_util import restored_url_digest, volume_digest

pytestmark = needs_root()

MiB = 1 << 20
SIZE = 16 * MiB
REBUILDS = "concurrent-replica-rebuild-per-node-limit"


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def replica(env: Env, name: str) -> dict[str, Any]:
    return next(r for r in env.show("vol")["replicas"] if r["name"] == name)


def test_backup_reads_the_in_sync_replica_not_the_first(env: Env) -> None:
    target = os.path.join(env.root, "backups")
    os.makedirs(target)
    env.cli("backup", "target", "set", "t", f"file://{target}")
    env.cli("volume", "create", "vol", "--size", "16MiB", "--replicas", "2")
    uri = env.cli("volume", "attach", "vol", "--frontend", "none").stdout.strip()
    volume_digest(uri, write_seed=1)
    env.cli("snapshot", "create", "vol", "s1")
    env.cli("snapshot", "create", "vol", "s2")   # s1 folds into it when removed
    env.cli("setting", "set", REBUILDS, "0")
    first = env.show("vol")["replicas"][0]      # the one the old reader took
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: replica(env, first["name"])["mode"] not in (None, "RW"), 30,
               "the killed replica out of the in-sync set")
    env.cli("snapshot", "rm", "vol", "s1")
    env.cli("snapshot", "purge", "vol")
    fresh = volume_digest(uri, write_seed=2)
    env.cli("snapshot", "create", "vol", "s1")   # the same name, newer data
    assert replica(env, first["name"])["mode"] != "RW"

    got = env.cli("backup", "create", "vol", "--snapshot", "s1", "--target", "t", "--json")
    made = json.loads(got.stdout)
    assert made["state"] == "complete", made
    assert restored_url_digest(target, made["url"], SIZE) == fresh, \
        "the backup of the attached volume read the stale replica"

    # Detached with the first replica still stale: the generation rule's choice is read.
    env.cli("volume", "detach", "vol")
    made = json.loads(env.cli("backup", "create", "vol", "--snapshot", "s1", "--target", "t",
                              "--json").stdout)
    assert made["state"] == "complete", made
    assert restored_url_digest(target, made["url"], SIZE) == fresh, \
        "the backup of the detached volume read the stale replica"
    print(f"two backups of s1 read {replica(env, first['name'])['name']}'s sibling, in sync")
