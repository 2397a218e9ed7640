"""The RetrainControl service on real gRPC loopback: trigger, get, list with paging, cancel, every refusal's status,
bearer tokens, health and reflection, and `serve()` with a job runner taking a triggered job to its end."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ingest.auth import issue_token
from retrain.jobs.wire import control_pb2 as pb
from retrain.jobs.client import ControlClient
from retrain.jobs.models import ControlConfig
from retrain.jobs.service import ControlService, serve
from retrain.jobs.adapter import FunctionCycle
from retrain.jobs.models import JobSpec, JobsConfig, JobState, ScoreRule
from retrain.jobs.store import JobStore
from tests.retrain.test_jobs import stand_in_cycle

SQL = "SELECT drive_id, window_start_seq, window_end_seq FROM scenarios WHERE NOT passed"


def refuse_unknown_options(spec: JobSpec) -> None:
    unknown = set(spec.options) - {"delay", "promote", "block_at"}
    if unknown:
        raise ValueError(f"unknown cycle option(s) {sorted(unknown)}")


class Loop:
    """An event loop in a thread, so that the tests drive the server with the blocking client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def jobs_config(tmp_path) -> JobsConfig:
    (tmp_path / "lake").mkdir()  # an empty lake still has every view: mining queries bind against it
    return JobsConfig(db_path=tmp_path / "jobs.sqlite", work_root=tmp_path / "work", lake_dir=tmp_path / "lake",
                      lease_s=1.0, poll_interval_s=0.05)


@pytest.fixture
def server(tmp_path, jobs_config):
    tokens = tmp_path / "tokens.json"
    token = issue_token(tokens, "alice")
    loop = Loop()
    service = ControlService(jobs_config, ControlConfig(listen="127.0.0.1:0", token_file=tokens, runners=0),
                             FunctionCycle(stand_in_cycle, refuse_unknown_options))
    port = loop.run(service.start())
    client = ControlClient(f"127.0.0.1:{port}", token)
    try:
        yield client, port, service
    finally:
        client.close()
        loop.run(service.stop(0))
        loop.close()


def spec(student="student", sql=SQL, **kw) -> JobSpec:
    return JobSpec(student=student, sql=sql, targets=kw.pop("targets", ("cpu", "orin")), **kw)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_trigger_get_list_cancel(server):
    client, _, service = server
    job = client.trigger(spec(), request_id="req-1")
    assert job.state == JobState.QUEUED and job.requested_by == "alice" and job.spec.targets == ("cpu", "orin")
    assert client.trigger(spec(), request_id="req-1").id == job.id  # a retried trigger is the same job
    assert client.get(job.id).spec.sql == SQL
    rule = ScoreRule(min_score=2.5, top_k=10, road_types=("merge",), lightings=("night",))
    by_score = client.trigger(JobSpec(student="other", score_rule=rule, targets=(), options={"delay": 0}))
    assert client.get(by_score.id).spec.score_rule == rule and by_score.spec.targets == ()
    behind = client.trigger(spec(), queue_behind=True)
    # paging: one job per page, newest first, each page's token leads to the next
    seen, token = [], ""
    stub_list = client.stub.ListJobs
    while True:
        resp = stub_list(pb.ListJobsRequest(page_size=1, page_token=token), metadata=client.metadata)
        seen += [j.id for j in resp.jobs]
        token = resp.next_page_token
        if not token:
            break
    assert seen == [behind.id, by_score.id, job.id]
    assert [j.id for j in client.list(student="student")] == [behind.id, job.id]
    assert client.list(states=[JobState.RUNNING]) == []
    cancelled = client.cancel(job.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.error == "cancelled by alice"
    assert cancelled.finished_at >= cancelled.created_at
    assert [j.id for j in client.list(states=[JobState.CANCELLED])] == [job.id]
    assert service.store.get(job.id).state == JobState.CANCELLED


@pytest.mark.parametrize("make, status, reason", [
    (lambda: spec(sql="SELEC drive_id FROM scenarios"), "INVALID_ARGUMENT", "does not parse"),
    (lambda: spec(sql="DELETE FROM scenarios"), "INVALID_ARGUMENT", "refused"),
    (lambda: spec(sql="COPY (SELECT 1) TO 'x.csv'"), "INVALID_ARGUMENT", "refused"),
    (lambda: spec(sql="SELECT 1; SELECT 2"), "INVALID_ARGUMENT", "one statement"),
    (lambda: spec(sql="SELECT * FROM no_such_table"), "INVALID_ARGUMENT", "does not bind"),
    (lambda: spec(sql="SELECT no_such_column FROM scenarios"), "INVALID_ARGUMENT", "does not bind"),
    (lambda: spec(sql="SELECT drive_id, score FROM divergences"), "INVALID_ARGUMENT", "must return drive_id and seq"),
    (lambda: spec(targets=("cpu", "tpu9")), "INVALID_ARGUMENT", "unknown target tpu9; known targets: "),
    (lambda: spec(options={"epochs_x": 3}), "INVALID_ARGUMENT", "unknown cycle option"),
])
def test_trigger_refusals_name_the_reason(server, make, status, reason):
    client = server[0]
    code, details = code_of(lambda: client.trigger(make()))
    assert code == getattr(grpc.StatusCode, status) and reason in details, details
    assert client.list() == []  # nothing was queued


def test_request_level_refusals(server):
    client, _, _ = server
    stub, md = client.stub, client.metadata
    code, details = code_of(lambda: stub.TriggerRetrain(pb.TriggerRetrainRequest(student="s", targets=["cpu"]),
                                                        metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exactly one of" in details
    req = pb.TriggerRetrainRequest(student="s", sql=SQL, options_json="[1, 2]")
    assert code_of(lambda: stub.TriggerRetrain(req, metadata=md))[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad_rule = pb.TriggerRetrainRequest(student="s", score_rule=pb.ScoreRule(min_score=1, weathers=["hail"]))
    code, details = code_of(lambda: stub.TriggerRetrain(bad_rule, metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hail" in details
    code, details = code_of(lambda: stub.ListJobs(pb.ListJobsRequest(page_token="garbage!"), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
    code, details = code_of(lambda: stub.ListJobs(pb.ListJobsRequest(states=[0]), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_conflicts_and_missing_jobs(server):
    client, _, service = server
    first = client.trigger(spec(), request_id="r-1")
    code, details = code_of(lambda: client.trigger(spec()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and first.id in details
    code, details = code_of(lambda: client.trigger(spec(targets=("cpu",)), request_id="r-1"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "r-1" in details
    assert code_of(lambda: client.get("20990101-000000-deadbeef"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.cancel("nope"))[0] == grpc.StatusCode.NOT_FOUND
    # a job that already ended cannot be cancelled
    store = service.store
    claimed = store.claim("r", 5.0)
    store.finish(claimed.id, "r", JobState.SUCCEEDED)
    code, details = code_of(lambda: client.cancel(first.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "succeeded" in details


def test_tokens_are_required(server, tmp_path):
    _, port, _ = server
    for token in (None, "not-a-token"):
        anonymous = ControlClient(f"127.0.0.1:{port}", token)
        try:
            for call in (lambda: anonymous.list(), lambda: anonymous.trigger(spec()), lambda: anonymous.get("x"),
                         lambda: anonymous.cancel("x")):
                code, details = code_of(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, details
        finally:
            anonymous.close()


def test_health_and_reflection_answer(server):
    _, port, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for name in ("", "flywheel.v1.RetrainControl"):
            assert check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="flywheel.v1.RetrainControl")]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs)))
        names = {s.name for s in listed.list_services_response.service}
        assert {"flywheel.v1.RetrainControl", "grpc.health.v1.Health"} <= names
        assert described.file_descriptor_response.file_descriptor_proto  # the schema is served for grpcurl


@pytest.fixture
def served(jobs_config):
    """serve() with one job runner over the stand-in cycle, authentication off; yields the port."""
    loop = Loop()
    stop = asyncio.Event()
    ports: list[int] = []
    cfg = ControlConfig(listen="127.0.0.1:0", runners=1, grace_s=1)
    served = asyncio.run_coroutine_threadsafe(
        serve(jobs_config, cfg, FunctionCycle(stand_in_cycle), ready=ports.append, stop=stop), loop.loop)
    try:
        deadline = time.monotonic() + 20
        while not ports and time.monotonic() < deadline:
            time.sleep(0.05)
        yield ports[0]
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        served.result(30)
        loop.close()


def test_serve_runs_triggered_jobs_to_the_end(served, jobs_config):
    client = ControlClient(f"127.0.0.1:{served}")
    job = client.trigger(spec(options={"delay": 0.01}))
    deadline = time.monotonic() + 20
    while client.get(job.id).state not in (JobState.SUCCEEDED, JobState.FAILED) and time.monotonic() < deadline:
        time.sleep(0.1)
    done = client.get(job.id)
    client.close()
    assert done.state == JobState.SUCCEEDED, done.error
    assert done.attempts == 1 and done.steps_done[0] == "mine" and done.steps_done[-1] == "register"
    assert json.loads(open(done.result_path).read())["promoted"] is True
    assert done.report_path.endswith("report.html") and "<html" in open(done.report_path).read()
    assert JobStore(jobs_config.db_path).get(job.id).state == JobState.SUCCEEDED


def test_cli_against_the_service(served, tmp_path):
    from typer.testing import CliRunner

    from flywheel.cli.main import app

    cli = CliRunner()
    server = ["--server", f"127.0.0.1:{served}"]
    sql_file = tmp_path / "mine.sql"
    sql_file.write_text(SQL)
    r = cli.invoke(app, ["retrain", "--file", str(sql_file), "--target", "cpu", "--student", "s1",
                         "--option", "delay=0.01", "--option", "finetune.epochs=1", "--wait", *server])
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[0]
    r = cli.invoke(app, ["jobs", "list", "--json", *server])
    [listed] = json.loads(r.stdout)
    assert listed["id"] == job_id and listed["state"] == "succeeded"
    assert listed["spec"]["options"] == {"delay": 0.01, "finetune": {"epochs": 1}}
    r = cli.invoke(app, ["jobs", "show", job_id, "--json", *server])
    assert json.loads(r.stdout)["steps_done"][-1] == "register"
    r = cli.invoke(app, ["jobs", "cancel", job_id, *server])
    assert r.exit_code == 1 and "FAILED_PRECONDITION" in r.output
    r = cli.invoke(app, ["retrain", "--sql", "DROP TABLE frames", "--student", "s1", *server])
    assert r.exit_code == 1 and "INVALID_ARGUMENT" in r.output
    r = cli.invoke(app, ["retrain", "--by-score", "1", "--student", "s2", "--road-type", "merge",
                         "--option", "promote=false", "--wait", *server])
    assert r.exit_code == 2, r.output  # rejected by its gates


def test_a_service_without_lake_or_registry_refuses_real_cycles_as_a_precondition(jobs_config):
    from retrain.jobs.service import STATUS_OF, Validator
    from retrain.jobs.adapter import RealCycle
    from retrain.jobs.models import NotConfigured

    with pytest.raises(NotConfigured, match="registry_dir"):
        Validator(jobs_config, RealCycle(jobs_config)).check(spec())
    assert STATUS_OF[NotConfigured] == grpc.StatusCode.FAILED_PRECONDITION
