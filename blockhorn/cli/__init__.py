"""The `blockhorn` command: a client of the daemon's REST API, plus the process entry points
(`daemon`, `replica serve`, `engine serve`, `fuse serve`) that the daemon and the systemd units run.

One module per resource (volume, snapshot, backup, node/disk, setting, job, share, daemon, the
serve entry points); each adds its parsers and runs its commands. Imports point downward only:
this module imports the resource modules, they import `common` (and some each other's helpers),
never this module.

Errors are one line, `blockhorn: error: <message>`, on stderr; exit status 2 for usage and
invalid input, 1 for everything else. No tracebacks for errors a user can cause.
"""

from __future__ import annotations

import errno
import os
import sys

from blockhorn.cli.backup import add_parsers as add_backup_parsers
from blockhorn.cli.backup import run_backup
from blockhorn.cli.common import EXIT_ERROR, EXIT_USAGE, Parser, home_arg
from blockhorn.cli.daemon import add_parser as add_daemon_parser
from blockhorn.cli.daemon import run_daemon
from blockhorn.cli.jobs import add_parsers as add_job_parsers
from blockhorn.cli.jobs import run_job
from blockhorn.cli.node import add_parsers as add_node_parsers
from blockhorn.cli.node import run_disk, run_node
from blockhorn.cli.serve import add_parsers as add_serve_parsers
from blockhorn.cli.serve import run_engine, run_fuse, run_replica
from blockhorn.cli.settings import add_parsers as add_setting_parsers
from blockhorn.cli.settings import run_setting
from blockhorn.cli.share import add_parsers as add_share_parsers
from blockhorn.cli.share import run_share
from blockhorn.cli.snapshot import add_parsers as add_snapshot_parsers
from blockhorn.cli.snapshot import run_snapshot
from blockhorn.cli.standby import add_parsers as add_standby_parsers
from blockhorn.cli.upgrade import add_parsers as add_upgrade_parsers
from blockhorn.cli.upgrade import run_upgrade
from blockhorn.cli.verify import add_parser as add_verify_parser
from blockhorn.cli.volume import add_parsers as add_volume_parsers
from blockhorn.cli.volume import run_volume
from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> Parser:
    top = Parser(prog="blockhorn",
                 description="Replicated block storage: volumes served by an nbdkit engine that "
                             "replicates every write to N replica processes.")
    home_arg(top, top=True)
    top.add_argument("--api", metavar="URL", help="talk to a daemon's TCP API "
                     "(https://HOST:PORT, `daemon run --api-listen`) instead of the local socket;"
                     " the token comes from $BLOCKHORN_TOKEN (env BLOCKHORN_API)")
    top.add_argument("--ca-file", metavar="FILE", help="CA certificate to verify the API's TLS "
                     "with (the daemon's <home>/api-tls/ca-cert.pem; env BLOCKHORN_CA)")
    cmds = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    cmds.required = True

    # The order of these calls is the order of the commands and actions in `--help`.
    vcmds = add_volume_parsers(cmds)
    add_snapshot_parsers(cmds, vcmds)
    add_verify_parser(vcmds, home_arg)
    add_upgrade_parsers(cmds, vcmds, home_arg)
    add_setting_parsers(cmds, home_arg)
    add_node_parsers(cmds, home_arg)
    add_job_parsers(cmds, vcmds)
    add_standby_parsers(vcmds)
    add_backup_parsers(cmds, home_arg)
    add_share_parsers(cmds)
    add_daemon_parser(cmds)
    add_serve_parsers(cmds)
    return top


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The API client (manager/client.py connect) reads these: every command module uses it.
    for env, value in (("BLOCKHORN_API", args.api), ("BLOCKHORN_CA", args.ca_file)):
        if value:
            os.environ[env] = value
    try:
        home = Home.at(args.home)
        if args.command == "volume":
            return run_volume(args, home)
        if args.command == "share":
            return run_share(args, home)
        if args.command == "upgrade":
            return run_upgrade(args, home)
        if args.command == "snapshot":
            return run_snapshot(args, home)
        if args.command == "setting":
            return run_setting(args, home)
        if args.command in ("node", "disk"):
            return (run_node if args.command == "node" else run_disk)(args, home)
        if args.command == "job":
            return run_job(args, home)
        if args.command == "backup":
            return run_backup(args, home)
        if args.command == "daemon":
            return run_daemon(args, home)
        if args.command == "replica":
            return run_replica(args)
        if args.command == "fuse":
            return run_fuse(args)
        return run_engine(args)
    except BlockhornError as e:
        print(f"blockhorn: error: {e}", file=sys.stderr)
        return EXIT_USAGE if e.errno == errno.EINVAL else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
