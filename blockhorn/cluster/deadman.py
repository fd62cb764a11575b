"""The owner's dead man's switch: if the agent process dies, what it serves dies with it.

    python -m blockhorn.cluster.deadman WORKDIR [IFNAME CIDR]      (stdin: a pipe from the agent)

The agent starts this helper, in a session of its own, when it becomes the owner, and holds
the only write end of the pipe on its stdin. The helper does nothing until the pipe reaches
EOF — the agent closed it (a clean stop, after its own teardown) or died (killed -9, crashed) —
and then SIGKILLs every process whose command line names WORKDIR (the engine's nbdkit,
nbdfuse, ganesha.nfsd: their config, socket and pid paths all live there) and removes the
service address CIDR from IFNAME. So a host whose agent is gone neither writes to the replicas
nor answers NFS clients nor holds the address, even when its lease then expires and another
host takes over.

Why a helper and not the kernel's parent-death signal: nbdkit sets its own
PR_SET_PDEATHSIG(SIGTERM) in the foreground, and on SIGTERM it keeps serving the clients that
are connected (nbdfuse) until they hang up; Ganesha is started from a worker thread, whose
exit would count as the parent's death.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

from blockhorn.sharemgr import address
from blockhorn.types import BlockhornError


def holders(workdir: str) -> list[psutil.Process]:
    """Processes (other than this one) with WORKDIR/... in their command line."""
    prefix = os.path.join(os.path.abspath(workdir), "")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        if any(prefix in arg for arg in p.info["cmdline"] or []):
            found.append(p)
    return found


def kill_all(workdir: str, timeout: float = 5.0) -> int:
    """SIGKILL every holder of WORKDIR and wait until they are dead; how many there were.
    Dead includes zombies: their parent (the agent) is gone, and whoever inherited them may
    reap them late."""
    procs = holders(workdir)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass   # exited meanwhile
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_dead(p) for p in procs):
        time.sleep(0.02)
    return len(procs)


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3):
        print("usage: python -m blockhorn.cluster.deadman WORKDIR [IFNAME CIDR]",
              file=sys.stderr)
        return 2
    import pyroute2  # noqa: F401  (imported now, so that removing the address is quick later)
    while sys.stdin.buffer.read(4096):
        pass   # the agent writes nothing; only EOF matters
    killed = kill_all(argv[0])
    if len(argv) == 3:
        try:
            address.remove(argv[1], argv[2])
        except BlockhornError as e:
            print(f"deadman: {e}", file=sys.stderr)
    if killed:
        print(f"{time.strftime('%F %T')} deadman[{os.getpid()}]: the agent is gone: killed "
              f"{killed} processes of {argv[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
