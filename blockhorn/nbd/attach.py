"""Turning a running engine into a block device, and back.

Where the kernel has NBD (`/dev/nbd*`), `nbd-client` connects a free `/dev/nbdN` to the
volume's local relay (manager/nbdproxy.py LOCAL: nbdkit with nbd/relay.py on a unix socket of
its own, in front of the engine's), which outlives the engine: the daemon starts the relay
first. Elsewhere (containers, this CI), `nbdfuse` exposes the engine as one file in a
FUSE mount and `losetup` puts a loop device on it. The `fuse` frontend skips NBD: the engine
runs inside a pyfuse3 process (`blockhorn.fuse`) that exposes the volume as a file, and only the
loop device is attached here. `detach_device` undoes every step in reverse order and keeps going
after a failed step, so a half-attached volume can always be cleaned up.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from blockhorn.fuse import IMAGE
from blockhorn.types import BlockhornError

log = logging.getLogger("blockhorn.attach")

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
NBDKIT_PYTHON_PLUGIN = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-python-plugin.so"
READY_TIMEOUT_S = 20.0
# nbdkit worker threads. Every request runs Python under the one GIL, and with many threads
# they mostly wait for each other: measured on 2 cores, 3 replicas, fio QD32, 4 threads gave
# 24k randread / 4.3k randwrite IOPS, 8 gave 21k / 4.9k, 16 (nbdkit's default) 16k / 4.6k.
NBDKIT_THREADS = 4

# fuse-nbd: the device-holding FUSE process (blockhorn/fuse/holder.py), which outlives engines.
FRONTENDS = ("nbd", "nbdfuse", "fuse", "fuse-nbd", "none")
# Frontends whose device survives an engine restart (and so a live upgrade); `nbd` too when
# its nbd-client is connected to the local relay (`Attachment.relay`; see `survives`).
SURVIVING = ("fuse-nbd",)
HOLDER_READY_TIMEOUT_S = 70.0   # the holder waits up to 60 s for an engine before it mounts

NBDFUSE_IMAGE = "nbd"   # nbdfuse's file in its mount
# The files a loop device of a FUSE frontend is on, in the volume's FUSE mount: the fuse and
# fuse-nbd frontends', nbdfuse's.
IMAGE_NAMES = (IMAGE, NBDFUSE_IMAGE)

PACKAGES = {  # command -> Debian package that provides it
    "nbdkit": "nbdkit", "nbdfuse": "libnbd-bin", "losetup": "mount",
    "fusermount3": "fuse3", "nbd-client": "nbd-client",
}


@dataclass
class Attachment:
    device: str
    frontend: str
    pids: dict[str, int] = field(default_factory=dict)
    fuse_dir: str = ""
    # The `nbd` frontend: the relay socket nbd-client is connected to (manager/nbdproxy.py).
    # Empty for an attachment made before the relay existed (nbd-client on the engine's socket).
    relay: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attachment:
        return cls(**data)


def survives(attachment: dict[str, Any]) -> bool:
    """Whether the device of `attachment` (Attachment.to_dict) outlives an engine restart."""
    frontend = attachment.get("frontend")
    return frontend in SURVIVING or (frontend == "nbd" and bool(attachment.get("relay")))


def require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise BlockhornError(f"{command} is not installed: apt-get install {PACKAGES[command]}",
                             errno.ENOENT)
    return path


def check_dependencies(frontend: str = "auto") -> None:
    require("nbdkit")
    if not glob.glob("/usr/lib/*/nbdkit/plugins/nbdkit-python-plugin.so"):
        raise BlockhornError("nbdkit's Python plugin is not installed: "
                             "apt-get install nbdkit-plugin-python", errno.ENOENT)
    frontend = choose_frontend(frontend)
    if frontend == "nbd":
        require("nbd-client")
    elif frontend == "nbdfuse":
        for cmd in ("nbdfuse", "losetup", "fusermount3"):
            require(cmd)
        if not os.path.exists("/dev/fuse"):
            raise BlockhornError("/dev/fuse is missing: this host cannot use the nbdfuse "
                                 "frontend", errno.ENODEV)
    elif frontend in ("fuse", "fuse-nbd"):
        for cmd in ("losetup", "fusermount3"):
            require(cmd)
        if not os.path.exists("/dev/fuse"):
            raise BlockhornError(f"/dev/fuse is missing: this host cannot use the {frontend} "
                                 "frontend", errno.ENODEV)
        if frontend == "fuse-nbd":
            from blockhorn.fuse.holder import import_nbd
            import_nbd()
        try:
            import pyfuse3  # noqa: F401
        except ImportError:
            raise BlockhornError("pyfuse3 is not installed: run `make setup` (needs "
                                 "libfuse3-dev to build)", errno.ENOENT) from None


def choose_frontend(frontend: str) -> str:
    # auto is fuse-nbd where there is no NBD: its device survives an engine crash and a live
    # upgrade (docs/DURABILITY.md), and it keeps the NBD endpoint (nbdsh, nbdcopy, fio
    # --ioengine=nbd) that the fuse frontend does not have. It costs speed: make bench
    # (scripts/bench_engine_survival.py, 2 vCPUs shared with other work, 3 replicas, fio on
    # the loop device, two runs) measured against nbdfuse 4k randread 0.41-0.49x, randwrite
    # 0.85-0.9x, 1M read 0.65-0.78x, 1M write 0.58-0.9x, and against the in-process fuse
    # frontend 0.28-0.44x / 0.65-0.71x / 0.39-0.57x / 0.75-1.1x: a thread hand-off and a
    # libnbd round trip per request, in Python. nbdfuse is the fallback where pyfuse3 or
    # libnbd's Python module is missing.
    if frontend == "auto":
        if glob.glob("/dev/nbd[0-9]*") and shutil.which("nbd-client"):
            return "nbd"
        return "fuse-nbd" if _holder_usable() else "nbdfuse"
    if frontend not in FRONTENDS:
        raise BlockhornError(f"unknown frontend {frontend!r}: use auto, "
                             f"{', '.join(FRONTENDS)}", errno.EINVAL)
    return frontend


def _holder_usable() -> bool:
    try:
        import pyfuse3  # noqa: F401

        from blockhorn.fuse.holder import import_nbd
        import_nbd()
    except (ImportError, BlockhornError):
        return False
    return os.path.exists("/dev/fuse")


def engine_argv(config_path: str, nbd_socket: str) -> list[str]:
    """The command line of one engine: nbdkit in the foreground with the blockhorn plugin,
    on its unix socket only (a TCP endpoint is a TLS proxy in front of it: nbd/tls.py)."""
    return [require("nbdkit"), "--foreground", "--threads", str(NBDKIT_THREADS),
            "--unix", nbd_socket, "python", PLUGIN, f"config={os.path.abspath(config_path)}"]


def start_engine(config_path: str, nbd_socket: str, log_path: str) -> subprocess.Popen[bytes]:
    """Start one engine in its own session (it outlives its starter) logging to `log_path`.
    nbdkit leaves its unix socket behind when it exits: a stale one is removed first."""
    remove_stale_socket(nbd_socket)
    argv = engine_argv(config_path, nbd_socket)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def remove_stale_socket(path: str) -> None:
    """Unlink `path` if it is a unix socket nobody listens on (refuse to touch a live one)."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise BlockhornError(f"{path} is in use by a running engine", errno.EBUSY)


def nbd_uri(nbd_socket: str) -> str:
    return f"nbd+unix:///?socket={os.path.abspath(nbd_socket)}"


def _run(argv: list[str], timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BlockhornError(f"{argv[0]} did not finish in {timeout:g} s", errno.ETIMEDOUT) from None
    if proc.returncode != 0:
        raise BlockhornError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}",
                             errno.EIO)
    return proc.stdout.strip()


def wait_for(predicate: Any, what: str, timeout: float = READY_TIMEOUT_S,
             log_path: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = ""
            if log_path and os.path.exists(log_path):
                with open(log_path, errors="replace") as f:
                    tail = "; log: " + " | ".join(f.read().splitlines()[-5:])
            raise BlockhornError(f"{what} not ready after {timeout:g} s{tail}", errno.ETIMEDOUT)
        time.sleep(0.05)


def attach_device(uri: str, fuse_dir: str, log_path: str, frontend: str = "auto") -> Attachment:
    frontend = choose_frontend(frontend)
    if frontend == "nbd":
        return _attach_nbd(uri)
    if frontend == "none":
        return Attachment(device="", frontend="none")
    if frontend == "fuse":
        # The FUSE process (`blockhorn fuse serve`) runs the engine and is the engine process
        # the daemon supervises: here only the loop device goes on its file.
        att = Attachment(device="", frontend="fuse", fuse_dir=fuse_dir)
        att.device = loop_setup(os.path.join(fuse_dir, IMAGE))
        return att
    if frontend == "fuse-nbd":
        return _attach_holder(uri, fuse_dir, log_path)
    return _attach_nbdfuse(uri, fuse_dir, log_path)


def _attach_holder(uri: str, fuse_dir: str, log_path: str) -> Attachment:
    """The holder process (blockhorn/fuse/holder.py) mounts the volume file and reaches the
    engine over NBD, reconnecting when the engine is restarted; a loop device on the file."""
    cleanup_stale_mount(fuse_dir)
    os.makedirs(fuse_dir, exist_ok=True)
    pidfile = fuse_dir.rstrip("/") + ".pid"
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    att = Attachment(device="", frontend="fuse-nbd", fuse_dir=fuse_dir)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "blockhorn.fuse.holder",
                                 "--socket", uri.split("socket=", 1)[1], "--mount", fuse_dir,
                                 "--pidfile", pidfile],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    att.pids["holder"] = proc.pid
    try:
        wait_for(lambda: os.path.exists(pidfile) or proc.poll() is not None,
                 "the fuse-nbd holder", HOLDER_READY_TIMEOUT_S, log_path=log_path)
        if proc.poll() is not None:
            raise BlockhornError(f"the fuse-nbd holder exited with status {proc.returncode}; "
                                 f"see {log_path}", errno.EIO)
        att.device = loop_setup(os.path.join(fuse_dir, IMAGE))
    except BaseException:
        detach_device(att)
        raise
    return att


NBD_BLOCK_SIZE = 4096   # the kernel device's logical block size (a filesystem's usual block)
# Connections of a local `nbd` device (nbd-client -C; the kernel maps its hardware queues,
# at most one per CPU, onto them). The engine advertises multi-conn (nbd/exports.py: one
# FLUSH covers the writes of every connection), and the local relay serves each on its own
# worker threads (tls.PROXY_THREADS).
NBD_CONNECTIONS = 2
# The kernel's limit for one request (nbd-client -t), longer than every wait of ours: the
# relay's 60 s for an engine to come back (fuse/holder.py RECONNECT_DEADLINE_S) plus the
# engine's own answer timeout. Without -t the kernel does not wait forever once there is more
# than one connection: the block layer's default (30 s) applies, and at that timeout the NBD
# driver shuts that connection down and re-queues the request on another; after the last one
# every request fails (EIO). An engine paused for 30 s (SIGSTOP, a frozen VM, a swap storm)
# cost a connection that way: tests/t7_vm_host.py freezes it for 40 s.
NBD_REQUEST_TIMEOUT_S = 180
# File names in a client certificate directory: libnbd's (nbd_set_tls_certificates), so one
# directory serves nbdsh/nbdcopy and nbd-client alike.
CLIENT_CERT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def nbd_client_argv(device: str, socket_path: str = "", host: str = "", port: int = 0,
                    cert_dir: str = "", tls_hostname: str = "", export: str = "",
                    nbd_client: str = "", connections: int = 1) -> list[str]:
    """The `nbd-client` command line that connects `device` to an engine: its unix socket
    (the nbd frontend) or its TCP endpoint (nbd/tls.py) with X.509 certificates from
    `cert_dir` — nbd-client 3.24 speaks TLS with certificates only, not TLS-PSK.
    `tls_hostname` is the name checked against the server's certificate when the host is
    reached by another address (a NAT, QEMU's 10.0.2.2). `export` names the export (`-N`;
    the engine serves one whatever the name, but without -N nbd-client 3.24 warns about the
    oldstyle protocol). `connections` > 1: that many connections (`-C`, netlink only). The
    request timeout is NBD_REQUEST_TIMEOUT_S (`-t`) either way.
    The real-kernel tier (tests/t7_vm_nbd.py, t7_vm_host.py) runs exactly this command line
    in a guest."""
    argv = [nbd_client or require("nbd-client")]
    if socket_path:
        argv += ["-unix", socket_path]
    elif host and port:
        argv += [host, str(port)]
    else:
        raise BlockhornError("nbd-client needs a unix socket or a host and port", errno.EINVAL)
    argv += [device, "-b", str(NBD_BLOCK_SIZE), "-t", str(NBD_REQUEST_TIMEOUT_S)]
    if connections > 1:
        argv += ["-C", str(connections)]
    if export:
        argv += ["-N", export]
    if cert_dir:
        ca, cert, key = (os.path.join(cert_dir, f) for f in CLIENT_CERT_FILES)
        argv += ["-enable-tls", "-cacertfile", ca, "-certfile", cert, "-keyfile", key]
        if tls_hostname:
            argv += ["-tlshostname", tls_hostname]
    elif host:
        raise BlockhornError("an NBD endpoint on TCP needs TLS: give a certificate directory",
                             errno.EINVAL)
    return argv


def nbd_connected(dev: str) -> bool:
    """Whether kernel NBD device `dev` is connected (its size is not 0)."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/size") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def _attach_nbd(uri: str) -> Attachment:
    socket_path = uri.split("socket=", 1)[1]
    for dev in sorted(glob.glob("/dev/nbd[0-9]*")):
        if nbd_connected(dev):
            continue  # in use
        _run(nbd_client_argv(dev, socket_path=socket_path, connections=NBD_CONNECTIONS))
        return Attachment(device=dev, frontend="nbd")
    raise BlockhornError("no free /dev/nbd device", errno.EBUSY)


def refresh_size(att: Attachment, size: int, timeout: float = 10.0) -> bool:
    """After an online expand: make the block device show `size`. The fuse frontend's file
    grows by itself; the fuse-nbd holder's once told (SIGWINCH: it asks the engine again);
    the loop device on it re-reads its size with `losetup -c`. nbdfuse and nbd-client read
    the size only when they connect: False (detach and attach)."""
    if att.frontend not in ("fuse", "fuse-nbd") or not att.device:
        return False
    image = os.path.join(att.fuse_dir, IMAGE)
    if att.frontend == "fuse-nbd":
        holder = att.pids.get("holder", 0)
        if not holder or not _alive(holder):
            return False
        os.kill(holder, signal.SIGWINCH)
    try:
        wait_for(lambda: os.stat(image).st_size >= size, f"{image} to grow", timeout)
    except BlockhornError as e:
        # The expand itself is done; a device that did not follow (a holder of an older
        # release) shows the new size after detach + attach.
        log.warning("%s", e)
        return False
    _run([require("losetup"), "-c", att.device])
    return True


def _attach_nbdfuse(uri: str, fuse_dir: str, log_path: str) -> Attachment:
    cleanup_stale_mount(fuse_dir)
    os.makedirs(fuse_dir, exist_ok=True)
    image = os.path.join(fuse_dir, NBDFUSE_IMAGE)
    pidfile = fuse_dir.rstrip("/") + ".pid"
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    att = Attachment(device="", frontend="nbdfuse", fuse_dir=fuse_dir)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([require("nbdfuse"), "-P", pidfile, image, uri],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    att.pids["nbdfuse"] = proc.pid
    try:
        wait_for(lambda: os.path.exists(pidfile) or proc.poll() is not None,
                 "nbdfuse", log_path=log_path)
        if proc.poll() is not None:
            raise BlockhornError(f"nbdfuse exited with status {proc.returncode}; "
                                 f"see {log_path}", errno.EIO)
        att.device = loop_setup(image)
    except BaseException:
        detach_device(att)
        raise
    return att


def loop_setup(image: str) -> str:
    """A loop device on `image`, with direct I/O (no second page cache above the FUSE file)."""
    return _run([require("losetup"), "--find", "--show", "--direct-io=on", image])


def loops_on(image: str) -> list[str]:
    """The loop devices whose backing file is `image` (from sysfs: no process, no wait).
    The kernel names a backing file by its real path; only the directories above the FUSE
    mount are resolved here (a look at the mount itself would ask its server)."""
    mount = os.path.dirname(os.path.abspath(image))
    image = os.path.join(os.path.realpath(os.path.dirname(mount)), os.path.basename(mount),
                         os.path.basename(image))
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing) as f:
                path = f.read().strip()
        except OSError:
            continue   # detached meanwhile
        if path.removesuffix(" (deleted)") == image:
            found.append("/dev/" + backing.split("/")[3])
    return sorted(found)


def is_mounted(path: str) -> bool:
    """From /proc/self/mounts: `os.path.ismount` cannot see a FUSE mount whose process died
    (stat answers ENOTCONN)."""
    path = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == path for line in f)


def _unmount_fuse(fuse_dir: str) -> None:
    if not is_mounted(fuse_dir):
        return
    if subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True).returncode != 0:
        # Still busy, or its process is gone: detach it lazily so the name is free again.
        subprocess.run(["fusermount3", "-u", "-z", fuse_dir], capture_output=True)


def cleanup_stale_mount(fuse_dir: str) -> None:
    """A FUSE mount whose process died answers ENOTCONN: unmount it before reuse. statfs is
    the probe because the kernel always asks the FUSE server for it (stat may be answered
    from cached attributes)."""
    try:
        os.statvfs(fuse_dir)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            # A loop device on its file is dead for good (a new mount is a new file). Detach
            # it now, while its backing path still names this mount: after the lazy unmount
            # below it reads "/volume", nothing tells it from another volume's, and it would
            # hold the dead FUSE connection until a reboot. Busy (a filesystem still mounted
            # on it): -d sets autoclear, and the kernel frees it when that ends.
            for name in IMAGE_NAMES:
                for dev in loops_on(os.path.join(fuse_dir, name)):
                    subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            _unmount_fuse(fuse_dir)


def detach_device(att: Attachment) -> None:
    """Undo `attach_device` in reverse order; every step is tried, the first error re-raised."""
    errors: list[str] = []
    if att.frontend == "nbd" and att.device:
        try:
            _run([require("nbd-client"), "-d", att.device])
        except BlockhornError as e:
            errors.append(str(e))
    if att.frontend in ("nbdfuse", "fuse", "fuse-nbd"):
        # Only while it is still on this attachment's file: a node that fenced itself
        # released it (node/fence.py), and the number may belong to another volume since.
        if att.device and att.device in loops_on(_image(att)):
            try:
                _run([require("losetup"), "-d", att.device])
            except BlockhornError as e:
                if "No such device" not in str(e):
                    errors.append(str(e))
        if att.fuse_dir:
            _unmount_fuse(att.fuse_dir)
        for pid in att.pids.values():   # nbdfuse, or the fuse-nbd holder
            _wait_exit(pid)
    if errors:
        raise BlockhornError("; ".join(errors), errno.EBUSY)


def _image(att: Attachment) -> str:
    """The file in `att`'s FUSE mount that its loop device is on."""
    name = NBDFUSE_IMAGE if att.frontend == "nbdfuse" else IMAGE
    return os.path.join(os.path.abspath(att.fuse_dir), name)


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if not _alive(pid):
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # exited between the check and the kill


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
