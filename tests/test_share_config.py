"""Share manager, lowest tiers: the generated ganesha.conf, the allow-list parser, and device
handling (blkid -> mkfs / fsck / refuse) on real loop devices."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator

import pytest
from conftest import needs_root

from blockhorn.sharemgr import device, ganesha
from blockhorn.sharemgr.config import ShareConfig, parse_client, share_options
from blockhorn.types import BlockhornError, InvalidArgument

MiB = 1 << 20


def config(**kw: object) -> ShareConfig:
    base: dict[str, object] = dict(
        volume="vol1", device="/dev/loop9", mount_dir="/h/export/vol1",
        state_dir="/h/volumes/vol1/share", port=20049,
        clients=[{"cidr": "10.0.0.0/24", "access": "rw"}, {"cidr": "10.1.0.7/32",
                                                             "access": "ro"}])
    base.update(kw)
    return ShareConfig.from_dict(base)


def test_ganesha_config_is_locked_down() -> None:
    text = ganesha.render(config())
    for line in ("Protocols = 4;", "NFS_Port = 20049;", "Enable_NLM = false;",
                 "Enable_RQUOTA = false;", "Enable_UDP = false;", "Minor_Versions = 1, 2;",
                 "Only_Numeric_Owners = true;", "RecoveryBackend = fs;",
                 'RecoveryRoot = "/h/volumes/vol1/share/recovery";', "Active_krb5 = false;",
                 'Path = "/h/export/vol1";', 'Pseudo = "/vol1";', "Transports = TCP;",
                 "Squash = Root_Squash;", "Name = VFS;", "Clients = 10.0.0.0/24;",
                 "Clients = 10.1.0.7/32;", "Lease_Lifetime = 10;", "Grace_Period = 15;"):
        assert line in [s.strip() for s in text.splitlines()], line
    export = text[text.index("EXPORT {"):]
    # The export itself grants nothing: only the CLIENT blocks do.
    assert export.index("Access_Type = None;") < export.index("CLIENT {")
    rw, ro = export.index("Access_Type = RW;"), export.index("Access_Type = RO;")
    assert export.index("10.0.0.0/24") < rw < export.index("10.1.0.7/32") < ro
    assert "No_Root_Squash" in ganesha.render(config(squash="no_root_squash"))
    assert text.count("{") == text.count("}")


def test_allow_list_and_settings_validation() -> None:
    assert parse_client("10.0.0.5") == {"cidr": "10.0.0.5/32", "access": "rw"}
    assert parse_client("10.0.0.0/8=ro") == {"cidr": "10.0.0.0/8", "access": "ro"}
    for bad in ("everyone", "10.0.0.0/33", "10.0.0.1=rx", ""):
        with pytest.raises(InvalidArgument):
            parse_client(bad)
    with pytest.raises(InvalidArgument, match="at least one allowed client"):
        config(clients=[])
    with pytest.raises(InvalidArgument):
        share_options(squash="all_squash")
    with pytest.raises(InvalidArgument):
        share_options(grace_s=0)
    assert share_options(clients=["127.0.0.1"])["clients"] == [
        {"cidr": "127.0.0.1/32", "access": "rw"}]


# --- devices -----------------------------------------------------------------------------------

@pytest.fixture
def loop(tmp_path: object) -> Iterator[tuple[str, str]]:
    """(loop device, backing file) of 64 MiB, and a mount point; detached afterwards."""
    backing = os.path.join(str(tmp_path), "disk.img")
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                         capture_output=True, text=True).stdout.strip()
    mnt = os.path.join(str(tmp_path), "mnt")
    try:
        yield dev, mnt
    finally:
        device.unmount(mnt)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def digest(dev: str) -> str:
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(4 * MiB)).hexdigest()


@needs_root()
def test_device_empty_formatted_then_checked_then_grown(loop: tuple[str, str]) -> None:
    dev, mnt = loop
    assert device.prepare(dev, mnt, ["-L", "bhtest"]) == ["formatted ext4", "mounted"]
    assert device.probe(dev)["LABEL"] == "bhtest"
    with open(os.path.join(mnt, "f"), "w") as f:
        f.write("kept")
    assert device.prepare(dev, mnt) == ["already mounted"]
    device.unmount(mnt)
    assert device.prepare(dev, mnt) == ["checked", "mounted"]
    with open(os.path.join(mnt, "f")) as f:
        assert f.read() == "kept"
    before = os.statvfs(mnt).f_blocks
    backing = subprocess.run(["losetup", "-nO", "BACK-FILE", dev], check=True,
                             capture_output=True, text=True).stdout.strip()
    os.truncate(backing, 96 * MiB)
    subprocess.run(["losetup", "-c", dev], check=True)
    assert device.prepare(dev, mnt) == ["already mounted"]
    device.unmount(mnt)
    assert device.prepare(dev, mnt) == ["checked", "grown to the device", "mounted"]
    assert os.statvfs(mnt).f_blocks > before
    with open(os.path.join(mnt, "f")) as f:
        assert f.read() == "kept"


@needs_root()
def test_device_foreign_content_refused_untouched(loop: tuple[str, str]) -> None:
    dev, mnt = loop
    subprocess.run(["mkswap", dev], check=True, capture_output=True)
    before = digest(dev)
    with pytest.raises(device.ForeignDevice, match="swap filesystem: refusing"):
        device.prepare(dev, mnt)
    assert digest(dev) == before and device.is_mounted(mnt) is None
    # An MBR partition table (one Linux partition) is refused the same way.
    subprocess.run(["wipefs", "-a", dev], check=True, capture_output=True)
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + \
        (4096).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    with open(dev, "r+b") as f:
        f.write(mbr)
    before = digest(dev)
    with pytest.raises(device.ForeignDevice, match="dos partition table"):
        device.prepare(dev, mnt)
    assert digest(dev) == before


@needs_root()
def test_device_too_small_refused(tmp_path: object) -> None:
    backing = os.path.join(str(tmp_path), "small.img")
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    dev = subprocess.run(["losetup", "--find", "--show", backing], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        with pytest.raises(InvalidArgument, match="at least 32 MiB; nothing was formatted"):
            device.prepare(dev, os.path.join(str(tmp_path), "mnt"))
        assert device.probe(dev) == {}
        with pytest.raises(BlockhornError, match="does not exist"):
            device.prepare("/dev/loop-none", os.path.join(str(tmp_path), "mnt"))
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# --- hostile input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    ["-d", "/etc"],                      # would copy host files into the exported fs
    ["-d/etc"],
    ["-z", "/tmp/undo"],                 # would write a root-owned undo file anywhere
    ["-E", "root_owner=0:0,offset=4096"],
    ["-E", "root_owner=1000"],
    ["-E", "root_owner=1000:1000\n"],
    ["-b", "4096", "/dev/sda"],          # a second device argument
    ["-O", "has_journal -d /etc"],
    ["-m", "90"], ["-I", "100"], ["-N", "0"], ["-b"], ["-c"], ["-n"], ["-S"],
    ["-L", "a b"],
])
def test_mkfs_options_outside_the_allow_list_refused(bad: list[str]) -> None:
    with pytest.raises(InvalidArgument, match="allowed: "):
        share_options(mkfs_options=bad)
    with pytest.raises(InvalidArgument, match="allowed: "):
        config(mkfs_options=bad)


def test_mkfs_options_allowed_are_normalised() -> None:
    opts = ["-E", "root_owner=1000:1000,lazy_itable_init=0", "-O^has_journal,metadata_csum",
            "-N", "2048", "-i", "16384", "-I", "256", "-b4096", "-m", "0.5", "-L", "data"]
    assert share_options(mkfs_options=opts)["mkfs_options"] == [
        "-E", "root_owner=1000:1000,lazy_itable_init=0", "-O", "^has_journal,metadata_csum",
        "-N", "2048", "-i", "16384", "-I", "256", "-b", "4096", "-m", "0.5", "-L", "data"]


def test_newlines_and_quotes_never_reach_ganesha_conf() -> None:
    """Names were checked with `$`-anchored regexes, which accept a trailing newline: every
    name and value that reaches ganesha.conf is now a full match or a normalised form."""
    for kw in ({"volume": "vol1\n"}, {"volume": "vol1\nEXPORT{"},
               {"mount_dir": '/h/export/vol1"\n}'}, {"state_dir": "/h/st\nLOG {"},
               {"clients": [{"cidr": "10.0.0.0/24\n", "access": "rw"}]},
               {"clients": [{"cidr": "10.0.0.0/24", "access": "rw\n"}]},
               {"bind": "0.0.0.0\n"}, {"port": "2049\n"},
               {"service_address": "10.0.0.5/24", "interface": "eth0\n"}):
        with pytest.raises(InvalidArgument):
            config(**kw)
    with pytest.raises(InvalidArgument):
        share_options(interface="eth0;x", service_address="10.0.0.5/24")
    with pytest.raises(InvalidArgument):
        parse_client("10.0.0.1\n")


@needs_root()
def test_device_allowed_mkfs_options_applied(loop: tuple[str, str]) -> None:
    dev, mnt = loop
    assert device.prepare(dev, mnt, ["-E", "root_owner=1234:5678", "-b", "1024"]) == [
        "formatted ext4", "mounted"]
    st = os.stat(mnt)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert os.statvfs(mnt).f_bsize == 1024
    device.unmount(mnt)
    subprocess.run(["wipefs", "-a", dev], check=True, capture_output=True)
    with pytest.raises(InvalidArgument, match="'-d' is not allowed"):
        device.prepare(dev, mnt, ["-d", "/etc"])
    assert device.probe(dev) == {}
