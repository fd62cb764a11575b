"""Every bad input: one line `blockhorn: error: ...`, a non-zero exit (2 for invalid input and
usage, 1 otherwise), no traceback, and nothing changed in the home."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from daemon_util import Env

from blockhorn.cli import build_parser


@pytest.fixture
def env() -> Iterator[Env]:
    with Env() as e:
        yield e


def snapshot(env: Env) -> tuple[object, ...]:
    """What a failed command must not change: the volume list and the replica directories."""
    vols = env.ls()
    for v in vols:   # fields that move on their own
        v.pop("counters", None)
    tree = sorted(os.path.relpath(os.path.join(d, f), env.home.root)
                  for d, _, files in os.walk(os.path.join(env.home.root, "replicas"))
                  for f in files)
    configs = sorted(os.listdir(os.path.join(env.home.root, "volumes")))
    return (vols, tree, configs)


def assert_error(proc: object, code: int, *needles: str) -> None:
    rc, err = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith("blockhorn: error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_bad_input_without_daemon_creates_nothing(env: Env) -> None:
    """Input the CLI can judge alone is rejected before a daemon or a home exists."""
    cases = [
        (["volume", "create", "v", "--size", "1000"], "not a multiple of 4096"),
        (["volume", "create", "v", "--size", "abc"], "invalid size"),
        (["volume", "create", "v", "--size", "0"], "greater than zero"),
        (["volume", "create", "v", "--size", "10XB"], "invalid size"),
        (["volume", "create", "Bad_Name", "--size", "1MiB"], "invalid volume name"),
        (["volume", "create", "x" * 64, "--size", "1MiB"], "invalid volume name"),
        (["volume", "create", "v", "--size", "1MiB", "--replicas", "0"], "replica count"),
        (["volume", "create", "v", "--size", "1MiB", "--replicas", "3", "--disk", "/tmp",
          "--disk", "/var"], "3 replicas need 3 disks"),
        (["volume", "create", "v"], "--size"),
        (["volume", "attach", "v", "--frontend", "floppy"], "invalid choice"),
        (["volume"], "required"),
        (["bogus"], "invalid choice"),
    ]
    for args, needle in cases:
        assert_error(env.cli(*args, check=False), 2, needle)
    assert not os.path.exists(env.home.root)


def test_bad_input_with_daemon_changes_nothing(env: Env, tmp_path: object) -> None:
    env.cli("volume", "create", "good", "--size", "4MiB", "--replicas", "2")
    before = snapshot(env)
    disk = os.path.join(env.root, "disk0")
    os.mkdir(disk)
    cases = [
        (["volume", "create", "good", "--size", "4MiB"], 1, "already exists"),
        (["volume", "show", "nope"], 1, "does not exist"),
        (["volume", "attach", "nope"], 1, "does not exist"),
        (["volume", "detach", "nope"], 1, "does not exist"),
        (["volume", "rm", "nope"], 1, "does not exist"),
        (["volume", "create", "v2", "--size", "4MiB", "--replicas", "2", "--disk", disk],
         2, "2 replicas need 2 disks"),
        (["volume", "create", "v2", "--size", "4MiB", "--replicas", "1",
          "--disk", os.path.join(env.root, "missing")], 2, "is not a directory"),
        (["volume", "create", "v2", "--size", "4MiB", "--replicas", "2",
          "--disk", disk, "--disk", disk], 2, "twice"),
        (["volume", "create", "v" * 61, "--size", "4MiB"], 2, "invalid replica name"),
    ]
    for args, code, needle in cases:
        assert_error(env.cli(*args, check=False), code, needle)
    assert snapshot(env) == before
    assert os.listdir(disk) == []


def test_attach_when_attached_and_rm_when_attached(env: Env) -> None:
    env.cli("volume", "create", "v", "--size", "4MiB", "--replicas", "1")
    endpoint = env.cli("volume", "attach", "v", "--frontend", "none").stdout.strip()
    assert endpoint.startswith("nbd+unix:///?socket=")
    before = env.show("v")
    assert_error(env.cli("volume", "attach", "v", "--frontend", "none", check=False), 1,
                 "already attached")
    assert_error(env.cli("volume", "rm", "v", check=False), 1, "attached", "--force")
    after = env.show("v")
    assert [r["pid"] for r in after["replicas"]] == [r["pid"] for r in before["replicas"]]
    assert after["engine"]["pid"] == before["engine"]["pid"]
    env.cli("volume", "rm", "v", "--force")
    assert env.ls() == []
    assert not os.path.exists(before["replicas"][0]["path"])


def _path_with(tmp: str, commands: list[str]) -> str:
    """A PATH directory that offers only `commands` (symlinks to the real ones)."""
    import shutil
    os.makedirs(tmp, exist_ok=True)
    for c in commands:
        real = shutil.which(c)
        assert real, c
        os.symlink(real, os.path.join(tmp, c))
    return tmp


def test_missing_dependency_names_the_package(env: Env) -> None:
    """The daemon checks the programs an attach needs and names the Debian package."""
    env.cli("volume", "create", "v", "--size", "4MiB", "--replicas", "1")
    env.cli("daemon", "stop")
    # A daemon whose PATH has nbdkit but no nbdfuse.
    bare = dict(env.env, PATH=_path_with(os.path.join(env.root, "bin"), ["nbdkit"]))
    assert_error(env.cli("volume", "attach", "v", "--frontend", "nbdfuse", check=False,
                         env=bare), 1, "nbdfuse", "apt-get install libnbd-bin")
    assert env.show("v")["state"] == "detached"
    env.cli("daemon", "stop")
    empty = dict(env.env, PATH=os.path.join(env.root, "empty"))
    assert_error(env.cli("volume", "attach", "v", "--frontend", "none", check=False,
                         env=empty), 1, "apt-get install nbdkit")
    show = env.show("v")
    assert show["state"] == "detached" and show["endpoint"] is None
    assert all(r["pid"] is None for r in show["replicas"])


def test_help_everywhere() -> None:
    parser = build_parser()
    for argv in (["--help"], ["volume", "--help"], ["volume", "create", "--help"],
                 ["volume", "attach", "--help"], ["volume", "show", "--help"],
                 ["daemon", "--help"], ["replica", "serve", "--help"],
                 ["engine", "serve", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
