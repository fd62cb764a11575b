"""`blockhorn volume upgrade NAME` and `blockhorn upgrade --all`: live engine upgrade (a new
engine process running the installed code takes over under the live device; see
manager/upgrade.py). Prints the versions and the pause; `--json` for the raw answer."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, check_name

EXIT_SOME_FAILED = 1


def add_parsers(cmds: Any, vcmds: Any, home_arg: Callable[[argparse.ArgumentParser], None]
                ) -> None:
    p = vcmds.add_parser(
        "upgrade", help="restart the volume's engine on the installed code, device live",
        description="Stop the engine of an attached volume cleanly (its requests drained, a "
                    "final FLUSH) and start one running the code installed now on the same "
                    "replicas, without a rebuild. Its device stays up (frontend fuse-nbd, or "
                    "none with --port: the TLS proxy's clients are retried): I/O pauses, it "
                    "does not fail.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    home_arg(p)
    p = cmds.add_parser(
        "upgrade", help="live engine upgrade of every attached volume",
        description="`volume upgrade` for every attached volume, one at a time; volumes whose "
                    "frontend cannot keep its device, or whose upgrade fails, are reported and "
                    "the others go on. On a cluster every node that is up upgrades the engines "
                    "it runs, and each node's result is reported.")
    p.add_argument("--all", action="store_true", required=True,
                   help="every attached volume (required: says what is meant)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    home_arg(p)


def _line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['name']}: not upgraded: {r['error']}"
    return (f"{r['name']}: engine {r.get('old_version') or '?'} -> {r.get('version')}, "
            f"I/O paused {r['pause_s'] * 1000:.0f} ms (stop {r['stop_s'] * 1000:.0f} ms, "
            f"start {r['start_s'] * 1000:.0f} ms)")


def _node_line(n: dict[str, Any]) -> str:
    if n.get("error"):
        return f"node {n['node']}: not reached: {n['error']}"
    if n.get("skipped"):
        return f"node {n['node']}: skipped, {n['skipped']}"
    return f"node {n['node']}: {n['volumes']} engine(s), {n['failed']} not upgraded"


def run_upgrade(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import UPGRADE_ALL_TIMEOUT_S, connect
    nodes: list[dict[str, Any]] = []   # a cluster: what each node did (manager/forward.py)
    # --all: every engine of every node, one at a time (a cluster's nodes one after another).
    with connect(home, timeout=UPGRADE_ALL_TIMEOUT_S) as c:
        if args.command == "volume":
            check_name(args.name)
            results = [c.request("POST", f"/volumes/{args.name}/upgrade", {})]
        else:
            if not args.all:
                raise InvalidArgument("use --all")
            answer = c.request("POST", "/upgrade", {})
            results, nodes = answer["volumes"], answer.get("nodes") or []
    if args.json:
        print(json.dumps(results[0] if args.command == "volume" else
                         {"volumes": results, "nodes": nodes} if nodes else results, indent=2))
    else:
        for n in nodes:
            print(_node_line(n))
        for r in results:
            print((f"[{r['node']}] " if r.get("node") else "") + _line(r))
    failed = any(r.get("error") for r in results) or any(n.get("error") for n in nodes)
    return EXIT_SOME_FAILED if failed else 0
