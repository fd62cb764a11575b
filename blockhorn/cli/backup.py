"""`blockhorn backup ...`: targets, create (with progress), ls, show, rm, restore, jobs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from blockhorn.fsutil import atomic_write
from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError, InvalidArgument, check_name, format_size

POLL_S = 0.5           # seconds between progress polls of a running job
JOB_TIMEOUT_S = 7 * 24 * 3600.0   # a CLI waits at most this long for one job


def add_parsers(cmds: Any, home_arg: Any) -> None:
    top = cmds.add_parser(
        "backup", help="back up snapshots to S3 or NFS, list, restore and delete backups",
        description="Backups in Longhorn's backupstore format (a Longhorn backup restores "
                    "here and the reverse). Targets: s3://BUCKET@REGION/PATH/, "
                    "nfs://HOST:/EXPORT/PATH (mounted by the host), file:///PATH. A backup "
                    "is named by its URL: TARGET?backup=NAME&volume=VOL.")
    sub = top.add_subparsers(dest="action", metavar="ACTION", parser_class=type(top))
    sub.required = True

    t = sub.add_parser("target", help="named backup targets",
                       description="Add, list and remove named backup targets.")
    tsub = t.add_subparsers(dest="target_action", metavar="ACTION", parser_class=type(top))
    tsub.required = True
    p = tsub.add_parser("set", help="add or replace a target",
                        description="Name a backup target. S3 credentials, endpoint and CA "
                                    "come from --credential-file (AWS_ACCESS_KEY_ID, "
                                    "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINTS, AWS_CERT, "
                                    "VIRTUAL_HOSTED_STYLE as KEY=VALUE lines) or the daemon's "
                                    "environment.")
    p.add_argument("name")
    p.add_argument("url", help="s3://BUCKET@REGION/PATH/, nfs://HOST:/EXPORT/PATH or "
                               "file:///PATH")
    p.add_argument("--credential-file", metavar="FILE", help="AWS_* KEY=VALUE lines, read "
                   "at each use (secrets are not copied into the daemon's state)")
    p.add_argument("--endpoint", metavar="URL", help="S3 endpoint (written as AWS_ENDPOINTS "
                   "into a credential file next to the state: only without --credential-file)")
    p.add_argument("--mount", metavar="DIR", help="NFS: where the export is mounted (default "
                   "$BLOCKHORN_NFS_MOUNT_ROOT/HOST/EXPORT/PATH)")
    home_arg(p)
    p = tsub.add_parser("ls", help="list targets")
    p.add_argument("--json", action="store_true")
    home_arg(p)
    p = tsub.add_parser("rm", help="forget a target (its backups stay in the store)")
    p.add_argument("name")
    home_arg(p)

    p = sub.add_parser("create", help="back up a snapshot of a volume",
                       description="Back up SNAPSHOT (default: a new snapshot) of VOLUME; only "
                                   "blocks changed since the last backup are read, and only "
                                   "new ones uploaded. Shows progress; prints the backup URL.")
    p.add_argument("volume")
    p.add_argument("--snapshot", metavar="S", help="existing snapshot to back up")
    p.add_argument("--target", metavar="NAME", help="backup target (default: the only one, "
                   "or the one named 'default')")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--compression", choices=("lz4", "gzip", "none"),
                   help="for a volume's first backup on a target (default lz4; fixed after)")
    p.add_argument("--block-size", choices=("2MiB", "16MiB"),
                   help="block size (default 2MiB; 16MiB: fewer, larger objects)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    home_arg(p)

    p = sub.add_parser("ls", help="list backups",
                       description="List complete backups (of VOLUME, or all) on every "
                                   "target, or on --target.")
    p.add_argument("volume", nargs="?")
    p.add_argument("--target", metavar="NAME")
    p.add_argument("--json", action="store_true", help="JSON: [{name, url, volume, snapshot, "
                   "size, created, state, target, ...}]")
    home_arg(p)

    p = sub.add_parser("show", help="show one backup")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    home_arg(p)

    p = sub.add_parser("rm", help="delete a backup and the blocks only it uses",
                       description="Delete a backup; blocks no other backup uses are removed. "
                                   "Waits for running backups of the volume to finish.")
    p.add_argument("url")
    home_arg(p)

    p = sub.add_parser("restore", help="restore a backup into a new volume",
                       description="Create NEWVOL (detached) and restore the backup into it; "
                                   "every block is verified against its checksum.")
    p.add_argument("url")
    p.add_argument("newvol")
    p.add_argument("--replicas", type=int, default=3, metavar="N")
    p.add_argument("--disk", action="append", default=[], metavar="PATH", dest="disks")
    p.add_argument("--no-wait", action="store_true")
    home_arg(p)

    p = sub.add_parser("gc", help="remove blocks no backup of VOLUME uses",
                       description="Sweep the backup volume for blocks that no backup uses "
                                   "(left by backups interrupted and never resumed). Lists "
                                   "every block: meant to be run rarely. `backup rm` already "
                                   "collects the blocks of the backup it deletes.")
    p.add_argument("volume")
    p.add_argument("--target", metavar="NAME")
    home_arg(p)

    p = sub.add_parser("jobs", help="running and recent backup/restore jobs")
    p.add_argument("--json", action="store_true")
    home_arg(p)


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidArgument(f"bad label {item!r}: use KEY=VALUE")
        out[k] = v
    return out


def _progress_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    if not p:
        return f"{job['operation']} {job.get('volume', '')}: starting"
    eta = p.get("eta")
    eta_s = "?" if eta is None else f"{eta:.0f}s"
    return (f"{job['operation']} {job.get('volume', '')}: {p['percent']:3d}% "
            f"{format_size(p['done_bytes'])} of {format_size(p['total_bytes'])}, "
            f"{format_size(int(p['rate']))}/s, ETA {eta_s}, "
            f"{format_size(p['transferred_bytes'])} transferred")


def _wait(c: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Poll the job until it ends, showing progress on a terminal."""
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    shown = False
    while job["state"] == "in-progress":
        if time.monotonic() > deadline:
            raise BlockhornError(f"job {job['id']} still running after {JOB_TIMEOUT_S} s")
        if tty:
            print(f"\r{_progress_line(job)}\033[K", end="", file=sys.stderr, flush=True)
            shown = True
        time.sleep(POLL_S)
        job = c.request("GET", f"/backups/jobs/{job['id']}")
    if shown:
        print(file=sys.stderr)
    if job["state"] == "error":
        raise BlockhornError(job.get("error") or "the job failed")
    return job


def _table(backups: list[dict[str, Any]]) -> str:
    if not backups:
        return "no backups"
    lines = [f"{'NAME':<24} {'VOLUME':<16} {'SNAPSHOT':<24} {'SIZE':>9} {'CREATED':<21} "
             f"{'STATE':<9} URL"]
    for b in backups:
        lines.append(f"{b['name']:<24} {b['volume']:<16} {b['snapshot']:<24} "
                     f"{format_size(b['size']):>9} {b['created']:<21} {b['state']:<9} "
                     f"{b['url']}")
    return "\n".join(lines)


def run_backup(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    with connect(home) as c:
        if args.action == "target":
            return _target(args, c, home)
        if args.action == "create":
            check_name(args.volume)
            job = c.request("POST", "/backups", {"volume": args.volume,
                                                 "snapshot": args.snapshot,
                                                 "target": args.target,
                                                 "labels": _labels(args.label),
                                                 "compression": args.compression,
                                                 "block_size": args.block_size})
            if args.no_wait:
                print(job["id"])
                return 0
            result = _wait(c, job)["result"]
            if args.json:
                print(json.dumps(result, indent=2, sort_keys=True))
            else:
                print(result["url"])
                print(f"{result['blocks']} blocks ({format_size(result['size'])}), "
                      f"{result['new_blocks']} new, {format_size(result['transferred_bytes'])} "
                      f"uploaded in {result['seconds']} s", file=sys.stderr)
        elif args.action == "ls":
            params = {k: v for k, v in (("volume", args.volume), ("target", args.target)) if v}
            reply = c.request("GET", "/backups", params=params)
            backups = reply["backups"]
            print(json.dumps(backups, indent=2, sort_keys=True) if args.json
                  else _table(backups))
            for name, message in sorted((reply.get("errors") or {}).items()):
                print(f"blockhorn: warning: target {name}: {message}", file=sys.stderr)
        elif args.action == "show":
            b = c.request("GET", "/backups/show", params={"url": args.url})
            if args.json:
                print(json.dumps(b, indent=2, sort_keys=True))
            else:
                for k in sorted(b):
                    print(f"{k:<20} {b[k]}")
        elif args.action == "rm":
            r = c.request("DELETE", "/backups", params={"url": args.url})
            note = f" (GC skipped: {r['gc_skipped']})" if r.get("gc_skipped") else ""
            print(f"removed {r['removed']}; {r['blocks_deleted']} blocks collected{note}")
        elif args.action == "restore":
            check_name(args.newvol)
            job = c.request("POST", "/backups/restore", {"url": args.url, "volume": args.newvol,
                                                        "replicas": args.replicas,
                                                        "disks": args.disks})
            if args.no_wait:
                print(job["id"])
                return 0
            r = _wait(c, job)["result"]
            print(f"restored {args.newvol} from {r['backup']} ({r['snapshot']}): "
                  f"{format_size(r['restored_bytes'])} written in {r['seconds']} s")
        elif args.action == "gc":
            r = c.request("POST", "/backups/gc", {"volume": args.volume, "target": args.target})
            note = f" (skipped: {r['gc_skipped']})" if r.get("gc_skipped") else ""
            print(f"{r['blocks_deleted']} unused blocks of {args.volume} removed{note}")
        elif args.action == "jobs":
            jobs = c.request("GET", "/backups/jobs")["jobs"]
            if args.json:
                print(json.dumps(jobs, indent=2, sort_keys=True))
            else:
                for j in jobs:
                    line = _progress_line(j) if j["state"] == "in-progress" else \
                        f"{j['operation']} {j.get('volume', '')}: {j['state']}"
                    print(f"{j['id']}  {line}  {j.get('error', '')}")
    return 0


def _target(args: argparse.Namespace, c: Any, home: Home) -> int:
    if args.target_action == "set":
        # The daemon runs elsewhere: paths are made absolute here, relative to the caller.
        cred = os.path.abspath(args.credential_file) if args.credential_file else None
        mount = os.path.abspath(args.mount) if args.mount else None
        if args.endpoint:
            if cred:
                raise InvalidArgument("give the endpoint as AWS_ENDPOINTS in the credential "
                                      "file, or --endpoint without --credential-file")
            cred = os.path.join(home.root, f"backup-target-{args.name}.env")
            atomic_write(cred, f"AWS_ENDPOINTS={args.endpoint}\n".encode(), 0o600)
        t = c.request("PUT", f"/backup-targets/{args.name}",
                      {"url": args.url, "credential_file": cred, "mount": mount})
        print(f"backup target {t['name']}: {t['url']}")
    elif args.target_action == "ls":
        targets = c.request("GET", "/backup-targets")["targets"]
        if args.json:
            print(json.dumps(targets, indent=2, sort_keys=True))
        elif not targets:
            print("no backup targets")
        else:
            for t in targets:
                print(f"{t['name']:<16} {t['url']}"
                      + (f"  (credentials: {t['credential_file']})" if t["credential_file"]
                         else ""))
    else:
        c.request("DELETE", f"/backup-targets/{args.name}")
    return 0
