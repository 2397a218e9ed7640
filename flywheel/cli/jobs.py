"""Retraining job subcommands: `flywheel retrain`, `flywheel jobs list|show|cancel|report|policy|runner`,
`flywheel control`.

Commands talk to the RetrainControl service (`--server`, default [control] listen; token from --token or
$FLYWHEEL_CONTROL_TOKEN), or with `--local` straight to the job store ([jobs] db_path). Exit status of a waited job:
0 succeeded, 2 rejected by its gates, 1 failed or cancelled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cli.common import console, settings

app = typer.Typer()

jobs_app = typer.Typer(help="Retraining jobs: list, show, cancel, report, trigger policy, runners.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

LocalOpt = Annotated[bool, typer.Option("--local", help="use the job store directly instead of the service")]
ServerOpt = Annotated[Optional[str], typer.Option("--server", help="host:port of the control service")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="FLYWHEEL_CONTROL_TOKEN",
                                                 help="bearer token of the control service")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RegistryOpt = Annotated[Optional[Path], typer.Option("--registry", help="model registry; overrides [jobs] "
                                                     "registry_dir")]
EXIT = {"succeeded": 0, "rejected": 2, "failed": 1, "cancelled": 1}


def jobs_config(registry: Path | None = None):
    """[jobs] of the settings, the lake defaulting to [sink] lake_dir."""
    s = settings()
    cfg = s.jobs
    update = {"lake_dir": cfg.lake_dir or s.sink.lake_dir, "registry_dir": registry or cfg.registry_dir}
    return cfg.model_copy(update=update)


def control_config():
    return settings().control


class _Backend:
    """The same calls on the service (gRPC) or on the local store; errors become a message and exit 1."""

    def __init__(self, local: bool, server: str | None, token: str | None, registry: Path | None = None) -> None:
        self.local = local
        if local:
            from retrain.jobs.service import Validator
            from retrain.jobs.adapter import RealCycle
            from retrain.jobs.store import JobStore

            self.cfg = jobs_config(registry)
            self.store = JobStore.from_config(self.cfg)
            self.validator = Validator(self.cfg, RealCycle(self.cfg))
        else:
            from retrain.jobs.client import ControlClient

            self.client = ControlClient(server or control_config().listen, token)

    def call(self, what: str, *args: Any, **kw: Any) -> Any:
        import grpc

        from retrain.jobs.models import JobError

        try:
            if not self.local:
                return getattr(self.client, what)(*args, **kw)
            if what == "trigger":
                self.validator.check(args[0])
                return self.store.create(args[0], kw.get("request_id") or None, "cli", kw.get("queue_behind", False))[0]
            return getattr(self.store, what)(*args, **kw)
        except grpc.RpcError as exc:
            console.print(f"[red]{exc.code().name}[/]: {escape(str(exc.details()))}")
        except JobError as exc:
            console.print(f"[red]{type(exc).__name__}[/]: {escape(str(exc))}")
        raise typer.Exit(1)


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _mining(job) -> str:
    if job.spec.sql is not None:
        return " ".join(job.spec.sql.split())[:60]
    r = job.spec.score_rule
    cls = ",".join((*r.road_types, *r.lightings, *r.weathers))
    return f"score >= {r.min_score:g}" + (f" top {r.top_k}" if r.top_k else "") + (f" [{cls}]" if cls else "")


def print_job(job, events: list[dict] | None = None) -> None:
    t = Table(show_header=False, title=f"job {job.id}")
    for k, v in [("state", job.state.value), ("student", job.student), ("mining", job.spec.sql or _mining(job)),
                 ("targets", ", ".join(job.spec.targets) or "all"), ("options", _short(json.dumps(job.spec.options), 160)),
                 ("created", _when(job.created_at)), ("started", _when(job.started_at)),
                 ("finished", _when(job.finished_at)), ("step", job.current_step or "-"),
                 ("steps done", ", ".join(job.steps_done) or "-"), ("attempts", str(job.attempts)),
                 ("error", job.error or "-"), ("result", job.result_path or "-"), ("report", job.report_path or "-"),
                 ("work dir", job.work_dir), ("requested by", job.requested_by or "-")]:
        t.add_row(k, v)
    Console().print(t)
    for e in events or []:
        typer.echo(f"  {_when(e['at'])}  {e['kind']:<9} {e['step']:<9} {e['message']}")


def follow(get, job_id: str, poll_s: float = 1.0) -> Any:
    """Print each step change of a job until it ends; returns the final job."""
    seen = None
    while True:
        job = get(job_id)
        now = (job.state.value, job.current_step, tuple(job.steps_done))
        if now != seen:
            console.print(f"{_when(time.time())} {job.state.value:<9} step {job.current_step or '-'} "
                          f"(done: {', '.join(job.steps_done) or 'none'})")
            seen = now
        if job.state.value in EXIT:
            return job
        time.sleep(poll_s)


def _options(pairs: list[str], file: Path | None) -> dict:
    """--option key=value (dotted keys nest, values parsed as JSON when they are JSON) over --options-file."""
    out: dict = json.loads(file.read_text()) if file else {}
    for p in pairs:
        key, sep, raw = p.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option wants key=value, got {p!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


@app.command()
def retrain(sql: Annotated[Optional[str], typer.Option("--sql", help="mining query (read-only SQL)")] = None,
            file: Annotated[Optional[Path], typer.Option("--file", help="mining query from a .sql file")] = None,
            by_score: Annotated[Optional[float], typer.Option("--by-score", help="mine windows scoring at least this")]
            = None,
            top_k: Annotated[int, typer.Option(help="with --by-score: windows at most (0: no limit)")] = 0,
            pair: Annotated[str, typer.Option(help="with --by-score: pair id (default: the student's)")] = "",
            road_type: Annotated[Optional[list[str]], typer.Option(help="with --by-score: only this road type")] = None,
            lighting: Annotated[Optional[list[str]], typer.Option(help="with --by-score: only this lighting")] = None,
            weather: Annotated[Optional[list[str]], typer.Option(help="with --by-score: only this weather")] = None,
            target: Annotated[Optional[list[str]], typer.Option("--target", help="target chip (repeatable); "
                                                                "default every target")] = None,
            student: Annotated[str, typer.Option(help="registry name of the student")] = "student",
            option: Annotated[Optional[list[str]], typer.Option("--option", help="cycle option key=value "
                                                                "(repeatable, dotted keys nest)")] = None,
            options_file: Annotated[Optional[Path], typer.Option(help="cycle options as a JSON object")] = None,
            request_id: Annotated[str, typer.Option(help="idempotency key: a retry returns the same job")] = "",
            queue_behind: Annotated[bool, typer.Option(help="queue even if the student has an active job")] = False,
            wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end (with --local: run it "
                                               "here)")] = False,
            local: LocalOpt = False, server: ServerOpt = None, token: TokenOpt = None,
            registry: RegistryOpt = None) -> None:
    """Trigger a targeted retraining of a student: mine by SQL (--sql/--file) or by score (--by-score)."""
    from pydantic import ValidationError

    from retrain.jobs.models import JobSpec, ScoreRule

    if sum(x is not None for x in (sql, file, by_score)) != 1:
        raise typer.BadParameter("give exactly one of --sql, --file and --by-score")
    try:
        rule = None if by_score is None else ScoreRule(min_score=by_score, top_k=top_k, pair=pair,
                                                       road_types=tuple(road_type or ()),
                                                       lightings=tuple(lighting or ()), weathers=tuple(weather or ()))
        spec = JobSpec(student=student, sql=file.read_text() if file else sql, score_rule=rule,
                       targets=tuple(target or ()), options=_options(option or [], options_file))
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(e["msg"] for e in exc.errors())) from None
    backend = _Backend(local, server, token, registry)
    job = backend.call("trigger", spec, request_id=request_id, queue_behind=queue_behind)
    console.print(f"job [bold]{job.id}[/] {job.state.value} (student {job.student}, work dir {job.work_dir})")
    typer.echo(job.id)
    if not wait:
        return
    stop = threading.Event()
    if local:  # nobody else may be running jobs: run them here until ours ends
        runner_thread = threading.Thread(target=_local_runner(backend.cfg).run_forever, args=(stop,), daemon=True)
        runner_thread.start()
    try:
        done = follow(lambda i: backend.call("get", i), job.id)
    finally:
        stop.set()
    print_job(done)
    raise typer.Exit(EXIT[done.state.value])


def _local_runner(cfg):
    from retrain.jobs.runner import JobRunner, default_reporter
    from retrain.jobs.adapter import RealCycle
    from retrain.jobs.store import JobStore

    return JobRunner(JobStore.from_config(cfg), RealCycle(cfg), cfg, reporter=default_reporter(cfg.lake_dir))


@jobs_app.command("list")
def jobs_list(state: Annotated[Optional[list[str]], typer.Option(help="only these states (repeatable)")] = None,
              student: Annotated[Optional[str], typer.Option(help="only this student")] = None,
              limit: Annotated[int, typer.Option(help="newest first, at most this many")] = 20,
              as_json: JsonOpt = False, local: LocalOpt = False, server: ServerOpt = None,
              token: TokenOpt = None) -> None:
    """Jobs, newest first."""
    from retrain.jobs.models import JobState

    try:
        states = [JobState(s) for s in state or []]
    except ValueError:
        raise typer.BadParameter(f"states are {', '.join(s.value for s in JobState)}") from None
    jobs = _Backend(local, server, token).call("list", states, student, limit)
    if as_json:
        typer.echo(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
        return
    t = Table("id", "state", "student", "step", "mining", "targets", "created", "finished", title="retraining jobs")
    for j in jobs:
        t.add_row(j.id, j.state.value, j.student, j.current_step or "-", _mining(j), ",".join(j.spec.targets) or "all",
                  _when(j.created_at), _when(j.finished_at))
    Console().print(t)


@jobs_app.command("show")
def jobs_show(job_id: str, as_json: JsonOpt = False, follow_: Annotated[bool, typer.Option("--follow")] = False,
              local: LocalOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """One job (with its event log when --local); --follow waits for its end."""
    backend = _Backend(local, server, token)
    job = follow(lambda i: backend.call("get", i), job_id) if follow_ else backend.call("get", job_id)
    if as_json:
        typer.echo(json.dumps(job.model_dump(mode="json"), indent=2))
        return
    print_job(job, backend.store.events(job_id) if local else None)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, local: LocalOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Cancel a job: a queued one at once, a running one at its next step or progress report."""
    job = _Backend(local, server, token).call("cancel", job_id)
    console.print(f"job {job.id}: {job.state.value}" + (" (cancel requested)" if job.state.value == "running" else ""))


@jobs_app.command("report")
def jobs_report(job_id: str, out: Annotated[Optional[Path], typer.Option(help="HTML file; default the job's "
                                                                         "work dir")] = None) -> None:
    """(Re-)render a finished job's HTML report from its result and the lake (local store)."""
    from retrain.cycle.report import render_report

    cfg = jobs_config()
    job = _Backend(True, None, None).call("get", job_id)
    result = json.loads(Path(job.result_path).read_text()) if job.result_path else {}
    path = render_report(result, out or Path(job.work_dir) / "report.html", lake=cfg.lake_dir,
                         job=job.model_dump(mode="json"))
    typer.echo(path)


@jobs_app.command("policy")
def jobs_policy(file: Annotated[Path, typer.Argument(help="policy TOML (retrain.jobs.policy)")],
                dry_run: Annotated[bool, typer.Option("--dry-run", help="measure only, queue nothing")] = False) -> None:
    """Evaluate a trigger policy once over the lake and queue the jobs it calls for (local store)."""
    from retrain.jobs.service import Validator
    from retrain.jobs.adapter import RealCycle
    from retrain.jobs.store import JobStore
    from retrain.jobs.policy import PolicyConfig, evaluate
    from shadow.catalog import Catalog

    cfg = jobs_config()
    with Catalog(cfg.lake_dir) as catalog:
        decisions = evaluate(catalog, PolicyConfig.from_file(file), JobStore.from_config(cfg), cfg.registry_dir,
                             Validator(cfg, RealCycle(cfg)), dry_run=dry_run)
    t = Table("rule", "student", "value", "frames", "triggered", "reason", title="trigger policy")
    for d in decisions:
        t.add_row(d.rule, d.student, "-" if d.value is None else f"{d.value:.4g}", str(d.frames),
                  d.job_id or ("yes" if d.triggered else "no"), d.reason)
    Console().print(t)


@jobs_app.command("runner")
def jobs_runner(registry: RegistryOpt = None) -> None:
    """Run queued jobs (and resume those of dead runners) until SIGTERM/Ctrl-C; start several for more."""
    from flywheel.cli.common import wait_for_stop

    runner = _local_runner(jobs_config(registry)).start()
    console.print(f"runner {runner.owner} polling {jobs_config().db_path}; Ctrl-C stops it after the current job")
    wait_for_stop()
    runner.stop()


@app.command()
def control(listen: Annotated[Optional[str], typer.Option(help="host:port; overrides the config")] = None,
            runners: Annotated[Optional[int], typer.Option(help="job runner threads; overrides the config")] = None,
            policy: Annotated[Optional[Path], typer.Option(help="trigger policy TOML; overrides the config")] = None,
            token_file: Annotated[Optional[Path], typer.Option(help="hashed bearer tokens (`flywheel token issue "
                                                               "NAME --token-file ...`)")] = None,
            registry: RegistryOpt = None) -> None:
    """Serve the RetrainControl gRPC service with job runners (and the trigger policy) until SIGTERM/Ctrl-C."""
    from retrain.jobs.service import serve
    from retrain.jobs.adapter import RealCycle

    update = {k: v for k, v in {"listen": listen, "runners": runners, "policy_file": policy,
                                "token_file": token_file}.items() if v is not None}
    cfg = control_config().model_copy(update=update)
    jobs = jobs_config(registry)
    asyncio.run(serve(jobs, type(cfg).model_validate(cfg.model_dump()), RealCycle(jobs),
                      ready=lambda port: typer.echo(f"retrain control listening on port {port}", err=True)))
