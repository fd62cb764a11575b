"""RWX volumes end to end: the daemon attaches the volume, the share manager formats and mounts
it and runs a real NFS-Ganesha; real NFSv4 clients (libnfs-utils: nfs-cp, nfs-cat, nfs-ls) use
it. Each client command is its own NFSv4 client (own client id, own state).

libnfs 4.0 (Debian 12) speaks NFSv4.0 only, and its NFSv4 WRITE cannot encode more than about
2 KB ("ZDR error: Failed to encode COMPOUND4args"), while nfs-cp writes in one call: the files
written here stay below that (CHUNK). No libnfs-utils tool appends, so the append test drives
libnfs itself through ctypes (Appender)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from ctypes import POINTER, c_char_p, c_int, c_uint64, c_void_p
from typing import Any

import psutil
import pytest
from daemon_util import HAVE_FUSE, IS_ROOT, Env, wait_until

from blockhorn.control.store import SqliteStore
from blockhorn.sharemgr import address
from blockhorn.sharemgr.control import ShareControl
from blockhorn.sharemgr.device import probe

MISSING = [c for c in ("ganesha.nfsd", "nfs-cp", "nfs-cat", "nfs-ls") if not shutil.which(c)]
REASON = ("needs root, /dev/fuse, NFS-Ganesha and libnfs-utils "
          "(apt-get install nfs-ganesha nfs-ganesha-vfs libnfs-utils)")
if os.environ.get("CI") and (MISSING or not (IS_ROOT and HAVE_FUSE)):
    raise RuntimeError(f"CI cannot run the NFS tests: {REASON}; missing {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING) or not (IS_ROOT and HAVE_FUSE), reason=REASON)

MiB = 1 << 20
CHUNK = 1800        # bytes; the largest file nfs-cp (libnfs 4.0, NFSv4) can write, see above
SERVICE = "127.0.0.53/32"   # a service address on lo, reachable from this host
# Growing a mounted ext4 (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; some sandboxes lack it.
HAVE_SYS_RESOURCE = bool(int(next(line.split()[1] for line in open("/proc/self/status")
                                  if line.startswith("CapEff:")), 16) >> 24 & 1)
UID = 1000          # the clients' user; the filesystem root is made theirs at mkfs time
# libnfs speaks only NFSv4.0: the test volumes add minor version 0 to the default 1, 2.
RWX = ["--access", "rwx", "--replicas", "1", "--size", "64MiB", "--nfs-minor-versions", "0,1,2",
       "--mkfs-options", f"-E root_owner={UID}:{UID}"]
# The restart tests: a short NFSv4 lease and grace period (seconds; defaults 10 and 15), so
# that waiting out a restarted Ganesha's grace costs 5 s, not 15; the grace is still there
# and still waited out (t7_vm_nfs.py does the same).
RWX_RESTART = [*RWX, "--lease", "5", "--grace", "5"]


@contextlib.contextmanager
def share_env() -> Iterator[Env]:
    """A daemon home whose volumes are removed afterwards, with the Ganesha safety net (the
    real-kernel NFS tier uses it too)."""
    e = Env()
    try:
        yield e
    finally:
        try:
            if os.path.exists(e.home.db):
                for vol in e.ls():
                    e.cli("volume", "rm", vol["name"], "--force", check=False)
        finally:
            _safety_net(e)
            e.close()


@pytest.fixture
def env() -> Iterator[Env]:
    with share_env() as e:
        yield e


def _safety_net(e: Env) -> None:
    """Kill a share manager or Ganesha of this home that survived, unmount its exports."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if e.home.root in cmd and ("ganesha.nfsd" in cmd or "share serve" in cmd):
            p.kill()
    export = os.path.join(e.home.root, "export")
    if os.path.isdir(export):
        for vol in os.listdir(export):
            subprocess.run(["umount", "-l", os.path.join(export, vol)], capture_output=True)


def url(share: dict[str, Any], path: str = "", uid: int = UID) -> str:
    return (f"nfs://127.0.0.1/{share['volume']}/{path}?version=4&nfsport={share['port']}"
            f"&uid={uid}&gid={uid}")


def nfs(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def put(share: dict[str, Any], name: str, data: bytes, tmp: str, uid: int = UID
        ) -> subprocess.CompletedProcess[str]:
    src = os.path.join(tmp, f"src-{threading.get_ident()}")
    with open(src, "wb") as f:
        f.write(data)
    return nfs("nfs-cp", src, url(share, name, uid))


def get(share: dict[str, Any], name: str) -> bytes:
    proc = subprocess.run(["nfs-cat", url(share, name)], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def listing(share: dict[str, Any]) -> str:
    proc = nfs("nfs-ls", url(share))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class _Url(ctypes.Structure):
    _fields_ = [("server", c_char_p), ("path", c_char_p), ("file", c_char_p)]


class Appender:
    """One NFS client holding a file open for appending: libnfs through ctypes, because no
    libnfs-utils tool appends. Each record is one WRITE (below libnfs' 2 KB limit)."""

    def __init__(self, url: str) -> None:
        lib = ctypes.CDLL("libnfs.so.13")
        lib.nfs_init_context.restype = c_void_p
        lib.nfs_parse_url_full.restype = POINTER(_Url)
        lib.nfs_parse_url_full.argtypes = [c_void_p, c_char_p]
        lib.nfs_mount.argtypes = [c_void_p, c_char_p, c_char_p]
        lib.nfs_open.argtypes = [c_void_p, c_char_p, c_int, POINTER(c_void_p)]
        lib.nfs_write.argtypes = [c_void_p, c_void_p, c_uint64, c_char_p]
        lib.nfs_fsync.argtypes = [c_void_p, c_void_p]
        lib.nfs_close.argtypes = [c_void_p, c_void_p]
        lib.nfs_destroy_context.argtypes = [c_void_p]
        lib.nfs_get_error.argtypes = [c_void_p]
        lib.nfs_get_error.restype = c_char_p
        self.lib = lib
        self.ctx = lib.nfs_init_context()
        u = lib.nfs_parse_url_full(self.ctx, url.encode())
        if not u:
            raise OSError(self.error())
        self._check(lib.nfs_mount(self.ctx, u.contents.server, u.contents.path))
        self.fh = c_void_p()
        self._check(lib.nfs_open(self.ctx, u.contents.file, os.O_WRONLY | os.O_APPEND,
                                 ctypes.byref(self.fh)))

    def error(self) -> str:
        return (self.lib.nfs_get_error(self.ctx) or b"?").decode()

    def _check(self, rc: int) -> int:
        if rc < 0:
            raise OSError(-rc, self.error())
        return rc

    def append(self, data: bytes) -> None:
        n = self._check(self.lib.nfs_write(self.ctx, self.fh, len(data), data))
        if n != len(data):
            raise OSError(f"short write: {n} of {len(data)} bytes")

    def fsync(self) -> None:
        self._check(self.lib.nfs_fsync(self.ctx, self.fh))

    def close(self) -> None:
        self._check(self.lib.nfs_close(self.ctx, self.fh))
        self.lib.nfs_destroy_context(self.ctx)


def share_of(env: Env, name: str) -> dict[str, Any]:
    return dict(json.loads(env.cli("share", "show", name, "--json").stdout))


def test_rwx_two_clients_see_each_others_files(env: Env, tmp_path: object) -> None:
    tmp = str(tmp_path)
    env.cli("volume", "create", "shared", *RWX)
    env.cli("volume", "attach", "shared")
    share = share_of(env, "shared")
    assert share["health"] == "healthy" and share["squash"] == "root_squash"
    assert share["endpoint"].endswith(f":{share['port']}/shared")
    assert "mount -t nfs4" in share["mount_command"]
    assert any(c["cidr"] == "127.0.0.1/32" for c in share["clients"])   # the attaching host
    # Namespace operations are synchronous (NFS answers a create only once it is stable).
    export = os.path.join(env.home.root, "export", "shared")
    with open("/proc/self/mounts") as f:
        options = next(line.split()[3] for line in f if line.split()[1] == export)
    assert "dirsync" in options.split(","), options
    text = env.cli("share", "show", "shared").stdout
    assert "Health:      healthy" in text and "Ganesha:     pid" in text

    a, b = os.urandom(CHUNK), os.urandom(1000)
    assert put(share, "from-a.bin", a, tmp).returncode == 0          # client A
    assert put(share, "from-b.bin", b, tmp).returncode == 0          # client B
    names = listing(share)
    assert "from-a.bin" in names and "from-b.bin" in names
    assert get(share, "from-a.bin") == a and get(share, "from-b.bin") == b

    # One client appends records (fsync every 20) while another reads the file again and
    # again: every read is a prefix of what is being written.
    empty = os.path.join(tmp, "empty")
    open(empty, "wb").close()
    assert nfs("nfs-cp", empty, url(share, "log")).returncode == 0
    records = b"".join(f"record {i:05d}\n".encode() for i in range(300))
    appender = Appender(url(share, "log"))
    done = threading.Event()

    def write() -> None:
        try:
            for i in range(300):
                appender.append(records[i * 13:(i + 1) * 13])
                if i % 20 == 19:
                    appender.fsync()
            appender.fsync()
        finally:
            appender.close()
            done.set()

    t = threading.Thread(target=write)
    t.start()
    partial = 0
    while not done.is_set():
        seen = get(share, "log")
        assert records.startswith(seen), f"read {len(seen)} bytes that are no prefix"
        partial += 0 < len(seen) < len(records)
    t.join()
    assert get(share, "log") == records
    print(f"\nappend: {partial} reads saw a partial, consistent prefix")

    # root_squash: uid 0 is the anonymous user, which may not write in the owner's directory.
    assert put(share, "as-root.bin", b"x", tmp, uid=0).returncode != 0
    assert "as-root.bin" not in listing(share)

    # Detach and attach again: the same files, checked by fsck, served again on the same port.
    env.cli("volume", "detach", "shared")
    with pytest.raises(AssertionError, match="is detached"):
        env.cli("share", "show", "shared")
    env.cli("volume", "attach", "shared")
    again = share_of(env, "shared")
    assert again["port"] == share["port"]
    assert get(again, "from-a.bin") == a


def test_allow_list_refuses_other_hosts_and_read_only_clients(env: Env, tmp_path: object
                                                               ) -> None:
    tmp = str(tmp_path)
    # Only a network this host is not on: 127.0.0.1 is refused.
    env.cli("volume", "create", "closed", *RWX, "--nfs-client", "192.0.2.0/24")
    env.cli("volume", "attach", "closed")
    closed = share_of(env, "closed")
    assert closed["clients"] == [{"cidr": "192.0.2.0/24", "access": "rw"}]
    refused = nfs("nfs-ls", url(closed))
    assert refused.returncode != 0, refused.stdout
    assert put(closed, "x", b"x", tmp).returncode != 0
    env.cli("volume", "detach", "closed")

    # This host read-only: it lists and reads, but cannot write.
    env.cli("volume", "create", "readonly", *RWX, "--nfs-client", "127.0.0.1/32=ro")
    env.cli("volume", "attach", "readonly")
    ro = share_of(env, "readonly")
    assert ro["clients"] == [{"cidr": "127.0.0.1/32", "access": "ro"}]
    listing(ro)
    assert put(ro, "y", b"y", tmp).returncode != 0
    assert "y" not in listing(ro).split()


def test_service_address_added_while_serving_and_removed_at_detach(env: Env, tmp_path: object
                                                                    ) -> None:
    """The volume's service address (here 127.0.0.53 on lo, so this host reaches it) is added
    when the share starts, Ganesha listens only there, and it is removed at detach."""
    tmp = str(tmp_path)
    if address.present("lo", SERVICE):
        pytest.skip(f"{SERVICE} is already on lo (another test run?)")
    # Connections to an address on lo come from that address: allow all of 127/8.
    env.cli("volume", "create", "svc", *RWX, "--service-address", SERVICE,
            "--service-interface", "lo", "--nfs-client", "127.0.0.0/8")
    env.cli("volume", "attach", "svc")
    try:
        share = share_of(env, "svc")
        assert share["address"] == "127.0.0.53" and share["endpoint"].startswith(
            "nfs://127.0.0.53:")
        assert address.present("lo", SERVICE)
        via_service = url(share, "f").replace("127.0.0.1", "127.0.0.53")
        src = os.path.join(tmp, "f")
        with open(src, "wb") as f:
            f.write(b"via the service address")
        assert nfs("nfs-cp", src, via_service).returncode == 0
        assert nfs("nfs-ls", url(share)).returncode != 0     # not bound to 127.0.0.1
        env.cli("volume", "detach", "svc")
        assert not address.present("lo", SERVICE)
    finally:
        address.remove("lo", SERVICE)


def test_ganesha_killed_under_writes_restarted_no_acknowledged_loss(
        env: Env, tmp_path: object) -> None:
    tmp = str(tmp_path)
    env.cli("volume", "create", "crash", *RWX_RESTART)
    env.cli("volume", "attach", "crash")
    share = share_of(env, "crash")
    acked: dict[str, bytes] = {}
    done: list[tuple[float, float]] = []     # (start, end) of every acknowledged write
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            data = f"record {i:05d}\n".encode() * 100
            start = time.monotonic()
            try:
                ok = put(share, f"w{i:05d}", data, tmp).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if ok:
                acked[f"w{i:05d}"] = data      # nfs-cp closed the file: acknowledged
                done.append((start, time.monotonic()))
            else:
                time.sleep(0.1)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(done) >= 5, 60, "writes before the kill")
        killed_at = time.monotonic()
        os.kill(share["ganesha"]["pid"], signal.SIGKILL)
        # The first write started after the kill that was acknowledged: service is back.
        resumed = wait_until(lambda: next((e for s, e in done if s > killed_at), None), 120,
                             "a write after the restart")
        wait_until(lambda: sum(s > killed_at for s, _ in done) >= 3, 60, "more writes")
    finally:
        stop.set()
        t.join(60)
    outage = resumed - killed_at
    now = share_of(env, "crash")
    print(f"\nganesha kill -9: port back after {now['ganesha']['last_outage_s']} s, writes "
          f"resumed after {outage:.1f} s (grace {now['grace_s']} s); {len(acked)} files")
    assert now["ganesha"]["restarts"] == 1 and now["ganesha"]["pid"] != share["ganesha"]["pid"]
    assert now["health"] in ("healthy", "degraded")
    assert outage < 60
    for name, data in sorted(acked.items()):
        assert get(now, name) == data, name


def test_share_bad_inputs_are_clear_errors_nothing_formatted(env: Env) -> None:
    def error(*args: str) -> str:
        proc = env.cli(*args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr

    assert "at least 32 MiB" in error("volume", "create", "tiny", "--access", "rwx",
                                      "--size", "16MiB")
    assert "need --access rwx" in error("volume", "create", "v", "--size", "64MiB",
                                        "--nfs-client", "10.0.0.1")
    assert "bad NFS client" in error("volume", "create", "v", "--size", "64MiB",
                                     "--access", "rwx", "--nfs-client", "everyone")
    assert "does not exist" in error("share", "show", "nosuch")
    env.cli("volume", "create", "block", "--size", "64MiB", "--replicas", "1")
    assert "is RWO" in error("share", "show", "block")
    env.cli("volume", "create", "idle", *RWX)
    assert "is detached" in error("share", "show", "idle")

    # An existing volume holding another filesystem, turned RWX: the attach refuses it and
    # leaves its bytes alone. (Written as RWO through its device, then switched in the store,
    # as an operator changing the access mode of a detached volume would.)
    dev = env.cli("volume", "attach", "block").stdout.strip().splitlines()[-1]
    subprocess.run(["mkswap", "-L", "keepme", dev], check=True, capture_output=True)
    env.cli("volume", "detach", "block")
    store = SqliteStore(env.home.db)
    store.update_volume("block", access_mode="rwx")
    ShareControl(env.home, store).add("block", {"clients": [], "squash": "root_squash",
                                                "mkfs_options": [], "port": None,
                                                "lease_s": 10, "grace_s": 15,
                                                "minor_versions": [0, 1, 2]})
    assert "swap filesystem: refusing" in error("volume", "attach", "block")
    assert env.show("block")["state"] == "detached"
    store.update_volume("block", access_mode="rwo")
    dev = env.cli("volume", "attach", "block").stdout.strip().splitlines()[-1]
    info = probe(dev)
    assert info["TYPE"] == "swap" and info["LABEL"] == "keepme"


def test_share_manager_killed_restarted_and_readonly_fs_remounted(env: Env, tmp_path: object
                                                                   ) -> None:
    tmp = str(tmp_path)
    env.cli("volume", "create", "heal", *RWX_RESTART)
    env.cli("volume", "attach", "heal")
    first = share_of(env, "heal")
    # The filesystem goes read-only (as ext4 does after an I/O error): the health check
    # remounts it read-write and clients write again.
    subprocess.run(["mount", "-o", "remount,ro", first["mount_dir"]], check=True)
    wait_until(lambda: "rw" in _mount_options(first["mount_dir"]), 20, "remount read-write")
    assert put(first, "after-ro.bin", b"ok", tmp).returncode == 0

    # The share manager itself dies (kill -9): the daemon starts a new one, which replaces the
    # Ganesha left running by the old one and serves the same port.
    os.kill(first["pid"], signal.SIGKILL)
    again = wait_until(lambda: (s := share_of(env, "heal"))["restarts"] >= 1 and
                       s["health"] == "healthy" and s, 60, "share manager restart")
    assert again["pid"] != first["pid"] and again["port"] == first["port"]
    assert again["ganesha"]["pid"] != first["ganesha"]["pid"]
    assert not psutil.pid_exists(first["ganesha"]["pid"])
    # The client that wrote holds state from before: it is reclaimable, so reads may wait
    # out the grace period.
    wait_until(lambda: nfs("nfs-cat", url(again, "after-ro.bin")).stdout == "ok", 40,
               "read after the restart")


def _mount_options(path: str) -> list[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == path:
                return fields[3].split(",")
    return []


def test_expand_while_attached_grows_the_shared_filesystem(env: Env, tmp_path: object) -> None:
    """An RWX volume on the fuse-nbd frontend (the default without kernel NBD; its loop
    device, as the fuse frontend's, follows an expand at once) is expanded while clients use
    it: the share manager grows the mounted ext4 online where it may (CAP_SYS_RESOURCE), else
    it keeps serving, says why in its mount check, and the next attach grows it offline.
    Either way, what was written before stays."""
    tmp = str(tmp_path)
    env.cli("volume", "create", "grow", *RWX)
    env.cli("volume", "attach", "grow", "--frontend", "fuse-nbd")
    share = share_of(env, "grow")
    before = share["fs"]["size"]
    data = os.urandom(CHUNK)
    assert put(share, "kept.bin", data, tmp).returncode == 0
    env.cli("volume", "expand", "grow", "--size", "128MiB")

    def grown(s: dict[str, Any]) -> bool:
        return bool(s["fs"]) and s["fs"]["size"] > before + 48 * MiB

    if HAVE_SYS_RESOURCE:
        show = wait_until(lambda: (lambda s: s if grown(s) else None)(share_of(env, "grow")),
                          30, "the filesystem grown online")
        assert show["checks"]["mount"].startswith("ok"), show["checks"]
    else:
        show = wait_until(lambda: (lambda s: s if "CAP_SYS_RESOURCE" in s["checks"].get(
            "mount", "") else None)(share_of(env, "grow")), 30, "the reason growth waits")
        assert show["health"] == "healthy" and not grown(show)
        assert get(share, "kept.bin") == data            # still served at the old size
        env.cli("volume", "detach", "grow")
        env.cli("volume", "attach", "grow", "--frontend", "fuse-nbd")
        share = share_of(env, "grow")
        assert grown(share), share["fs"]
        with open(env.home.log("grow-share.log")) as f:
            assert "grown to the device" in f.read()
    assert get(share, "kept.bin") == data
    more = os.urandom(CHUNK)
    assert put(share, "after.bin", more, tmp).returncode == 0
    assert get(share, "after.bin") == more
