"""Tier 3: backups of real replica directories (snapshot layer chains) to a file target —
full and incremental backups restored and compared by checksum, dedup, a backup killed
mid-upload and resumed, corrupt and missing blocks, delete + GC beside a running backup,
Longhorn's locks, and compatibility both ways with an independent Longhorn-format writer and
reader (tests/support/longhorn_ref.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import threading
import time

import pytest
from support import longhorn_ref
from support.backup_util import (
    BLOCK,
    MiB,
    ReplicaVolume,
    backup_killed_after,
    backup_snapshot,
    file_digest,
    replica_digest,
    restore_digest,
    snapshot_digest,
)

from blockhorn import backup as bk
from blockhorn.backup import format as fmt
from blockhorn.replica.snapshots import create_snapshot
from blockhorn.replica.store import Replica
from blockhorn.types import Busy

SIZE = 16 * MiB     # 8 blocks of 2 MiB
backup = backup_snapshot
restored_digest = functools.partial(restore_digest, size=SIZE)


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKHORN_BACKUP_LOCK_WAIT_S", "0.02")


@pytest.fixture
def store(tmp_path) -> bk.Target:
    (tmp_path / "store").mkdir()
    return bk.open_target(f"file://{tmp_path}/store")


@pytest.fixture
def vol(tmp_path):
    v = ReplicaVolume(str(tmp_path / "r0"), SIZE, "vol")
    yield v
    v.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_and_three_incrementals_restore_to_their_snapshots(store, vol, tmp_path) -> None:
    vol.random(0, 3 * MiB)
    vol.random(9 * MiB, 4096)
    made = [backup(store, vol, vol.snapshot("s0"))]
    changes = [lambda: vol.random(2 * MiB + 100, 5000),            # one block
               lambda: (vol.zero(0, 1 * MiB), vol.random(14 * MiB, MiB)),   # zeroed + new
               lambda: vol.random(4 * MiB, 4 * MiB)]               # two fresh blocks
    for i, change in enumerate(changes, 1):
        change()
        made.append(backup(store, vol, vol.snapshot(f"s{i}")))
    assert [b["incremental"] for b in made] == [False, True, True, True]
    assert [b["new_blocks"] for b in made] == [3, 1, 2, 2]
    listed = bk.list_backups(store, "vol")
    assert [b["snapshot"] for b in listed] == ["s0", "s1", "s2", "s3"]
    assert all(b["state"] == "complete" and "backup=" in b["url"] for b in listed)
    for i, b in enumerate(made):
        assert restored_digest(store, b["name"], str(tmp_path / f"r{i}.img")) == \
            snapshot_digest(vol.directory, f"s{i}"), f"backup of s{i} restores wrong data"
    # Holes stay holes: the restored image of s0 allocates only its three blocks.
    assert os.stat(tmp_path / "r0.img").st_blocks * 512 <= 3 * BLOCK + MiB
    # Incremental restore of s3 over s1 gives s3 too (what a DR standby does).
    sink = bk.FileSink(str(tmp_path / "dr.img"), SIZE)
    bk.restore(store, "vol", made[1]["name"], sink)
    bk.incremental_restore(store, "vol", made[3]["name"], made[1]["name"], sink)
    sink.close()
    assert file_digest(str(tmp_path / "dr.img"), SIZE) == snapshot_digest(vol.directory, "s3")


def test_identical_blocks_are_stored_once(store, vol) -> None:
    same = os.urandom(BLOCK)
    for off in (0, 4 * MiB, 10 * MiB):
        vol.write(off, same)
    first = backup(store, vol, vol.snapshot("s0"))
    assert (first["blocks"], first["new_blocks"]) == (3, 1)
    vol.write(14 * MiB, same)          # a changed block whose content the store has
    second = backup(store, vol, vol.snapshot("s1"))
    assert (second["blocks"], second["new_blocks"], second["transferred_bytes"]) == (4, 0, 0)
    blocks = store.list(fmt.blocks_dir("vol"))
    assert len(blocks) == 1


def test_backup_killed_mid_upload_resumes_without_redoing_blocks(store, vol, tmp_path) -> None:
    for i in range(6):
        vol.random(i * BLOCK, BLOCK)
    vol.snapshot("s0")
    journal = str(tmp_path / "journal")
    proc = backup_killed_after(3, store.url, None, vol.directory, "s0", journal)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert bk.list_backups(store, "vol") == []           # a half-done backup is not listed
    (pending,) = bk.list_backups(store, "vol", include_incomplete=True)
    assert pending["state"] == "in-progress"
    result = backup(store, vol, "s0", journal_dir=journal)
    assert result["name"] == pending["name"]             # the same backup, resumed
    # 2 blocks were journaled before the kill; the 3rd was uploaded but not journaled.
    assert result["new_blocks"] == 4 and result["blocks"] == 6
    assert os.listdir(journal) == []
    assert restored_digest(store, result["name"], str(tmp_path / "r.img")) == \
        snapshot_digest(vol.directory, "s0")


def test_corrupt_and_missing_blocks_are_named_on_restore(store, vol, tmp_path) -> None:
    vol.random(0, 2 * BLOCK)
    b0 = backup(store, vol, vol.snapshot("s0"))
    vol.random(8 * MiB, 4096)
    b1 = backup(store, vol, vol.snapshot("s1"))
    cfg = fmt.BackupCfg.decode(store.get(fmt.backup_cfg_path("vol", b1["name"])))
    victim = cfg.blocks[0][1]
    path = os.path.join(store.root, fmt.block_path("vol", victim))
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(fmt.BackupCorrupt) as e:
        restored_digest(store, b1["name"], str(tmp_path / "x.img"))
    msg = str(e.value)
    assert victim in msg and "corrupt" in msg
    assert b0["name"] in msg and b1["name"] in msg      # both backups use that block
    os.unlink(path)
    with pytest.raises(fmt.BackupCorrupt, match=f"{victim}.*is missing"):
        restored_digest(store, b0["name"], str(tmp_path / "y.img"))


def test_delete_waits_for_a_running_backup_and_gc_keeps_its_blocks(store, vol, tmp_path) -> None:
    vol.random(0, BLOCK)                  # only in s0 (overwritten later)
    vol.random(4 * MiB, BLOCK)            # shared by every backup
    b0 = backup(store, vol, vol.snapshot("s0"))
    vol.random(0, BLOCK)
    b1 = backup(store, vol, vol.snapshot("s1"))
    vol.random(8 * MiB, 2 * BLOCK)
    vol.snapshot("s2")
    gate, uploading = threading.Event(), threading.Event()

    def slow(csum: str) -> None:
        uploading.set()
        assert gate.wait(30), "test gate never opened"

    results: dict[str, object] = {}
    runner = threading.Thread(target=lambda: results.update(
        b2=backup(store, vol, "s2", on_upload=slow, workers=1)))
    runner.start()
    assert uploading.wait(30)
    with pytest.raises(Busy):             # a delete cannot take its lock now...
        bk.delete_backup(store, "vol", b0["name"], lock_timeout_s=0)
    deleter = threading.Thread(target=lambda: results.update(
        rm=bk.delete_backup(store, "vol", b0["name"], lock_timeout_s=60)))
    deleter.start()
    deleter.join(1.5)
    assert deleter.is_alive()             # ...and one with a deadline waits for the backup
    gate.set()
    runner.join(30)
    deleter.join(30)
    assert not runner.is_alive() and not deleter.is_alive()
    rm, b2 = results["rm"], results["b2"]
    assert isinstance(rm, dict) and isinstance(b2, dict)
    # Only the block that b0 alone used is collected; the shared one stays.
    assert rm["blocks_deleted"] == 1 and rm["gc_skipped"] is None
    assert [b["name"] for b in bk.list_backups(store, "vol")] == [b1["name"], b2["name"]]
    for name, snap in ((b1["name"], "s1"), (b2["name"], "s2")):
        assert restored_digest(store, name, str(tmp_path / f"{snap}.img")) == \
            snapshot_digest(vol.directory, snap)
    assert bk.load_volume(store, "vol").last_backup_name == b2["name"]


def test_longhorn_locks_are_honoured_and_expire(store, vol) -> None:
    vol.random(0, 4096)
    vol.snapshot("s0")
    other = fmt.LockCfg("lock-00000000000000aa", fmt.LOCK_DELETE, True)
    path = fmt.lock_path("vol", other.name)
    store.put(path, other.encode())
    with pytest.raises(Busy, match="delete"):
        backup(store, vol, "s0", lock_timeout_s=0)
    old = time.time() - 200                # past Longhorn's 150 s expiry
    os.utime(os.path.join(store.root, path), (old, old))
    assert backup(store, vol, "s0", lock_timeout_s=0)["state"] == "complete"
    assert store.list(fmt.locks_dir("vol")) == [f"{other.name}.lck"]   # ours released


@pytest.mark.parametrize("method", ["lz4", "gzip"])
def test_longhorn_written_store_restores_in_blockhorn(store, vol, tmp_path, method) -> None:
    image = bytearray(SIZE)
    image[0:3 * MiB] = os.urandom(3 * MiB)
    first = longhorn_ref.write_backup(store.root, "vol", bytes(image), "lh-s0", method)
    image[10 * MiB:10 * MiB + 5000] = os.urandom(5000)
    second = longhorn_ref.write_backup(store.root, "vol", bytes(image), "lh-s1", last=first)
    assert restored_digest(store, second, str(tmp_path / "a.img")) == digest(bytes(image))
    # A blockhorn backup on top: Longhorn's snapshot is unknown here, so every allocated
    # block is read, and those the Longhorn backup stored are not uploaded again.
    vol.write(0, bytes(image[0:12 * MiB]))
    b = backup(store, vol, vol.snapshot("s0"))
    assert not b["incremental"] and b["compression"] == method
    # 6 blocks written (3 of them zeros, stored once as the zero block); the 3 with data are
    # in the store already, so only the zero block (which this writer skips) is uploaded.
    assert (b["blocks"], b["new_blocks"]) == (6, 1)
    assert longhorn_ref.read_backup(store.root, "vol", b["name"]) == bytes(image)


@pytest.mark.parametrize("method", ["lz4", "gzip", "none"])
def test_blockhorn_store_reads_with_the_independent_reader(store, vol, method) -> None:
    vol.random(2 * MiB, 3 * MiB)
    b0 = backup(store, vol, vol.snapshot("s0"), compression=method)
    vol.random(12 * MiB, 4096)
    b1 = backup(store, vol, vol.snapshot("s1"), compression="gzip")   # fixed per volume
    assert b1["compression"] == method
    for b, snap in ((b0, "s0"), (b1, "s1")):
        image = longhorn_ref.read_backup(store.root, "vol", b["name"])
        assert digest(image) == snapshot_digest(vol.directory, snap)
    vcfg = json.loads(store.get(fmt.volume_cfg_path("vol")))
    assert vcfg["LastBackupName"] == b1["name"] and json.loads(vcfg["CompressionMethod"]) == method



def test_nfs_target_is_the_mounted_directory(tmp_path, monkeypatch, vol) -> None:
    monkeypatch.setenv("BLOCKHORN_NFS_MOUNT_ROOT", str(tmp_path / "mnt"))
    with pytest.raises(bk.targets.NotFound, match="mount the NFS export"):
        bk.open_target("nfs://nas.example:/export/bk")
    (tmp_path / "mnt" / "nas_example" / "export" / "bk").mkdir(parents=True)
    t = bk.open_target("nfs://nas.example:/export/bk")
    vol.random(0, 4096)
    b = backup(t, vol, vol.snapshot("s0"))
    assert b["url"] == "nfs://nas.example:/export/bk?backup=" + b["name"] + "&volume=vol"
    assert os.path.exists(tmp_path / "mnt" / "nas_example" / "export" / "bk" /
                          fmt.volume_cfg_path("vol"))


def test_resume_after_the_interrupted_backup_was_deleted_starts_over(store, vol, tmp_path):
    for i in range(3):
        vol.random(i * BLOCK, BLOCK)
    vol.snapshot("s0")
    journal = str(tmp_path / "journal")

    def crash(csum: str) -> None:
        raise RuntimeError("simulated crash after one upload")

    with pytest.raises(RuntimeError):
        backup(store, vol, "s0", journal_dir=journal, workers=1, on_upload=crash)
    (pending,) = bk.list_backups(store, "vol", include_incomplete=True)
    store.delete(fmt.backup_cfg_path("vol", pending["name"]))
    for name in store.list(fmt.blocks_dir("vol")):          # a Longhorn-style sweep
        for sub in store.list(f"{fmt.blocks_dir('vol')}/{name}"):
            for blk in store.list(f"{fmt.blocks_dir('vol')}/{name}/{sub}"):
                store.delete(f"{fmt.blocks_dir('vol')}/{name}/{sub}/{blk}")
    result = backup(store, vol, "s0", journal_dir=journal)
    assert result["new_blocks"] == 3
    assert restored_digest(store, result["name"], str(tmp_path / "r.img")) == \
        snapshot_digest(vol.directory, "s0")


def test_daemon_service_resumes_an_interrupted_backup_when_it_starts(tmp_path) -> None:
    from blockhorn.control.store import SqliteStore
    from blockhorn.manager.backups import BackupService
    from blockhorn.manager.paths import Home
    from blockhorn.manager.volumes import VolumeManager

    home = Home(str(tmp_path / "home"))
    home.ensure()
    volumes = VolumeManager(home, SqliteStore(home.db))
    volumes.create("data", 8 * MiB, replicas=2)
    (tmp_path / "store").mkdir()
    svc = BackupService(volumes, resume=False)
    svc.set_target("t", f"file://{tmp_path}/store")
    dirs = [r.directory for r in volumes.store.replicas("data")]
    for d in dirs:
        r = Replica.open(d)
        r.write(0, b"\x5a" * (5 * MiB))
        create_snapshot(r, "s0", True, None)
        r.close()

    uploads: list[str] = []

    def crash(csum: str) -> None:
        uploads.append(csum)
        if len(uploads) == 2:
            raise RuntimeError("simulated crash after the second upload")

    target = svc.open(svc.target("t"))
    src = bk.open_snapshot(dirs, "s0")
    with pytest.raises(RuntimeError):
        bk.create_backup(target, "data", src, journal_dir=svc.journal_dir, workers=1,
                         on_upload=crash)
    src.close()
    svc2 = BackupService(volumes, resume=True)       # what a restarted daemon builds
    deadline = time.monotonic() + 30
    while not svc2.jobs() and time.monotonic() < deadline:   # its resume thread registers it
        time.sleep(0.02)
    (job,) = svc2.jobs()
    job = svc2.wait(job["id"], 30)
    assert job["state"] == "complete" and job["resumed"], job
    # 3 blocks, 2 distinct contents; the first was uploaded and journaled before the crash.
    assert job["result"]["new_blocks"] == 1
    (listed,) = svc2.list_backups("data")
    assert listed["snapshot"] == "s0" and listed["target"] == "t"
    restore_job = svc2.wait(svc2.start_restore(listed["url"], "copy", replicas=1)["id"], 30)
    assert restore_job["state"] == "complete", restore_job
    (copy,) = [r.directory for r in volumes.store.replicas("copy")]
    assert replica_digest(copy, 8 * MiB) == snapshot_digest(dirs[0], "s0")


def test_volume_size_not_a_multiple_of_the_block_size(store, tmp_path) -> None:
    size = 5 * MiB + 8192
    v = ReplicaVolume(str(tmp_path / "odd"), size, "odd")
    try:
        v.random(size - 3 * MiB, 3 * MiB)         # the last, partial block holds data
        src = bk.open_snapshot([v.directory], v.snapshot("s"))
        b = bk.create_backup(store, "odd", src)
        src.close()
        assert b["blocks"] == 2
        sink = bk.FileSink(str(tmp_path / "odd.img"), size)
        bk.restore(store, "odd", b["name"], sink)
        sink.close()
        assert os.path.getsize(tmp_path / "odd.img") == size
        assert file_digest(str(tmp_path / "odd.img")) == snapshot_digest(v.directory, "s")
    finally:
        v.close()


def test_16_mib_blocks(store, tmp_path) -> None:
    v = ReplicaVolume(str(tmp_path / "big"), 32 * MiB, "big")
    try:
        made = []
        for snap, offset in (("a", MiB), ("b", 20 * MiB)):
            v.random(offset, 4096)
            src = bk.open_snapshot([v.directory], v.snapshot(snap))
            made.append(bk.create_backup(store, "big", src, block_size=bk.LARGE_BLOCK_SIZE))
            src.close()
        first, second = made
        assert (first["blocks"], second["blocks"], second["incremental"]) == (1, 2, True)
        cfg = json.loads(store.get(fmt.backup_cfg_path("big", second["name"])))
        assert cfg["Parameters"] == {"backup-block-size": str(16 * MiB)}
        assert cfg["Size"] == str(32 * MiB)
        image = longhorn_ref.read_backup(store.root, "big", second["name"])
        assert digest(image) == snapshot_digest(v.directory, "b")
    finally:
        v.close()


def test_collect_garbage_sweeps_blocks_of_an_abandoned_backup(store, vol) -> None:
    vol.random(0, BLOCK)
    kept = backup(store, vol, vol.snapshot("s0"))
    vol.random(4 * MiB, 2 * BLOCK)
    vol.snapshot("s1")

    def crash(csum: str) -> None:
        raise RuntimeError("abandoned")

    with pytest.raises(RuntimeError):
        backup(store, vol, "s1", workers=1, on_upload=crash)
    assert bk.collect_garbage(store, "vol")["gc_skipped"]       # a backup is "in progress"
    (pending,) = [b for b in bk.list_backups(store, "vol", include_incomplete=True)
                  if b["state"] == "in-progress"]
    store.delete(fmt.backup_cfg_path("vol", pending["name"]))   # abandoned for good
    assert bk.collect_garbage(store, "vol")["blocks_deleted"] == 1
    cfg = fmt.BackupCfg.decode(store.get(fmt.backup_cfg_path("vol", kept["name"])))
    assert all(store.exists(fmt.block_path("vol", c)) for _, c in cfg.blocks)
    assert bk.load_volume(store, "vol").block_count == 1
