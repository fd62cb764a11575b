"""`blockhorn volume create|attach|detach|ls|show|rm`, and the dispatch of the other volume
actions to the modules that own them (snapshot, verify, upgrade, jobs, standby)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from blockhorn.cli.common import Parser, dash, home_arg, table
from blockhorn.cli.jobs import run_volume_group
from blockhorn.cli.snapshot import run_clone, run_expand
from blockhorn.cli.standby import add_create_options as add_standby_options
from blockhorn.cli.standby import format_standby, run_standby
from blockhorn.cli.upgrade import run_upgrade
from blockhorn.cli.verify import run_verify
from blockhorn.cli.watch import watch
from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, check_name, format_size, parse_size


def add_parsers(cmds: Any) -> Any:
    """`blockhorn volume ...`; returns its ACTION sub-parsers for the other modules' actions."""
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
    p.add_argument("--node-selector", metavar="TAGS", default="",
                   help="comma-separated tags: every replica goes on a node carrying all of "
                        "them (`node update NAME --tags`); not with --disk")
    p.add_argument("--disk-selector", metavar="TAGS", default="",
                   help="comma-separated tags: every replica goes on a disk carrying all of "
                        "them (`disk add PATH --tags`); not with --disk")
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
                   help="RWX: the interface that carries --service-address (default, and "
                        "on a host without an interface of that name: the one whose subnet "
                        "contains the address)")
    add_standby_options(p)
    home_arg(p)

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
    p.add_argument("--salvage", default=None, metavar="REPLICA",
                   help="when the attach is refused because replicas of the newest in-sync "
                        "set are gone for good: start from this replica (`volume show` lists "
                        "them) and resync the others from it, for this start only. Writes "
                        "that only the missing replicas hold are lost")
    home_arg(p)

    p = vcmds.add_parser("detach", help="remove the device and stop the volume's processes",
                         description="Undo attach in reverse order; safe to repeat.")
    p.add_argument("name")
    home_arg(p)

    p = vcmds.add_parser("ls", help="list volumes", description="List volumes.")
    p.add_argument("--json", action="store_true", help="print JSON")
    home_arg(p)

    p = vcmds.add_parser("show", help="show one volume", description="Show one volume: state, "
                         "robustness, endpoint, device and its replicas.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    p.add_argument("--watch", action="store_true",
                   help="draw rebuild progress (done/total, rate, ETA) until the volume is "
                        "healthy; Ctrl-C stops watching")
    home_arg(p)

    p = vcmds.add_parser("rm", help="remove a volume and its replica data",
                         description="Remove a volume, its configs and replica directories.")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="detach first if it is attached")
    home_arg(p)
    return vcmds


# --- output ----------------------------------------------------------------------------------

def format_show(v: dict[str, Any]) -> str:
    lines = [
        f"Name:        {v['name']}",
        f"Size:        {format_size(v['size'])} ({v['size']} bytes)",
        f"State:       {v['state']}",
        f"Robustness:  {v['robustness']}",
        f"Frontend:    {dash(v.get('frontend'))}",
        f"Device:      {dash(v.get('device'))}",
        f"Endpoint:    {dash(v.get('endpoint'))}",
        f"Engine:      {dash((v.get('engine') or {}).get('version'))}",
        *([f"TCP (TLS):   {v['nbd_tcp']['uri']}"] if v.get("nbd_tcp") else []),
        f"Created:     {dash(v.get('created'))}",
    ]
    if v.get("share"):
        lines.append(f"Share:       {dash(v['share'].get('endpoint'))} "
                     f"({v['share'].get('health')})")
    if v.get("groups"):
        lines.append(f"Groups:      {' '.join(v['groups'])}")
    if v.get("standby"):
        lines.append(f"Standby:     {format_standby(v['standby'])}")
    if v.get("message"):
        lines.append(f"Message:     {v['message']}")
    rows = [["REPLICA", "MODE", "PID", "ADDRESS", "REBUILD", "PATH"]]
    for r in v["replicas"]:
        rows.append([r["name"], dash(r.get("mode")), dash(r.get("pid")), r["address"],
                     _rebuild_text(r.get("rebuild")), r["path"]])
    return "\n".join(lines) + "\n\n" + table(rows)


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
                     str(len(v["replicas"])), dash(v.get("device") or v.get("endpoint"))])
    return table(rows)


# --- commands --------------------------------------------------------------------------------

def run_volume(args: argparse.Namespace, home: Home) -> int:
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
        from blockhorn.manager.nodes import parse_tags  # imports trio: only when needed
        node_sel, disk_sel = parse_tags(args.node_selector), parse_tags(args.disk_selector)
        if (node_sel or disk_sel) and disks:
            raise InvalidArgument("--node-selector and --disk-selector choose among the "
                                  "registered disks (`blockhorn disk add`); they do not go with "
                                  "--disk, which names the directories itself")
        share = _share_settings(args)
        with connect(home) as c:
            v = c.create(args.name, args.size, args.replicas, disks, args.transport,
                         args.access, share, node_sel, disk_sel)
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
                         args.node, args.salvage)
            if args.salvage:
                print(f"blockhorn: volume {args.name} started from replica {args.salvage} "
                      "(salvage); its other replicas are resynced from it", file=sys.stderr)
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
