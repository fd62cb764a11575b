"""Recovery times of the fault scenarios of issue 9 (part of `make bench`).

Runs the scenario tests (real replicas, engine, daemon where the scenario needs it) with
BLOCKHORN_RECOVERY_LOG set, so that each test appends what it measured
(tests/support/recovery.py), and prints one table: scenario, runs, min / median / max seconds
until the volume was whole again (what "whole" means is in each scenario's name). The long
link cut of scenario 5 is the issue's 120 s here (`make test` runs it with 40 s); `--quick`
shortens it to 30 s; `--runs N` repeats everything.
Scenarios 2 and 8 (crashes during a rebuild) have no timing here: they belong to the rebuild
work (engine/rebuild.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = [
    "tests/t5_system_heal.py::test_scenario1_replica_killed_under_writes",
    "tests/t5_system_heal.py::test_scenario3_everything_killed_comes_back",
    "tests/t5_system_heal.py::test_failed_replica_is_replaced_on_another_disk",
    "tests/t3_engine_review.py::test_a_returning_replica_resyncs_only_what_changed",
    "tests/t3_engine_verify.py::test_verify_finds_flipped_bytes_and_repair_fixes_them",
    "tests/t5_fault_disk_full.py",
    "tests/t5_fault_power_cut.py",
    "tests/t5_fault_link_cut.py",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="long link cut of 30 s, not 120 s")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    fd, log = tempfile.mkstemp(prefix="bh-recovery-", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, BLOCKHORN_RECOVERY_LOG=log)
    env["BLOCKHORN_LONG_CUT_S"] = "30" if args.quick else "120"
    failed = False
    try:
        for run in range(args.runs):
            print(f"bench_faults: run {run + 1}/{args.runs}: {len(TESTS)} scenario tests",
                  flush=True)
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                *TESTS], cwd=ROOT, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                failed = True
                print(p.stdout[-4000:] + p.stderr[-2000:], file=sys.stderr)
        rows: dict[str, list[float]] = {}
        details: dict[str, str] = {}
        with open(log) as f:
            for line in f:
                rec = json.loads(line)
                rows.setdefault(rec["scenario"], []).append(rec["seconds"])
                details[rec["scenario"]] = rec["detail"]
    finally:
        os.unlink(log)
    width = max((len(s) for s in rows), default=10)
    print(f"\n{'scenario (recovery measured until)':<{width}}  runs     min  median     max")
    for scenario in sorted(rows, key=lambda s: (s.split()[0].zfill(3), s)):
        t = rows[scenario]
        print(f"{scenario:<{width}}  {len(t):>4}  {min(t):6.2f}  {statistics.median(t):6.2f}  "
              f"{max(t):6.2f}")
        print(f"{'':<{width}}  ({details[scenario]})")
    if failed:
        sys.exit("bench_faults: a scenario test failed (output above)")


if __name__ == "__main__":
    main()
