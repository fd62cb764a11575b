"""Recurring jobs and their runs in the etcd store (control/store/etcd.py, whose layout names
the keys: `jobs/<name>`, `runs/<id>`, `meta/run-seq`)."""

from __future__ import annotations

from typing import Any

from blockhorn.control.store.base import SlotTaken
from blockhorn.control.store.etcd_cas import Doc, EtcdCas
from blockhorn.control.store.records import JobRow, RunRow
from blockhorn.types import AlreadyExists, NotFound


def _run(d: Doc) -> RunRow:
    return RunRow(d["id"], d["job"], d.get("slot"), d["started"], d.get("finished"),
                  d["state"], d.get("message"), d.get("result"), d.get("node"))


def _job(d: Doc) -> JobRow:
    return JobRow(d["name"], d["spec"], d["created"], d["last_slot"], d.get("runs", 0),
                  d.get("failures", 0))


class EtcdJobs(EtcdCas):
    def add_job(self, name: str, spec: dict[str, Any], now: float) -> JobRow:
        doc = {"name": name, "spec": spec, "created": now, "last_slot": now, "runs": 0,
               "failures": 0}
        if not self._commit({f"jobs/{name}": 0}, {f"jobs/{name}": doc}):
            raise AlreadyExists(f"job {name!r} already exists")
        return _job(doc)

    def job(self, name: str) -> JobRow:
        d, _ = self._get(f"jobs/{name}")
        if d is None:
            raise NotFound(f"job {name!r} does not exist")
        return _job(d)

    def jobs(self) -> list[JobRow]:
        return sorted((_job(d) for _, d, _ in self._list("jobs/")), key=lambda j: j.name)

    def _runs_of(self, job: str) -> list[tuple[str, Doc, int]]:
        return [(k, d, rev) for k, d, rev in self._list("runs/") if d["job"] == job]

    def remove_job(self, name: str) -> None:
        def step() -> bool:
            _, rev = self._get(f"jobs/{name}")
            if rev == 0:
                raise NotFound(f"job {name!r} does not exist")
            return self._commit({f"jobs/{name}": rev}, {},
                                [f"jobs/{name}"] + [k for k, _, _ in self._runs_of(name)])
        self._retry(step, f"remove job {name}")

    def start_run(self, name: str, slot: float | None, now: float, state: str,
                  message: str | None, keep: int, node: str = "") -> int:
        got: list[int] = []

        def step() -> bool:
            job, job_rev = self._get(f"jobs/{name}")
            if job is None:
                raise NotFound(f"job {name!r} does not exist")
            seq, seq_rev = self._get("meta/run-seq")
            run_id = int((seq or {}).get("last", 0)) + 1
            if slot is not None:
                if job["last_slot"] >= slot:   # another node's scheduler claimed it first
                    raise SlotTaken(f"job {name}: slot {slot} was claimed already")
                job["last_slot"] = slot
            old = sorted(k for k, _, _ in self._runs_of(name))   # keys sort by id
            got[:] = [run_id]
            return self._commit(
                {f"jobs/{name}": job_rev, "meta/run-seq": seq_rev},
                {f"jobs/{name}": job, "meta/run-seq": {"last": run_id},
                 f"runs/{run_id:016d}": {"id": run_id, "job": name, "slot": slot,
                                         "started": now, "state": state, "message": message,
                                         "node": node or None,
                                         "finished": None if state == "running" else now,
                                         "result": None}},
                old[:max(0, len(old) - keep + 1)])
        self._retry(step, f"start a run of job {name}")
        return got[0]

    def finish_run(self, run_id: int, state: str, message: str | None,
                   result: dict[str, Any] | None, now: float) -> None:
        key = f"runs/{run_id:016d}"

        def step() -> bool | None:
            run, run_rev = self._get(key)
            if run is None:
                return None   # the job was removed while it ran
            job, job_rev = self._get(f"jobs/{run['job']}")
            if job is None:
                return None
            job["runs"] += 1
            job["failures"] += int(state == "failed")
            run.update(state=state, message=message, result=result or None, finished=now)
            return self._commit({key: run_rev, f"jobs/{run['job']}": job_rev},
                                {key: run, f"jobs/{run['job']}": job})
        self._retry(step, f"finish run {run_id}")

    def interrupt_running(self, now: float, node: str = "") -> int:
        count: list[int] = [0]

        def step() -> bool | None:
            # Only this node's: another node's runs may be going on right now.
            running = [(k, d, rev) for k, d, rev in self._list("runs/")
                       if d["state"] == "running" and d.get("node") in (None, node)]
            count[0] = len(running)
            if not running:
                return None
            return self._commit({k: rev for k, _, rev in running},
                                {k: {**d, "state": "interrupted", "finished": now,
                                     "message": "the daemon stopped during the run"}
                                 for k, d, _ in running})
        self._retry(step, "interrupt running job runs")
        return count[0]

    def job_runs(self, name: str, limit: int) -> list[RunRow]:
        runs = sorted((_run(d) for _, d, _ in self._runs_of(name)), key=lambda r: -r.id)
        return runs[:limit]

    def job_run(self, run_id: int) -> RunRow | None:
        d, _ = self._get(f"runs/{run_id:016d}")
        return None if d is None else _run(d)
