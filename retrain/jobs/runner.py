"""The job runner: takes jobs from the store (`retrain.jobs.store`), runs each one's cycle, records its progress and outcome.

The cycle runs in the runner's worker thread; a second thread renews the job's lease every lease/3 seconds and picks
up cancel requests. The cycle sees a `JobProgress`: it calls it at each step boundary (and may call it inside long
steps); the call records the step in the store and raises `JobCancelled` once the job is cancelled (or its lease was
lost), so cancelling is cooperative and never leaves a step half-recorded. `progress.cancelled` and
`progress.check()` serve a step that wants to look without reporting.

A runner killed at any moment leaves its job `running` with a lease that expires; the next runner to poll takes it
again and calls the cycle with `resume=True` in the same work directory, where the cycle finds the records of the
steps it finished and does not repeat them.

The cycle is reached through a `CycleAdapter` (`retrain.jobs.adapter`): `RealCycle` calls
`retrain.cycle.cycle.run_cycle`; `FunctionCycle` wraps any function of the same shape (tests, custom flows).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from ingest.lake import write_json_atomic
from retrain.jobs.adapter import CycleAdapter, JobProgress, jsonable
from retrain.jobs.models import Job, JobState, JobsConfig, LeaseLost
from retrain.jobs.store import JobStore

log = logging.getLogger(__name__)

RESULT_FILE = "job_result.json"
REPORT_FILE = "report.html"


def default_reporter(lake_dir: Path | None) -> Callable[[Job, Path], Path | None]:
    """Render `retrain.cycle.report`'s HTML report next to the result (imported lazily: matplotlib is slow to load)."""

    def render(job: Job, result_path: Path) -> Path | None:
        from retrain.cycle.report import render_report

        return render_report(json.loads(result_path.read_text()), Path(job.work_dir) / REPORT_FILE,
                             lake=lake_dir, job=job.model_dump(mode="json"))

    return render


class JobRunner:
    """Claims and runs jobs, one at a time per runner; start several runners (threads or processes) for more."""

    def __init__(self, store: JobStore, cycle: CycleAdapter, config: JobsConfig, owner: str | None = None,
                 reporter: Callable[[Job, Path], Path | None] | None = None) -> None:
        self.store, self.cycle, self.config = store, cycle, config
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.reporter = reporter
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------------------- loop

    def run_once(self) -> Job | None:
        """Claim one job and run it to its end; None when nothing was claimable."""
        job = self.store.claim(self.owner, self.config.lease_s, self.config.max_attempts)
        if job is None:
            return None
        log.info("runner %s took job %s (attempt %d, student %s)", self.owner, job.id, job.attempts, job.student)
        self._run(job)
        return self.store.get(job.id)

    def run_forever(self, stop: threading.Event) -> None:
        """Poll and run jobs until `stop` is set (checked between jobs; a running job finishes first)."""
        while not stop.is_set():
            try:
                ran = self.run_once()
            except sqlite3.Error as exc:  # a locked or briefly unavailable database: try again next poll
                log.warning("runner %s: job store error: %s", self.owner, exc)
                ran = None
            if ran is None:
                stop.wait(self.config.poll_interval_s)

    def start(self) -> "JobRunner":
        """Run in a background thread until `stop()`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, args=(self._stop,), name=f"runner-{self.owner}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------------------------------- job

    def _beat(self, job: Job, cancel: threading.Event, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.config.lease_s / 3):
            try:
                if self.store.heartbeat(job.id, self.owner, self.config.lease_s):
                    cancel.set()
            except LeaseLost:
                log.error("runner %s lost job %s (lease expired, another runner took it)", self.owner, job.id)
                lost.set()
                cancel.set()
                return
            except sqlite3.Error as exc:
                log.warning("job %s: heartbeat failed: %s", job.id, exc)

    def _finish(self, job: Job, state: JobState, error: str = "", result: str = "", report: str = "") -> None:
        try:
            self.store.finish(job.id, self.owner, state, error, result, report)
        except LeaseLost as exc:
            log.error("job %s ended as %s here, but %s", job.id, state.value, exc)

    def _run(self, job: Job) -> None:
        work = Path(job.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        if job.cancel_requested:
            self._finish(job, JobState.CANCELLED, job.error or "cancelled before it started")
            return
        cancel, lost, done = threading.Event(), threading.Event(), threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, cancel, lost, done), daemon=True,
                                name=f"heartbeat-{job.id}")
        beat.start()
        progress = JobProgress(self.store, job, self.owner, cancel, lost)
        try:
            # resume=True always: a fresh work dir has nothing to resume, a taken-over one continues
            result = jsonable(self.cycle.run(job, work, progress, True))
            if lost.is_set():
                return
            result_path = write_json_atomic(work / RESULT_FILE, result, indent=2)
            state, reason = self.cycle.outcome(result)
            ended = job.model_copy(update={"state": state, "error": reason})  # what the report shows
            self._finish(job, state, reason, str(result_path), self._report(ended, result_path))
        except Exception as exc:
            if lost.is_set():
                log.error("job %s: the cycle stopped after this runner lost the job (%r)", job.id, exc)
            elif cancel.is_set():
                self._finish(job, JobState.CANCELLED, self.store.get(job.id).error or "cancelled")
            else:
                log.exception("job %s failed", job.id)
                self._finish(job, JobState.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            done.set()
            beat.join()

    def _report(self, job: Job, result_path: Path) -> str:
        if self.reporter is None:
            return ""
        try:
            path = self.reporter(job, result_path)
            return str(path) if path else ""
        except Exception:  # a broken report must not fail a cycle that completed
            log.exception("job %s: report could not be rendered", job.id)
            return ""
