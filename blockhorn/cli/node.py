"""`blockhorn node ls|show|update` and `blockhorn disk add|rm|ls`: the nodes and disks the
scheduler places replicas on (manager/nodes.py; JSON fields in docs/API.md)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, format_size

YES_NO = {"yes": True, "no": False, "true": True, "false": False}
DRAIN_TIMEOUT_S = 3600.0   # seconds: a drain rebuilds every replica of the node, one by one


def add_parsers(cmds: Any, home_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    top = cmds.add_parser("node", help="list, show and change nodes",
                          description="The hosts replicas are placed on (this host is a node "
                                      "of its own daemon).")
    ncmds = top.add_subparsers(dest="action", metavar="ACTION", parser_class=type(top))
    ncmds.required = True
    p = ncmds.add_parser("ls", help="list nodes with their state and disks")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    home_arg(p)
    p = ncmds.add_parser("show", help="show one node")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    home_arg(p)
    p = ncmds.add_parser("update", help="change a node's schedulability, tags or zone")
    p.add_argument("name")
    p.add_argument("--schedulable", choices=sorted(YES_NO), help="may new replicas go here")
    p.add_argument("--tags", help="comma-separated tags ('' for none), for --node-selector")
    p.add_argument("--zone", help="the node's zone ('' for none)")
    home_arg(p)
    p = ncmds.add_parser("drain", help="move every replica off a node (a cluster)",
                         description="Plan a new place for every replica on the node (refused, "
                                     "nothing changed, when one has none), mark the node "
                                     "unschedulable, then move the replicas one at a time, "
                                     "each rebuilt before the next.")
    p.add_argument("name")
    home_arg(p)

    top = cmds.add_parser("disk", help="add, remove and list disks",
                          description="Directories replicas may be placed in; `volume create` "
                                      "without --disk schedules over them.")
    dcmds = top.add_subparsers(dest="action", metavar="ACTION", parser_class=type(top))
    dcmds.required = True
    p = dcmds.add_parser("add", help="register a directory as a disk")
    p.add_argument("path")
    p.add_argument("--node", help="the node it is on (default: this one)")
    p.add_argument("--tags", default="", help="comma-separated tags, for --disk-selector")
    p.add_argument("--reserve", default="0", help="space no replica may be promised (e.g. 10GiB)")
    home_arg(p)
    p = dcmds.add_parser("rm", help="unregister a disk that holds no replica")
    p.add_argument("path")
    p.add_argument("--node", help="the node it is on (default: this one)")
    home_arg(p)
    p = dcmds.add_parser("ls", help="list disks")
    p.add_argument("--json", action="store_true", help="print JSON")
    home_arg(p)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _disk_rows(disks: list[dict[str, Any]], with_node: bool) -> list[list[str]]:
    rows = [(["NODE"] if with_node else []) + ["PATH", "CAPACITY", "AVAILABLE", "SCHEDULED",
                                               "RESERVED", "SCHEDULABLE", "TAGS"]]
    for d in disks:
        rows.append(([d["node"]] if with_node else []) + [
            d["path"], format_size(d["capacity"]), format_size(d["available"]),
            format_size(d["scheduled"]), format_size(d["reserved"]),
            "yes" if d["schedulable"] else "no", ",".join(d["tags"]) or "-"])
    return rows


def format_nodes(nodes: list[dict[str, Any]]) -> str:
    rows = [["NAME", "ADDRESS", "STATE", "SCHEDULABLE", "ZONE", "TAGS", "DISKS"]]
    for n in nodes:
        rows.append([n["name"] + (" (leader)" if n.get("leader") else ""), n["address"], n["state"], "yes" if n["schedulable"] else "no",
                     n["zone"] or "-", ",".join(n["tags"]) or "-", str(len(n["disks"]))])
    return _table(rows)


def format_node(n: dict[str, Any]) -> str:
    head = (f"Name:        {n['name']}\nAddress:     {n['address']}\nState:       {n['state']}\n"
            f"Schedulable: {'yes' if n['schedulable'] else 'no'}\nZone:        "
            f"{n['zone'] or '-'}\nTags:        {','.join(n['tags']) or '-'}\n")
    if not n["disks"]:
        return head + "Disks:       none (add one with `blockhorn disk add PATH`)"
    return head + "Disks:\n" + "\n".join("  " + line for line in
                                         _table(_disk_rows(n["disks"], False)).splitlines())


def run_node(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    if args.action == "drain":
        with connect(home, timeout=DRAIN_TIMEOUT_S) as c:
            got = c.request("POST", f"/nodes/{args.name}/drain", {})
        for m in got["moved"]:
            print(f"replica {m['replica']} of {m['volume']}: moved to {m['node']} "
                  f"({m['disk']})")
            if m.get("message"):   # how (the volume's message then; later events replace it)
                print(f"  {m['message']}")
        print(f"node {args.name} drained ({len(got['moved'])} replicas moved)")
        return 0
    with connect(home) as c:
        if args.action == "ls":
            nodes = c.request("GET", "/nodes")["nodes"]
            print(json.dumps(nodes, indent=2, sort_keys=True) if args.json
                  else format_nodes(nodes))
        elif args.action == "show":
            n = c.request("GET", f"/nodes/{args.name}")
            print(json.dumps(n, indent=2, sort_keys=True) if args.json else format_node(n))
        else:
            body: dict[str, Any] = {}
            if args.schedulable is not None:
                body["schedulable"] = YES_NO[args.schedulable]
            if args.tags is not None:
                body["tags"] = args.tags
            if args.zone is not None:
                body["zone"] = args.zone
            if not body:
                raise InvalidArgument("nothing to change: give --schedulable, --tags or --zone")
            print(format_node(c.request("PATCH", f"/nodes/{args.name}", body)))
    return 0


def run_disk(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    with connect(home) as c:
        if args.action == "add":
            d = c.request("POST", "/disks", {"path": os.path.abspath(args.path),
                                             "node": args.node, "tags": args.tags,
                                             "reserve": args.reserve})
            print(f"added disk {d['path']} of node {d['node']}: "
                  f"{format_size(d['available'])} free of {format_size(d['capacity'])}")
        elif args.action == "rm":
            params = {"path": os.path.abspath(args.path)}
            if args.node:
                params["node"] = args.node
            c.request("DELETE", "/disks", params=params)
            print(f"removed disk {params['path']}")
        else:
            disks = c.request("GET", "/disks")["disks"]
            print(json.dumps(disks, indent=2, sort_keys=True) if args.json
                  else _table(_disk_rows(disks, True)))
    return 0
