"""The engine keeper: the process that stays nbdkit's parent (and that of the NBD TLS proxy in
front of it), so that nbdkit lives exactly as long as it and not as long as the daemon that
started it. `blockhorn engine serve --keeper` and manager/nbdproxy.py run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PROXY_RESTART_DELAY_S = 1.0   # seconds between restarts of a TLS proxy that exited


def keep(argv: list[str], proxy: list[str] | None = None) -> int:
    """Run `argv` (and the TLS proxy in front of it, if any) as children, pass
    SIGTERM/SIGINT/SIGHUP on, exit with the engine's status when it exits.

    nbdkit run with --foreground sets PR_SET_PDEATHSIG(SIGTERM): it stops when its parent
    exits. Its parent must therefore be a process that lives exactly as long as it — this one —
    and not the daemon, whose restart must not interrupt I/O. Killing this process (even with
    SIGKILL) still stops nbdkit, through that same death signal (the proxy runs with
    --exit-with-parent). A proxy that exits is started again here, after a pause, without
    touching the engine: the local device above the engine's unix socket keeps working."""
    engine = subprocess.Popen(argv)
    children = [engine]
    if proxy:
        children.append(subprocess.Popen(proxy))
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.returncode is None:
                c.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        pid, status = os.waitpid(-1, 0)   # PEP 475: retried after each forwarded signal
        rc = os.waitstatus_to_exitcode(status)
        if pid == engine.pid:
            engine.returncode = rc
            break
        if proxy and pid == children[1].pid:
            children[1].returncode = rc
            if stopping:
                continue
            print(f"blockhorn: the NBD TLS proxy exited with status {rc}: starting it again",
                  file=sys.stderr, flush=True)
            time.sleep(PROXY_RESTART_DELAY_S)
            if not stopping:
                children[1] = subprocess.Popen(proxy)
    for c in children[1:]:
        if c.returncode is None:
            c.terminate()
            c.wait()
    return rc if rc >= 0 else 128 - rc
