"""An independent, minimal Longhorn backupstore writer and reader for compatibility tests.

Written from Longhorn's documented layout (docs/FORMAT.md "Backupstore", and the Go structs of
longhorn/backupstore), deliberately sharing no code with blockhorn.backup: its own paths, its
own JSON (Go's encoding as Python dicts + json.dumps with Go's separators), its own lz4 frame
and gzip calls. It works on a plain directory (the layout of a `vfs://` / NFS target).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import time

import lz4.frame

BLOCK = 2 * 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()[:64]


def vol_dir(root: str, volume: str) -> str:
    h = sha(volume.encode())
    return os.path.join(root, "backupstore", "volumes", h[:2], h[2:4], volume)


def _go(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{time.time_ns()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _pack(method: str, data: bytes) -> bytes:
    if method == "lz4":
        return lz4.frame.compress(data)
    if method == "gzip":
        return gzip.compress(data)
    return data


def _unpack(method: str, data: bytes) -> bytes:
    if method == "lz4":
        return lz4.frame.decompress(data)
    if method == "gzip":
        return gzip.decompress(data)
    return data


def write_backup(root: str, volume: str, image: bytes, snapshot: str,
                 method: str = "lz4", last: str = "") -> str:
    """Write one backup of `image` (all blocks holding any non-zero byte) like Longhorn does;
    returns the backup name. `last` makes it incremental over that backup's block list."""
    vd = vol_dir(root, volume)
    name = "backup-" + secrets.token_hex(8)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    vcfg_path = os.path.join(vd, "volume.cfg")
    if os.path.exists(vcfg_path):
        vcfg = json.loads(open(vcfg_path, "rb").read())
        method = json.loads(vcfg["CompressionMethod"])
    else:
        vcfg = {"Name": volume, "Size": str(len(image)), "Labels": None, "CreatedTime": stamp,
                "LastBackupName": "", "LastBackupAt": "", "BlockCount": "0",
                "BackingImageName": json.dumps(""), "BackingImageChecksum": json.dumps(""),
                "CompressionMethod": json.dumps(method), "StorageClassName": json.dumps(""),
                "DataEngine": json.dumps("v1")}
    blocks = {}
    if last:
        old = json.loads(open(os.path.join(vd, "backups", f"backup_{last}.cfg"), "rb").read())
        blocks = {b["Offset"]: b["BlockChecksum"] for b in old.get("Blocks", [])}
    new = 0
    for off in range(0, len(image), BLOCK):
        chunk = image[off:off + BLOCK]
        if not chunk.strip(b"\0"):
            continue
        c = sha(chunk)
        blocks[off] = c
        p = os.path.join(vd, "blocks", c[:2], c[2:4], c + ".blk")
        if not os.path.exists(p):
            _write(p, _pack(method, chunk))
            new += 1
    cfg = {"Name": name, "VolumeName": volume, "SnapshotName": snapshot,
           "SnapshotCreatedAt": stamp, "CreatedTime": stamp, "Size": str(len(blocks) * BLOCK),
           "Labels": None, "Parameters": None, "IsIncremental": bool(last),
           "CompressionMethod": method, "NewlyUploadedDataSize": "0",
           "ReUploadedDataSize": "0", "ProcessingBlocks": None,
           "Blocks": [{"Offset": o, "BlockChecksum": blocks[o]} for o in sorted(blocks)],
           "SingleFile": {"FilePath": ""}}
    _write(os.path.join(vd, "backups", f"backup_{name}.cfg"), _go(cfg))
    vcfg.update(LastBackupName=name, LastBackupAt=stamp,
                BlockCount=str(int(vcfg["BlockCount"]) + new), Size=str(len(image)))
    _write(vcfg_path, _go(vcfg))
    return name


def read_backup(root: str, volume: str, name: str) -> bytes:
    """Rebuild the image of backup `name`, checking the field encodings Longhorn's Go decoder
    insists on (quoted sizes, double-encoded `,string` strings, integer offsets)."""
    vd = vol_dir(root, volume)
    vcfg = json.loads(open(os.path.join(vd, "volume.cfg"), "rb").read())
    assert isinstance(vcfg["Size"], str) and vcfg["Size"].isdigit(), vcfg["Size"]
    assert isinstance(vcfg["BlockCount"], str), vcfg["BlockCount"]
    for key in ("CompressionMethod", "BackingImageName", "DataEngine", "StorageClassName"):
        assert isinstance(json.loads(vcfg[key]), str), (key, vcfg[key])
    cfg = json.loads(open(os.path.join(vd, "backups", f"backup_{name}.cfg"), "rb").read())
    assert cfg["CreatedTime"], "backup not complete"
    assert isinstance(cfg["Size"], str) and cfg["Size"].isdigit()
    assert isinstance(cfg["CompressionMethod"], str)
    size = int(vcfg["Size"])
    image = bytearray(size)
    for b in cfg.get("Blocks", []):
        assert isinstance(b["Offset"], int)
        c = b["BlockChecksum"]
        raw = open(os.path.join(vd, "blocks", c[:2], c[2:4], c + ".blk"), "rb").read()
        data = _unpack(cfg["CompressionMethod"], raw)
        assert sha(data) == c, f"block {c} corrupt"
        image[b["Offset"]:b["Offset"] + len(data)] = data
    return bytes(image)
