"""`blockhorn daemon [run|stop|status]`: the manager + node agent in the foreground, or stop /
query a running one."""

from __future__ import annotations

import argparse
import errno
import json
import os
from typing import Any

from blockhorn.cli.common import home_arg
from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError


def add_parser(cmds: Any) -> None:
    p = cmds.add_parser("daemon", help="run (or stop) the blockhorn daemon",
                        description="Run the manager + node agent in the foreground (systemd "
                                    "runs this), or stop / query a running one.")
    p.add_argument("op", nargs="?", choices=("run", "stop", "status"), default="run",
                   help="run (default), stop, or status")
    p.add_argument("--quiet", action="store_true",
                   help="log only to <home>/logs/daemon.log, not to stderr")
    p.add_argument("--etcd", metavar="URL[,URL...]", default=os.environ.get("BLOCKHORN_ETCD"),
                   help="keep the state in etcd (client URLs; env BLOCKHORN_ETCD) instead of "
                        "SQLite in the home")
    p.add_argument("--etcd-prefix", metavar="PREFIX", default="/blockhorn/",
                   help="key prefix of this cluster's state in etcd (default /blockhorn/)")
    p.add_argument("--node", metavar="NAME", default=os.environ.get("BLOCKHORN_NODE"),
                   help="this host's node name (default: the host name)")
    p.add_argument("--address", metavar="IP",
                   default=os.environ.get("BLOCKHORN_ADDRESS", "127.0.0.1"),
                   help="the address other nodes reach this one at (env BLOCKHORN_ADDRESS; "
                        "default 127.0.0.1)")
    p.add_argument("--api-listen", metavar="IP:PORT|none",
                   default=os.environ.get("BLOCKHORN_API_LISTEN"),
                   help="serve the API on TCP too, with TLS and a bearer token "
                        "(<home>/api.token; env BLOCKHORN_API_LISTEN); see docs/API.md. With "
                        "--etcd the default is ADDRESS:9443, so that other nodes can forward "
                        "requests here; `none` serves the unix socket only. One host: off "
                        "unless given")
    home_arg(p)


def run_daemon(args: argparse.Namespace, home: Home) -> int:
    if args.op == "run":
        from blockhorn.manager import daemon
        return daemon.main(home.root, to_stderr=not args.quiet, etcd=args.etcd,
                           etcd_prefix=args.etcd_prefix, node=args.node,
                           address=args.address, api_listen=args.api_listen)
    from blockhorn.manager.client import connect
    try:
        c = connect(home, autostart=False)
    except BlockhornError:
        if args.op == "status":
            print(f"no daemon answers on {home.socket}")
            return 3
        print(f"no daemon runs for {home.root}")
        return 0
    pid = None
    with c:
        if args.op == "status":
            print(json.dumps(c.ping(), indent=2, sort_keys=True))
        else:
            pid = (c.ping() or {}).get("pid")
            c.stop_daemon()
    if args.op == "stop":
        # Wait with the connection closed: the daemon lets open connections finish first.
        _wait_gone(pid)
        print(f"stopped daemon {pid}")
    return 0


def _wait_gone(pid: int | None, timeout: float = 15.0) -> None:
    """Wait for the daemon to exit. It is not our child, and its parent (init in a container)
    may reap it late: a zombie counts as gone."""
    import time

    import psutil
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            raise BlockhornError(f"daemon {pid} did not stop within {timeout:.0f} s",
                                 errno.ETIMEDOUT)
        time.sleep(0.02)
