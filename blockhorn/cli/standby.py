"""`blockhorn volume create --standby-from`, `volume standby-sync`, `volume activate`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, check_name, format_size


def add_parsers(vcmds: Any) -> None:
    p = vcmds.add_parser("standby-sync", help="check a DR standby's backup volume now",
                         description="Check the standby's backup volume now and apply a new "
                                     "backup if there is one (only the blocks that changed). "
                                     "The daemon does this on its own every interval.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the standby state as JSON")
    p = vcmds.add_parser("activate", help="turn a DR standby into a normal volume",
                         description="Apply the latest backup of the standby's backup volume, "
                                     "then make it a normal volume that can be attached.")
    p.add_argument("name")


def add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--standby-from", metavar="URL",
                   help="create a DR standby of a backup volume (TARGET?volume=VOL): restored "
                        "from its latest backup, then following each new one; detached until "
                        "`volume activate`")
    p.add_argument("--standby-interval", type=int, default=None, metavar="SECONDS",
                   help="with --standby-from: seconds between checks for a new backup "
                        "(default 300)")


def format_standby(st: dict[str, Any]) -> str:
    text = (f"standby of {st['source']}: at backup {st.get('last_backup') or '-'} "
            f"(applied {st.get('applied') or '-'}), next check {st.get('next_check')}")
    if st.get("error"):
        text += f"; last check failed: {st['error']}"
    return text


def run_standby(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    check_name(args.name)
    if args.action == "create":
        if args.from_snapshot:
            raise InvalidArgument("--standby-from and --from-snapshot exclude each other")
        if args.size:
            raise InvalidArgument("--standby-from takes its size from the backup volume: "
                                  "drop --size")
        if args.access != "rwo":
            raise InvalidArgument("a standby volume is created rwo")
        body: dict[str, Any] = {"source": args.standby_from, "replicas": args.replicas,
                                "disks": [os.path.abspath(d) for d in args.disks],
                                "transport": args.transport}
        if args.standby_interval is not None:
            body["interval_s"] = args.standby_interval
        with connect(home) as c:
            v = c.request("POST", f"/volumes/{args.name}/standby", body)
        print(f"created standby volume {v['name']}: {format_size(v['size'])}, at backup "
              f"{v['standby']['last_backup']}")
        return 0
    with connect(home) as c:
        if args.action == "standby-sync":
            st = c.request("POST", f"/volumes/{args.name}/standby/sync")
            if args.json:
                print(json.dumps(st, indent=2, sort_keys=True))
            elif st.get("applied_now"):
                print(f"applied backup {st['last_backup']}: "
                      f"{format_size(st['applied_bytes'])} fetched")
            else:
                print(f"no new backup: at {st['last_backup']}")
        else:
            v = c.request("POST", f"/volumes/{args.name}/activate")
            print(f"volume {v['name']} activated: {v.get('message')}")
    return 0
