"""Retraining jobs: the SQLite store's rules (idempotency, one running job per student, cancel) and the runner
(progress, outcomes, cancel, racing runners, a runner killed with SIGKILL and its job resumed by another)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from retrain.jobs.adapter import FunctionCycle
from retrain.jobs.runner import JobRunner
from retrain.jobs.models import (JobFinished, JobNotFound, JobSpec, JobsConfig, JobState, RequestConflict, ScoreRule,
                                 StudentBusy)
from retrain.jobs.store import JobStore

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("mine", "snapshot", "baseline", "finetune", "compress", "verify", "gate", "register")


def stand_in_cycle(job, work_dir: Path, progress, resume: bool) -> dict:
    """Behaves like run_cycle: each step writes <step>.json into the work dir and a resumed cycle skips recorded steps.

    Every execution of a step is appended to executions.log. Options: `delay` (s per step), `block_at` (a step that
    waits until the job is cancelled), `promote` (the gate's decision), `fail_at` (a step that raises). The
    environment variable STAND_IN_BLOCK names a step that blocks for good (to be killed there).
    """
    opts = job.spec.options
    for step in STEPS:
        record = work_dir / f"{step}.json"
        if resume and record.exists():
            progress(step, "skipped")
            continue
        progress(step, "start")
        with open(work_dir / "executions.log", "a") as fh:
            fh.write(step + "\n")
        if step == os.environ.get("STAND_IN_BLOCK"):
            while True:
                time.sleep(0.05)
        if step == opts.get("fail_at"):
            raise RuntimeError(f"{step} broke")
        if step == opts.get("block_at"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                progress.check()
                time.sleep(0.02)
        time.sleep(opts.get("delay", 0.0))
        record.write_text(json.dumps({"step": step}))
        progress(step, "done")
    promoted = opts.get("promote", True)
    return {"promoted": promoted, "gate": {"passed": promoted, "reasons": [] if promoted else ["merge ADE up 12%"]}}


def cfg(tmp_path: Path, **kw) -> JobsConfig:
    return JobsConfig(**{"db_path": tmp_path / "jobs.sqlite", "work_root": tmp_path / "work", "lease_s": 0.6,
                         "poll_interval_s": 0.05, **kw})


def spec(student="student", **options) -> JobSpec:
    return JobSpec(student=student, sql="SELECT * FROM scenarios WHERE NOT passed", targets=("cpu",),
                   options=options)


def runner(config: JobsConfig, owner: str) -> JobRunner:
    return JobRunner(JobStore.from_config(config), FunctionCycle(stand_in_cycle), config, owner=owner)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_create_is_idempotent_per_request_id_and_refuses_a_busy_student(tmp_path):
    store = JobStore.from_config(cfg(tmp_path))
    job, created = store.create(spec(), request_id="req-1", requested_by="alice")
    assert created and job.state == JobState.QUEUED and job.requested_by == "alice"
    assert Path(job.work_dir).parent == (tmp_path / "work").resolve()
    again, created = store.create(spec(), request_id="req-1")
    assert not created and again.id == job.id
    with pytest.raises(RequestConflict):
        store.create(spec(delay=1), request_id="req-1")
    with pytest.raises(StudentBusy, match=job.id):
        store.create(spec())
    behind, _ = store.create(spec(), queue_behind=True)
    other, _ = store.create(spec("other"))
    assert [j.id for j in store.list()] == [other.id, behind.id, job.id]
    assert [j.id for j in store.list(student="student")] == [behind.id, job.id]
    page = store.list(limit=2)
    assert [j.id for j in store.list(limit=2, before=(page[-1].created_at, page[-1].id))] == [job.id]
    assert store.list(states=[JobState.RUNNING]) == []
    with pytest.raises(JobNotFound):
        store.get("nope")
    # the store reopens with its schema version, from another process' point of view too
    assert JobStore(tmp_path / "jobs.sqlite").get(job.id).spec == job.spec


@pytest.mark.parametrize("bad", [
    dict(student="s", sql="SELECT 1", score_rule=ScoreRule(min_score=1)),
    dict(student="s"),
    dict(student="a/b", sql="SELECT 1"),
    dict(student="s", sql="SELECT 1", targets=("cpu", "cpu")),
    dict(student="s", score_rule=dict(min_score=1, road_types=["motorway"])),
    dict(student="s", score_rule=dict(min_score=-1)),
])
def test_spec_validation(bad):
    with pytest.raises(ValidationError):
        JobSpec(**bad)


def test_database_refuses_a_second_running_job_of_a_student(tmp_path):
    store = JobStore.from_config(cfg(tmp_path))
    a, _ = store.create(spec())
    b, _ = store.create(spec(), queue_behind=True)
    con = sqlite3.connect(tmp_path / "jobs.sqlite")
    con.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (a.id,))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        con.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (b.id,))
    con.close()


def test_racing_runners_never_run_two_jobs_of_one_student(tmp_path):
    config = cfg(tmp_path)
    store = JobStore.from_config(config)
    # each job outlives its lease several times: only heartbeats keep the other runner off it
    jobs = [store.create(spec(delay=0.15), queue_behind=True)[0] for _ in range(2)]
    jobs.append(store.create(spec("other", delay=0.15))[0])
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def tracked(job, work_dir, progress, resume):
        with lock:
            running[job.student] = running.get(job.student, 0) + 1
            peak[job.student] = max(peak.get(job.student, 0), running[job.student])
        try:
            return stand_in_cycle(job, work_dir, progress, resume)
        finally:
            with lock:
                running[job.student] -= 1

    stop = threading.Event()
    threads = [threading.Thread(target=JobRunner(JobStore.from_config(config), FunctionCycle(tracked), config,
                                                 owner=f"r{i}").run_forever, args=(stop,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(store.get(j.id).state in (JobState.SUCCEEDED,) for j in jobs), 60, "three jobs")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert peak == {"student": 1, "other": 1}
    done = [store.get(j.id) for j in jobs]
    assert all(j.attempts == 1 and j.steps_done == list(STEPS) for j in done)
    first, second = sorted(done[:2], key=lambda j: j.started_at)
    assert second.started_at >= first.finished_at  # queued behind: it started only after the first ended
    owners = {e["message"] for j in done for e in store.events(j.id) if e["kind"] == "claimed"}
    assert owners == {"r0", "r1"}  # both runners worked


def test_outcomes_are_recorded_with_result_and_reasons(tmp_path):
    config = cfg(tmp_path)
    store = JobStore.from_config(config)
    r = runner(config, "r")
    ok = store.create(spec("a"))[0]
    rejected = store.create(spec("b", promote=False))[0]
    broken = store.create(spec("c", fail_at="compress"))[0]
    results = {j.id: j for j in iter(r.run_once, None)}
    assert results[ok.id].state == JobState.SUCCEEDED and results[ok.id].steps_done == list(STEPS)
    assert json.loads(Path(results[ok.id].result_path).read_text())["promoted"] is True
    assert results[rejected.id].state == JobState.REJECTED and "merge ADE up 12%" in results[rejected.id].error
    b = results[broken.id]
    assert b.state == JobState.FAILED and "RuntimeError: compress broke" in b.error
    assert b.steps_done == ["mine", "snapshot", "baseline", "finetune"] and b.current_step == "compress"
    assert all(j.finished_at >= j.started_at >= j.created_at for j in results.values())


def test_cancel_queued_running_and_finished_jobs(tmp_path):
    config = cfg(tmp_path)
    store = JobStore.from_config(config)
    queued = store.create(spec("q"))[0]
    assert store.cancel(queued.id).state == JobState.CANCELLED
    assert store.cancel(queued.id).state == JobState.CANCELLED  # idempotent
    assert runner(config, "r").run_once() is None  # nothing left to run

    blocking = store.create(spec("b", block_at="finetune"))[0]
    out: list = []
    t = threading.Thread(target=lambda: out.append(runner(config, "r").run_once()))
    t.start()
    wait_for(lambda: store.get(blocking.id).current_step == "finetune", what="finetune")
    assert store.cancel(blocking.id, "operator changed their mind").state == JobState.RUNNING  # cooperative
    t.join(20)
    job = out[0]
    assert job.state == JobState.CANCELLED and job.error == "operator changed their mind"
    assert job.steps_done == ["mine", "snapshot", "baseline"]
    executed = (Path(job.work_dir) / "executions.log").read_text().split()
    assert executed == ["mine", "snapshot", "baseline", "finetune"]  # nothing after the cancel
    with pytest.raises(JobNotFound):
        store.cancel("missing")
    done = store.create(spec("d"))[0]
    runner(config, "r").run_once()
    with pytest.raises(JobFinished):
        store.cancel(done.id)


def test_killed_runner_job_is_resumed_by_another_without_repeating_steps(tmp_path):
    config = cfg(tmp_path, lease_s=1.0)
    store = JobStore.from_config(config)
    job = store.create(spec())[0]
    code = ("import sys; from pathlib import Path; from retrain.jobs.models import JobsConfig; "
            "from retrain.jobs.store import JobStore; from retrain.jobs.adapter import FunctionCycle; "
            "from retrain.jobs.runner import JobRunner; from tests.retrain.test_jobs import stand_in_cycle; "
            "c = JobsConfig(db_path=Path(sys.argv[1]), work_root=Path(sys.argv[2]), lease_s=1.0); "
            "JobRunner(JobStore.from_config(c), FunctionCycle(stand_in_cycle), c, owner='doomed').run_once()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(config.db_path), str(config.work_root)], cwd=ROOT,
                            env={**os.environ, "STAND_IN_BLOCK": "finetune"})
    try:
        wait_for(lambda: store.get(job.id).current_step == "finetune", 60, "the doomed runner to reach finetune")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed = store.get(job.id)
    assert killed.state == JobState.RUNNING and killed.lease_owner == "doomed"
    assert killed.steps_done == ["mine", "snapshot", "baseline"]
    rescuer = runner(config, "rescuer")
    assert rescuer.run_once() is None or killed.lease_expires < time.time()  # a live lease is not taken
    done = wait_for(rescuer.run_once, 10, "the expired lease")
    assert done.id == job.id and done.state == JobState.SUCCEEDED
    assert done.attempts == 2 and done.steps_done == list(STEPS)
    executed = (Path(done.work_dir) / "executions.log").read_text().split()
    # the step it was killed in runs again; the steps finished before it do not
    assert executed == ["mine", "snapshot", "baseline", "finetune", "finetune", "compress", "verify", "gate", "register"]
    assert any(e["kind"] == "claimed" and "rescuer resumes after doomed" in e["message"]
               for e in store.events(job.id))


def test_a_job_whose_runners_keep_dying_fails(tmp_path):
    config = cfg(tmp_path, lease_s=0.2, max_attempts=2)
    store = JobStore.from_config(config)
    job = store.create(spec())[0]
    for owner in ("dead-1", "dead-2"):  # claimed, then never renewed: the runner "died"
        assert store.claim(owner, config.lease_s, config.max_attempts).id == job.id
        time.sleep(0.25)
    assert store.claim("third", config.lease_s, config.max_attempts) is None
    failed = store.get(job.id)
    assert failed.state == JobState.FAILED and "died 2 times" in failed.error


# ------------------------------------------------------------------------------------------------------- policy


def policy_lake(tmp_path: Path, night_frames: int, night_score: float, day: str) -> Path:
    """Divergences of student 1.0: `night_frames` night-merge frames at `night_score`, 50 day-highway frames at 0.5."""
    from tests.retrain.test_report import rows, write

    recs = [{"drive_id": "d1", "seq": s, "teacher_name": "teacher", "teacher_version": "1.0",
             "student_name": "student", "student_version": "1.0", "road_type": "merge", "lighting": "night",
             "weather": "clear", "score": night_score} for s in range(night_frames)]
    recs += [{"drive_id": "d2", "seq": s, "teacher_name": "teacher", "teacher_version": "1.0",
              "student_name": "student", "student_version": "1.0", "road_type": "highway", "lighting": "day",
              "weather": "clear", "score": 0.5} for s in range(50)]
    lake = tmp_path / "lake"
    write(lake, "divergences", rows("divergences", recs), 0, date=day, pair="teacher-1.0__student-1.0")
    return lake


def test_policy_triggers_once_above_threshold_and_respects_cooldown_and_min_frames(tmp_path):
    from datetime import date

    from retrain.jobs.policy import PolicyConfig, evaluate
    from shadow.catalog import Catalog

    today = date.today().isoformat()
    config = cfg(tmp_path)
    store = JobStore.from_config(config)
    policy = PolicyConfig.model_validate({"rules": [
        {"name": "night-merge", "student": "student", "student_version": "1.0", "road_type": "merge",
         "lighting": "night", "metric": "mean_score", "threshold": 1.5, "min_frames": 20, "cooldown_s": 3600,
         "targets": ["cpu"]}]})
    few = Catalog(policy_lake(tmp_path / "few", 10, 3.0, today))
    [d] = evaluate(few, policy, store)
    assert not d.triggered and d.frames == 10 and "min_frames" in d.reason and store.list() == []
    low = Catalog(policy_lake(tmp_path / "low", 40, 1.2, today))
    [d] = evaluate(low, policy, store)
    assert not d.triggered and abs(d.value - 1.2) < 1e-6 and "below" in d.reason  # the day frames do not count

    high = Catalog(policy_lake(tmp_path / "high", 40, 3.0, today))
    [d] = evaluate(high, policy, store, dry_run=True)
    assert not d.triggered and "would trigger" in d.reason and store.list() == []
    [d] = evaluate(high, policy, store)
    assert d.triggered and d.frames == 40 and d.pair == "teacher-1.0__student-1.0"
    job = store.get(d.job_id)
    assert job.requested_by == "policy:night-merge" and job.spec.targets == ("cpu",)
    rule = job.spec.score_rule
    assert rule.road_types == ("merge",) and rule.lightings == ("night",) and rule.pair == d.pair
    # again while the job is queued: nothing new
    [again] = evaluate(high, policy, store)
    assert not again.triggered and "already has job" in again.reason and len(store.list()) == 1
    # the job ends; within the cooldown still nothing, after it a second job
    claimed = store.claim("r", 5.0)
    store.finish(claimed.id, "r", JobState.REJECTED, "gate")
    [again] = evaluate(high, policy, store)
    assert not again.triggered and "cooldown" in again.reason and len(store.list()) == 1
    later = PolicyConfig.model_validate({"rules": [{**policy.rules[0].model_dump(), "cooldown_s": 0.0}]})
    [again] = evaluate(high, later, store)
    assert again.triggered and len(store.list()) == 2
    # old data falls out of the lookback window
    old = Catalog(policy_lake(tmp_path / "old", 40, 3.0, "2020-01-01"))
    [d] = evaluate(old, policy, JobStore(tmp_path / "other.sqlite"))
    assert d.frames == 0 and not d.triggered


def test_policy_rules_are_validated():
    from retrain.jobs.policy import PolicyConfig

    base = {"name": "r", "student": "s", "threshold": 1.0}
    for bad in ({**base}, {**base, "road_type": "motorway"}, {**base, "lighting": "night", "metric": "p99"},
                {**base, "lighting": "night", "extra": 1}):
        with pytest.raises(ValidationError):
            PolicyConfig.model_validate({"rules": [bad]})
    with pytest.raises(ValidationError, match="repeat"):
        PolicyConfig.model_validate({"rules": [{**base, "lighting": "night"}] * 2})


# --------------------------------------------------------------------------------- the real cycle, end to end


class _RunnerDied(BaseException):
    """Escapes the runner like a kill: no final state is written, the heartbeat stops, the lease runs out."""


@pytest.mark.slow
def test_real_cycle_runs_as_a_job_and_resumes_after_its_runner_died(tmp_path, tmp_path_factory):
    """retrain.cycle.cycle.run_cycle through RealCycle on test_cycle's tiny world: the first runner dies as verification
    starts, a second one resumes the job from its work dir (mine .. compress not redone) to a gate decision and a
    report drawn from the real CycleResult and the verification lake."""
    from retrain.jobs.adapter import RealCycle
    from retrain.jobs.runner import default_reporter
    from tests.retrain.test_cycle import config as cycle_config
    from tests.retrain.test_cycle import tiny_world

    world = tiny_world(tmp_path_factory.getbasetemp() / "flywheel-world")  # shared with test_cycle
    tiny = cycle_config(world).model_dump(mode="json", exclude={"lake", "registry", "student", "targets"})
    options = {k: tiny[k] for k in ("teacher", "mining", "finetune", "compress", "verification", "gates")}
    options["update_registry"] = False  # the world's registry is shared: judge, but do not promote
    config = cfg(tmp_path, lake_dir=world["lake"], registry_dir=world["registry"], lease_s=1.0)
    store = JobStore.from_config(config)
    real = RealCycle(config)
    with pytest.raises(ValidationError):  # the real CycleConfig refuses unknown options at trigger time
        real.validate(JobSpec(student="student", sql="SELECT 1", options={"surprise": 1}))
    job = store.create(JobSpec(student="student", score_rule=ScoreRule(min_score=0.0, top_k=14),
                               targets=("orin",), options=options))[0]
    assert real.build(job.spec).targets == ["orin", "cpu"]  # the verification chip joins the targets

    class DiesAtVerify(RealCycle):
        def run(self, job, work_dir, progress, resume):
            def dying(step, status="start", message="", **extra):
                if step == "verify" and status == "start":
                    raise _RunnerDied()
                progress(step, status, message, **extra)
            dying.check = progress.check
            return super().run(job, work_dir, dying, resume)

    with pytest.raises(_RunnerDied):
        JobRunner(store, DiesAtVerify(config), config, owner="first").run_once()
    left = store.get(job.id)
    assert left.state == JobState.RUNNING and left.steps_done == ["mine", "snapshot", "baseline", "finetune", "compress"]
    time.sleep(config.lease_s)
    second = JobRunner(JobStore.from_config(config), real, config, owner="second", reporter=default_reporter(None))
    done = second.run_once()
    assert done.id == job.id and done.attempts == 2, done.error
    assert done.state in (JobState.SUCCEEDED, JobState.REJECTED), done.error
    assert done.steps_done == list(STEPS)
    skipped = [e["step"] for e in store.events(job.id) if e["kind"] == "step" and e["message"] == "skipped"]
    assert skipped == ["mine", "snapshot", "baseline", "finetune", "compress"]
    result = json.loads(Path(done.result_path).read_text())
    assert result["status"] == "not registered" and result["targets"][0]["chip"] == "orin"
    assert {k for k, v in result["steps"].items() if v["resumed"]} == {"mine", "snapshot", "baseline", "finetune", "compress"}
    if done.state == JobState.REJECTED:
        assert done.error == "; ".join(result["reasons"])
    report = Path(done.report_path).read_text()
    assert report.count("data:image/png;base64,") >= 2  # condition bars and at least one bird's-eye scene
    assert "orin" in report and "estimate" in report
