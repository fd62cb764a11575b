"""The `blockhorn` command: a client of the daemon's REST API, plus the process entry points
(`daemon`, `replica serve`, `engine serve`, `fuse serve`) that the daemon and the systemd units run.

Errors are one line, `blockhorn: error: <message>`, on stderr; exit status 2 for usage and
invalid input, 1 for everything else. No tracebacks for errors a user can cause.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any, NoReturn

from blockhorn.cli_backup import add_parsers as add_backup_parsers
from blockhorn.cli_backup import run_backup
from blockhorn.cli_failover import FAILOVER_ACTIONS, add_failover_parsers, run_failover
from blockhorn.cli_jobs import add_parsers as add_job_parsers
from blockhorn.cli_jobs import run_job, run_volume_group
from blockhorn.cli_node import add_parsers as add_node_parsers
from blockhorn.cli_node import run_disk, run_node
from blockhorn.cli_settings import add_parsers as add_setting_parsers
from blockhorn.cli_settings import run_setting
from blockhorn.cli_snapshot import add_parsers as add_snapshot_parsers
from blockhorn.cli_snapshot import run_clone, run_expand, run_snapshot
from blockhorn.cli_standby import add_create_options as add_standby_options
from blockhorn.cli_standby import add_parsers as add_standby_parsers
from blockhorn.cli_standby import format_standby, run_standby
from blockhorn.cli_upgrade import add_parsers as add_upgrade_parsers
from blockhorn.cli_upgrade import run_upgrade
from blockhorn.cli_verify import add_parser as add_verify_parser
from blockhorn.cli_verify import run_verify
from blockhorn.cli_watch import watch
from blockhorn.manager.paths import DEFAULT_HOME, HOME_ENV, Home
from blockhorn.types import BlockhornError, InvalidArgument, check_name, format_size, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the `--help` to read."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"blockhorn: error: {message} (see '{self.prog} --help')\n")


def _home_arg(p: argparse.ArgumentParser, top: bool = False) -> None:
    # On sub-commands the default is SUPPRESS, so `blockhorn --home H volume ls` and
    # `blockhorn volume ls --home H` both work and neither overrides the other with a default.
    p.add_argument("--home", metavar="DIR", default=None if top else argparse.SUPPRESS,
                   help=f"blockhorn home (state, logs, sockets); default ${HOME_ENV} or "
                        f"{DEFAULT_HOME}")


def _serve_parser(cmds: Any, name: str, help: str, description: str, serve_help: str,
                  serve_description: str) -> Parser:
    """`blockhorn NAME serve`: the entry point of one kind of process the daemon starts."""
    return _actions(cmds, name, help, description).add_parser(
        "serve", help=serve_help, description=serve_description)


def _actions(cmds: Any, name: str, help: str, description: str) -> Any:
    top = cmds.add_parser(name, help=help, description=description)
    sub = top.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.required = True
    return sub


def build_parser() -> Parser:
    top = Parser(prog="blockhorn",
                 description="Replicated block storage: volumes served by an nbdkit engine that "
                             "replicates every write to N replica processes.")
    _home_arg(top, top=True)
    top.add_argument("--api", metavar="URL", help="talk to a daemon's TCP API "
                     "(https://HOST:PORT, `daemon run --api-listen`) instead of the local socket;"
                     " the token comes from $BLOCKHORN_TOKEN (env BLOCKHORN_API)")
    top.add_argument("--ca-file", metavar="FILE", help="CA certificate to verify the API's TLS "
                     "with (the daemon's <home>/api-tls/ca-cert.pem; env BLOCKHORN_CA)")
    cmds = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    cmds.required = True

    vol = cmds.add_parser("volume", help="create, attach, inspect and remove volumes",
                          description="Manage volumes (talks to the daemon; starts it if needed).")
    vcmds = vol.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    vcmds.required = True

    p = vcmds.add_parser("create", help="create a volume",
                         description="Create a volume with N replicas, each in its own "
                                     "directory (under the home, or one per --disk).")
    p.add_argument("name", help="volume name: 1-63 of a-z 0-9 - . (replicas are NAME-r0, ...)")
    p.add_argument("--size",
                   help="size in bytes or with a unit: KiB, MiB, GiB, TiB (multiple of 4096); "
                        "required unless --from-snapshot")
    p.add_argument("--from-snapshot", metavar="VOL/SNAP",
                   help="create the volume as a full, independent copy of snapshot SNAP of "
                        "volume VOL (sparse; progress shown)")
    p.add_argument("--replicas", type=int, default=3, metavar="N",
                   help="number of replicas (default 3)")
    p.add_argument("--disk", action="append", default=[], metavar="PATH", dest="disks",
                   help="directory for one replica; repeat it, one per replica")
    p.add_argument("--transport", choices=("auto", "tcp", "unix"), default="auto",
                   help="engine-to-replica transport: unix sockets under the home (faster on "
                        "one host), tcp on 127.0.0.1, or auto (default: unix unless a socket "
                        "path would be too long)")
    p.add_argument("--access", choices=("rwo", "rwx"), default="rwo",
                   help="rwo: one host uses the block device (default); rwx: attaching it "
                        "exports an ext4 filesystem on it over NFSv4 (see `share show`)")
    p.add_argument("--nfs-client", action="append", default=[], metavar="CIDR[=ro]",
                   dest="nfs_clients",
                   help="RWX: a client allowed to mount the share (repeat); default only "
                        "the attaching host's own addresses")
    p.add_argument("--no-root-squash", action="store_true",
                   help="RWX: let clients act as root (default: root is squashed)")
    p.add_argument("--mkfs-options", default="", metavar="OPTS",
                   help="RWX: extra mkfs.ext4 options, e.g. '-E root_owner=1000:1000'")
    p.add_argument("--nfs-port", type=int, metavar="PORT",
                   help="RWX: NFS TCP port (default: one allocated for the volume)")
    p.add_argument("--grace", type=int, default=None, metavar="SECONDS",
                   help="RWX: NFSv4 grace period after a restart (default 15)")
    p.add_argument("--lease", type=int, default=None, metavar="SECONDS",
                   help="RWX: NFSv4 lease time (default 10)")
    p.add_argument("--nfs-minor-versions", default=None, metavar="LIST",
                   help="RWX: NFSv4 minor versions served, default 1,2; add 0 for NFSv4.0 "
                        "clients such as libnfs (nfs-cp, nfs-ls)")
    p.add_argument("--service-address", default=None, metavar="CIDR",
                   help="RWX: an address (e.g. 10.0.0.50/24) added to --service-interface "
                        "while the share serves; Ganesha listens on it and clients mount it")
    p.add_argument("--service-interface", default=None, metavar="IF",
                   help="RWX: the interface that carries --service-address")
    add_standby_options(p)
    _home_arg(p)

    p = vcmds.add_parser("attach", help="start the volume and make a block device",
                         description="Start the replicas and the engine, then attach a block "
                                     "device; prints the device path (with --frontend none, "
                                     "the NBD endpoint).")
    p.add_argument("name")
    p.add_argument("--frontend", choices=("auto", "nbdfuse", "nbd", "fuse", "fuse-nbd", "none"),
                   default="auto",
                   help="auto: nbd-client where /dev/nbd* exists, else fuse-nbd "
                        "(nbdfuse + loop without pyfuse3 or python3-libnbd); "
                        "fuse: the engine in a pyfuse3 process + loop (no NBD); "
                        "fuse-nbd: a FUSE process holding the device over NBD + loop, "
                        "survives engine restarts and live upgrades; "
                        "none: only the NBD endpoint (for fio, nbdsh, qemu)")
    p.add_argument("--port", type=int, metavar="PORT", dest="tcp_port",
                   help="also serve NBD on this TCP port, TLS required (see --tls)")
    p.add_argument("--address", default=None, metavar="IP", dest="tcp_address",
                   help="with --port: the address to listen on (default 127.0.0.1; 0.0.0.0 "
                        "only when you ask for it)")
    p.add_argument("--tls", choices=("psk", "certificates"), default=None,
                   help="with --port: psk (default; key in <home>/volumes/NAME/nbd.psk, for "
                        "libnbd and qemu clients) or certificates (<home>/tls/{ca-cert,"
                        "server-cert,server-key}.pem; clients need a certificate of that CA: "
                        "nbd-client -cacertfile -certfile -keyfile)")
    p.add_argument("--node", default=None, metavar="NODE",
                   help="on a cluster: the node whose daemon runs the engine and device "
                        "(default: the node this command talks to)")
    _home_arg(p)

    p = vcmds.add_parser("detach", help="remove the device and stop the volume's processes",
                         description="Undo attach in reverse order; safe to repeat.")
    p.add_argument("name")
    _home_arg(p)

    p = vcmds.add_parser("ls", help="list volumes", description="List volumes.")
    p.add_argument("--json", action="store_true", help="print JSON")
    _home_arg(p)

    p = vcmds.add_parser("show", help="show one volume", description="Show one volume: state, "
                         "robustness, endpoint, device and its replicas.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    p.add_argument("--watch", action="store_true",
                   help="draw rebuild progress (done/total, rate, ETA) until the volume is "
                        "healthy; Ctrl-C stops watching")
    _home_arg(p)

    p = vcmds.add_parser("rm", help="remove a volume and its replica data",
                         description="Remove a volume, its configs and replica directories.")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="detach first if it is attached")
    _home_arg(p)

    add_snapshot_parsers(cmds, vcmds)
    add_verify_parser(vcmds, _home_arg)
    add_upgrade_parsers(cmds, vcmds, _home_arg)
    add_setting_parsers(cmds, _home_arg)
    add_node_parsers(cmds, _home_arg)
    add_job_parsers(cmds, vcmds)
    add_standby_parsers(vcmds)
    add_backup_parsers(cmds, _home_arg)

    sh = cmds.add_parser("share", help="NFS shares of RWX volumes",
                         description="Inspect the NFSv4 share of an RWX volume, or run a "
                                     "share manager (the daemon and "
                                     "blockhorn-share@.service use `serve`), or serve a share "
                                     "from whichever of several hosts is alive (`define`, "
                                     "`agent`, `owner`: state in etcd).")
    scmds = sh.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    scmds.required = True
    p = scmds.add_parser("show", help="endpoint, mount command, allow-list and health",
                         description="Show the share of an attached RWX volume.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    _home_arg(p)
    p = scmds.add_parser("serve", help="run one share manager in the foreground",
                         description="Format/check and mount the device, run NFS-Ganesha, "
                                     "restart it when it dies, check health.")
    p.add_argument("--config", required=True, metavar="FILE", help="share config (JSON)")
    add_failover_parsers(scmds, _home_arg)

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
    p.add_argument("--api-listen", metavar="IP:PORT", help="serve the API on TCP too, with TLS "
                   "and a bearer token (<home>/api.token); see docs/API.md")
    _home_arg(p)

    rcmds = _actions(cmds, "replica", "replica server process",
                     "Create or run one replica server (the daemon and "
                     "blockhorn-replica@.service use this).")
    p = rcmds.add_parser("serve", help="serve one replica in the foreground",
                         description="Serve one replica in the foreground. Its directory must "
                                     "hold a replica (volume.meta): a missing one is an error, "
                                     "never a reason to start empty.")
    p.add_argument("--config", required=True, metavar="FILE", help="replica config (JSON)")
    p = rcmds.add_parser("create", help="create an empty replica directory for a config",
                         description="Create the empty replica directory a config names, for "
                                     "hand-run hosts. It is marked Rebuilding: no engine trusts "
                                     "it before its first resync from a current replica.")
    p.add_argument("--config", required=True, metavar="FILE", help="replica config (JSON)")

    p = _serve_parser(cmds, "engine", "engine (nbdkit) process",
                      "Run one engine (the daemon and blockhorn-engine@.service use this).",
                      "exec nbdkit with the blockhorn plugin",
                      "Replace this process with nbdkit serving one volume.")
    p.add_argument("--config", required=True, metavar="FILE", help="engine config (JSON)")
    p.add_argument("--socket", required=True, metavar="PATH", help="NBD unix socket to serve")
    p.add_argument("--port", type=int, metavar="PORT",
                   help="also serve NBD on this TCP port, TLS required: a second nbdkit "
                        "forwards to --socket (implies --keeper)")
    p.add_argument("--address", default="127.0.0.1", metavar="IP",
                   help="with --port: the address to listen on (default 127.0.0.1)")
    p.add_argument("--tls-psk", metavar="FILE", help="with --port: PSK file (USER:HEXKEY)")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="with --port: nbdkit certificate directory; clients must present a "
                        "certificate signed by its ca-cert.pem")
    p.add_argument("--keeper", action="store_true",
                   help="stay as nbdkit's parent (forwarding signals) instead of exec'ing it: "
                        "nbdkit in the foreground exits when its parent does, so the daemon "
                        "starts engines this way to let them outlive it")

    p = _serve_parser(cmds, "fuse", "FUSE frontend process",
                      "Run one engine inside a FUSE filesystem (the daemon and "
                      "blockhorn-fuse@.service use this).",
                      "serve one volume as DIR/volume in the foreground",
                      "Start the engine and mount a FUSE filesystem on DIR holding one file, "
                      "DIR/volume, the volume; put a loop device on it with `losetup --find "
                      "--show --direct-io=on DIR/volume`.")
    p.add_argument("--config", required=True, metavar="FILE", help="engine config (JSON)")
    p.add_argument("--mount", required=True, metavar="DIR", help="mount point")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="engine calls in flight at once (worker threads)")
    return top


# --- output ----------------------------------------------------------------------------------

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _dash(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def format_show(v: dict[str, Any]) -> str:
    lines = [
        f"Name:        {v['name']}",
        f"Size:        {format_size(v['size'])} ({v['size']} bytes)",
        f"State:       {v['state']}",
        f"Robustness:  {v['robustness']}",
        f"Frontend:    {_dash(v.get('frontend'))}",
        f"Device:      {_dash(v.get('device'))}",
        f"Endpoint:    {_dash(v.get('endpoint'))}",
        f"Engine:      {_dash((v.get('engine') or {}).get('version'))}",
        *([f"TCP (TLS):   {v['nbd_tcp']['uri']}"] if v.get("nbd_tcp") else []),
        f"Created:     {_dash(v.get('created'))}",
    ]
    if v.get("share"):
        lines.append(f"Share:       {_dash(v['share'].get('endpoint'))} "
                     f"({v['share'].get('health')})")
    if v.get("groups"):
        lines.append(f"Groups:      {' '.join(v['groups'])}")
    if v.get("standby"):
        lines.append(f"Standby:     {format_standby(v['standby'])}")
    if v.get("message"):
        lines.append(f"Message:     {v['message']}")
    rows = [["REPLICA", "MODE", "PID", "ADDRESS", "REBUILD", "PATH"]]
    for r in v["replicas"]:
        rows.append([r["name"], _dash(r.get("mode")), _dash(r.get("pid")), r["address"],
                     _rebuild_text(r.get("rebuild")), r["path"]])
    return "\n".join(lines) + "\n\n" + _table(rows)


def _rebuild_text(rb: Any) -> str:
    """`42%` while a rebuild runs, else its last state (`done`, `failed`...), `-` if none."""
    if not isinstance(rb, dict):
        return "-"
    state = str(rb.get("state") or "?")
    total = rb.get("total") or 0
    if state in ("queued", "running") and total:
        text = f"{100 * (rb.get('done') or 0) // total}%"
        if rb.get("rate"):
            text += f" {rb['rate'] / 1e6:.0f}MB/s"
        if rb.get("eta_s") is not None:
            text += f" ETA {int(rb['eta_s'])}s"
        return text
    return state


def format_list(vols: list[dict[str, Any]]) -> str:
    if not vols:
        return "no volumes"
    rows = [["NAME", "SIZE", "STATE", "ROBUSTNESS", "REPLICAS", "DEVICE"]]
    for v in vols:
        state = "standby" if v.get("standby") else v["state"]
        rows.append([v["name"], format_size(v["size"]), state, v["robustness"],
                     str(len(v["replicas"])), _dash(v.get("device") or v.get("endpoint"))])
    return _table(rows)


# --- commands --------------------------------------------------------------------------------

def _volume(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    if args.action == "expand":
        return run_expand(args, home)
    if args.action == "verify":
        return run_verify(args, home)
    if args.action == "upgrade":
        return run_upgrade(args, home)
    if args.action == "group":
        return run_volume_group(args, home)
    if args.action in ("standby-sync", "activate") or (args.action == "create"
                                                      and args.standby_from):
        return run_standby(args, home)
    if args.action == "create" and args.from_snapshot:
        return run_clone(args, home)
    if args.action == "create" and not args.size:
        raise InvalidArgument("volume create needs --size (or --from-snapshot VOL/SNAP, or "
                              "--standby-from URL)")
    if args.action == "create":
        # Validate here too, so bad input neither starts a daemon nor creates a home.
        check_name(args.name)
        parse_size(args.size)
        if args.replicas < 1:
            raise InvalidArgument(f"invalid replica count {args.replicas}: at least 1")
        if args.disks and args.replicas > len(args.disks):
            raise InvalidArgument(
                f"{args.replicas} replicas need {args.replicas} disks (one per replica) but "
                f"only {len(args.disks)} given with --disk: add disks or use --replicas "
                f"{len(args.disks)}")
        disks = [os.path.abspath(d) for d in args.disks]
        share = _share_settings(args)
        with connect(home) as c:
            v = c.create(args.name, args.size, args.replicas, disks, args.transport,
                         args.access, share)
        print(f"created volume {v['name']}: {format_size(v['size'])}, "
              f"{len(v['replicas'])} replicas")
        if v.get("message"):
            print(f"blockhorn: warning: {v['message']}", file=sys.stderr)
        return 0
    if args.action in ("attach", "detach", "show", "rm"):
        check_name(args.name)
    with connect(home) as c:
        if args.action == "attach":
            if args.tcp_port is None and (args.tcp_address or args.tls):
                raise InvalidArgument("--address and --tls go with --port")
            v = c.attach(args.name, args.frontend, args.tcp_port, args.tcp_address, args.tls,
                         args.node)
            print(v.get("device") or v.get("endpoint"))
            if v.get("nbd_tcp"):
                print(v["nbd_tcp"]["uri"])
        elif args.action == "detach":
            was = c.show(args.name)["state"]
            c.detach(args.name)   # even when detached: it also cleans up leftovers
            if was != "attached":
                print(f"volume {args.name} was not attached: nothing to detach",
                      file=sys.stderr)
        elif args.action == "rm":
            c.remove(args.name, force=args.force)
        elif args.action == "show" and getattr(args, "watch", False):
            return watch(c, args.name)
        elif args.action == "show":
            v = c.show(args.name)
            print(json.dumps(v, indent=2, sort_keys=True) if args.json else format_show(v))
        elif args.action == "ls":
            vols = c.list()
            print(json.dumps(vols, indent=2, sort_keys=True) if args.json else format_list(vols))
    return 0


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"bad list {text!r}: use numbers separated by commas") from None


def _share_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    given: dict[str, Any] = {k: v for k, v in (("clients", args.nfs_clients), ("port", args.nfs_port),
                               ("grace_s", args.grace), ("lease_s", args.lease),
                               ("minor_versions", _int_list(args.nfs_minor_versions)),
                               ("service_address", args.service_address),
                               ("interface", args.service_interface),
                               ("mkfs_options", args.mkfs_options.split()),
                               ("squash", "no_root_squash" if args.no_root_squash else None))
             if v is not None and v != []}
    if args.access == "rwo":
        if given:
            raise InvalidArgument("--nfs-client, --nfs-port, --grace, --lease, --mkfs-options, "
                                  "--nfs-minor-versions, --service-address/-interface and "
                                  "--no-root-squash need --access rwx")
        return None
    from blockhorn.sharemgr.config import share_options
    share_options(**given)   # validate before a daemon starts
    return given


def format_share(s: dict[str, Any]) -> str:
    lines = [
        f"Volume:      {s['volume']}",
        f"Health:      {s['health']}",
        f"Endpoint:    {_dash(s.get('endpoint'))}",
        f"Mount:       {_dash(s.get('mount_command'))}",
        "Clients:     " + ", ".join(f"{c['cidr']} ({c['access']})" for c in s["clients"]),
        f"Squash:      {s['squash']}",
        f"Ganesha:     pid {_dash(s['ganesha'].get('pid'))}, "
        f"{s['ganesha'].get('restarts', 0)} restarts, last outage "
        f"{_dash(s['ganesha'].get('last_outage_s'))} s",
        "Checks:      " + (", ".join(f"{k} {v}" for k, v in sorted(s["checks"].items()))
                           or "-"),
    ]
    if s.get("fs"):
        lines.append(f"Filesystem:  {format_size(s['fs']['size'])}, "
                     f"{format_size(s['fs']['free'])} free, mounted at {s['mount_dir']}")
    if s.get("message"):
        lines.append(f"Message:     {s['message']}")
    return "\n".join(lines)


def _share(args: argparse.Namespace, home: Home) -> int:
    if args.action == "serve":
        from blockhorn.sharemgr.server import main as share_main
        return share_main(args.config)
    if args.action in FAILOVER_ACTIONS:
        return run_failover(args, home)
    from blockhorn.manager.client import connect
    check_name(args.name)
    with connect(home) as c:
        s = c.share(args.name)
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else format_share(s))
    return 0


def _daemon(args: argparse.Namespace, home: Home) -> int:
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


def _replica(args: argparse.Namespace) -> int:
    if args.action == "create":
        from blockhorn.config import ReplicaConfig
        from blockhorn.replica.store import Replica
        cfg = ReplicaConfig.load(args.config)
        Replica.create(cfg.directory, cfg.size, cfg.volume, {"Rebuilding": True}).close()
        print(f"created replica {cfg.name} of {cfg.volume} in {cfg.directory} (empty, "
              "Rebuilding until the engine resyncs it)")
        return 0
    from blockhorn.replica.server import main as replica_main
    return replica_main(args.config)


def _fuse(args: argparse.Namespace) -> int:
    from blockhorn.fuse.serve import FUSE_THREADS
    from blockhorn.fuse.serve import main as fuse_main
    if args.threads is not None and args.threads < 1:
        raise InvalidArgument(f"invalid --threads {args.threads}: at least 1")
    return fuse_main(args.config, args.mount, args.threads or FUSE_THREADS)


def _engine(args: argparse.Namespace) -> int:
    from blockhorn.nbd.attach import engine_argv
    argv = engine_argv(args.config, args.socket)
    proxy = None
    if args.port is not None:
        from blockhorn.nbd.tls import check_bindable, proxy_argv
        proxy = proxy_argv(argv[0], args.socket, args.address, args.port,
                           args.tls_psk or "", args.tls_certificates or "")
        check_bindable(args.address, args.port)
    elif args.tls_psk or args.tls_certificates:
        raise InvalidArgument("--tls-psk and --tls-certificates go with --port")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if not args.keeper and proxy is None:
            os.execvp(argv[0], argv)
        return _keep(argv, proxy)
    except OSError as e:
        raise BlockhornError(f"cannot run {argv[0]}: {e.strerror} (apt-get install nbdkit "
                             "nbdkit-plugin-python)", e.errno) from None


PROXY_RESTART_DELAY_S = 1.0   # seconds between restarts of a TLS proxy that exited


def _keep(argv: list[str], proxy: list[str] | None = None) -> int:
    """Run `argv` (and the TLS proxy in front of it, if any) as children, pass
    SIGTERM/SIGINT/SIGHUP on, exit with the engine's status when it exits.

    nbdkit run with --foreground sets PR_SET_PDEATHSIG(SIGTERM): it stops when its parent
    exits. Its parent must therefore be a process that lives exactly as long as it — this one —
    and not the daemon, whose restart must not interrupt I/O. Killing this process (even with
    SIGKILL) still stops nbdkit, through that same death signal (the proxy runs with
    --exit-with-parent). A proxy that exits is started again here, after a pause, without
    touching the engine: the local device above the engine's unix socket keeps working."""
    import signal
    import subprocess
    import time
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The API client (manager/client.py connect) reads these: every command module uses it.
    for env, value in (("BLOCKHORN_API", args.api), ("BLOCKHORN_CA", args.ca_file)):
        if value:
            os.environ[env] = value
    try:
        home = Home.at(args.home)
        if args.command == "volume":
            return _volume(args, home)
        if args.command == "share":
            return _share(args, home)
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
            return _daemon(args, home)
        if args.command == "replica":
            return _replica(args)
        if args.command == "fuse":
            return _fuse(args)
        return _engine(args)
    except BlockhornError as e:
        print(f"blockhorn: error: {e}", file=sys.stderr)
        return EXIT_USAGE if e.errno == errno.EINVAL else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
