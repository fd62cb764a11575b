"""Whole system: snapshots, revert, expansion and clones through the CLI and the daemon, with
data written and read by a real NBD client (libnbd)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import nbd
import pytest
from daemon_util import Env

MiB = 1 << 20


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def write(uri: str, data: bytes, offset: int = 0) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def read(uri: str, length: int, offset: int = 0) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(length, offset)
    size = h.get_size()
    h.shutdown()
    return data + size.to_bytes(8, "little")


def snaps(env: Env, vol: str) -> list[dict]:  # type: ignore[type-arg]
    return list(json.loads(env.cli("snapshot", "ls", vol, "--json").stdout))


def test_snapshot_revert_expand_clone_through_the_cli(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    first = os.urandom(2 * MiB)
    write(uri, first)
    assert env.cli("snapshot", "create", "v", "s1", "--label", "why=test").stdout.strip() == "s1"
    write(uri, b"x" * MiB, MiB)
    env.cli("snapshot", "create", "v", "s2")
    auto = env.cli("snapshot", "create", "v").stdout.strip()
    listed = snaps(env, "v")
    assert [s["name"] for s in listed] == ["s1", "s2", auto]
    assert listed[0]["labels"] == {"why": "test"} and listed[1]["parent"] == "s1"
    assert {"name", "parent", "created", "user_created", "removed", "size"} <= set(listed[0])
    tree = env.cli("snapshot", "ls", "v").stdout
    assert "s1" in tree and "└─ s2" in tree

    env.cli("snapshot", "rm", "v", "s2")
    assert [s["name"] for s in snaps(env, "v")] == ["s1", auto]
    env.cli("snapshot", "purge", "v")

    # Revert needs a detached volume: a clear error, nothing changed.
    bad = env.cli("snapshot", "revert", "v", "s1", check=False)
    assert bad.returncode != 0 and "detach" in bad.stderr and "Traceback" not in bad.stderr

    # Online expansion; a new connection sees the new size.
    env.cli("volume", "expand", "v", "--size", "32MiB")
    assert read(uri, 1)[1:] == (32 * MiB).to_bytes(8, "little")
    shrink = env.cli("volume", "expand", "v", "--size", "8MiB", check=False)
    assert shrink.returncode == 2 and "shrink" in shrink.stderr

    env.cli("volume", "detach", "v")
    env.cli("snapshot", "revert", "v", "s1")
    uri = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    assert read(uri, 2 * MiB)[:2 * MiB] == first
    assert env.show("v")["size"] == 32 * MiB

    # Clone: a full, independent copy of the snapshot.
    out = env.cli("volume", "create", "c", "--from-snapshot", "v/s1", "--replicas", "2").stdout
    assert "created volume c from v/s1" in out
    curi = env.cli("volume", "attach", "c", "--frontend", "none").stdout.strip()
    assert read(curi, 2 * MiB)[:2 * MiB] == first
    write(curi, b"c" * 4096)                       # independent of the source
    assert read(uri, 4096)[:4096] == first[:4096]

    for args, words in [
        (("snapshot", "create", "v", "s1"), "exists"),
        (("snapshot", "rm", "v", "nope"), "no snapshot"),
        (("snapshot", "create", "v", "Bad!"), "invalid snapshot name"),
        (("snapshot", "create", "v", "x", "--label", "novalue"), "KEY=VALUE"),
        (("snapshot", "ls", "missing"), "does not exist"),
        (("volume", "create", "d", "--from-snapshot", "v"), "VOLUME/SNAPSHOT"),
        (("volume", "create", "d"), "--size"),
    ]:
        p = env.cli(*args, check=False)
        assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_tree_of_twelve_snapshots_on_four_branches_every_one_checked(env: Env) -> None:
    """Real replica processes, a real NBD client: 12 snapshots on 4 branches made by reverts
    (each revert with the volume detached), then every snapshot's content checked by
    reverting to it; the replicas hold identical chains after each step."""
    import random

    from test_snapshots_engine import chain_digests

    rng = random.Random(3)
    env.cli("volume", "create", "t", "--size", "8MiB", "--replicas", "2")
    expected: dict[str, bytes] = {}

    def attach() -> str:
        return env.cli("volume", "attach", "t", "--frontend", "none").stdout.strip()

    def identical() -> None:
        show = env.show("t")
        chains = [chain_digests(r["path"]) for r in show["replicas"]]
        assert all(c == chains[0] for c in chains), chains

    uri = attach()
    n = 0
    for branch in range(4):
        if branch:
            env.cli("volume", "detach", "t")
            base = rng.choice(sorted(expected))
            env.cli("snapshot", "revert", "t", base)
            uri = attach()
            assert read(uri, 8 * MiB)[:8 * MiB] == expected[base]
        for _ in range(3):
            for _ in range(5):
                write(uri, rng.randbytes(rng.choice([512, 4096, 20000])),
                      rng.randrange(8 * MiB - 20000))
            expected[f"s{n}"] = read(uri, 8 * MiB)[:8 * MiB]
            env.cli("snapshot", "create", "t", f"s{n}")
            n += 1
    listed = snaps(env, "t")
    assert len(listed) == 12 and len({s["parent"] for s in listed}) >= 4
    env.cli("volume", "detach", "t")
    identical()
    for name, data in expected.items():
        env.cli("snapshot", "revert", "t", name)
        uri = attach()
        assert read(uri, 8 * MiB)[:8 * MiB] == data, name
        env.cli("volume", "detach", "t")
        identical()


def test_online_expand_resizes_the_fuse_frontends_block_device(env: Env) -> None:
    import subprocess

    env.cli("volume", "create", "x", "--size", "16MiB", "--replicas", "2")
    dev = env.cli("volume", "attach", "x", "--frontend", "fuse").stdout.strip()
    size = lambda: int(subprocess.check_output(["blockdev", "--getsize64", dev]))  # noqa: E731
    assert size() == 16 * MiB
    env.cli("volume", "expand", "x", "--size", "48MiB")
    assert size() == 48 * MiB
    env.cli("volume", "detach", "x")
