"""Tier 5: a detached volume whose replicas live on other nodes, worked on from a node that
holds none of them (three namespace hosts, tests/support/cluster_site.py):

- snapshot create/ls/rm, expand and purge asked of that node run through a maintenance
  attach there (manager/maintenance.py): the data reads the same afterwards (checksums), the
  volume is detached again with every replica stopped, and a user's attach while one runs
  is refused with the maintenance named;
- a clone asked of that node reads the snapshot from an in-sync replica elsewhere and reads
  as the source (a revert asked there: tests/t5_cluster_revert.py);
- a backup asked of that node (the volume detached, then attached there: the engine's node
  holds no replica) reads the snapshot from a node that holds one (manager/backup_peer.py);
  a restore into a new volume of the cluster writes through an engine over NBD: checksums
  equal; so does a DR standby, created in full and then stepped incrementally (new data and
  zeroed old data): after its activation it reads as the source;
- a recurring job runs once per slot though every node's scheduler sees it due, its steps
  for a volume attached elsewhere on the engine's node, for a detached one through a
  maintenance attach.
- a backup reads only a replica in sync: not a stale one (ERR, holding an older snapshot of
  the same name) nor a Rebuilding one, whose node refuses to serve it; with the in-sync one
  unreadable it is refused (checksums of the restored backups against acknowledged data);
- an expand is checked against every replica's disk as the store reports it (a reserve
  leaving too little room: refused, nothing changed; a fitting one done, data as written);
- a replica gone from its disk while the volume is detached is not made again empty (the
  start rule would then trust an older replica and lose acknowledged writes).

The cluster is module-scoped and the tests run in this order (they share the volume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import nbd
import pytest
from conftest import needs_root
from support.backup_util import restored_url_digest as restored_digest
from support.backup_util import volume_digest as digest
from support.cluster_site import ROOT, Site, module_site, wait_until

pytestmark = needs_root()

MiB = 1 << 20
VOL = "dv"
state: dict[str, Any] = {}   # what the tests in order hand on (checksums, backup URL)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with module_site("bhd") as s:
        yield s


def attach_sum(site: Site, volume: str, host: Any, length: int | None = None,
               write_seed: int | None = None) -> str:
    """Attach `volume` on `host` (no device), checksum (after writing), detach."""
    site.cli(host, "volume", "attach", volume, "--frontend", "none")
    try:
        return digest(site.show(host, volume)["endpoint"], length, write_seed)
    finally:
        site.cli(host, "volume", "detach", volume)
        wait_stopped(site, host, volume)


def wait_stopped(site: Site, host: Any, volume: str) -> None:
    wait_until(lambda: all(r["pid"] is None for r in site.show(host, volume)["replicas"]),
               20, f"every replica of {volume} stopped")


def assert_detached(site: Site, host: Any, volume: str) -> None:
    v = site.show(host, volume)
    assert v["state"] == "detached" and not v["message"], v
    assert all(r["pid"] is None for r in v["replicas"]), v


def test_snapshots_of_a_detached_volume_from_a_node_without_replicas(site: Site) -> None:
    a, b, c = site.hosts
    assert site.create_avoiding(a, "ds", 2, [a]) == {b.name, c.name}
    before = attach_sum(site, "ds", b, write_seed=1)
    t0 = time.monotonic()
    site.cli(a, "snapshot", "create", "ds", "s1")
    t_snap = time.monotonic() - t0
    assert_detached(site, a, "ds")
    site.cli(a, "snapshot", "create", "ds", "s2")
    assert [s["name"] for s in site.json(a, "snapshot", "ls", "ds")] == ["s1", "s2"]
    site.cli(a, "snapshot", "rm", "ds", "s1")
    site.cli(a, "snapshot", "purge", "ds")
    assert_detached(site, a, "ds")
    site.cli(c, "volume", "attach", "ds", "--frontend", "none")
    try:
        # Attached: asked of a, forwarded to c's engine (no maintenance attach).
        assert [s["name"] for s in site.json(a, "snapshot", "ls", "ds")] == ["s2"]
        assert digest(site.show(c, "ds")["endpoint"]) == before
    finally:
        site.cli(c, "volume", "detach", "ds")
        wait_stopped(site, a, "ds")
    site.cli(a, "volume", "rm", "ds")
    print(f"snapshot create through a maintenance attach: {t_snap:.1f} s")


def test_expand_of_a_detached_volume_from_a_node_without_replicas(site: Site) -> None:
    a, b, c = site.hosts
    assert site.create_avoiding(a, VOL, 2, [a]) == {b.name, c.name}
    state["written"] = attach_sum(site, VOL, b, write_seed=2)
    t0 = time.monotonic()
    site.cli(a, "volume", "expand", VOL, "--size", "48MiB")
    print(f"expand through a maintenance attach: {time.monotonic() - t0:.1f} s")
    assert site.show(b, VOL)["size"] == 48 * MiB
    assert_detached(site, a, VOL)


def test_attach_during_maintenance_is_refused(site: Site) -> None:
    """A user's attach (asked of b, straight to its API socket to hit the short window)
    while a snapshot create on a holds the volume: refused, naming the maintenance. Should
    the maintenance have ended just before, the attach is undone and the round repeated."""
    a, b, c = site.hosts
    api = httpx.Client(transport=httpx.HTTPTransport(uds=os.path.join(b.home, "daemon.sock")),
                       base_url="http://blockhorn", timeout=60)
    refused = ""
    try:
        for attempt in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-m", "blockhorn", "--home", a.home, "snapshot", "create",
                 VOL, f"busy{attempt}"], env=site.env(), cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 30
                while proc.poll() is None and time.monotonic() < deadline:
                    v = api.get(f"/v1/volumes/{VOL}").json()
                    if (v.get("message") or "").startswith("maintenance on node"):
                        r = api.post(f"/v1/volumes/{VOL}/attach", json={"frontend": "none"})
                        if r.status_code == 200:   # it ended in between: undo, again
                            site.cli(b, "volume", "detach", VOL)
                            wait_stopped(site, b, VOL)
                        else:
                            refused = r.json()["error"]["message"]
                        break
                    time.sleep(0.01)
            finally:
                _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            if refused:
                break
    finally:
        api.close()
    assert f"maintenance on node {a.name}: snapshot create busy" in refused, refused
    assert_detached(site, a, VOL)


def test_daemon_killed_during_maintenance_leaves_an_attached_volume(site: Site) -> None:
    """The daemon of the node asked dies in the middle of a maintenance attach: the volume
    is left attached there (its engine restarted by the daemon's next start), an attach is
    refused, a detach ends it, and the data is as written."""
    a, b, c = site.hosts
    assert site.create_avoiding(a, "dk", 2, [a]) == {b.name, c.name}
    before = attach_sum(site, "dk", b, write_seed=3)
    api = httpx.Client(transport=httpx.HTTPTransport(uds=os.path.join(a.home, "daemon.sock")),
                       base_url="http://blockhorn", timeout=60)
    # Straight to the API, not the CLI: a CLI that loses its daemon may start one itself.
    asked = threading.Thread(target=_post_quietly,
                             args=(api, "/v1/volumes/dk/snapshots", {"name": "k1"}))
    try:
        asked.start()
        deadline = time.monotonic() + 30
        while not (api.get("/v1/volumes/dk").json().get("message") or "").startswith(
                "maintenance on node"):
            assert time.monotonic() < deadline, "no maintenance attach seen"
            time.sleep(0.01)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        asked.join(30)
    finally:
        api.close()
    site.start(a)
    v = site.show(b, "dk")
    assert v["state"] == "attached" and v["node"] == a.name, v
    # Refused naming the maintenance attach, also where a's supervisor restarted the engine
    # and its message replaced the mark's (the mark is the attachment: maintenance.py).
    r = site.cli(b, "volume", "attach", "dk", "--frontend", "none", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"busy: maintenance on node {a.name}: snapshot create k1" in r.stderr and \
        "volume detach dk` ends it" in r.stderr, r.stderr
    site.cli(a, "volume", "detach", "dk")
    wait_stopped(site, b, "dk")
    assert_detached(site, b, "dk")
    assert attach_sum(site, "dk", c) == before
    site.cli(a, "volume", "rm", "dk")


def _post_quietly(api: httpx.Client, path: str, body: dict[str, Any]) -> None:
    try:
        api.post(path, json=body)
    except httpx.HTTPError:
        pass   # the daemon was killed under it


def test_clone_across_nodes(site: Site) -> None:
    """A clone asked of a (no replica of the source there) reads the snapshot from b's or c's replica and writes the new volume through
    a maintenance attach: it reads the same as the source; a snapshot that does not exist
    is a clear error and leaves no volume."""
    a, b, c = site.hosts
    r = site.cli(a, "volume", "create", "cl", "--from-snapshot", f"{VOL}/nosuch", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nosuch" in r.stderr, r.stderr
    assert "cl" not in {v["name"] for v in site.json(a, "volume", "ls")}
    site.cli(a, "snapshot", "create", VOL, "forclone")
    source = attach_sum(site, VOL, b)
    t0 = time.monotonic()
    site.cli(a, "volume", "create", "cl", "--from-snapshot", f"{VOL}/forclone",
             "--replicas", "2")
    t_clone = time.monotonic() - t0
    assert_detached(site, a, "cl")
    assert attach_sum(site, "cl", c) == source
    assert attach_sum(site, "cl", c, length=32 * MiB) == state["written"]
    site.cli(a, "volume", "rm", "cl")
    assert_detached(site, a, VOL)
    print(f"clone of a 48 MiB volume across nodes: {t_clone:.1f} s")


def test_backup_from_a_node_without_replicas_and_restore(site: Site) -> None:
    a, b, c = site.hosts
    target = os.path.join(site.root, "backups")
    os.makedirs(target)
    site.cli(a, "backup", "target", "set", "default", f"file://{target}")
    t0 = time.monotonic()
    detached = site.json(a, "backup", "create", VOL)   # a new snapshot, then the backup
    t_backup = time.monotonic() - t0
    assert detached["state"] == "complete", detached
    assert_detached(site, a, VOL)

    # Attached on a: the engine's node holds no replica; the backup reads b's or c's.
    site.cli(a, "volume", "attach", VOL, "--frontend", "none")
    try:
        attached = site.json(a, "backup", "create", VOL)
    finally:
        site.cli(a, "volume", "detach", VOL)
        wait_stopped(site, a, VOL)
    assert attached["state"] == "complete" and attached["incremental"], attached

    t0 = time.monotonic()
    site.cli(a, "backup", "restore", attached["url"], "rv", "--replicas", "2")
    t_restore = time.monotonic() - t0
    rv = site.show(a, "rv")
    assert rv["state"] == "detached" and not rv["message"], rv
    assert {r["node"] for r in rv["replicas"]} != {a.name}   # at least one elsewhere
    # A DR standby on the cluster, asked of a: restored in full (the same backup) now.
    site.cli(a, "volume", "create", "sb", "--standby-from", f"file://{target}?volume={VOL}",
             "--replicas", "2")
    assert_detached(site, a, "sb")

    site.cli(c, "volume", "attach", VOL, "--frontend", "none")
    try:
        uri = site.show(c, VOL)["endpoint"]
        # The data of the expanded volume: as written, the new 16 MiB zeros.
        assert digest(uri, 32 * MiB) == state["written"]
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            assert h.get_size() == 48 * MiB
            assert not any(h.pread(16 * MiB, 32 * MiB))
            whole = digest(uri)
            # For the standby's incremental step: old data zeroed, new data.
            h.pwrite(bytes(2 * MiB), 0)
            h.pwrite(b"standby" * 4096, 40 * MiB)
            h.flush()
        finally:
            h.shutdown()
        changed = digest(uri)
        site.json(a, "backup", "create", VOL)   # forwarded to c, which holds a replica
    finally:
        site.cli(c, "volume", "detach", VOL)
        wait_stopped(site, a, VOL)

    assert attach_sum(site, "rv", c) == whole
    print(f"backup (detached, read from another node): {t_backup:.1f} s; "
          f"restore through a maintenance attach: {t_restore:.1f} s")
    st = site.json(a, "volume", "standby-sync", "sb")
    assert st["applied_now"] and not st["error"], st
    assert_detached(site, a, "sb")
    site.cli(a, "volume", "activate", "sb")
    assert attach_sum(site, "sb", b) == changed
    for v in ("rv", "sb", VOL):
        site.cli(a, "volume", "rm", v)


def test_recurring_job_once_per_slot_on_the_engines_node(site: Site) -> None:
    """A recurring job on a cluster: every node's scheduler sees each slot due, and exactly
    one claims it (the store's start_run); a node that runs it for a volume attached on
    another node runs the job's steps there (POST /v1/jobs/JOB/volumes/VOL/run). `job run`
    of a detached volume asked of a node without its replicas goes through a maintenance
    attach. (Two claims of one slot race only when the nodes read the job within the same
    few milliseconds, which a handful of slots rarely shows: the store's rule that the second
    claim fails is tested on its own in t2_control_store.)"""
    a, b, c = site.hosts
    assert site.create_avoiding(a, "dj", 2, [a]) == {b.name, c.name}
    site.cli(b, "volume", "attach", "dj", "--frontend", "none")
    try:
        # Every 3 s (a sixth cron field gives seconds), seen due by three schedulers.
        site.cli(a, "job", "create", "every3", "--cron", "* * * * * */3", "--task",
                 "snapshot", "--retain", "2", "--volume", "dj")
        try:
            wait_until(lambda: sum(r["state"] == "ok" for r in
                                   site.json(c, "job", "show", "every3")["history"]) >= 4,
                       60, "four runs of the job")
            runs = site.json(c, "job", "show", "every3")["history"]
        finally:
            site.cli(c, "job", "rm", "every3")
        slots = [r["slot"] for r in runs]
        assert len(slots) == len(set(slots)), runs          # one run per slot, not one per node
        for r in runs:
            if r["state"] == "ok":
                assert r["result"]["volumes"]["dj"].get("node", b.name) == b.name, r
        # Asked of a (no engine there): the steps run on b, where the engine is.
        site.cli(a, "job", "create", "once", "--cron", "0 0 1 1 *", "--task", "snapshot",
                 "--retain", "5", "--volume", "dj")
        got = site.json(a, "job", "run", "once")
        assert got["state"] == "ok" and got["result"]["volumes"]["dj"]["node"] == b.name, got
        snap = got["result"]["volumes"]["dj"]["snapshot"]
        listed = {s["name"]: s for s in site.json(a, "snapshot", "ls", "dj")}
        assert listed[snap]["labels"] == {"RecurringJob": "once"}, listed
    finally:
        site.cli(b, "volume", "detach", "dj")
        wait_stopped(site, a, "dj")
    # Detached, asked of a, which holds no replica: a maintenance attach there.
    got = site.json(a, "job", "run", "once")
    assert got["state"] == "ok" and "node" not in got["result"]["volumes"]["dj"], got
    assert_detached(site, a, "dj")
    assert got["result"]["volumes"]["dj"]["snapshot"] in {
        s["name"] for s in site.json(a, "snapshot", "ls", "dj")}
    site.cli(a, "job", "rm", "once")
    site.cli(a, "volume", "rm", "dj")


def _replica_on(site: Site, asked: Any, volume: str, node: Any) -> dict[str, Any]:
    return next(r for r in site.show(asked, volume)["replicas"] if r["node"] == node.name)


REBUILDS = "concurrent-replica-rebuild-per-node-limit"
BANDWIDTH = "replica-rebuilding-bandwidth-limit"


def _rebuilding(meta: str) -> bool:
    try:
        with open(meta) as f:
            return bool(json.load(f).get("Rebuilding"))
    except (OSError, ValueError):   # replaced at this moment
        return False


def test_backup_reads_only_an_in_sync_replica(site: Site) -> None:
    """Attached on a (no replica there), b's replica stale: killed while no rebuild may run
    (REBUILDS 0), it comes back with its files as they were and stays ERR while the engine
    goes on with c's: snapshot s1 removed and made again with other data. A backup of s1
    asked of a reads c's replica, the one in sync, not b's older s1 (b's node sorts first,
    which is where the reader looked before): the restored backup is the data acknowledged
    before the second s1. With c's daemon down the one in-sync replica cannot be read: the
    backup is refused naming it, b is not read, nothing is written. Rebuilds allowed again
    but slow, b is Rebuilding: its node refuses to serve its snapshot, and a backup then
    reads c's (the acknowledged data again). Then b resyncs and the volume reads as
    acknowledged."""
    a, b, c = site.hosts
    assert site.create_avoiding(a, "bf", 2, [a]) == {b.name, c.name}
    target = os.path.join(site.root, "backups-fresh")
    os.makedirs(target)
    site.cli(a, "backup", "target", "set", "fresh", f"file://{target}")
    site.cli(a, "volume", "attach", "bf", "--frontend", "none")
    try:
        uri = site.show(a, "bf")["endpoint"]
        digest(uri, write_seed=21)
        site.cli(a, "snapshot", "create", "bf", "s1")
        site.cli(a, "snapshot", "create", "bf", "s2")   # s1 folds into it when removed
        site.cli(a, "setting", "set", REBUILDS, "0")
        rb, rc = (_replica_on(site, a, "bf", h) for h in (b, c))
        os.kill(rb["pid"], signal.SIGKILL)
        wait_until(lambda: _replica_on(site, a, "bf", b)["mode"] not in (None, "RW"), 30,
                   "b's replica out of the in-sync set")
        site.cli(a, "snapshot", "rm", "bf", "s1")
        site.cli(a, "snapshot", "purge", "bf")
        fresh = digest(uri, write_seed=22)
        site.cli(a, "snapshot", "create", "bf", "s1")   # the same name, newer data
        assert _replica_on(site, a, "bf", b)["mode"] != "RW"

        t0 = time.monotonic()
        got = site.json(a, "backup", "create", "bf", "--snapshot", "s1", "--target", "fresh")
        t_backup = time.monotonic() - t0
        assert got["state"] == "complete", got
        assert restored_digest(target, got["url"], 32 * MiB) == fresh

        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait(10)
        try:
            r = site.cli(a, "backup", "create", "bf", "--snapshot", "s1", "--target", "fresh",
                         check=False)
        finally:
            site.start(c)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert f"no in-sync replica of 'bf' ({rc['name']})" in r.stderr, r.stderr
        assert len(site.json(a, "backup", "ls", "bf", "--target", "fresh")) == 1

        # Rebuilds allowed again, at 1 MiB/s: b is Rebuilding (its layers copied in part)
        # for seconds. Its node refuses to serve it; a backup meanwhile reads c's.
        site.cli(a, "setting", "set", BANDWIDTH, "1")
        site.cli(a, "setting", "set", REBUILDS, "5")
        meta = os.path.join(rb["path"], "volume.meta")
        wait_until(lambda: _rebuilding(meta), 30, "b's replica rebuilding")
        api = httpx.Client(transport=httpx.HTTPTransport(
            uds=os.path.join(b.home, "daemon.sock")), base_url="http://blockhorn", timeout=30)
        try:   # as another node's backup asks it (served there, not forwarded)
            served = api.get("/v1/volumes/bf/snapshots/s1/source",
                             headers={"x-blockhorn-forwarded": "1"})
        finally:
            api.close()
        assert _rebuilding(meta)   # still: the refusal was for this
        assert served.status_code >= 400 and "rebuilding" in served.text, served.text
        during = site.json(a, "backup", "create", "bf", "--snapshot", "s1", "--target",
                           "fresh")
        assert during["state"] == "complete", during
        assert restored_digest(target, during["url"], 32 * MiB) == fresh
        site.cli(a, "setting", "set", BANDWIDTH, "0")
        wait_until(lambda: site.healthy_on(a, "bf", {b.name, c.name}), 60, "b resynced")
        assert digest(uri) == fresh
    finally:
        site.cli(a, "setting", "set", BANDWIDTH, "0")
        site.cli(a, "setting", "set", REBUILDS, "5")
        site.cli(a, "volume", "detach", "bf")
        wait_stopped(site, a, "bf")
    site.cli(a, "volume", "rm", "bf")
    print(f"backup with a stale replica, read from the in-sync one: {t_backup:.1f} s")


def test_expand_checks_every_replicas_disk(site: Site) -> None:
    """Expand asked of a, which holds no replica: b's disk of the volume promises only 40 MiB
    (the rest reserved), so 48 MiB is refused naming b and that disk, the size and data
    unchanged; 40 MiB fits, and the data reads back."""
    a, b, c = site.hosts
    tight = {h.name: os.path.join(site.root, f"tight-{h.name}") for h in (b, c)}
    for path in tight.values():
        os.makedirs(path)
    # 40 MiB promisable on b's: capacity less the reserve (a multiple of 4 KiB).
    reserve = (shutil.disk_usage(tight[b.name]).total - 40 * MiB) // 4096 * 4096
    site.cli(b, "disk", "add", tight[b.name], "--tags", "tight", "--reserve", str(reserve))
    site.cli(c, "disk", "add", tight[c.name], "--tags", "tight")
    try:
        site.cli(a, "volume", "create", "dx", "--size", "32MiB", "--replicas", "2",
                 "--disk-selector", "tight")
        reps = site.show(a, "dx")["replicas"]
        assert {(r["node"], r["disk"]) for r in reps} == set(tight.items()), reps
        written = attach_sum(site, "dx", b, write_seed=31)

        r = site.cli(a, "volume", "expand", "dx", "--size", "48MiB", check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert f"disk {tight[b.name]} of node {b.name}" in r.stderr, r.stderr
        assert tight[c.name] not in r.stderr and "the limit of 40" in r.stderr, r.stderr
        assert site.show(a, "dx")["size"] == 32 * MiB
        assert_detached(site, a, "dx")

        site.cli(a, "volume", "expand", "dx", "--size", "40MiB")
        assert site.show(a, "dx")["size"] == 40 * MiB
        assert_detached(site, a, "dx")
        assert attach_sum(site, "dx", c, 32 * MiB) == written
        site.cli(a, "volume", "rm", "dx")
    finally:
        for name, path in tight.items():
            site.cli(site.host(name), "disk", "rm", path, check=False)


def test_replica_gone_from_its_disk_is_not_made_again_empty(site: Site) -> None:
    """b's replica stale (kept out while writes went to c's alone), the volume detached, then
    c's replica directory gone (a disk lost or not mounted): c's node must not make an empty
    replica in its place. It did: the start rule then counted it as the member it asks for,
    started from b's older replica and resynced c's from it, losing acknowledged writes. Now
    nothing is made there (an attach meanwhile would be refused naming c's replica as
    unreachable, after waiting for it: the start rule's refusal, tested elsewhere); with the
    directory back the volume attaches and reads as acknowledged."""
    a, b, c = site.hosts
    assert site.create_avoiding(a, "hz", 2, [a]) == {b.name, c.name}
    site.cli(a, "volume", "attach", "hz", "--frontend", "none")
    try:
        uri = site.show(a, "hz")["endpoint"]
        digest(uri, write_seed=41)
        site.cli(a, "setting", "set", REBUILDS, "0")
        rb, rc = (_replica_on(site, a, "hz", h) for h in (b, c))
        os.kill(rb["pid"], signal.SIGKILL)
        wait_until(lambda: _replica_on(site, a, "hz", b)["mode"] not in (None, "RW"), 30,
                   "b's replica out of the in-sync set")
        acked = digest(uri, write_seed=42)   # on c's replica only
    finally:
        site.cli(a, "volume", "detach", "hz")
        site.cli(a, "setting", "set", REBUILDS, "5")
    wait_stopped(site, a, "hz")
    os.rename(rc["path"], rc["path"] + ".lost")
    log = os.path.join(c.home, "logs", "daemon.log")
    wait_until(lambda: f"replica {rc['name']} of hz is gone" in open(log).read()
               or os.path.exists(rc["path"]), 20, "c's node to notice its replica gone")
    assert not os.path.exists(rc["path"]), "an empty replica made in place of the lost one"
    os.rename(rc["path"] + ".lost", rc["path"])
    site.cli(a, "volume", "attach", "hz", "--frontend", "none")
    try:
        wait_until(lambda: site.healthy_on(a, "hz", {b.name, c.name}), 60, "b resynced")
        assert digest(site.show(a, "hz")["endpoint"]) == acked
    finally:
        site.cli(a, "volume", "detach", "hz")
        wait_stopped(site, a, "hz")
    site.cli(a, "volume", "rm", "hz")


def test_a_dead_replica_process_record_goes_once_detached(site: Site) -> None:
    """A replica process that died while attached, the volume detached before its node's
    daemon restarted it (the daemon paused here): once that daemon runs again, the record
    of the dead process goes, so `volume show` no longer names its pid and waiting for the
    volume's replicas to stop ends; the data written before reads back. (The record stayed
    for good: seen in a CI run.)"""
    a, b, c = site.hosts
    assert site.create_avoiding(a, "dz", 2, [a]) == {b.name, c.name}
    site.cli(a, "volume", "attach", "dz", "--frontend", "none")
    acked = digest(site.show(a, "dz")["endpoint"], write_seed=51)
    assert b.proc is not None
    pid = _replica_on(site, a, "dz", b)["pid"]
    os.kill(b.proc.pid, signal.SIGSTOP)     # briefly: well within its node lease
    try:
        os.kill(pid, signal.SIGKILL)
        site.cli(a, "volume", "detach", "dz")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    wait_stopped(site, a, "dz")
    assert_detached(site, a, "dz")
    assert attach_sum(site, "dz", c) == acked
    site.cli(a, "volume", "rm", "dz")
