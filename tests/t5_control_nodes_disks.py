"""Tier 5: nodes and disks through the CLI and the real daemon (SQLite home, one host):
`node ls/show/update`, `disk add/rm/ls`, and `volume create` without --disk placing replicas
with the scheduler over the registered disks, refusing what the rules forbid, half-creating
nothing."""

from __future__ import annotations

import json
import os

from daemon_util import Env
from support.daemon_proc import daemon

MiB = 1 << 20


def nodes(env: Env) -> dict[str, dict[str, object]]:
    return {n["name"]: n for n in json.loads(env.cli("node", "ls", "--json").stdout)}


def test_nodes_disks_and_scheduled_create() -> None:
    with Env() as env, daemon(env, "--node", "hosta", "--address", "127.0.0.1"):
        n = nodes(env)["hosta"]
        assert (n["address"], n["state"], n["schedulable"], n["zone"], n["tags"], n["disks"]) \
            == ("127.0.0.1", "up", True, None, [], [])
        # No disk registered: replicas go in the home, as before.
        env.cli("volume", "create", "v0", "--size", "16MiB", "--replicas", "1")
        assert env.show("v0")["replicas"][0]["path"].startswith(env.home.root + "/replicas/")

        d1, d2 = (os.path.join(env.root, d) for d in ("d1", "d2"))
        os.makedirs(d1)
        os.makedirs(d2)
        env.cli("disk", "add", d1, "--tags", "ssd,fast", "--reserve", "1MiB")
        env.cli("disk", "add", d2)
        bad = env.cli("disk", "add", os.path.join(env.root, "none"), check=False)
        assert bad.returncode == 2 and "is not a directory" in bad.stderr
        again = env.cli("disk", "add", d1, check=False)
        assert again.returncode == 1 and "registered already" in again.stderr
        disks = {d["path"]: d for d in nodes(env)["hosta"]["disks"]}   # type: ignore[attr-defined]
        assert disks[d1]["tags"] == ["fast", "ssd"] and disks[d1]["reserved"] == MiB
        assert disks[d1]["capacity"] > 0 and 0 < disks[d1]["available"] <= disks[d1]["capacity"]

        # One node, hard anti-affinity: two replicas cannot be placed; nothing is created.
        no = env.cli("volume", "create", "v1", "--size", "16MiB", "--replicas", "2",
                     check=False)
        assert no.returncode == 1
        assert "2 replicas need 2 schedulable nodes; 1 is up and schedulable" in no.stderr
        assert [v["name"] for v in env.ls()] == ["v0"]
        assert not os.path.exists(os.path.join(d1, "replicas", "v1"))

        env.cli("setting", "set", "replica-soft-anti-affinity", "true")
        env.cli("volume", "create", "v1", "--size", "16MiB", "--replicas", "2")
        paths = sorted(r["path"] for r in env.show("v1")["replicas"])
        assert paths == sorted([os.path.join(d1, "replicas", "v1", "v1-r0"),
                                os.path.join(d2, "replicas", "v1", "v1-r1")]) or \
            paths == sorted([os.path.join(d1, "replicas", "v1", "v1-r1"),
                             os.path.join(d2, "replicas", "v1", "v1-r0")])
        listed = json.loads(env.cli("disk", "ls", "--json").stdout)
        assert [d["scheduled"] for d in listed] == [16 * MiB, 16 * MiB]
        no = env.cli("volume", "create", "v2", "--size", "16MiB", "--replicas", "3",
                     check=False)
        assert no.returncode == 1 and "3 replicas need 3 disks with room" in no.stderr
        # --disk keeps working, beside the scheduler.
        env.cli("volume", "create", "v3", "--size", "16MiB", "--replicas", "1", "--disk", d2)

        # Node changes: an unschedulable node takes no new replica.
        env.cli("node", "update", "hosta", "--schedulable", "no", "--tags", "b,a",
                "--zone", "z1")
        shown = json.loads(env.cli("node", "show", "hosta", "--json").stdout)
        assert (shown["schedulable"], shown["tags"], shown["zone"]) == (False, ["a", "b"], "z1")
        no = env.cli("volume", "create", "v4", "--size", "16MiB", "--replicas", "1",
                     check=False)
        assert no.returncode == 1 and "no schedulable node is up" in no.stderr
        bad = env.cli("node", "update", "hosta", "--zone", "Bad Zone", check=False)
        assert bad.returncode == 2 and "invalid zone" in bad.stderr
        missing = env.cli("node", "show", "nohost", check=False)
        assert missing.returncode == 1 and "node 'nohost' does not exist" in missing.stderr

        # A disk holding replicas stays; once they are gone it can go.
        busy = env.cli("disk", "rm", d1, check=False)
        assert busy.returncode == 1 and "holds replicas v1-r" in busy.stderr
        env.cli("volume", "rm", "v1")
        env.cli("disk", "rm", d1)
        assert [d["path"] for d in json.loads(env.cli("disk", "ls", "--json").stdout)] == [d2]
        assert "hosta" in env.cli("node", "ls").stdout
