"""Longhorn's backupstore format as a pure codec: paths, checksums, compression, and the JSON
of `volume.cfg`, `backup_<name>.cfg` and lock files byte for byte as Go's encoding/json writes
Longhorn's structs. No I/O here. docs/FORMAT.md ("Backupstore") describes every field and
says where in longhorn/backupstore each detail was checked.

Vocabulary:
- *backup volume*: the directory of one volume in a store, `backupstore/volumes/XX/YY/<vol>/`;
  its blocks are shared by all its backups (dedup is per backup volume, as in Longhorn).
- *block*: one `block_size` piece of the volume at an aligned offset, stored compressed as
  `blocks/XX/YY/<checksum>.blk`; the checksum is over the *uncompressed* bytes.
- *block list*: a backup's `Blocks`, the full image as [(offset, checksum)] sorted by offset;
  offsets missing from the list read as zeros.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import secrets
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import lz4.frame

from blockhorn.types import BlockhornError, InvalidArgument

BACKUPSTORE_BASE = "backupstore"
DEFAULT_BLOCK_SIZE = 2 << 20       # bytes; Longhorn's DEFAULT_BLOCK_SIZE (2 MiB)
LARGE_BLOCK_SIZE = 16 << 20        # bytes; the other size Longhorn accepts ("backup-block-size")
BLOCK_SIZE_PARAMETER = "backup-block-size"   # Backup.Parameters key naming a non-default size
CHECKSUM_LEN = 64                  # hex characters kept of the SHA-512 digest
COMPRESSION_METHODS = ("lz4", "gzip", "none")
LEGACY_COMPRESSION = "gzip"        # what a cfg without CompressionMethod means (Longhorn)
LOCK_BACKUP = 1                    # backup and restore share this type (Longhorn: both are 1)
LOCK_DELETE = 2
NAME_RE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class BackupCorrupt(BlockhornError):
    """A block or config in the store is missing or does not match its checksum."""

    errno = 74   # EBADMSG


def checksum(data: bytes | bytearray | memoryview) -> str:
    """Longhorn's GetChecksum: SHA-512 hex cut to 64 characters (its comment says SHA-256)."""
    return hashlib.sha512(data).hexdigest()[:CHECKSUM_LEN]


_zero_sums: dict[int, str] = {}


def zero_checksum(block_size: int) -> str:
    if block_size not in _zero_sums:
        _zero_sums[block_size] = checksum(bytes(block_size))
    return _zero_sums[block_size]


def valid_name(name: str) -> bool:
    """Longhorn's ValidateName: ^[a-zA-Z0-9][a-zA-Z0-9_.-]+$ (two characters at least)."""
    return (len(name) >= 2 and name[0].isascii() and name[0].isalnum()
            and set(name) <= NAME_RE_CHARS)


def check_store_name(name: str, what: str) -> str:
    if not valid_name(name):
        raise InvalidArgument(f"invalid {what} name {name!r} for a backupstore: use letters, "
                              "digits, '_', '.', '-', starting with a letter or digit")
    return name


def new_backup_name() -> str:
    """Longhorn's GenerateName("backup"): `backup-` + 16 hex characters of a UUID."""
    return "backup-" + secrets.token_hex(8)


def new_lock_name() -> str:
    return "lock-" + secrets.token_hex(8)


def now() -> str:
    """Longhorn's util.Now(): RFC 3339 UTC, whole seconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- paths (relative to the target's root) ---------------------------------------------------

def volume_dir(volume: str) -> str:
    h = checksum(volume.encode())
    return f"{BACKUPSTORE_BASE}/volumes/{h[0:2]}/{h[2:4]}/{volume}"


def volume_cfg_path(volume: str) -> str:
    return f"{volume_dir(volume)}/volume.cfg"


def backups_dir(volume: str) -> str:
    return f"{volume_dir(volume)}/backups"


def backup_cfg_path(volume: str, backup: str) -> str:
    return f"{backups_dir(volume)}/backup_{backup}.cfg"


def blocks_dir(volume: str) -> str:
    return f"{volume_dir(volume)}/blocks"


def block_path(volume: str, csum: str) -> str:
    return f"{blocks_dir(volume)}/{csum[0:2]}/{csum[2:4]}/{csum}.blk"


def locks_dir(volume: str) -> str:
    return f"{volume_dir(volume)}/locks"


def lock_path(volume: str, name: str) -> str:
    return f"{locks_dir(volume)}/{name}.lck"


def backup_name_from_file(file_name: str) -> str | None:
    if file_name.startswith("backup_") and file_name.endswith(".cfg"):
        name = file_name[len("backup_"):-len(".cfg")]
        return name if valid_name(name) else None
    return None


# --- compression -----------------------------------------------------------------------------

# An LZ4 frame header: magic, FLG 0x60 (version 1, independent blocks, no checksums, no
# content size), BD 0x70 (blocks up to 4 MiB), header checksum (xxh32 of FLG BD, 2nd byte).
LZ4_RAW_HEADER = bytes.fromhex("04224d18607073")
LZ4_MAX_BLOCK = 4 << 20          # bytes in one frame block with BD 0x70
LZ4_SAMPLE = 64 << 10            # bytes compressed to guess whether a block compresses
LZ4_SAMPLE_GAIN = 0.97           # a sample that shrinks less than this is "incompressible"


def _lz4_raw_frame(data: bytes | bytearray | memoryview) -> bytearray:
    """A valid LZ4 frame holding `data` in *uncompressed* frame blocks (size word with the
    high bit set) — what an LZ4 encoder itself emits for data that does not compress."""
    view = memoryview(data)
    nblocks = max(1, -(-len(view) // LZ4_MAX_BLOCK))
    out = bytearray(len(LZ4_RAW_HEADER) + 4 * nblocks + len(view) + 4)   # one copy of data
    out[:len(LZ4_RAW_HEADER)] = LZ4_RAW_HEADER
    pos = len(LZ4_RAW_HEADER)
    for i in range(0, len(view), LZ4_MAX_BLOCK):
        chunk = view[i:i + LZ4_MAX_BLOCK]
        out[pos:pos + 4] = (len(chunk) | 0x80000000).to_bytes(4, "little")
        out[pos + 4:pos + 4 + len(chunk)] = chunk
        pos += 4 + len(chunk)
    return out   # the end mark, 4 zero bytes, is already at the end


def compress(method: str, data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """lz4: an LZ4 *frame* (independent 4 MiB blocks, content checksum), as pierrec/lz4 v4's
    Writer (Longhorn) reads and writes them. A block whose 64 KiB sample does not compress is
    stored as a frame of uncompressed blocks without trying the rest (random or encrypted
    data: saves ~2-5 ms of CPU per 2 MiB). gzip: RFC 1952. none: the bytes."""
    if method == "lz4":
        sample = lz4.block.compress(bytes(data[:LZ4_SAMPLE]), store_size=False)
        if len(data) > LZ4_SAMPLE and len(sample) > LZ4_SAMPLE_GAIN * LZ4_SAMPLE:
            return _lz4_raw_frame(data)
        return bytes(lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                                        block_linked=False, content_checksum=True))
    if method == "gzip":
        return gzip.compress(bytes(data), compresslevel=6, mtime=0)
    if method == "none":
        return bytes(data)
    raise InvalidArgument(f"unknown compression method {method!r}: use lz4, gzip or none")


def decompress(method: str, data: bytes) -> bytes:
    """Decompress; like Longhorn, a gzip/lz4 mix-up is recognised by the magic and tolerated."""
    if data[:4] == b"\x04\x22\x4d\x18" and method in ("lz4", "gzip"):
        method = "lz4"
    elif data[:2] == b"\x1f\x8b" and method in ("lz4", "gzip"):
        method = "gzip"
    try:
        if method == "lz4":
            return bytes(lz4.frame.decompress(data))
        if method == "gzip":
            return gzip.decompress(data)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise BackupCorrupt(f"cannot decompress ({method}): {e}") from None
    if method == "none":
        return data
    raise InvalidArgument(f"unknown compression method {method!r}")


# --- Go encoding/json ------------------------------------------------------------------------

def go_string(s: str) -> str:
    """A JSON string as Go's json.Marshal writes it: UTF-8 kept, <, >, & and U+2028/2029
    escaped as \\u00XX (HTML-safe), control characters as \\n, \\r, \\t, \\b, \\f or \\u00XX."""
    out = json.dumps(s, ensure_ascii=False)
    return (out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _go_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return go_string(v)
    if isinstance(v, dict):       # Go sorts map keys
        return "{" + ",".join(f"{go_string(k)}:{_go_value(v[k])}" for k in sorted(v)) + "}"
    raise TypeError(f"cannot encode {type(v).__name__}")


def _go_object(fields: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}"


def _str_tag(v: str | int) -> str:
    """A field tagged `json:",string"`: the value's own JSON, written as a JSON string
    (a string is thus encoded twice: "lz4" -> "\\"lz4\\"")."""
    return go_string(_go_value(v))


def _untag_str(v: Any) -> str:
    """Decode a `,string` string field; also accepts a plain string (hand-written stores)."""
    if v is None:
        return ""
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        try:
            inner = json.loads(v)
        except ValueError:
            return v
        return inner if isinstance(inner, str) else v
    return str(v)


def _untag_int(v: Any) -> int:
    if v is None or v == "":
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BackupCorrupt(f"not an integer: {v!r}") from None


@dataclass
class VolumeCfg:
    """backupstore.Volume (volume.cfg)."""

    name: str
    size: int
    labels: dict[str, str] | None = None
    created_time: str = ""
    last_backup_name: str = ""
    last_backup_at: str = ""
    block_count: int = 0
    backing_image_name: str = ""
    backing_image_checksum: str = ""
    compression_method: str = "lz4"
    storage_class_name: str = ""
    data_engine: str = "v1"

    def encode(self) -> bytes:
        return _go_object([
            ("Name", go_string(self.name)),
            ("Size", _str_tag(self.size)),
            ("Labels", _go_value(self.labels)),
            ("CreatedTime", go_string(self.created_time)),
            ("LastBackupName", go_string(self.last_backup_name)),
            ("LastBackupAt", go_string(self.last_backup_at)),
            ("BlockCount", _str_tag(self.block_count)),
            ("BackingImageName", _str_tag(self.backing_image_name)),
            ("BackingImageChecksum", _str_tag(self.backing_image_checksum)),
            ("CompressionMethod", _str_tag(self.compression_method)),
            ("StorageClassName", _str_tag(self.storage_class_name)),
            ("DataEngine", _str_tag(self.data_engine)),
        ]).encode()

    @classmethod
    def decode(cls, raw: bytes) -> VolumeCfg:
        d = _load(raw, "volume.cfg")
        return cls(
            name=str(d.get("Name") or ""), size=_untag_int(d.get("Size")),
            labels=d.get("Labels"), created_time=str(d.get("CreatedTime") or ""),
            last_backup_name=str(d.get("LastBackupName") or ""),
            last_backup_at=str(d.get("LastBackupAt") or ""),
            block_count=_untag_int(d.get("BlockCount")),
            backing_image_name=_untag_str(d.get("BackingImageName")),
            backing_image_checksum=_untag_str(d.get("BackingImageChecksum")),
            compression_method=_untag_str(d.get("CompressionMethod")) or LEGACY_COMPRESSION,
            storage_class_name=_untag_str(d.get("StorageClassName")),
            data_engine=_untag_str(d.get("DataEngine")) or "v1")


@dataclass
class BackupCfg:
    """backupstore.Backup (backups/backup_<name>.cfg). `created_time == ""` marks a backup in
    progress (Longhorn writes such a cfg first; its GC deletes nothing while one exists)."""

    name: str
    volume_name: str
    snapshot_name: str = ""
    snapshot_created_at: str = ""
    created_time: str = ""
    size: int = 0
    labels: dict[str, str] | None = None
    parameters: dict[str, str] | None = None
    is_incremental: bool = False
    compression_method: str = "lz4"
    newly_uploaded_data_size: int = 0
    re_uploaded_data_size: int = 0
    blocks: list[tuple[int, str]] = field(default_factory=list)
    single_file_path: str = ""

    @property
    def in_progress(self) -> bool:
        return self.created_time == ""

    @property
    def block_size(self) -> int:
        raw = (self.parameters or {}).get(BLOCK_SIZE_PARAMETER, "")
        if not raw:
            return DEFAULT_BLOCK_SIZE
        return parse_quantity(raw)

    def encode(self) -> bytes:
        fields = [
            ("Name", go_string(self.name)),
            ("VolumeName", go_string(self.volume_name)),
            ("SnapshotName", go_string(self.snapshot_name)),
            ("SnapshotCreatedAt", go_string(self.snapshot_created_at)),
            ("CreatedTime", go_string(self.created_time)),
            ("Size", _str_tag(self.size)),
            ("Labels", _go_value(self.labels)),
            ("Parameters", _go_value(self.parameters)),
            ("IsIncremental", _go_value(self.is_incremental)),
            ("CompressionMethod", go_string(self.compression_method)),
            ("NewlyUploadedDataSize", _str_tag(self.newly_uploaded_data_size)),
            ("ReUploadedDataSize", _str_tag(self.re_uploaded_data_size)),
            # A nil *ProcessingBlocks: what Longhorn writes for in-progress and incremental
            # cfgs (a full backup's cfg has {} here; readers ignore the field).
            ("ProcessingBlocks", "null"),
        ]
        if self.blocks:   # `json:",omitempty"` on a slice: left out when empty
            fields.append(("Blocks", "[" + ",".join(
                _go_object([("Offset", str(o)), ("BlockChecksum", go_string(c))])
                for o, c in self.blocks) + "]"))
        # omitempty has no effect on a struct: SingleFile is always written.
        fields.append(("SingleFile", _go_object([("FilePath", go_string(self.single_file_path))])))
        return _go_object(fields).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BackupCfg:
        d = _load(raw, "backup cfg")
        blocks = []
        for b in d.get("Blocks") or []:
            off, csum = b.get("Offset"), b.get("BlockChecksum")
            if not isinstance(off, int) or not isinstance(csum, str) or len(csum) != CHECKSUM_LEN:
                raise BackupCorrupt(f"bad block entry {b!r} in backup {d.get('Name')!r}")
            blocks.append((off, csum))
        blocks.sort()
        return cls(
            name=str(d.get("Name") or ""), volume_name=str(d.get("VolumeName") or ""),
            snapshot_name=str(d.get("SnapshotName") or ""),
            snapshot_created_at=str(d.get("SnapshotCreatedAt") or ""),
            created_time=str(d.get("CreatedTime") or ""), size=_untag_int(d.get("Size")),
            labels=d.get("Labels"), parameters=d.get("Parameters"),
            is_incremental=bool(d.get("IsIncremental")),
            compression_method=str(d.get("CompressionMethod") or LEGACY_COMPRESSION),
            newly_uploaded_data_size=_untag_int(d.get("NewlyUploadedDataSize")),
            re_uploaded_data_size=_untag_int(d.get("ReUploadedDataSize")),
            blocks=blocks,
            single_file_path=str((d.get("SingleFile") or {}).get("FilePath") or ""))


@dataclass
class LockCfg:
    """backupstore.FileLock's exported fields (locks/<name>.lck); its time is the file's
    modification time on the server, not a field."""

    name: str
    type: int
    acquired: bool = False

    def encode(self) -> bytes:
        return _go_object([("Name", go_string(self.name)), ("Type", str(self.type)),
                           ("Acquired", _go_value(self.acquired))]).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LockCfg:
        d = _load(raw, "lock")
        return cls(str(d.get("Name") or ""), _untag_int(d.get("Type")), bool(d.get("Acquired")))


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise BackupCorrupt(f"{what} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise BackupCorrupt(f"{what} is not a JSON object")
    return d


_QUANTITY = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1 << 10, "Mi": 1 << 20,
             "Gi": 1 << 30}


def parse_quantity(text: str) -> int:
    """The Kubernetes quantities Longhorn's block-size parameter takes: 2097152, 2Mi, 16Mi."""
    num = text.rstrip("kMGi")
    unit = text[len(num):]
    if not num.isdigit() or unit not in _QUANTITY:
        raise BackupCorrupt(f"bad {BLOCK_SIZE_PARAMETER} {text!r}")
    return int(num) * _QUANTITY[unit]


# --- backup URLs -----------------------------------------------------------------------------

def encode_backup_url(target_url: str, volume: str, backup: str | None = None) -> str:
    """Longhorn's EncodeBackupURL: `TARGET?backup=NAME&volume=VOL` (Go's url.Values.Encode
    sorts the keys and query-escapes the values)."""
    parts = urllib.parse.urlsplit(target_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query.append(("volume", volume))
    if backup:
        query.append(("backup", backup))
    query.sort(key=lambda kv: kv[0])
    encoded = "&".join(f"{urllib.parse.quote_plus(k)}={urllib.parse.quote_plus(v)}"
                       for k, v in query)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, encoded, ""))


@dataclass(frozen=True)
class BackupURL:
    target: str
    volume: str
    backup: str


def decode_backup_url(url: str) -> BackupURL:
    """Split `TARGET?backup=NAME&volume=VOL` into its parts (backup may be empty: a URL
    naming a whole backup volume)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    volume = (query.pop("volume", [""]) or [""])[0]
    backup = (query.pop("backup", [""]) or [""])[0]
    if not parts.scheme or not volume:
        raise InvalidArgument(f"bad backup URL {url!r}: expected TARGET?backup=NAME&volume=VOL")
    check_store_name(volume, "volume")
    if backup:
        check_store_name(backup, "backup")
    rest = urllib.parse.urlencode(sorted((k, v) for k, vs in query.items() for v in vs))
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, rest, ""))
    return BackupURL(target, volume, backup)
