"""Shadow commands: `flywheel shadow run` (batch replay over the lake), `flywheel shadow backfill` (the same as Ray
tasks, [shadow.backfill]) and `flywheel shadow stream` (a worker of the streaming consumer group; its settings are
[shadow.stream], e.g. FLYWHEEL_SHADOW__STREAM='{"max_age_s": 1}')."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flywheel.cli.common import console, settings, stop_on_signal

app = typer.Typer()

shadow_app = typer.Typer(help="Shadow mode: replay teacher and student on logged frames, record divergence.",
                         no_args_is_help=True)
app.add_typer(shadow_app, name="shadow")

LakeOpt = Annotated[Optional[Path], typer.Option("--lake", help="lake directory; default: shadow.lake_dir")]
TeacherOpt = Annotated[Optional[Path], typer.Option("--teacher", help="teacher model dir or .onnx (spec.json beside)")]
StudentOpt = Annotated[Optional[Path], typer.Option("--student", help="student model dir or .onnx (spec.json beside)")]
CriteriaOpt = Annotated[Optional[Path], typer.Option("--criteria", help="criteria YAML; default: the packaged one")]


def shadow_settings():
    """[shadow] of the effective settings."""
    return settings().shadow


def _models(cfg, teacher: Path | None, student: Path | None) -> tuple[Path, Path]:
    t, s = teacher or cfg.teacher, student or cfg.student
    if t is None or s is None:
        console.print("[red]give --teacher and --student (or set shadow.teacher and shadow.student)[/]")
        raise typer.Exit(2)
    return Path(t), Path(s)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_report(report, out: Console) -> None:
    """The summary tables of a ReplayReport: totals, divergence per condition, pass rates, noise floor."""
    head = Table(title=f"shadow replay {report.replay_id}  ({report.pair})")
    for col in ("frames replayed", "units", "deferred", "already covered", "files", "windows", "seconds",
                "frames/s"):
        head.add_column(col, justify="right")
    head.add_row(str(report.frames_replayed), str(report.units), str(report.units_deferred), str(report.files_covered),
                 str(report.files_written), str(report.windows), f"{report.seconds:.1f}", f"{report.frames_per_s:.0f}")
    out.print(head)
    if report.by_condition:
        t = Table(title="divergence per condition (student vs teacher)")
        for col in ("group", "value", "frames", "mean ADE 4s m", "miss rate 4s", "disagree rate", "mean score"):
            t.add_column(col, justify="left" if col in ("group", "value") else "right")
        for r in report.by_condition:
            t.add_row(r["group"], r["value"], str(r["frames"]), *(_fmt(r[k]) for k in
                      ("mean_ade_4s", "miss_rate_4s", "disagree_rate", "mean_score")))
        out.print(t)
    if report.pass_rates:
        t = Table(title="scenario windows: pass rate vs required")
        for col in ("group", "value", "windows", "passed", "pass rate", "required", ""):
            t.add_column(col, justify="left" if col in ("group", "value", "") else "right")
        for r in report.pass_rates:
            t.add_row(r["group"], r["value"], str(r["windows"]), str(r["passed"]), _fmt(r["pass_rate"]),
                      _fmt(r["required"]), "[green]ok[/]" if r["ok"] else "[red]below[/]")
        out.print(t)
    if report.noise_floor:
        n = report.noise_floor
        out.print(f"noise floor (teacher vs itself, {n['runtime_a']} vs {n['runtime_b']}): {n['frames']} frames, "
                  f"mean ADE 4s {n['mean_ade_4s']:.2e} m, max FDE 4s {n['max_fde_4s']:.2e} m, "
                  f"mean JSD {n['mean_jsd']:.2e}")


@shadow_app.command("run")
def run(lake: LakeOpt = None, teacher: TeacherOpt = None, student: StudentOpt = None, criteria: CriteriaOpt = None,
        batch_size: Annotated[Optional[int], typer.Option(help="frames per onnxruntime run")] = None,
        threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (0 = cores)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Replay every frame of the lake the teacher/student pair has not replayed yet (incremental, crash-safe)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from shadow.criteria import CriteriaError
    from shadow.batch.replay import replay
    from shadow.models import ModelError, ProviderUnavailable

    cfg = shadow_settings()
    t, s = _models(cfg, teacher, student)
    rcfg = cfg.replay
    runtime = rcfg.runtime.model_copy(update={k: v for k, v in {"batch_size": batch_size,
                                                                "intra_op_threads": threads}.items() if v is not None})
    rcfg = type(rcfg).model_validate({**rcfg.model_dump(), "runtime": runtime.model_dump(),
                                      **({"criteria": criteria} if criteria else {})})
    with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("replay", total=None)
        try:
            report = replay(lake or cfg.lake_dir, t, s, rcfg,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ModelError, CriteriaError, FileNotFoundError, ProviderUnavailable) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        # piped or captured output gets room for the tables instead of rich's 80-column default
        print_report(report, Console(width=None if sys.stdout.isatty() else 160))


@shadow_app.command("backfill")
def backfill_cmd(lake: LakeOpt = None, teacher: TeacherOpt = None, student: StudentOpt = None,
                 criteria: CriteriaOpt = None,
                 address: Annotated[Optional[str], typer.Option(help="Ray cluster (ray://head:10001, auto); "
                                                                "default: shadow.backfill.address, else a local "
                                                                "Ray")] = None,
                 cpus: Annotated[Optional[int], typer.Option(help="CPUs of the local Ray")] = None,
                 files_per_task: Annotated[Optional[int], typer.Option(help="frames files per share of the work")]
                 = None,
                 as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Replay the lake for a pair as Ray tasks (same files as `shadow run`; a killed backfill resumes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from shadow.batch.backfill import BackfillError, backfill
    from shadow.criteria import CriteriaError
    from shadow.models import ModelError, ProviderUnavailable

    cfg = shadow_settings()
    t, s = _models(cfg, teacher, student)
    rcfg = type(cfg.replay).model_validate({**cfg.replay.model_dump(), **({"criteria": criteria} if criteria else {})})
    bcfg = cfg.backfill.model_copy(update={k: v for k, v in {"address": address, "num_cpus": cpus,
                                                             "files_per_task": files_per_task}.items()
                                           if v is not None})
    with Progress(TextColumn("backfill"), BarColumn(), MofNCompleteColumn(), TextColumn("shares"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("backfill", total=None)
        try:
            report = backfill(lake or cfg.lake_dir, t, s, rcfg, bcfg,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ModelError, CriteriaError, FileNotFoundError, ProviderUnavailable, BackfillError) as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        typer.echo(f"backfill {report.pair} on {report.ray_address} Ray ({report.ray_cpus:g} CPUs): "
                   f"{report.frames_replayed} frames in {report.tasks} shares on {report.actors} actors, "
                   f"{report.files_written} files, "
                   f"{report.files_covered} frames files already covered, {report.units_deferred} units deferred, "
                   f"{report.seconds:.1f} s, {report.frames_per_s:.0f} frames/s")


@shadow_app.command("stream")
def stream(bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap; overrides the config")] = None,
           lake: LakeOpt = None, teacher: TeacherOpt = None, student: StudentOpt = None,
           criteria: CriteriaOpt = None,
           group: Annotated[Optional[str], typer.Option(help="consumer group; default flywheel-shadow-<pair>")] = None,
           topic: Annotated[Optional[str], typer.Option(help="frames topic; overrides the config")] = None) -> None:
    """Run one streaming shadow worker of the pair's consumer group until SIGTERM/Ctrl-C; start more to scale."""
    from shadow.stream.worker import StreamWorker

    cfg = shadow_settings()
    t, s = _models(cfg, teacher, student)
    kafka = settings().kafka
    kafka = kafka.model_copy(update={k: v for k, v in {"bootstrap_servers": bootstrap, "frames_topic": topic}.items()
                                     if v})
    scfg = type(cfg.stream).model_validate({**cfg.stream.model_dump(), **({"group_id": group} if group else {}),
                                            **({"criteria": criteria} if criteria else {})})
    stop = stop_on_signal()
    worker = StreamWorker(kafka, lake or cfg.lake_dir, t, s, scfg,
                          on_write=lambda p, a, b: typer.echo(f"wrote partition {p} offsets {a}-{b}"))
    console.print(f"shadow stream {worker.shadow.pair} as group {worker.group_id} on {kafka.bootstrap_servers}")
    stats = worker.run(stop)
    console.print(f"shadow stream stopped: {stats.records} records, {stats.frames} frames, {stats.windows} windows, "
                  f"{stats.files} files, {stats.commits} commits")
