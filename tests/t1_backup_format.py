"""Tier 1: the backupstore codec against the documented examples of docs/FORMAT.md ("4.
Backupstore") and against facts of Longhorn's Go code (checksums, paths, `,string` fields,
lz4 frames, backup URLs)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re

import lz4.frame
import pytest

from blockhorn.backup import format as fmt
from blockhorn.types import InvalidArgument

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def doc_block(tag: str) -> bytes:
    with open(DOC) as f:
        (block,) = re.findall(rf"```{tag}\n(.*?)\n```", f.read(), re.S)
    return block.encode()


def test_volume_cfg_example_decodes_and_reencodes_byte_for_byte() -> None:
    raw = doc_block("backupstore-volume-cfg")
    v = fmt.VolumeCfg.decode(raw)
    assert (v.name, v.size, v.block_count, v.compression_method) == ("vol1", 8 << 20, 2, "lz4")
    assert v.labels == {"app": "db"} and v.last_backup_name == "backup-0123456789abcdef"
    assert v.encode() == raw
    d = json.loads(raw)   # the double encoding a Go `,string` string field has
    assert d["CompressionMethod"] == '"lz4"' and d["Size"] == "8388608"


def test_backup_cfg_example_decodes_and_reencodes_byte_for_byte() -> None:
    raw = doc_block("backupstore-backup-cfg")
    b = fmt.BackupCfg.decode(raw)
    assert b.name == "backup-0123456789abcdef" and b.volume_name == "vol1"
    assert b.size == 4 << 20 and not b.in_progress and b.block_size == 2 << 20
    assert b.blocks[0] == (0, fmt.checksum(bytes(2 << 20)))
    assert b.blocks[1] == (6 << 20, fmt.checksum(b"\xab" * (2 << 20)))
    assert b.encode() == raw
    assert isinstance(json.loads(raw)["Blocks"][1]["Offset"], int)


def test_lock_and_url_examples() -> None:
    raw = doc_block("backupstore-lock")
    lock = fmt.LockCfg.decode(raw)
    assert (lock.name, lock.type, lock.acquired) == ("lock-0123456789abcdef", 1, True)
    assert lock.encode() == raw
    url = doc_block("backupstore-url").decode()
    parsed = fmt.decode_backup_url(url)
    assert parsed == fmt.BackupURL("s3://bkt@us-east-1/backups/", "vol1",
                                   "backup-0123456789abcdef")
    assert fmt.encode_backup_url(parsed.target, parsed.volume, parsed.backup) == url


def test_checksum_is_truncated_sha512_and_paths_use_it() -> None:
    assert fmt.checksum(b"vol1") == hashlib.sha512(b"vol1").hexdigest()[:64]
    assert fmt.volume_dir("vol1") == "backupstore/volumes/01/9c/vol1"
    c = fmt.checksum(bytes(2 << 20))
    assert fmt.block_path("vol1", c) == \
        f"backupstore/volumes/01/9c/vol1/blocks/{c[:2]}/{c[2:4]}/{c}.blk"
    assert fmt.backup_cfg_path("vol1", "backup-1") == \
        "backupstore/volumes/01/9c/vol1/backups/backup_backup-1.cfg"


def test_in_progress_cfg_and_empty_blocks_as_go_writes_them() -> None:
    raw = fmt.BackupCfg(name="backup-aa", volume_name="v1").encode()
    d = json.loads(raw)
    assert d["CreatedTime"] == "" and "Blocks" not in d        # omitempty slice
    assert d["SingleFile"] == {"FilePath": ""}                 # omitempty has no effect
    assert fmt.BackupCfg.decode(raw).in_progress


def test_go_string_escaping_and_lenient_string_tags() -> None:
    assert fmt.go_string("a<b>&c") == '"a\\u003cb\\u003e\\u0026c"'
    assert fmt.go_string("é") == '"é"'
    # A hand-written store with plain strings in `,string` fields still reads.
    v = fmt.VolumeCfg.decode(b'{"Name":"v1","Size":"4096","CompressionMethod":"gzip"}')
    assert v.compression_method == "gzip" and v.size == 4096
    # No method at all means gzip (Longhorn's LEGACY_COMPRESSION_METHOD).
    assert fmt.VolumeCfg.decode(b'{"Name":"v1","Size":"4096"}').compression_method == "gzip"


@pytest.mark.parametrize("method", ["lz4", "gzip", "none"])
def test_compression_round_trip(method: str) -> None:
    data = os.urandom(1 << 20) + bytes(1 << 20)
    blob = fmt.compress(method, data)
    assert fmt.decompress(method, blob) == data
    if method == "lz4":
        assert blob[:4] == b"\x04\x22\x4d\x18"           # a frame, not a raw block
        assert lz4.frame.decompress(blob) == data
    if method == "gzip":
        assert gzip.decompress(blob) == data


def test_incompressible_block_is_a_frame_of_uncompressed_blocks() -> None:
    for size in (2 << 20, 16 << 20):
        data = os.urandom(size)
        blob = fmt.compress("lz4", data)
        assert blob[:7] == bytes.fromhex("04224d18607073")      # FLG 0x60, BD 4 MiB
        assert int.from_bytes(blob[7:11], "little") == 0x80000000 | min(size, 4 << 20)
        assert len(blob) == size + 7 + 4 * (size // (4 << 20) or 1) + 4
        assert lz4.frame.decompress(blob) == data               # any LZ4 frame reader
    # The header checksum byte is xxh32 of FLG BD, as an encoder computes it.
    ref = lz4.frame.compress(bytes(2 << 20), block_linked=False, content_checksum=False,
                             store_size=False, block_size=lz4.frame.BLOCKSIZE_MAX4MB)
    assert ref[:7] == fmt.LZ4_RAW_HEADER


def test_mixed_up_compression_is_recognised_by_magic() -> None:
    data = b"x" * 5000
    assert fmt.decompress("gzip", fmt.compress("lz4", data)) == data
    assert fmt.decompress("lz4", fmt.compress("gzip", data)) == data
    with pytest.raises(fmt.BackupCorrupt):
        fmt.decompress("lz4", b"\x04\x22\x4d\x18garbage")


def test_block_size_parameter_and_bad_names() -> None:
    b = fmt.BackupCfg(name="backup-aa", volume_name="v1",
                      parameters={"backup-block-size": "16Mi"})
    assert b.block_size == 16 << 20
    with pytest.raises(InvalidArgument):
        fmt.check_store_name("-bad", "volume")
    with pytest.raises(InvalidArgument):
        fmt.decode_backup_url("s3://bkt/p/?backup=b1")     # no volume
