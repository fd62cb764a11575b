"""`blockhorn snapshot ...`, `blockhorn volume expand` and `volume create --from-snapshot`."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, check_labels, check_name, format_size, parse_size


def add_parsers(cmds: Any, vcmds: Any) -> None:
    snap = cmds.add_parser("snapshot", help="take, list, remove and revert to snapshots",
                           description="Point-in-time snapshots of a volume. Taking one copies "
                                       "no data; removing one folds it into its neighbours.")
    scmds = snap.add_subparsers(dest="action", metavar="ACTION", parser_class=type(snap))
    scmds.required = True
    p = scmds.add_parser("create", help="take a snapshot",
                         description="Take a snapshot of VOLUME (attached or not).")
    p.add_argument("volume")
    p.add_argument("name", nargs="?", help="snapshot name (default: snap-<UTC time>)")
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="a label to store with the snapshot (repeatable)")
    p = scmds.add_parser("ls", help="list a volume's snapshots as a tree",
                         description="List snapshots: parent, created, user-created, size.")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true", help="JSON: [{name, parent, created, "
                   "user_created, removed, size, labels}]")
    p = scmds.add_parser("rm", help="remove a snapshot (its data folds into its neighbours)")
    p.add_argument("volume")
    p.add_argument("name")
    p = scmds.add_parser("purge", help="fold every removed snapshot now",
                         description="Fold removed snapshots into their neighbours (runs beside "
                                     "I/O; needs no extra free space beyond the child's data).")
    p.add_argument("volume")
    p = scmds.add_parser("revert", help="revert a detached volume to a snapshot",
                         description="Revert VOLUME to snapshot NAME. The volume must be "
                                     "detached; what was written after the snapshot is lost.")
    p.add_argument("volume")
    p.add_argument("name")

    p = vcmds.add_parser("expand", help="grow a volume (online when attached)",
                         description="Grow VOLUME to SIZE; shrinking is refused. NBD clients "
                                     "see the new size after reconnecting (detach + attach for "
                                     "nbdfuse + loop devices).")
    p.add_argument("name")
    p.add_argument("--size", required=True, help="new size: bytes or KiB/MiB/GiB/TiB")


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidArgument(f"bad label {item!r}: use KEY=VALUE")
        out[k] = v
    return check_labels(out)


def format_tree(snaps: list[dict[str, Any]]) -> str:
    if not snaps:
        return "no snapshots"
    kids: dict[str, list[dict[str, Any]]] = {}
    for s in snaps:
        kids.setdefault(s["parent"], []).append(s)
    lines = [f"{'SNAPSHOT':<40} {'CREATED':<28} {'USER':<5} {'SIZE':>10}  LABELS"]

    def walk(parent: str, depth: int) -> None:
        for s in kids.get(parent, []):
            name = "  " * depth + ("└─ " if depth else "") + s["name"]
            labels = ",".join(f"{k}={v}" for k, v in (s.get("labels") or {}).items())
            lines.append(f"{name:<40} {s['created']:<28} {'yes' if s['user_created'] else 'no':<5}"
                         f" {format_size(s['size']):>10}  {labels}")
            walk(s["name"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


def run_snapshot(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    check_name(args.volume)
    if getattr(args, "name", None) is not None:
        check_name(args.name, "snapshot")   # it becomes part of the request's URL path
    base = f"/volumes/{args.volume}/snapshots"
    with connect(home) as c:
        if args.action == "create":
            s = c.request("POST", base, {"name": args.name, "labels": _labels(args.label)})
            print(s["name"])
        elif args.action == "ls":
            snaps = c.request("GET", base)["snapshots"]
            print(json.dumps(snaps, indent=2, sort_keys=True) if args.json else format_tree(snaps))
        elif args.action == "rm":
            c.request("DELETE", f"{base}/{args.name}")
        elif args.action == "purge":
            c.request("POST", f"{base}/purge")
        elif args.action == "revert":
            done = c.request("POST", f"{base}/{args.name}/revert")
            print(f"volume {args.volume} reverted to {args.name}")
            for rep, why in sorted((done.get("left_out") or {}).items()):
                print(f"replica {rep} did not revert ({why}): it is out of sync and is "
                      "rebuilt from the reverted replicas at the next attach", file=sys.stderr)
    return 0


def run_expand(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    check_name(args.name)
    size = parse_size(args.size)
    with connect(home) as c:
        r = c.request("POST", f"/volumes/{args.name}/expand", {"size": size})
    print(f"volume {args.name} is now {format_size(r['size'])}; {r['note']}")
    return 0


def run_clone(args: argparse.Namespace, home: Home) -> int:
    """`volume create NEW --from-snapshot VOL/SNAP`, with progress while the data is copied."""
    from blockhorn.manager.client import Client, connect
    check_name(args.name)
    body: dict[str, Any] = {"source": args.from_snapshot, "replicas": args.replicas,
                            "disks": args.disks}
    if args.size:
        body["size"] = parse_size(args.size)
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with connect(home) as c:
                result.update(c.request("POST", f"/volumes/{args.name}/clone", body))
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    last = ""
    while t.is_alive():
        t.join(0.5)
        try:
            with Client(home) as c:
                msg = c.request("GET", f"/volumes/{args.name}").get("message") or ""
        except Exception:  # the volume may not exist yet: nothing to show
            msg = ""
        if msg and msg != last and sys.stderr.isatty():
            print(f"\r{msg}", end="", file=sys.stderr, flush=True)
            last = msg
        time.sleep(0.2)
    if last:
        print(file=sys.stderr)
    if errors:
        raise errors[0]
    print(f"created volume {result['name']} from {args.from_snapshot}: "
          f"{format_size(result['size'])}, {format_size(result['cloned_bytes'])} copied")
    return 0
