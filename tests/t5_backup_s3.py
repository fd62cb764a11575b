"""Tier 5: backups to a real S3 server (SeaweedFS on 127.0.0.1, credentials enforced),
spoken to over HTTP by boto3 — incremental backups restored and compared, the requests each
backup makes (counted by a botocore event hook), a wrong secret, a backup killed mid-upload
and resumed, a corrupt block; and the whole path through the CLI and the daemon: an attached
volume written over NBD, backed up, listed, restored into a new volume, read back, removed."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import signal
from collections.abc import Iterator

import pytest
from support.backup_util import (
    BLOCK,
    MiB,
    ReplicaVolume,
    backup_killed_after,
    backup_snapshot,
    restore_digest,
    snapshot_digest,
)
from support.s3server import S3Server

from blockhorn import backup as bk
from blockhorn.backup import format as fmt

SIZE = 16 * MiB
backup = backup_snapshot
restored = functools.partial(restore_digest, size=SIZE)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(str(tmp_path_factory.mktemp("seaweedfs"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKHORN_BACKUP_LOCK_WAIT_S", "0.02")


@pytest.fixture
def target(s3server: S3Server) -> Iterator[bk.Target]:
    t = bk.open_target(f"s3://{s3server.bucket()}@us-east-1/backups/", s3server.env())
    yield t
    t.close()


@pytest.fixture
def vol(tmp_path) -> Iterator[ReplicaVolume]:
    v = ReplicaVolume(str(tmp_path / "r0"), SIZE, "vol")
    yield v
    v.close()


def test_s3_incrementals_restore_and_requests_grow_only_with_changed_blocks(
        target, vol, tmp_path) -> None:
    assert isinstance(target, bk.targets.S3Target)
    vol.random(0, 5 * BLOCK)
    made = [backup(target, vol, vol.snapshot("s0"))]
    requests = []
    for i, nblocks in enumerate((1, 2, 1), 1):
        for j in range(nblocks):
            vol.random((5 + j) * BLOCK + 4096 * i, 4096)
        target.requests.clear()
        made.append(backup(target, vol, vol.snapshot(f"s{i}")))
        requests.append(dict(target.requests))
        assert made[-1]["incremental"] and made[-1]["new_blocks"] == nblocks
    for r, b in zip(requests, made[1:], strict=True):
        # One PUT per new block plus a constant 5 (lock twice, cfg twice, volume.cfg), and
        # the same few other requests each time: nothing grows with the store.
        assert r["PutObject"] == b["new_blocks"] + 5, r
        assert r.get("ListObjectsV2") == 1, r          # the locks directory, never blocks/
        others = {k: v for k, v in r.items() if k != "PutObject"}
        assert others == {k: v for k, v in requests[0].items() if k != "PutObject"}
    for i, b in enumerate(made):
        assert restored(target, b["name"], str(tmp_path / f"{i}.img")) == \
            snapshot_digest(vol.directory, f"s{i}")
    listed = bk.list_backups(target, "vol")
    assert [b["url"] for b in listed] == [b["url"] for b in made]
    assert listed[0]["url"].startswith(target.url + "?backup=")


def test_s3_wrong_secret_is_a_clear_error(s3server, vol) -> None:
    bad = dict(s3server.env(), AWS_SECRET_ACCESS_KEY="wrong")
    t = bk.open_target(f"s3://{s3server.bucket()}@us-east-1/x/", bad)
    vol.random(0, 4096)
    with pytest.raises(bk.TargetError) as e:
        backup(t, vol, vol.snapshot("s0"))
    assert e.value.errno == errno.EACCES and "credentials" in str(e.value)
    t.close()


def test_s3_addressing_style_and_ca_from_the_environment(s3server) -> None:
    env = dict(s3server.env(), VIRTUAL_HOSTED_STYLE="true", AWS_CERT="-----BEGIN CERT-----")
    t = bk.open_target("s3://bkt@eu-west-1/p/", env)
    try:
        assert t.client.meta.config.s3["addressing_style"] == "virtual"
        assert t.client.meta.region_name == "eu-west-1"
        assert open(t._cert_file).read() == "-----BEGIN CERT-----"
    finally:
        t.close()
    t = bk.open_target("s3://bkt/p/", s3server.env())      # an endpoint: path style
    assert t.client.meta.config.s3["addressing_style"] == "path"
    t.close()


def test_s3_backup_killed_mid_upload_resumes(s3server, target, vol, tmp_path) -> None:
    for i in range(5):
        vol.random(i * BLOCK, BLOCK)
    vol.snapshot("s0")
    journal = str(tmp_path / "journal")
    proc = backup_killed_after(2, target.url, s3server.env(), vol.directory, "s0", journal)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert bk.list_backups(target, "vol") == []
    target.requests.clear()
    result = backup(target, vol, "s0", journal_dir=journal)
    assert result["new_blocks"] == 4 and target.requests["PutObject"] == 4 + 5
    assert restored(target, result["name"], str(tmp_path / "r.img")) == \
        snapshot_digest(vol.directory, "s0")


def test_s3_delete_collects_only_unshared_blocks_in_one_request(target, vol, tmp_path) -> None:
    vol.random(0, 3 * BLOCK)
    b0 = backup(target, vol, vol.snapshot("s0"))
    vol.random(0, 2 * BLOCK)                     # two blocks now only in b0
    b1 = backup(target, vol, vol.snapshot("s1"))
    only0 = {c for _, c in fmt.BackupCfg.decode(target.get(
        fmt.backup_cfg_path("vol", b0["name"]))).blocks[:2]}
    target.requests.clear()
    rm = bk.delete_backup(target, "vol", b0["name"])
    assert rm["blocks_deleted"] == 2 and target.requests["DeleteObjects"] == 1
    assert not any(target.exists(fmt.block_path("vol", c)) for c in only0)
    assert [b["name"] for b in bk.list_backups(target, "vol")] == [b1["name"]]
    assert restored(target, b1["name"], str(tmp_path / "r.img")) == \
        snapshot_digest(vol.directory, "s1")


def test_s3_corrupt_block_is_named(target, vol, tmp_path) -> None:
    vol.random(0, BLOCK)
    b = backup(target, vol, vol.snapshot("s0"))
    (csum,) = [c for _, c in fmt.BackupCfg.decode(
        target.get(fmt.backup_cfg_path("vol", b["name"]))).blocks]
    target.put(fmt.block_path("vol", csum), fmt.compress("lz4", os.urandom(BLOCK)))
    with pytest.raises(fmt.BackupCorrupt, match=f"{csum}.*corrupt.*{b['name']}"):
        restored(target, b["name"], str(tmp_path / "x.img"))


def test_cli_backup_restore_through_the_daemon(s3server, tmp_path) -> None:
    import nbd
    from daemon_util import Env

    creds = tmp_path / "s3.env"
    creds.write_text("".join(f"{k}={v}\n" for k, v in s3server.env().items()))
    bucket = s3server.bucket()
    with Env() as env:
        env.env["BLOCKHORN_BACKUP_LOCK_WAIT_S"] = "0.02"
        short = env.cli("backup", "create", "v", check=False)   # Longhorn needs 2+ chars
        assert short.returncode == 2 and "invalid volume name" in short.stderr
        env.cli("volume", "create", "vol", "--size", "16MiB", "--replicas", "2")
        uri = env.cli("volume", "attach", "vol", "--frontend", "none").stdout.strip()
        data = os.urandom(3 * MiB)
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(data, 5 * MiB)
        h.flush()
        h.shutdown()
        none = env.cli("backup", "create", "vol", check=False)
        assert none.returncode == 2 and "backup target set" in none.stderr
        env.cli("backup", "target", "set", "s3t", f"s3://{bucket}@us-east-1/bh/",
                "--credential-file", str(creds))
        out = json.loads(env.cli("backup", "create", "vol", "--json").stdout)
        assert out["state"] == "complete" and out["blocks"] == 2
        (job,) = json.loads(env.cli("backup", "jobs", "--json").stdout)
        assert job["state"] == "complete" and job["progress"]["percent"] == 100
        assert job["progress"]["done_bytes"] == job["progress"]["total_bytes"] == 2 * BLOCK
        listed = json.loads(env.cli("backup", "ls", "vol", "--json").stdout)
        assert [b["url"] for b in listed] == [out["url"]]
        assert {"name", "url", "volume", "snapshot", "size", "created", "state"} <= \
            set(listed[0])
        shown = json.loads(env.cli("backup", "show", out["url"], "--json").stdout)
        assert shown["volume_size"] == 16 * MiB
        env.cli("backup", "restore", out["url"], "v2", "--replicas", "1")
        uri2 = env.cli("volume", "attach", "v2", "--frontend", "none").stdout.strip()
        h = nbd.NBD()
        h.connect_uri(uri2)
        back = h.pread(16 * MiB, 0)
        h.shutdown()
        expect = bytes(5 * MiB) + data + bytes(8 * MiB)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(expect).hexdigest()
        missing = env.cli("backup", "show", out["url"].replace("backup=backup-",
                                                               "backup=backup-0"), check=False)
        assert missing.returncode == 1 and "does not exist" in missing.stderr
        assert "Traceback" not in missing.stderr
        bad = env.cli("backup", "restore", out["url"], "v2", check=False)
        assert bad.returncode == 1 and "already exists" in bad.stderr
        env.cli("backup", "rm", out["url"])
        assert json.loads(env.cli("backup", "ls", "--json").stdout) == []
