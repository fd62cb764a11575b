"""Tier 5: nodes and disks through the CLI and the real daemon (SQLite home, one host):
`node ls/show/update`, `disk add/rm/ls`, and `volume create` without --disk placing replicas
with the scheduler over the registered disks, refusing what the rules forbid, half-creating
nothing."""

from __future__ import annotations

import json
import os
from typing import Any

from daemon_util import Env
from support.daemon_proc import daemon

from blockhorn.manager.client import Client

MiB = 1 << 20


def nodes(env: Env) -> dict[str, dict[str, Any]]:
    """Read through the API directly: a CLI process per check would double the test's time;
    the CLI's own output is checked once below."""
    with Client(env.home) as c:
        return {n["name"]: n for n in c.request("GET", "/nodes")["nodes"]}


def disks(env: Env) -> list[dict[str, Any]]:
    with Client(env.home) as c:
        return list(c.request("GET", "/disks")["disks"])


def replica_paths(env: Env, name: str) -> list[str]:
    with Client(env.home) as c:
        return sorted(r["path"] for r in c.show(name)["replicas"])


def test_nodes_disks_and_scheduled_create() -> None:
    with Env() as env, daemon(env, "--node", "hosta", "--address", "127.0.0.1"):
        n = nodes(env)["hosta"]
        assert (n["address"], n["state"], n["schedulable"], n["zone"], n["tags"], n["disks"]) \
            == ("127.0.0.1", "up", True, None, [], [])
        # No disk registered: replicas go in the home, as before.
        env.cli("volume", "create", "v0", "--size", "16MiB", "--replicas", "1")
        assert replica_paths(env, "v0")[0].startswith(env.home.root + "/replicas/")

        d1, d2 = (os.path.join(env.root, d) for d in ("d1", "d2"))
        os.makedirs(d1)
        os.makedirs(d2)
        env.cli("disk", "add", d1, "--tags", "ssd,fast", "--reserve", "1MiB")
        with Client(env.home) as c:
            c.request("POST", "/disks", {"path": d2})
        bad = env.cli("disk", "add", os.path.join(env.root, "none"), check=False)
        assert bad.returncode == 2 and "is not a directory" in bad.stderr
        again = env.cli("disk", "add", d1, check=False)
        assert again.returncode == 1 and "registered already" in again.stderr
        got = {d["path"]: d for d in nodes(env)["hosta"]["disks"]}
        assert got[d1]["tags"] == ["fast", "ssd"] and got[d1]["reserved"] == MiB
        assert got[d1]["capacity"] > 0 and 0 < got[d1]["available"] <= got[d1]["capacity"]

        # One node, hard anti-affinity: two replicas cannot be placed; nothing is created.
        no = env.cli("volume", "create", "v1", "--size", "16MiB", "--replicas", "2",
                     check=False)
        assert no.returncode == 1
        assert "2 replicas need 2 schedulable nodes; 1 is up and schedulable" in no.stderr
        with Client(env.home) as c:
            assert [v["name"] for v in c.list()] == ["v0"]
        assert not os.path.exists(os.path.join(d1, "replicas", "v1"))

        with Client(env.home) as c:
            c.request("PUT", "/settings/replica-soft-anti-affinity", {"value": "true"})
            c.create("v1", "16MiB", replicas=2)
        paths = replica_paths(env, "v1")
        assert paths == sorted([os.path.join(d1, "replicas", "v1", "v1-r0"),
                                os.path.join(d2, "replicas", "v1", "v1-r1")]) or \
            paths == sorted([os.path.join(d1, "replicas", "v1", "v1-r1"),
                             os.path.join(d2, "replicas", "v1", "v1-r0")])
        assert all(os.path.exists(os.path.join(p, "volume.meta")) for p in paths)
        listed = json.loads(env.cli("disk", "ls", "--json").stdout)
        assert [d["scheduled"] for d in listed] == [16 * MiB, 16 * MiB]
        # An expand follows the scheduler's rules on one host too (capacity.py): 1 % of the
        # disk may be promised, and 1 % of this filesystem is less than the size asked.
        big = listed[0]["capacity"] // 50 // MiB * MiB
        with Client(env.home) as c:
            c.request("PUT", "/settings/storage-over-provisioning-percentage", {"value": 1})
        no = env.cli("volume", "expand", "v1", "--size", f"{big // MiB}MiB", check=False)
        assert no.returncode == 1 and "cannot expand 'v1'" in no.stderr, no.stderr
        assert "storage-over-provisioning-percentage" in no.stderr and \
            "nothing was changed" in no.stderr, no.stderr
        with Client(env.home) as c:
            assert c.show("v1")["size"] == 16 * MiB
            c.request("PUT", "/settings/storage-over-provisioning-percentage", {"value": 100})
        env.cli("volume", "expand", "v1", "--size", "32MiB")
        listed = json.loads(env.cli("disk", "ls", "--json").stdout)
        assert [d["scheduled"] for d in listed] == [32 * MiB, 32 * MiB]
        assert "SCHEDULED" in env.cli("disk", "ls").stdout
        no = env.cli("volume", "create", "v2", "--size", "16MiB", "--replicas", "3",
                     check=False)
        assert no.returncode == 1 and "3 replicas need 3 disks with room" in no.stderr
        # --disk keeps working, beside the scheduler.
        with Client(env.home) as c:
            c.create("v3", "16MiB", replicas=1, disks=[d2])

        # Node changes: an unschedulable node takes no new replica.
        env.cli("node", "update", "hosta", "--schedulable", "no", "--tags", "b,a",
                "--zone", "z1")
        shown = nodes(env)["hosta"]
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
        with Client(env.home) as c:
            c.remove("v1")
        env.cli("disk", "rm", d1)
        assert [d["path"] for d in disks(env)] == [d2]
        assert "hosta" in env.cli("node", "ls").stdout
        assert "Zone:        z1" in env.cli("node", "show", "hosta").stdout
