"""Tier 6: mistakes a user makes, through the real CLI and one daemon for the module (the
simplest ones — unknown volumes, a taken volume name — are in test_cli_errors.py). Each
answer names what is wrong and what to do, exits non-zero (2 for invalid input, 1 otherwise)
without a traceback or an "internal error", and leaves the volume serving. One case per class
of mistake: sizes at and past the limits of the replica disk's filesystem, malformed sizes and
names, existing and missing names, attached vs detached, the wrong access mode.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import nbd
import pytest
from daemon_util import Env

MiB = 1 << 20


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with Env() as e:
        e.cli("volume", "create", "v", "--size", "16MiB", "--replicas", "2")
        e.cli("snapshot", "create", "v", "s1")
        yield e


def check(env: Env, args: list[str], code: int, *needles: str) -> str:
    p = env.cli(*args, check=False)
    err = p.stderr
    assert p.returncode == code, (args, p.returncode, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("blockhorn: error: "), err
    for n in needles:
        assert n in err, (args, n, err)
    return err


def disk_numbers(env: Env) -> tuple[int, int]:
    """(capacity, free) bytes of the filesystem holding the replicas, 4096-aligned down."""
    st = os.statvfs(os.path.join(env.home.root, "replicas"))
    return (st.f_blocks * st.f_frsize) // 4096 * 4096, (st.f_bavail * st.f_frsize) // 4096 * 4096


def test_sizes(env: Env) -> None:
    capacity, free = disk_numbers(env)
    cases = [
        (["--size", "100TiB"], 1, "larger than the largest file the filesystem", "--disk"),
        (["--size", str(capacity + 4096)], 1, "larger than the whole filesystem",
         "smaller --size"),
        (["--size", "0"], 2, "greater than zero"),
        (["--size=-4096"], 2, "greater than zero"),
        (["--size", "4097"], 2, "not a multiple of 4096"),
        (["--size", "1.5GiB"], 2, "invalid size", "KiB, MiB, GiB or TiB"),
        (["--size", "10XB"], 2, "invalid size"),
        (["--size", "9999999999TiB"], 2, "larger than NBD allows"),
    ]
    for extra, code, *needles in cases:
        check(env, ["volume", "create", "x", "--replicas", "1", *extra], code, *needles)
    assert [v["name"] for v in env.ls()] == ["v"]
    assert not os.path.exists(os.path.join(env.home.root, "replicas", "x"))
    # Thin: larger than the free space but not than the disk: created, with a warning.
    if capacity - free > 64 * MiB:   # (free space moves: aim between free and capacity)
        size = (free + (capacity - free) // 2) // 4096 * 4096
        p = env.cli("volume", "create", "thin", "--replicas", "1", "--size", str(size))
        assert "blockhorn: warning: thin volume" in p.stderr and "ENOSPC" in p.stderr
        assert "thin volume" in env.show("thin")["message"]
        env.cli("volume", "rm", "thin")


def test_names_and_counts(env: Env) -> None:
    cases = [
        (["volume", "create", "v\n", "--size", "4MiB"], 2, "invalid volume name"),
        (["volume", "create", "x", "--size", "4MiB", "--replicas", "17"], 2, "1 to 16"),
        (["volume", "create", "x", "--size", "4MiB", "--replicas", "2", "--disk", "/etc/passwd",
          "--disk", "/tmp"], 2, "not a directory"),
        (["volume", "attach", "v", "--frontend", "floppy"], 2, "invalid choice"),
        (["snapshot", "create", "v", "s\n"], 2, "invalid snapshot name"),
        (["snapshot", "create", "v", "s2", "--label", "bad key=1"], 2, "bad label key"),
        (["snapshot", "create", "v", "s2", "--label", "k=a\nb"], 2, "bad label value"),
        (["snapshot", "rm", "v", "../../v"], 2, "invalid snapshot name"),
    ]
    for args, code, *needles in cases:
        check(env, args, code, *needles)


def test_share_input(env: Env) -> None:
    base = ["volume", "create", "x", "--size", "64MiB", "--access", "rwx"]
    for extra, needle in ((["--mkfs-options", "-d /etc"], "'-d' is not allowed"),
                          (["--mkfs-options", "-z /tmp/undo"], "'-z' is not allowed"),
                          (["--mkfs-options", "-E root_owner=0:0,offset=1"], "not allowed"),
                          (["--nfs-client", "everyone"], "bad NFS client"),
                          (["--service-address", "10.9.0.5/24", "--service-interface",
                            "eth0;x"], "bad interface name")):
        check(env, [*base, *extra], 2, needle, *(["allowed: "] if "mkfs" in extra[0] else []))
    check(env, ["volume", "create", "x", "--size", "16MiB", "--access", "rwx"], 2,
          "at least 32 MiB")
    check(env, ["volume", "create", "x", "--size", "64MiB", "--nfs-client", "10.0.0.0/8"], 2,
          "need --access rwx")
    check(env, ["share", "show", "v"], 2, "RWO", "--access rwx")
    # The wrong access mode for the operation: an RWX volume needs a block device for its
    # share, and a detached one has no share to show.
    env.cli("volume", "create", "s", "--size", "32MiB", "--replicas", "1", "--access", "rwx")
    check(env, ["volume", "attach", "s", "--frontend", "none"], 2, "RWX", "--frontend none")
    check(env, ["share", "show", "s"], 1, "detached", "volume attach s")
    env.cli("volume", "rm", "s")
    assert [v["name"] for v in env.ls()] == ["v"]


def test_missing_and_existing_names(env: Env) -> None:
    cases = [
        (["volume", "detach", "nope"], 1, "'nope' does not exist"),
        (["volume", "expand", "nope", "--size", "32MiB"], 1, "'nope' does not exist"),
        (["snapshot", "create", "nope", "s1"], 1, "'nope' does not exist"),
        (["snapshot", "rm", "v", "nosnap"], 1, "has no snapshot 'nosnap'"),
        (["snapshot", "revert", "v", "nosnap"], 1, "has no snapshot 'nosnap'"),
        (["snapshot", "create", "v", "s1"], 1, "'s1' already exists on volume 'v'",
         "pick another name"),
        (["volume", "create", "x", "--from-snapshot", "v/nosnap"], 1, "no snapshot 'nosnap'"),
        (["volume", "create", "x", "--from-snapshot", "v"], 2, "VOLUME/SNAPSHOT"),
        (["volume", "expand", "v", "--size", "8MiB"], 2, "shrinking is not supported"),
        (["volume", "expand", "v", "--size", "100TiB"], 1, "largest file"),
    ]
    for args, code, *needles in cases:
        check(env, args, code, *needles)
    p = env.cli("volume", "detach", "v")
    assert "was not attached" in p.stderr


def test_attached_state(env: Env) -> None:
    """Mistakes that depend on the volume being attached; afterwards the volume is healthy
    and the data written before them reads back."""
    endpoint = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    sock = endpoint.split("socket=", 1)[1]
    data = os.urandom(MiB)
    h = nbd.NBD()
    h.connect_unix(sock)
    h.pwrite(data, 3 * MiB)
    h.flush()
    try:
        cases = [
            (["volume", "attach", "v"], 1, "already attached", "detach it first"),
            (["volume", "rm", "v"], 1, "attached", "--force"),
            (["snapshot", "revert", "v", "s1"], 1, "attached", "detach"),
            (["snapshot", "create", "v", "s1"], 1, "'s1' already exists on volume 'v'",
             "pick another name"),
            # Past the disk's limit: refused before any replica sees it (it used to set
            # every replica ERR: "expand reached only 0 RW replicas").
            (["volume", "expand", "v", "--size", "100TiB"], 1, "largest file"),
            (["volume", "expand", "v", "--size", "8MiB"], 2, "shrinking"),
        ]
        for args, code, *needles in cases:
            check(env, args, code, *needles)
        v = env.show("v")
        assert v["robustness"] == "healthy" and {r["mode"] for r in v["replicas"]} == {"RW"}
        got = bytes(h.pread(MiB, 3 * MiB))
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    finally:
        h.shutdown()
        env.cli("volume", "detach", "v")
