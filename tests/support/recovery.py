"""Measured recovery times of the fault scenarios (issue 9), for scripts/bench_faults.py.

A fault test calls `report(scenario, seconds, detail)` once it has measured how long the volume
took to be whole again. The line is printed (visible with `pytest -s`) and, when the
environment names a file in BLOCKHORN_RECOVERY_LOG, appended there as one JSON object, which is
how the bench collects a table without parsing test output.
"""

from __future__ import annotations

import json
import os

LOG_ENV = "BLOCKHORN_RECOVERY_LOG"


def report(scenario: str, seconds: float, detail: str = "") -> None:
    print(f"recovery: {scenario}: {seconds:.2f} s ({detail})")
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, "seconds": round(seconds, 3),
                                "detail": detail}) + "\n")
