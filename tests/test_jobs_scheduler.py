"""The job scheduler's policy on a virtual wall clock (its `clock` and `sleep_until` hooks):
hours of cron slots pass in milliseconds, independent of how loaded the machine is. The real
daemon and tasks are in test_jobs.py; here the task is a recorder, since what is tested is
*when* runs start."""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Any

import pytest
import trio

from blockhorn.control.store import SqliteStore
from blockhorn.control.store.etcd import EtcdStore
from blockhorn.manager.jobs import JobScheduler, JobSpec, JobStore, rfc3339
from blockhorn.types import Busy

T0 = datetime.datetime(2026, 1, 1, 0, 30, tzinfo=datetime.UTC).timestamp()
HOUR = 3600.0
SETTLE_TIMEOUT_S = 10.0    # real seconds a run in a worker thread may take to finish


class VirtualTime:
    """A wall clock that stands still while the scheduler works and jumps to the time it
    sleeps until, once the runs in flight have finished (unless `overlap`: then a run that
    waits on `gate` goes on while time passes, until `release_at`)."""

    def __init__(self, end: float) -> None:
        self.now = T0
        self.end = end
        self.done = trio.Event()
        self.sched: JobScheduler | None = None
        self.gate: threading.Event | None = None
        self.release_at = float("inf")
        self.calls: list[tuple[str, float]] = []

    def clock(self) -> float:
        return self.now

    def execute(self, spec: JobSpec) -> dict[str, Any]:
        self.calls.append((spec.name, self.now))
        if self.gate is not None:
            self.gate.wait(SETTLE_TIMEOUT_S)
        return {"volumes": {}}

    async def sleep_until(self, wall: float, wake: trio.Event) -> None:
        assert self.sched is not None
        if wall >= self.release_at and self.gate is not None:
            self.gate.set()
        if self.gate is None or self.gate.is_set():
            with trio.fail_after(SETTLE_TIMEOUT_S):
                await self.sched.wait_idle()
        if wall > self.end:
            self.done.set()
            await trio.sleep_forever()
        self.now = max(self.now, wall)


async def run_until(tmp_path: Any, end: float, last_slot: float | None = None,
                    vt: VirtualTime | None = None,
                    ) -> tuple[JobScheduler, VirtualTime]:
    vt = vt or VirtualTime(end)
    store = SqliteStore(str(tmp_path / "state.db"))
    sched = JobScheduler(store, vt.execute, clock=vt.clock, sleep_until=vt.sleep_until)
    vt.sched = sched
    sched.jobs.add(JobSpec("h", "0 * * * *", "snapshot", 1, volume="v"), T0)
    if last_slot is not None:
        with store.tx() as db:
            db.execute("UPDATE jobs SET last_slot=? WHERE name='h'", (last_slot,))
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        with trio.fail_after(SETTLE_TIMEOUT_S):
            await vt.done.wait()
        n.cancel_scope.cancel()
    return sched, vt


async def test_runs_once_per_slot_on_time(tmp_path: Any) -> None:
    sched, vt = await run_until(tmp_path, T0 + 3 * HOUR + 60)
    # 01:00, 02:00, 03:00 UTC: each slot once, at its time.
    assert [round(t - T0) for _, t in vt.calls] == [1800, 5400, 9000]
    row = sched.jobs.get("h")
    assert row.runs == 3 and row.last_slot == T0 + 9000
    assert sched.describe(row)["next_run"] == "2026-01-01T04:00:00Z"


async def test_missed_slots_collapse_into_one_run(tmp_path: Any) -> None:
    # The daemon was down since 19:30 the day before: five slots passed.
    sched, vt = await run_until(tmp_path, T0 + HOUR, last_slot=T0 - 5 * HOUR)
    # One run at start for the latest missed slot (00:00), then 01:00 on schedule.
    assert [round(t - T0) for _, t in vt.calls] == [0, 1800]
    assert [r["slot"] for r in sched.jobs.runs("h")] == ["2026-01-01T01:00:00Z",
                                                        "2026-01-01T00:00:00Z"]


async def test_a_slot_during_a_long_run_is_skipped(tmp_path: Any) -> None:
    vt = VirtualTime(T0 + 3 * HOUR)
    vt.gate = threading.Event()               # the 01:00 run hangs until 03:00 is next
    vt.release_at = T0 + 2.5 * HOUR
    sched, _ = await run_until(tmp_path, vt.end, vt=vt)
    states = [(r["slot"], r["state"]) for r in reversed(sched.jobs.runs("h"))]
    assert states == [("2026-01-01T01:00:00Z", "ok"), ("2026-01-01T02:00:00Z", "skipped"),
                      ("2026-01-01T03:00:00Z", "ok")]
    assert len(vt.calls) == 2


async def test_run_now_and_interrupted_runs(tmp_path: Any) -> None:
    vt = VirtualTime(T0)
    store = SqliteStore(str(tmp_path / "state.db"))
    sched = JobScheduler(store, vt.execute, clock=vt.clock, sleep_until=vt.sleep_until)
    vt.sched = sched
    sched.jobs.add(JobSpec("h", "0 * * * *", "snapshot", 1, volume="v"), T0)
    jobs = JobStore(store)
    left = jobs.start_run("h", None, T0 - 60)   # a run a previous daemon never finished
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        run = await sched.run_now("h")
        n.cancel_scope.cancel()
    assert run["state"] == "ok" and run["slot"] is None and run["started"] == rfc3339(T0)
    assert jobs.run(left)["state"] == "interrupted"
    assert sched.jobs.get("h").last_slot == T0   # run-now leaves the schedule alone


async def test_a_run_going_on_another_node_skips_the_slot(etcd_url: str) -> None:
    """A cluster (real etcd): node n1 runs job h, claimed for 01:00 (its run row `running`).
    n2's scheduler sees 02:00 due: it records the slot skipped, naming n1, and runs nothing,
    and `job run` is refused (one run per job at a time across the cluster; before, n2 ran it
    beside n1's). With n1 down (its run ended with it) n2 runs 03:00."""
    store = EtcdStore(etcd_url, f"/bh-test-{uuid.uuid4().hex[:12]}/")
    live = {"n1", "n2"}
    try:
        JobStore(store, "n1").add(JobSpec("h", "0 * * * *", "snapshot", 1, volume="v"), T0)
        JobStore(store, "n1").start_run("h", T0 + 1800, T0 + 1800)   # 01:00, on n1
        for end, start in ((T0 + 5460, T0 + 1800), (T0 + 9060, T0 + 5460)):
            vt = VirtualTime(end)
            vt.now = start
            sched = JobScheduler(store, vt.execute, clock=vt.clock,
                                 sleep_until=vt.sleep_until, node="n2",
                                 live_nodes=live.copy)
            vt.sched = sched
            async with trio.open_nursery() as n:
                await n.start(sched.run)
                if "n1" in live:
                    with pytest.raises(Busy, match="on node n1"):
                        await sched.run_now("h")
                with trio.fail_after(SETTLE_TIMEOUT_S):
                    await vt.done.wait()
                n.cancel_scope.cancel()
            if "n1" in live:
                assert vt.calls == []
                runs = sched.jobs.runs("h")   # newest first
                assert [(r["slot"], r["state"]) for r in runs] == [
                    ("2026-01-01T02:00:00Z", "skipped"), ("2026-01-01T01:00:00Z", "running")]
                assert runs[0]["message"] == "the previous run was still going on node n1"
                live.discard("n1")   # n1 down
            else:
                assert [round(t - T0) for _, t in vt.calls] == [9000]   # 03:00
    finally:
        store.close()
