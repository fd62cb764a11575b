"""`blockhorn job ...` (recurring jobs) and `blockhorn volume group` (their volume groups)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import InvalidArgument, check_name

EXIT_RUN_FAILED = 1


def add_parsers(cmds: Any, vcmds: Any) -> None:
    job = cmds.add_parser(
        "job", help="recurring snapshots, snapshot clean-up and backups (cron)",
        description="Recurring jobs run a task on a cron schedule (UTC) for one volume or for "
                    "every volume of a group. Each keeps its newest N snapshots/backups per "
                    "volume (label RecurringJob=NAME). A run missed while the daemon was down "
                    "runs once when it starts.")
    jcmds = job.add_subparsers(dest="action", metavar="ACTION", parser_class=type(job))
    jcmds.required = True
    p = jcmds.add_parser("create", help="create a recurring job",
                         description="Create a recurring job. Its first run is the first cron "
                                     "slot after now; `job run NAME` runs it at once.")
    p.add_argument("name", help="job name: 1-40 of a-z 0-9 - . (prefixes its snapshots' names)")
    p.add_argument("--cron", required=True, metavar="EXPR",
                   help="'MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK' in UTC, e.g. '0 3 * * *' "
                        "(a sixth field gives seconds)")
    p.add_argument("--task", required=True, choices=("snapshot", "snapshot-cleanup", "backup"),
                   help="snapshot: take one; snapshot-cleanup: remove system snapshots and "
                        "recurring snapshots beyond retain; backup: snapshot + back it up")
    p.add_argument("--retain", required=True, type=int, metavar="N",
                   help="keep the newest N snapshots (backups) this job made, per volume")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--volume", metavar="VOL", help="the volume it applies to")
    which.add_argument("--group", metavar="GROUP",
                       help="every volume in GROUP at run time (`volume group VOL --add "
                            "GROUP`); the group 'default' also takes volumes in no group")
    p.add_argument("--target", metavar="NAME", help="backup target (backup jobs)")
    p = jcmds.add_parser("ls", help="list jobs: last run, its result, next run",
                         description="List recurring jobs.")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    p = jcmds.add_parser("show", help="a job and its recent runs",
                         description="Show a job with its last 20 runs.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON (fields in docs/API.md)")
    p = jcmds.add_parser("rm", help="remove a job (what it made stays)",
                         description="Remove a job; its snapshots and backups stay.")
    p.add_argument("name")
    p = jcmds.add_parser("run", help="run a job now and wait for it",
                         description="Run a job at once, outside its schedule (the schedule "
                                     "is unchanged); exit status 1 when the run failed.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the run record as JSON")
    p.add_argument("--no-wait", action="store_true",
                   help="start the run and return (see `job show NAME` for its result)")

    p = vcmds.add_parser("group", help="show or change a volume's recurring-job groups",
                         description="Add VOLUME to or remove it from recurring-job groups; "
                                     "prints its groups.")
    p.add_argument("name")
    p.add_argument("--add", action="append", default=[], metavar="GROUP")
    p.add_argument("--remove", action="append", default=[], metavar="GROUP")


def _dash(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _run_text(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    return f"{r['state']} {r['started']}"


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    rows = [["NAME", "TASK", "CRON", "APPLIES-TO", "RETAIN", "LAST-RUN", "RUNS", "FAILED",
             "NEXT-RUN"]]
    for j in jobs:
        rows.append([j["name"], j["task"], j["cron"],
                     f"volume {j['volume']}" if j.get("volume") else f"group {j['group']}",
                     str(j["retain"]), "running" if j.get("running") else _run_text(j["last_run"]),
                     str(j["runs"]), str(j["failures"]), _dash(j.get("next_run"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_job(j: dict[str, Any]) -> str:
    lines = [f"Name:        {j['name']}",
             f"Task:        {j['task']} (retain {j['retain']})",
             f"Cron:        {j['cron']} (UTC)",
             "Applies to:  " + (f"volume {j['volume']}" if j.get("volume")
                                else f"group {j['group']}"),
             f"Target:      {_dash(j.get('target'))}",
             f"Created:     {j['created']}",
             f"Next run:    {j['next_run']}" + ("  (running now)" if j.get("running") else ""),
             f"Runs:        {j['runs']} ({j['failures']} failed)", ""]
    for r in j.get("history") or []:
        lines.append((f"  {r['started']}  {r['state']:<11}  {r.get('message') or ''}").rstrip())
    if not j.get("history"):
        lines.append("  no runs yet")
    return "\n".join(lines)


def run_job(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    if args.action == "create":
        # Checked here too, so bad input neither starts a daemon nor creates a home.
        from blockhorn.manager.jobs import MAX_RETAIN, check_cron
        check_name(args.name, "job")
        check_cron(args.cron)
        if not 1 <= args.retain <= MAX_RETAIN:
            raise InvalidArgument(f"invalid --retain {args.retain}: a number from 1 to "
                                  f"{MAX_RETAIN}")
        body = {k: getattr(args, k) for k in ("name", "cron", "task", "retain", "volume",
                                              "group", "target") if getattr(args, k) is not None}
        with connect(home) as c:
            j = c.request("POST", "/jobs", body)
        print(f"created job {j['name']}: {j['task']} on "
              + (f"volume {j['volume']}" if j.get("volume") else f"group {j['group']}")
              + f", next run {j['next_run']}")
        return 0
    if args.action != "ls":
        check_name(args.name, "job")
    with connect(home) as c:
        if args.action == "ls":
            jobs = c.request("GET", "/jobs")["jobs"]
            print(json.dumps(jobs, indent=2, sort_keys=True) if args.json else format_jobs(jobs))
        elif args.action == "show":
            j = c.request("GET", f"/jobs/{args.name}")
            print(json.dumps(j, indent=2, sort_keys=True) if args.json else format_job(j))
        elif args.action == "rm":
            c.request("DELETE", f"/jobs/{args.name}")
        elif args.action == "run":
            r = c.request("POST", f"/jobs/{args.name}/run",
                          params={"wait": "false"} if args.no_wait else None)
            if args.json:
                print(json.dumps(r, indent=2, sort_keys=True))
            else:
                print(f"job {args.name}: {r['state']}"
                      + (f": {r['message']}" if r.get("message") else ""))
            return EXIT_RUN_FAILED if r["state"] == "failed" else 0
    return 0


def run_volume_group(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    check_name(args.name)
    for g in args.add + args.remove:
        check_name(g, "group")
    with connect(home) as c:
        if args.add or args.remove:
            groups = c.request("POST", f"/volumes/{args.name}/groups",
                               {"add": args.add, "remove": args.remove})["groups"]
        else:
            groups = c.request("GET", f"/volumes/{args.name}")["groups"]
    print(" ".join(groups) if groups else "(no group: the 'default' group's jobs apply)")
    return 0
