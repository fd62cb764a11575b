"""The job scheduler's policy on a virtual clock (trio's MockClock through the scheduler's
`clock` hook): hours of cron slots pass in milliseconds. The real daemon and tasks are in
test_jobs.py; here the task is a recorder, since what is tested is *when* runs start."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import trio
import trio.testing

from blockhorn.manager.jobs import JobScheduler, JobSpec, JobStore, rfc3339
from blockhorn.manager.state import Store

# The virtual clock jumps to the next deadline once every task has waited this long in real
# time; longer than a SQLite call in a worker thread takes, so a jump never lands mid-call.
AUTOJUMP_S = 0.1
T0 = datetime.datetime(2026, 1, 1, 0, 30, tzinfo=datetime.UTC).timestamp()
HOUR = 3600.0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_S)


class Recorder:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []
        self.gate: threading.Event | None = None

    def __call__(self, spec: JobSpec) -> dict[str, Any]:
        self.calls.append((spec.name, self.clock()))
        if self.gate is not None:
            self.gate.wait(10)
        return {"volumes": {}}


def setup(tmp_path: Any, mock: trio.testing.MockClock,
          last_slot: float | None = None) -> tuple[JobScheduler, Recorder]:
    store = Store(str(tmp_path / "state.db"))

    def clock() -> float:   # the wall clock the scheduler sees: T0 + virtual seconds
        return T0 + mock.current_time()

    rec = Recorder(clock)
    sched = JobScheduler(store, rec, clock=clock)
    sched.jobs.add(JobSpec("h", "0 * * * *", "snapshot", 1, volume="v"), T0)
    if last_slot is not None:
        with store.tx() as db:
            db.execute("UPDATE jobs SET last_slot=? WHERE name='h'", (last_slot,))
    return sched, rec


async def test_runs_once_per_slot_on_time(tmp_path: Any,
                                          clock: trio.testing.MockClock) -> None:
    sched, rec = setup(tmp_path, clock)
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        await trio.sleep(3 * HOUR + 60)
        n.cancel_scope.cancel()
    # 01:00, 02:00, 03:00 UTC: each slot once, at its time (no polling between).
    assert [round(t - T0) for _, t in rec.calls] == [1800, 5400, 9000]
    row = sched.jobs.get("h")
    assert row.runs == 3 and row.last_slot == T0 + 9000
    assert sched.describe(row)["next_run"] == "2026-01-01T04:00:00Z"


async def test_missed_slots_collapse_into_one_run(tmp_path: Any,
                                                  clock: trio.testing.MockClock) -> None:
    sched, rec = setup(tmp_path, clock, last_slot=T0 - 5 * HOUR)   # down since 19:30 the day before
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        await trio.sleep(HOUR)
        n.cancel_scope.cancel()
    # One run at start for the latest missed slot (00:00), then 01:00 on schedule.
    assert [round(t - T0) for _, t in rec.calls] == [0, 1800]
    runs = sched.jobs.runs("h")
    assert [r["slot"] for r in runs] == ["2026-01-01T01:00:00Z", "2026-01-01T00:00:00Z"]


async def test_a_slot_during_a_long_run_is_skipped(tmp_path: Any,
                                                   clock: trio.testing.MockClock) -> None:
    sched, rec = setup(tmp_path, clock)
    rec.gate = threading.Event()
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        await trio.sleep(HOUR + 1800 + 60)    # 01:00 runs and hangs; 02:00 comes
        rec.gate.set()
        await trio.sleep(HOUR)                # 03:00 runs again
        n.cancel_scope.cancel()
    states = [(r["slot"], r["state"]) for r in reversed(sched.jobs.runs("h"))]
    assert states == [("2026-01-01T01:00:00Z", "ok"), ("2026-01-01T02:00:00Z", "skipped"),
                      ("2026-01-01T03:00:00Z", "ok")]
    assert len(rec.calls) == 2


async def test_run_now_and_interrupted_runs(tmp_path: Any,
                                            clock: trio.testing.MockClock) -> None:
    sched, rec = setup(tmp_path, clock)
    jobs = JobStore(sched.store)
    left = jobs.start_run("h", None, T0 - 60)   # a run a previous daemon never finished
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        run = await sched.run_now("h")
        n.cancel_scope.cancel()
    assert run["state"] == "ok" and run["slot"] is None and run["started"] == rfc3339(T0)
    assert jobs.run(left)["state"] == "interrupted"
    assert sched.jobs.get("h").last_slot == T0   # run-now leaves the schedule alone
