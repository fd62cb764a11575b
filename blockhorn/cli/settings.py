"""`blockhorn setting ls|get|set|reset`: cluster settings with Longhorn's names
(manager/settings.py; table in docs/OPERATIONS.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from blockhorn.manager.paths import Home


def add_parsers(cmds: Any, home_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    top = cmds.add_parser("setting", help="list, read and change cluster settings",
                          description="Cluster settings (Longhorn's names). A setting never "
                                      "set reads as its default.")
    scmds = top.add_subparsers(dest="action", metavar="ACTION", parser_class=type(top))
    scmds.required = True
    p = scmds.add_parser("ls", help="list every setting with its value and default")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    home_arg(p)
    p = scmds.add_parser("get", help="print one setting's value")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the setting as JSON")
    home_arg(p)
    p = scmds.add_parser("set", help="change a setting")
    p.add_argument("name")
    p.add_argument("value")
    home_arg(p)
    p = scmds.add_parser("reset", help="return a setting to its default")
    p.add_argument("name")
    home_arg(p)


def _text(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _value(s: dict[str, Any]) -> str:
    return f"{_text(s['value'])} {s['unit']}".rstrip()


def format_settings(settings: list[dict[str, Any]]) -> str:
    rows = [["NAME", "VALUE", "DEFAULT", "DESCRIPTION"]]
    for s in settings:
        rows.append([s["name"], _value(s) + ("" if s["is_default"] else " *"),
                     f"{_text(s['default'])} {s['unit']}".rstrip(), s["description"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                      for r in rows)
    changed = any(not s["is_default"] for s in settings)
    return table + ("\n(* changed from the default)" if changed else "")


def run_setting(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    with connect(home) as c:
        if args.action == "ls":
            settings = c.request("GET", "/settings")["settings"]
            print(json.dumps(settings, indent=2, sort_keys=True) if args.json
                  else format_settings(settings))
        elif args.action == "get":
            s = c.request("GET", f"/settings/{args.name}")
            print(json.dumps(s, indent=2, sort_keys=True) if args.json else s["value"])
        elif args.action == "set":
            s = c.request("PUT", f"/settings/{args.name}", {"value": args.value})
            print(f"{s['name']} = {_value(s)} (takes effect: {s['applies']})")
        else:
            s = c.request("DELETE", f"/settings/{args.name}")
            print(f"{s['name']} reset to its default, {_value(s)}")
    return 0
