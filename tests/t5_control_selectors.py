"""Tier 5: `volume create --node-selector/--disk-selector` through the CLI and the real daemon
(SQLite home, one host): the replicas go only on nodes/disks carrying every tag, the selectors
are stored on the volume (`volume show --json`, a daemon restart), and tags that match nothing
are a clear error that creates nothing."""

from __future__ import annotations

import json
import os

from daemon_util import Env
from support.daemon_proc import daemon

from blockhorn.manager.client import Client


def names(env: Env) -> list[str]:
    with Client(env.home) as c:
        return [v["name"] for v in c.list()]


def test_volume_create_with_node_and_disk_selectors() -> None:
    with Env() as env:
        ssd, hdd = (os.path.join(env.root, d) for d in ("ssd", "hdd"))
        os.makedirs(ssd)
        os.makedirs(hdd)
        with daemon(env, "--node", "hosta"):
            env.cli("disk", "add", ssd, "--tags", "ssd,fast")
            env.cli("disk", "add", hdd, "--tags", "hdd")

            env.cli("volume", "create", "v1", "--size", "16MiB", "--replicas", "1",
                    "--disk-selector", "fast, ssd")
            v1 = json.loads(env.cli("volume", "show", "v1", "--json").stdout)
            assert [r["path"] for r in v1["replicas"]] == [os.path.join(ssd, "replicas", "v1",
                                                                        "v1-r0")]
            assert (v1["node_selector"], v1["disk_selector"]) == ([], ["fast", "ssd"])

            # Tags that match nothing: a clear error naming them; nothing created.
            no = env.cli("volume", "create", "v2", "--size", "16MiB", "--replicas", "1",
                         "--disk-selector", "nvme", check=False)
            assert no.returncode == 1, no.stderr
            assert "no schedulable disk has the tags ['nvme']" in no.stderr
            no = env.cli("volume", "create", "v2", "--size", "16MiB", "--replicas", "1",
                         "--node-selector", "gpu", check=False)
            assert no.returncode == 1, no.stderr
            assert "1 replica needs 1 schedulable node with tags ['gpu']; 0 have them" in no.stderr
            assert names(env) == ["v1"]
            assert not os.path.exists(os.path.join(hdd, "replicas", "v2"))
            assert not os.path.exists(os.path.join(ssd, "replicas", "v2"))

            # Bad input is refused before anything runs (exit 2).
            bad = env.cli("volume", "create", "v2", "--size", "16MiB", "--replicas", "1",
                          "--disk-selector", "ssd", "--disk", hdd, check=False)
            assert bad.returncode == 2 and "do not go with --disk" in bad.stderr
            bad = env.cli("volume", "create", "v2", "--size", "16MiB",
                          "--node-selector", "Not A Tag", check=False)
            assert bad.returncode == 2 and "invalid tag 'Not A Tag'" in bad.stderr

            # The REST API carries them (a list, as docs/API.md says), node and disk together.
            env.cli("node", "update", "hosta", "--tags", "gpu")
            with Client(env.home) as c:
                c.create("v2", "16MiB", replicas=1, node_selector=["gpu"],
                         disk_selector=["hdd"])
                v2 = c.show("v2")
            assert [r["path"] for r in v2["replicas"]] == [os.path.join(hdd, "replicas", "v2",
                                                                        "v2-r0")]
            assert (v2["node_selector"], v2["disk_selector"]) == (["gpu"], ["hdd"])
        # Stored with the volume: a new daemon on the same home still knows them.
        with daemon(env, "--node", "hosta"), Client(env.home) as c:
            assert (c.show("v2")["node_selector"], c.show("v1")["disk_selector"]) \
                == (["gpu"], ["fast", "ssd"])
