"""How the job runner and the control service reach a cycle: the `CycleAdapter` protocol, `RealCycle` (the flywheel
cycle, `retrain.cycle.cycle.run_cycle`, configured from a job), `FunctionCycle` (any function of the same shape:
stand-ins in tests, custom flows), and `JobProgress`, the progress callback a cycle reports to.

`JobProgress` records each step in the store and raises `JobCancelled` once the job is cancelled (or its runner lost
it), so cancelling is cooperative and never leaves a step half-recorded.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from ingest.lake import model_id, pair_id
from retrain.cycle.registry import Registry
from retrain.cycle.results import CycleResult
from retrain.jobs.models import Job, JobCancelled, JobSpec, JobState, JobsConfig, LeaseLost, NotConfigured
from retrain.jobs.store import JobStore

log = logging.getLogger(__name__)


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
    """SUCCEEDED when a result document says the student was promoted, else REJECTED with the gate's reasons (for
    cycles other than the real one, whose result is typed: `RealCycle.outcome`).

    Reads `status` ("promoted" / "rejected", as `retrain.cycle.results.CycleResult` has it), else `promoted` (bool), else
    `decision`, else `passed`, else `gate.passed`; the reasons from `reasons`, `gate.reasons` or `gate.failed`.
    """
    gate = result.get("gate") if isinstance(result.get("gate"), dict) else {}
    if result.get("status") in ("promoted", "rejected"):  # retrain.cycle.results.CycleResult
        ok = result["status"] == "promoted"
    elif "promoted" in result:
        ok = bool(result["promoted"])
    elif "decision" in result:
        ok = str(result["decision"]).lower() in ("promote", "promoted", "pass", "passed")
    elif "passed" in result:  # a cycle that ran without registering
        ok = bool(result["passed"])
    else:
        ok = bool(gate.get("passed", False))
    reasons = result.get("reasons") or gate.get("reasons") or gate.get("failed") or []
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


class RealCycle:
    """`retrain.cycle.cycle.run_cycle` behind the adapter.

    The CycleConfig of a job: `lake` and `registry` from the runner's JobsConfig; `student` and `targets` from the
    job (no targets: every target; the verification chip is added when missing, it is the one the candidate is
    verified with); mining from the job's query, or its score rule (`MiningConfig` min_score, max_windows = top_k,
    pair, window statistic max_score; a rule restricted to conditions becomes a query over the pair's `scenarios`
    windows of those conditions, best first); every other CycleConfig field from the job's options (nested dicts
    for mining, finetune, compress, verification, gates, ...).
    """

    RESERVED = frozenset({"lake", "registry", "student", "targets"})

    def __init__(self, config: JobsConfig) -> None:
        self.jobs = config

    def build(self, spec: JobSpec):
        """The job's CycleConfig; ValueError (pydantic's ValidationError included) naming what is wrong."""
        from retrain.cycle.cycle import CycleConfig  # the cycle's modules load torch: only when a cycle is built

        if self.jobs.lake_dir is None or self.jobs.registry_dir is None:
            raise NotConfigured("this service runs no cycles: set [jobs] lake_dir and registry_dir")
        taken = sorted(self.RESERVED & set(spec.options))
        if taken:
            raise ValueError(f"options may not set {taken}: they come from the job and the service's configuration")
        opts = dict(spec.options)
        mining = dict(opts.pop("mining", None) or {})
        if mining.get("sql") is not None:
            raise ValueError("options.mining.sql: the mining query is the job's own (sql or score rule)")
        if spec.sql is not None:
            mining["sql"] = spec.sql
        else:
            mining.update(self._score_mining(spec, opts.get("teacher", "teacher")))
        chip = (opts.get("verification") or {}).get("chip") or _default_verification_chip()
        targets = list(spec.targets) + ([chip] if spec.targets and chip not in spec.targets else []) or None
        return CycleConfig(lake=self.jobs.lake_dir, registry=self.jobs.registry_dir, student=spec.student,
                           targets=targets, mining=mining, **opts)

    def _score_mining(self, spec: JobSpec, teacher: str) -> dict:
        rule = spec.score_rule
        out: dict[str, Any] = {"min_score": rule.min_score, "window_statistic": "max_score"}
        if rule.top_k:
            out["max_windows"] = rule.top_k
        if rule.pair:
            out["pair"] = rule.pair
        filters = [(col, vals) for col, vals in (("road_type", rule.road_types), ("lighting", rule.lightings),
                                                 ("weather", rule.weathers)) if vals]
        if not filters:
            return out
        pair = rule.pair
        if not pair:  # the pair the cycle will use: registry teacher and the student's promoted version
            reg = Registry(self.jobs.registry_dir)
            try:
                name, _, version = teacher.partition(":")
                t, s = reg.get(name, version or None, verify=False), reg.get(spec.student, verify=False)
            except KeyError as exc:
                raise ValueError(f"cannot resolve the pair to mine: {exc}") from None
            pair = pair_id(model_id(t.name, t.version), model_id(s.name, s.version))
        # names were checked against the frame contract and the pair id pattern: safe to quote
        where = " AND ".join(f"{col}::VARCHAR IN ({', '.join(repr(v) for v in vals)})" for col, vals in filters)
        limit = f" LIMIT {rule.top_k}" if rule.top_k else ""
        return {"sql": "SELECT drive_id, window_start_seq, window_end_seq, max_score AS score FROM scenarios "
                       f"WHERE pair = '{pair}' AND max_score >= {rule.min_score!r} AND {where} "
                       f"ORDER BY max_score DESC, drive_id, window_start_seq{limit}"}

    def validate(self, spec: JobSpec) -> None:
        self.build(spec)

    def run(self, job: Job, work_dir: Path, progress: JobProgress, resume: bool) -> dict:
        from retrain.cycle.cycle import run_cycle

        config = self.build(job.spec)
        last = [0.0]
        statuses = {"started": "start", "done": "done", "resumed": "skipped"}

        def tell(step: str, done: int, total: int, info: dict) -> None:
            status = statuses.get(str((info or {}).get("status")))
            if status is not None:
                progress(step, status)
            elif time.monotonic() - last[0] >= 2.0:  # inside a step: recorded now and then, cancel checked always
                last[0] = time.monotonic()
                simple = {k: v for k, v in (info or {}).items() if isinstance(v, (str, int, float))}
                progress(step, "progress", f"{done}/{total} {json.dumps(simple, sort_keys=True)}")
            else:
                progress.check()

        return jsonable(run_cycle(config, work_dir, progress=tell, resume=resume))

    def outcome(self, result: dict) -> tuple[JobState, str]:
        """From the cycle's typed result: SUCCEEDED when promoted (or, not registered, when its gates passed)."""
        r = CycleResult.model_validate(result)
        ok = r.passed if r.status == "not registered" else r.status == "promoted"
        return (JobState.SUCCEEDED, "") if ok else (JobState.REJECTED, "; ".join(r.reasons) or "a gate failed")


def _default_verification_chip() -> str:
    from retrain.cycle.cycle import CycleConfig

    # read through CycleConfig: where VerificationConfig lives is the cycle's business
    return CycleConfig.model_fields["verification"].default_factory().chip


def jsonable(result: Any) -> dict:
    """A cycle result (pydantic model, dataclass, dict) as a JSON-able dict."""
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    if hasattr(result, "__dataclass_fields__"):
        import dataclasses

        return json.loads(json.dumps(dataclasses.asdict(result), default=str))
    if isinstance(result, dict):
        return json.loads(json.dumps(result, default=str))
    raise TypeError(f"the cycle returned {type(result).__name__}, not a result record")
