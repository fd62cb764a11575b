"""Recurring jobs: snapshots, snapshot clean-up and backups on a cron schedule.

Vocabulary:
- a *job* is a name, a cron expression (UTC), a task (`snapshot`, `snapshot-cleanup`,
  `backup`), `retain N` and what it applies to: one volume, or a *group* (every volume whose
  `groups` holds it at run time; the group `default` also takes every volume in no group, as in
  Longhorn).
- a *slot* is a time the cron expression names. A job's `last_slot` is the latest slot that was
  handled (run, or skipped because the previous run was still going); the next due time is the
  first slot after it.
- a *run* is one execution, recorded in `job_runs` with its state (`running`, `ok`, `failed`,
  `skipped`, `interrupted`), its message and what it made and removed.

Invariants:
- A slot is marked handled (last_slot moved, run row written, one transaction) *before* the
  task starts, so a daemon crash in the middle never runs the same slot twice; the run row it
  leaves in `running` is turned into `interrupted` when the next daemon starts.
- Slots missed while the daemon was down are collapsed: on start the job runs once, for the
  latest missed slot, never once per slot.
- One run per job at a time, also across a cluster's nodes (a run row `running` on another
  node that is up counts; each node's scheduler would otherwise start the next slot while
  another node's run of the job still goes on); different jobs run in parallel (each in a worker thread; the
  volume lock serialises them with the API's operations on the same volume).
- The scheduler sleeps until the earliest due time (capped, see MAX_SLEEP_S); creating,
  removing or running a job wakes it. An idle daemon does no work for jobs.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio
from croniter import croniter

from blockhorn.control.store import JobRow as StoredJob
from blockhorn.control.store import RunRow, SlotTaken, StateStore
from blockhorn.types import BlockhornError, Busy, InvalidArgument, NotFound
from blockhorn.types import check_name as _check_name

log = logging.getLogger("blockhorn.manager")

TASKS = ("snapshot", "snapshot-cleanup", "backup")
DEFAULT_GROUP = "default"     # Longhorn's: also applies to volumes that are in no group
MAX_JOB_NAME = 40             # characters; snapshot names are <job>-<YYYYmmddHHMMSS>-<n> (<= 63)
MAX_RETAIN = 1000
HISTORY_RUNS = 20             # run records kept per job
# Seconds the scheduler sleeps at most. It computes the due time from the wall clock and sleeps
# on the monotonic one; a wall clock stepped forward (NTP after boot) is noticed within this.
MAX_SLEEP_S = 600.0
START_WAIT_S = 10.0           # seconds `job run` waits for the scheduler of a starting daemon


@dataclass(frozen=True)
class JobSpec:
    name: str
    cron: str
    task: str
    retain: int
    volume: str | None = None
    group: str | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        return cls(str(d["name"]), str(d["cron"]), str(d["task"]), int(d["retain"]),
                   d.get("volume"), d.get("group"), d.get("target"))


@dataclass
class JobRow:
    spec: JobSpec
    created: float
    last_slot: float
    runs: int
    failures: int


# --- cron ------------------------------------------------------------------------------------

def _utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def rfc3339(t: float | None) -> str | None:
    return None if t is None else _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_cron(expr: str) -> str:
    """A cron expression of 5 fields (MIN HOUR DOM MON DOW, UTC) or 6 (croniter's seconds
    last), else InvalidArgument naming what is wrong."""
    fields = str(expr or "").split()
    hint = "use 5 fields 'MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK' in UTC, e.g. '0 3 * * *'"
    if len(fields) not in (5, 6):
        n = len(fields)
        raise InvalidArgument(f"invalid cron expression {expr!r}: {n} field{'s' * (n != 1)}; "
                              f"{hint}")
    try:
        croniter(" ".join(fields), _utc(0)).get_next(float)
    except (ValueError, KeyError, TypeError) as e:   # croniter's CroniterError is a ValueError
        raise InvalidArgument(f"invalid cron expression {expr!r}: {e}; {hint}") from None
    return " ".join(fields)


def next_slot(expr: str, after: float) -> float:
    """The first slot strictly after `after`."""
    return float(croniter(expr, _utc(after)).get_next(float))


def latest_slot(expr: str, now: float) -> float:
    """The latest slot at or before `now`."""
    prev = float(croniter(expr, _utc(now)).get_prev(float))
    nxt = next_slot(expr, prev)
    return nxt if nxt <= now else prev


# --- validation ------------------------------------------------------------------------------

def check_spec(d: dict[str, Any], store: StateStore,
               check_target: Callable[[str | None], str] | None = None) -> JobSpec:
    """A JobSpec from request fields, or InvalidArgument / NotFound saying what is wrong.
    `check_target(name or None)` resolves a backup job's target (the default one for None)."""
    name = str(d.get("name") or "")
    _check_name(name, "job")
    if len(name) > MAX_JOB_NAME:
        raise InvalidArgument(f"invalid job name {name!r}: at most {MAX_JOB_NAME} characters "
                              "(it prefixes the names of the snapshots it takes)")
    task = d.get("task")
    if task not in TASKS:
        raise InvalidArgument(f"invalid task {task!r}: use one of {', '.join(TASKS)}")
    retain = d.get("retain")
    if not isinstance(retain, int) or isinstance(retain, bool) or not 1 <= retain <= MAX_RETAIN:
        raise InvalidArgument(f"invalid retain {retain!r}: a number from 1 to {MAX_RETAIN} "
                              "(how many of its snapshots/backups the job keeps per volume)")
    volume, group = d.get("volume"), d.get("group")
    if bool(volume) == bool(group):
        raise InvalidArgument("a job applies to exactly one of a volume or a group")
    if volume:
        store.volume(str(volume))   # NotFound: "volume 'x' does not exist"
    if group:
        _check_name(str(group), "group")
    target = d.get("target")
    if target and task != "backup":
        raise InvalidArgument(f"--target is for backup jobs; a {task} job has no target")
    if task == "backup" and check_target is not None:
        target = check_target(str(target) if target else None)
    return JobSpec(name, check_cron(str(d.get("cron") or "")), str(task), retain,
                   str(volume) if volume else None, str(group) if group else None,
                   str(target) if target else None)


def check_groups(groups: list[str]) -> list[str]:
    for g in groups:
        _check_name(g, "group")
    return sorted(set(groups))


def group_members(store: StateStore, group: str) -> list[str]:
    """The volumes a group job works on now; DR standbys are left out until activated."""
    return [v.name for v in store.volumes() if not v.standby
            and (group in v.groups or (group == DEFAULT_GROUP and not v.groups))]


# --- the jobs' tables ------------------------------------------------------------------------

class JobStore:
    """Jobs and their runs in the daemon's state store (control/store), as JobSpecs."""

    def __init__(self, store: StateStore, node: str = "") -> None:
        self.store = store
        self.node = node   # a cluster's: the node whose runs these are (interrupt_running)

    @staticmethod
    def _row(r: StoredJob) -> JobRow:
        return JobRow(JobSpec.from_dict(r.spec), r.created, r.last_slot, r.runs, r.failures)

    def add(self, spec: JobSpec, now: float) -> JobRow:
        return self._row(self.store.add_job(spec.name, spec.to_dict(), now))

    def get(self, name: str) -> JobRow:
        return self._row(self.store.job(name))

    def all(self) -> list[JobRow]:
        return [self._row(r) for r in self.store.jobs()]

    def remove(self, name: str) -> None:
        self.store.remove_job(name)

    def start_run(self, name: str, slot: float | None, now: float,
                  state: str = "running", message: str | None = None) -> int:
        """Record a run (and, for a scheduled one, mark its slot handled) in one transaction."""
        return self.store.start_run(name, slot, now, state, message, HISTORY_RUNS, self.node)

    def finish_run(self, run_id: int, state: str, message: str | None,
                   result: dict[str, Any] | None, now: float) -> None:
        self.store.finish_run(run_id, state, message, result, now)

    def running_on(self, name: str, live: set[str]) -> str | None:
        """Another node of a cluster that runs job `name` now (a run row of it `running`,
        that node up: a down node's run ended with it); None when there is none."""
        for r in self.store.job_runs(name, HISTORY_RUNS):
            if r.state == "running" and r.node and r.node != self.node and r.node in live:
                return r.node
        return None

    def interrupt_running(self, now: float) -> int:
        """Runs a previous daemon left `running` died with it: say so."""
        return self.store.interrupt_running(now, self.node)

    def runs(self, name: str, limit: int = HISTORY_RUNS) -> list[dict[str, Any]]:
        return [_run(r) for r in self.store.job_runs(name, limit)]

    def run(self, run_id: int) -> dict[str, Any]:
        r = self.store.job_run(run_id)
        if r is None:
            raise NotFound(f"job run {run_id} does not exist (its job was removed)")
        return _run(r)


def _run(r: RunRow) -> dict[str, Any]:
    return {"id": r.id, "job": r.job, "slot": rfc3339(r.slot),
            "started": rfc3339(r.started), "finished": rfc3339(r.finished),
            "state": r.state, "message": r.message, "result": r.result}


# --- the scheduler ---------------------------------------------------------------------------

class JobFailed(BlockhornError):
    """A run that failed for some of its volumes; `result` holds what the others did."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


Execute = Callable[[JobSpec], dict[str, Any]]
# sleep_until(wall_time, wake): return at wall-clock time `wall_time`, or earlier when `wake`
# is set. The default sleeps on trio's clock; tests pass one that moves a virtual clock.
SleepUntil = Callable[[float, trio.Event], Awaitable[None]]


class JobScheduler:
    """Runs due jobs; the daemon runs `run()` in its nursery. `clock` (the wall clock) and
    `sleep_until` are the test hooks for time; tasks are executed by `execute(spec)` in a
    worker thread."""

    def __init__(self, store: StateStore, execute: Execute,
                 clock: Callable[[], float] = time.time,
                 check_target: Callable[[str | None], str] | None = None,
                 sleep_until: SleepUntil | None = None, node: str = "",
                 live_nodes: Callable[[], set[str]] | None = None) -> None:
        self.store = store
        # A cluster's nodes that are up: a run of a job going on another of them counts as
        # this job's run in flight (one run per job at a time across the cluster).
        self.live_nodes = live_nodes
        self.sleep_until = sleep_until or self._sleep_until
        self.check_target = check_target   # validates a backup job's target when it is created
        self.jobs = JobStore(store, node)
        self.execute = execute
        # The job's steps for one volume on this node (job_tasks.JobTasks.one), for another
        # node of a cluster whose volume's engine runs here (POST .../volumes/VOL/run).
        self.run_volume: Callable[..., dict[str, Any]] | None = None
        self.clock = clock
        self._running: dict[str, int] = {}     # job name -> run id
        self._idle = trio.Event()               # set while no run is in flight
        self._idle.set()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._started = trio.Event()

    def wake(self) -> None:
        """Recompute the due times now (a job was created, removed or changed)."""
        self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        n = await trio.to_thread.run_sync(self.jobs.interrupt_running, self.clock())
        if n:
            log.warning("%d job run(s) were interrupted by the previous daemon's end", n)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            task_status.started()
            while True:
                # A fresh event before the jobs are read: a wake() during the pass (a job
                # created meanwhile) ends the coming sleep at once instead of being lost.
                self._wake = wake = trio.Event()
                try:
                    wake_at = await self._start_due(nursery)
                except Exception:   # a bug or a store error must not end scheduling: retry later
                    log.exception("job scheduling pass failed")
                    wake_at = self.clock() + MAX_SLEEP_S
                await self.sleep_until(wake_at, wake)

    async def _sleep_until(self, wall_time: float, wake: trio.Event) -> None:
        with trio.move_on_after(max(0.0, wall_time - self.clock())):
            await wake.wait()

    async def _start_due(self, nursery: trio.Nursery) -> float:
        """Start every due job; return the wall-clock time of the next due slot."""
        now = self.clock()
        wake_at = now + MAX_SLEEP_S
        for row in await trio.to_thread.run_sync(self.jobs.all):
            spec = row.spec
            due = next_slot(spec.cron, row.last_slot)
            if due <= now:
                slot = latest_slot(spec.cron, now)   # missed slots collapse into one run
                try:
                    elsewhere = None if spec.name in self._running else \
                        await trio.to_thread.run_sync(self._running_elsewhere, spec.name)
                    if spec.name in self._running or elsewhere:
                        where = f" on node {elsewhere}" if elsewhere else ""
                        log.warning("job %s: slot %s skipped, the previous run is still going%s",
                                    spec.name, rfc3339(slot), where)
                        await trio.to_thread.run_sync(
                            self.jobs.start_run, spec.name, slot, now, "skipped",
                            f"the previous run was still going{where}")
                    else:
                        run_id = await trio.to_thread.run_sync(self.jobs.start_run, spec.name,
                                                               slot, now)
                        self._begin(spec.name, run_id)
                        nursery.start_soon(self._execute, spec, run_id, None)
                except SlotTaken:
                    log.debug("job %s: slot %s runs on another node", spec.name, rfc3339(slot))
                due = next_slot(spec.cron, slot)
            wake_at = min(wake_at, due)
        return wake_at

    async def run_now(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Run job `name` at once, outside its schedule (its slots are unchanged); returns the
        run record when it is done (or at once, state `running`, unless `wait`)."""
        row = await trio.to_thread.run_sync(self.jobs.get, name)
        with trio.move_on_after(START_WAIT_S):
            await self._started.wait()   # a request may come in just as the daemon starts
        if self._nursery is None:
            raise Busy("the job scheduler has not started: see daemon.log")
        if name in self._running:
            raise Busy(f"job {name!r} is running already (run {self._running[name]})")
        elsewhere = await trio.to_thread.run_sync(self._running_elsewhere, name)
        if elsewhere:
            raise Busy(f"job {name!r} is running already, on node {elsewhere}")
        run_id = await trio.to_thread.run_sync(self.jobs.start_run, name, None, self.clock())
        self._begin(name, run_id)
        done = trio.Event()
        # The run belongs to the scheduler: a client that goes away does not cancel it.
        self._nursery.start_soon(self._execute, row.spec, run_id, done)
        if wait:
            await done.wait()
        return await trio.to_thread.run_sync(self.jobs.run, run_id)

    def _running_elsewhere(self, name: str) -> str | None:
        return None if self.live_nodes is None else self.jobs.running_on(name,
                                                                         self.live_nodes())

    def _begin(self, name: str, run_id: int) -> None:
        if not self._running:
            self._idle = trio.Event()
        self._running[name] = run_id

    async def wait_idle(self) -> None:
        """Return once no run is in flight."""
        while self._running:
            await self._idle.wait()

    async def _execute(self, spec: JobSpec, run_id: int, done: trio.Event | None) -> None:
        state, message, result = "ok", None, None
        try:
            log.info("job %s (%s) run %d started", spec.name, spec.task, run_id)
            try:
                # abandon_on_cancel: a stopping daemon does not wait for a long backup; the run
                # row stays `running` and the next daemon marks it interrupted.
                result = await trio.to_thread.run_sync(self.execute, spec,
                                                       abandon_on_cancel=True)
                message = result.pop("message", None) if result else None
            except JobFailed as e:
                state, message, result = "failed", str(e), e.result
            except BlockhornError as e:
                state, message = "failed", str(e)
            except Exception as e:   # a bug: keep the traceback in the log, the gist in the run
                log.exception("job %s run %d failed", spec.name, run_id)
                state, message = "failed", f"internal error: {e!r} (see daemon.log)"
            log.info("job %s run %d %s%s", spec.name, run_id, state,
                     f": {message}" if message else "")
            await trio.to_thread.run_sync(self.jobs.finish_run, run_id, state, message, result,
                                          self.clock())
        finally:
            if self._running.get(spec.name) == run_id:
                del self._running[spec.name]
            if not self._running:
                self._idle.set()
            if done is not None:
                done.set()

    # --- views -----------------------------------------------------------------------------

    def describe(self, row: JobRow, history: int = 1) -> dict[str, Any]:
        """The job object of the API (docs/API.md)."""
        runs = self.jobs.runs(row.spec.name, history)
        d = row.spec.to_dict()
        d.update(created=rfc3339(row.created), last_slot=rfc3339(row.last_slot),
                 next_run=rfc3339(next_slot(row.spec.cron, row.last_slot)),
                 runs=row.runs, failures=row.failures, running=row.spec.name in self._running,
                 last_run=runs[0] if runs else None)
        if history > 1:
            d["history"] = runs
        return d
