"""The RetrainControl wire messages (proto/flywheel/v1/control.proto) to and from the job models, for the service
and its client alike; page tokens of ListJobs.
"""

from __future__ import annotations

import base64
import json

from pydantic import ValidationError

from retrain.jobs.models import InvalidRequest, Job, JobSpec, JobState, ScoreRule
from retrain.jobs.wire import control_pb2 as pb

MAX_PAGE = 500
DEFAULT_PAGE = 50
STATE_PB = {s: pb.JobState.Value(f"JOB_STATE_{s.value.upper()}") for s in JobState}
STATE_OF_PB = {v: k for k, v in STATE_PB.items()}


def _ts(t: float | None, msg) -> None:
    if t is not None:
        msg.FromNanoseconds(int(round(t * 1e9)))


def job_to_pb(job: Job) -> pb.Job:
    out = pb.Job(id=job.id, student=job.student, state=STATE_PB[job.state], targets=list(job.spec.targets),
                 options_json=json.dumps(job.spec.options, sort_keys=True), current_step=job.current_step,
                 steps_done=job.steps_done, attempts=job.attempts, error=job.error, result_path=job.result_path,
                 report_path=job.report_path, work_dir=job.work_dir, cancel_requested=job.cancel_requested,
                 request_id=job.request_id or "", requested_by=job.requested_by)
    if job.spec.sql is not None:
        out.sql = job.spec.sql
    else:
        out.score_rule.CopyFrom(pb.ScoreRule(**job.spec.score_rule.model_dump()))
    _ts(job.created_at, out.created_at)
    _ts(job.started_at, out.started_at)
    _ts(job.finished_at, out.finished_at)
    return out


def score_rule_from_pb(msg: pb.ScoreRule) -> ScoreRule:
    return ScoreRule(min_score=msg.min_score, top_k=msg.top_k, pair=msg.pair, road_types=tuple(msg.road_types),
                     lightings=tuple(msg.lightings), weathers=tuple(msg.weathers))


def job_from_pb(msg: pb.Job) -> Job:
    """The client side's view of a job, as the same model the store returns."""
    t = lambda ts, has: ts.ToNanoseconds() / 1e9 if has else None  # noqa: E731
    rule = score_rule_from_pb(msg.score_rule) if msg.WhichOneof("mining") == "score_rule" else None
    spec = JobSpec(student=msg.student, sql=msg.sql if rule is None else None, score_rule=rule,
                   targets=tuple(msg.targets), options=json.loads(msg.options_json or "{}"))
    return Job(id=msg.id, spec=spec, state=STATE_OF_PB[msg.state], request_id=msg.request_id or None,
               requested_by=msg.requested_by, created_at=t(msg.created_at, True),
               started_at=t(msg.started_at, msg.HasField("started_at")),
               finished_at=t(msg.finished_at, msg.HasField("finished_at")), current_step=msg.current_step,
               steps_done=list(msg.steps_done), attempts=msg.attempts, error=msg.error, result_path=msg.result_path,
               report_path=msg.report_path, work_dir=msg.work_dir, cancel_requested=msg.cancel_requested)


def spec_from_request(req: pb.TriggerRetrainRequest) -> JobSpec:
    """The JobSpec of a trigger request; InvalidRequest naming what is wrong."""
    try:
        options = json.loads(req.options_json) if req.options_json else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"options_json is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InvalidRequest("options_json must be a JSON object")
    which = req.WhichOneof("mining")
    try:
        return JobSpec(student=req.student, sql=req.sql if which == "sql" else None,
                       score_rule=score_rule_from_pb(req.score_rule) if which == "score_rule" else None,
                       targets=tuple(req.targets), options=options)
    except ValidationError as exc:
        raise InvalidRequest("; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                                       for e in exc.errors())) from None


def page_token(job: Job) -> str:
    return base64.urlsafe_b64encode(json.dumps([job.created_at, job.id]).encode()).decode()


def parse_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(created), str(job_id)
    except (ValueError, TypeError):
        raise InvalidRequest("page_token is not one this service issued") from None
