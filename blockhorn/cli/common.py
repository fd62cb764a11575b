"""What every `blockhorn` command module shares: the argument parser class, `--home`, exit
codes and table output. Imports nothing from the other CLI modules (they all import this)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from blockhorn.manager.paths import DEFAULT_HOME, HOME_ENV

EXIT_ERROR = 1
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the `--help` to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"blockhorn: error: {message} (see '{self.prog} --help')\n")


def home_arg(p: argparse.ArgumentParser, top: bool = False) -> None:
    # On sub-commands the default is SUPPRESS, so `blockhorn --home H volume ls` and
    # `blockhorn volume ls --home H` both work and neither overrides the other with a default.
    p.add_argument("--home", metavar="DIR", default=None if top else argparse.SUPPRESS,
                   help=f"blockhorn home (state, logs, sockets); default ${HOME_ENV} or "
                        f"{DEFAULT_HOME}")


def actions(cmds: Any, name: str, help: str, description: str) -> Any:
    """`blockhorn NAME ACTION`: the sub-command NAME with its required ACTION sub-parsers."""
    top = cmds.add_parser(name, help=help, description=description)
    sub = top.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.required = True
    return sub


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def dash(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)
