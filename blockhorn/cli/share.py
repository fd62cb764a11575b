"""`blockhorn share show|serve`: the NFSv4 share of an RWX volume."""

from __future__ import annotations

import argparse
import json
from typing import Any

from blockhorn.cli.common import Parser, dash, home_arg
from blockhorn.manager.paths import Home
from blockhorn.types import check_name, format_size


def add_parsers(cmds: Any) -> None:
    sh = cmds.add_parser("share", help="NFS shares of RWX volumes",
                         description="Inspect the NFSv4 share of an RWX volume, or run a "
                                     "share manager (the daemon and "
                                     "blockhorn-share@.service use `serve`). On a cluster of "
                                     "node daemons a share moves to another node by itself "
                                     "when its node dies.")
    scmds = sh.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    scmds.required = True
    p = scmds.add_parser("show", help="endpoint, mount command, allow-list and health",
                         description="Show the share of an attached RWX volume.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    home_arg(p)
    p = scmds.add_parser("serve", help="run one share manager in the foreground",
                         description="Format/check and mount the device, run NFS-Ganesha, "
                                     "restart it when it dies, check health.")
    p.add_argument("--config", required=True, metavar="FILE", help="share config (JSON)")


def format_share(s: dict[str, Any]) -> str:
    lines = [
        f"Volume:      {s['volume']}",
        f"Health:      {s['health']}",
        f"Endpoint:    {dash(s.get('endpoint'))}",
        f"Mount:       {dash(s.get('mount_command'))}",
        "Clients:     " + ", ".join(f"{c['cidr']} ({c['access']})" for c in s["clients"]),
        f"Squash:      {s['squash']}",
        f"Ganesha:     pid {dash(s['ganesha'].get('pid'))}, "
        f"{s['ganesha'].get('restarts', 0)} restarts, last outage "
        f"{dash(s['ganesha'].get('last_outage_s'))} s",
        "Checks:      " + (", ".join(f"{k} {v}" for k, v in sorted(s["checks"].items()))
                           or "-"),
    ]
    if s.get("fs"):
        lines.append(f"Filesystem:  {format_size(s['fs']['size'])}, "
                     f"{format_size(s['fs']['free'])} free, mounted at {s['mount_dir']}")
    if s.get("message"):
        lines.append(f"Message:     {s['message']}")
    return "\n".join(lines)


def run_share(args: argparse.Namespace, home: Home) -> int:
    if args.action == "serve":
        from blockhorn.sharemgr.server import main as share_main
        return share_main(args.config)
    from blockhorn.manager.client import connect
    check_name(args.name)
    with connect(home) as c:
        s = c.share(args.name)
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else format_share(s))
    return 0
