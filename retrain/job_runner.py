"""The job runner: takes jobs from the store (`retrain.jobs`), runs each one's cycle, records its progress and outcome.

The cycle runs in the runner's worker thread; a second thread renews the job's lease every lease/3 seconds and picks
up cancel requests. The cycle sees a `JobProgress`: it calls it at each step boundary (and may call it inside long
steps); the call records the step in the store and raises `JobCancelled` once the job is cancelled (or its lease was
lost), so cancelling is cooperative and never leaves a step half-recorded. `progress.cancelled` and
`progress.check()` serve a step that wants to look without reporting.

A runner killed at any moment leaves its job `running` with a lease that expires; the next runner to poll takes it
again and calls the cycle with `resume=True` in the same work directory, where the cycle finds the records of the
steps it finished and does not repeat them.

The cycle is reached through a `CycleAdapter`: `RealCycle` calls `retrain.cycle.run_cycle`; `FunctionCycle` wraps
any function of the same shape (tests, custom flows).
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
from typing import Any, Callable, Protocol

from retrain.jobs import Job, JobCancelled, JobSpec, JobState, JobsConfig, JobStore, LeaseLost

log = logging.getLogger(__name__)

RESULT_FILE = "job_result.json"
REPORT_FILE = "report.html"


class JobProgress:
    """The progress callback handed to the cycle: `progress(step, status="start", message="")`.

    `status` is free text; "done" and "skipped" (a step found already done on resume) mark the step completed.
    Raises JobCancelled when the job was cancelled or this runner lost it.
    """

    def __init__(self, store: JobStore, job: Job, owner: str, cancel: threading.Event, lost: threading.Event) -> None:
        self.store, self.job, self.owner = store, job, owner
        self._cancel, self._lost = cancel, lost

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled (for long steps that poll between batches)."""
        if self._cancel.is_set():
            raise JobCancelled("lease lost" if self._lost.is_set() else "job cancelled")

    def __call__(self, step: Any = "", status: Any = "start", message: Any = "", **extra: Any) -> None:
        self.check()  # a cancelled job records nothing more
        step, status = str(getattr(step, "value", step)), str(getattr(status, "value", status))
        text = str(message) + ("" if not extra else " " + json.dumps(extra, default=str, sort_keys=True))
        try:
            self.store.record_step(self.job.id, self.owner, step, status, text.strip())
        except LeaseLost:
            self._lost.set()
            self._cancel.set()
        except sqlite3.Error as exc:  # progress is advisory: a busy database must not fail the cycle
            log.warning("job %s: could not record step %s: %s", self.job.id, step, exc)
        self.check()


class CycleAdapter(Protocol):
    """How the runner and the control service reach a cycle implementation."""

    def validate(self, spec: JobSpec) -> None:
        """Raise ValueError with the reason when the cycle could not run `spec` (bad options...)."""

    def run(self, job: Job, work_dir: Path, progress: JobProgress, resume: bool) -> dict:
        """Run (or resume) the job's cycle in `work_dir`; return its result as a JSON-able dict."""

    def outcome(self, result: dict) -> tuple[JobState, str]:
        """(SUCCEEDED or REJECTED, reason) from a result."""


def gate_outcome(result: dict) -> tuple[JobState, str]:
    """SUCCEEDED when the result says the student was promoted, else REJECTED with the gate's reasons.

    Reads `promoted` (bool), else `decision` ("promote"/"promoted" vs anything else), else `gate.passed`; the reasons
    from `gate.reasons`, `reasons` or `gate.failed`.
    """
    gate = result.get("gate") if isinstance(result.get("gate"), dict) else {}
    if "promoted" in result:
        ok = bool(result["promoted"])
    elif "decision" in result:
        ok = str(result["decision"]).lower() in ("promote", "promoted", "pass", "passed")
    else:
        ok = bool(gate.get("passed", False))
    reasons = gate.get("reasons") or result.get("reasons") or gate.get("failed") or []
    if isinstance(reasons, dict):
        reasons = [f"{k}: {v}" for k, v in reasons.items()]
    text = "; ".join(str(r) for r in reasons) if isinstance(reasons, (list, tuple)) else str(reasons)
    return (JobState.SUCCEEDED, "") if ok else (JobState.REJECTED, text or "a gate failed")


class FunctionCycle:
    """A cycle given as a function `fn(job, work_dir, progress, resume) -> dict` (stand-ins, custom flows)."""

    def __init__(self, fn: Callable[[Job, Path, JobProgress, bool], dict],
                 validate: Callable[[JobSpec], None] | None = None) -> None:
        self.fn, self._validate = fn, validate

    def validate(self, spec: JobSpec) -> None:
        if self._validate is not None:
            self._validate(spec)

    def run(self, job: Job, work_dir: Path, progress: JobProgress, resume: bool) -> dict:
        return self.fn(job, work_dir, progress, resume)

    def outcome(self, result: dict) -> tuple[JobState, str]:
        return gate_outcome(result)


def _jsonable(result: Any) -> dict:
    """A cycle result (pydantic model, dataclass, dict) as a JSON-able dict."""
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    if hasattr(result, "__dataclass_fields__"):
        import dataclasses

        return json.loads(json.dumps(dataclasses.asdict(result), default=str))
    if isinstance(result, dict):
        return json.loads(json.dumps(result, default=str))
    raise TypeError(f"the cycle returned {type(result).__name__}, not a result record")


def write_json_atomic(doc: dict, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def default_reporter(lake_dir: Path | None) -> Callable[[Job, Path], Path | None]:
    """Render `retrain.report`'s HTML report next to the result (imported lazily: matplotlib is slow to load)."""

    def render(job: Job, result_path: Path) -> Path | None:
        from retrain.report import render_report

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
            result = _jsonable(self.cycle.run(job, work, progress, True))
            if lost.is_set():
                return
            result_path = write_json_atomic(result, work / RESULT_FILE)
            state, reason = self.cycle.outcome(result)
            self._finish(job, state, reason, str(result_path), self._report(job, result_path))
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
