"""`blockhorn volume verify NAME [--repair] [--json] [--rate MiB/s]`: the scrub.

Exit status: 0 when every chunk agrees on every compared replica (after repairs, with
--repair), 1 when differences remain or a replica failed, 2 for bad input (cli/common.py)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from blockhorn.manager.paths import Home
from blockhorn.types import BlockhornError, InvalidArgument, check_name, format_size

POLL_S = 0.25          # seconds between progress requests
EXIT_DIFFERENCES = 1


def add_parser(vcmds: Any, home_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    p = vcmds.add_parser(
        "verify", help="compare the replicas' data chunk by chunk (scrub)",
        description="Compare the data of the RW replicas of an attached volume, 1 MiB chunk by "
                    "chunk, while it is in use, and report which chunks differ on which "
                    "replica. With --repair, chunks where a strict majority of replicas agrees "
                    "are rewritten from it; chunks without one are reported, never guessed. "
                    "Exit status 0: all chunks agree; 1: differences remain.")
    p.add_argument("name")
    p.add_argument("--repair", action="store_true",
                   help="rewrite the minority replicas' chunks from the majority")
    p.add_argument("--json", action="store_true", help="print the report as JSON "
                   "(fields in docs/API.md)")
    p.add_argument("--rate", type=float, default=None, metavar="MiB/s",
                   help="compare at most this many MiB of the volume per second (each "
                        "replica reads at most that); 0 = unlimited; "
                        "default: the setting volume-verify-bandwidth-limit")
    home_arg(p)


def run_verify(args: argparse.Namespace, home: Home) -> int:
    from blockhorn.manager.client import connect
    check_name(args.name)
    if args.rate is not None and args.rate < 0:
        raise InvalidArgument(f"invalid --rate {args.rate:g}: MiB/s >= 0, 0 for unlimited")
    body: dict[str, Any] = {"repair": args.repair}
    if args.rate is not None:
        body["rate_mib_s"] = args.rate
    path = f"/volumes/{args.name}/verify"
    tty = sys.stderr.isatty()
    with connect(home) as c:
        st = c.request("POST", path, body)
        started = st["verify"]["started"]
        while st["verify"]["state"] == "running":
            if tty:
                print(f"\r{_progress_text(st['verify'])}", end="", file=sys.stderr, flush=True)
            time.sleep(POLL_S)
            st = c.request("GET", path)
            if st["verify"]["started"] != started:
                raise BlockhornError("another verify of this volume replaced this one: see "
                                     f"`GET /v1{path}` for its report", errno.EBUSY)
    if tty:
        print(file=sys.stderr)
    progress = st["verify"]
    if progress["state"] != "done":
        raise BlockhornError(f"verify failed: {progress.get('error')}",
                             int(progress.get("errno") or errno.EIO))
    report = st["report"]
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0 if report["ok"] else EXIT_DIFFERENCES


def _progress_text(p: dict[str, Any]) -> str:
    total = p.get("total") or 1
    return (f"verify: {100 * p['done'] // total:3d}% ({format_size(p['done'])} of "
            f"{format_size(total)}), {p.get('differing_chunks', 0)} differing chunks")


def format_report(r: dict[str, Any]) -> str:
    rate = f", {r['throughput_mib_s']} MiB/s" if r.get("throughput_mib_s") else ""
    lines = [f"volume {r['volume']}: {format_size(r['bytes_compared'])} compared on "
             f"{', '.join(r['replicas'])} in {r['elapsed_s']} s{rate}"]
    for name, reason in sorted(r["failed_replicas"].items()):
        lines.append(f"replica {name} dropped out: {reason}")
    diffs = r["differences"]
    if diffs:
        lines.append(f"{r['differing_chunks']} chunk(s) of {format_size(r['chunk_size'])} differ"
                     + ("" if r["differences_listed"] else f" ({len(diffs)} listed)") + ":")
        rows = [["OFFSET", "LENGTH", "DIFFERS ON", "MAJORITY", "REPAIRED"]]
        for d in diffs:
            rows.append([str(d["offset"]), format_size(d["length"]),
                         ",".join(d["minority"]) or "no majority",
                         ",".join(d["majority"] or []) or "-",
                         "yes" if d["repaired"] else "no"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
        for name, n in sorted(r["by_replica"].items()):
            if n["differing_chunks"]:
                lines.append(f"replica {name}: {n['differing_chunks']} differing, "
                             f"{n['repaired_chunks']} repaired")
    if r["ok"]:
        lines.append("result: every chunk agrees" + (f" ({r['repaired_chunks']} repaired)"
                                                     if r["repaired_chunks"] else ""))
    else:
        hint = ("" if r["repair"] else "; run again with --repair to rewrite them from the "
                "majority")
        if r["unresolved_chunks"]:
            hint += (f"; {r['unresolved_chunks']} chunk(s) have no majority: restore them from "
                     "a backup or rebuild the replica you distrust")
        lines.append(f"result: {r['remaining_chunks']} chunk(s) differ{hint}")
    return "\n".join(lines)
