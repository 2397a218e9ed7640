"""Retrain commands: `flywheel mine` (mine divergent windows into a dataset snapshot), `flywheel cycle` (one whole
flywheel cycle, `retrain.cycle.cycle.run_cycle`) and `flywheel finetune` (the fine-tune alone, `--nproc N` under
torchrun)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli.common import console, settings

app = typer.Typer()

LakeOpt = Annotated[Optional[Path], typer.Option("--lake", help="lake directory (default: jobs.lake_dir, else the "
                                                                  "sink's lake_dir)")]
SqlOpt = Annotated[Optional[str], typer.Option("--sql", help="read-only query returning drive_id and seq, or "
                                               "drive_id, window_start_seq and window_end_seq")]
FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="file holding the mining query")]


def _lake(lake: Path | None) -> Path:
    s = settings()
    return lake or s.jobs.lake_dir or s.sink.lake_dir


def _registry(registry: Path | None) -> Path:
    return registry or settings().jobs.registry_dir or Path("data/registry")


def _query(sql: str | None, file: Path | None, by_score: bool) -> str | None:
    given = [x for x in (sql, file) if x is not None]
    if len(given) + bool(by_score) != 1:
        raise typer.BadParameter("give exactly one of --sql, --file or --by-score")
    if file is not None:
        if not file.is_file():
            raise typer.BadParameter(f"{file} does not exist", param_hint="--file")
        return file.read_text()
    return sql


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/] {exc}")
    raise typer.Exit(2)


def _counts_table(result) -> Table:
    table = Table("condition", "scenario type", "windows", "frames", "drives", title=f"mined ({result.rule})")
    cells: dict[tuple[str, str], list] = {}
    for it in result.items:
        c = cells.setdefault((it.condition, it.road_type), [0, 0, set()])
        c[0] += 1
        c[1] += it.frames
        c[2].add(it.drive_id)
    for (cond, road), (n, frames, drives) in sorted(cells.items()):
        table.add_row(cond, road or "-", str(n), str(frames), str(len(drives)))
    table.add_row("[bold]total", "", str(len(result.items)), str(sum(i.frames for i in result.items)),
                  str(len({i.drive_id for i in result.items})))
    return table


@app.command()
def mine(sql: SqlOpt = None, file: FileOpt = None,
         by_score: Annotated[bool, typer.Option("--by-score", help="divergent windows above the noise floor")] = False,
         lake: LakeOpt = None,
         pair: Annotated[Optional[str], typer.Option(help="pair id to mine by score (default: the only one)")] = None,
         max_windows: Annotated[Optional[int], typer.Option(help="mined windows at most")] = None,
         signal: Annotated[Optional[str], typer.Option(help="by score: the divergence ranked: auto (the fleet's "
                                                       "logged decisions where the frames have them), fleet or "
                                                       "emulation")] = None,
         max_per_drive: Annotated[Optional[int], typer.Option(help="windows per drive at most (by score)")] = None,
         tail_quantile: Annotated[Optional[float], typer.Option(help="by score: mine only windows above this quantile "
                                                                "of all the pair's window scores (0: off)")] = None,
         snapshots: Annotated[Path, typer.Option(help="snapshot directory")] = Path("data/snapshots"),
         seed: Annotated[int, typer.Option(help="seeds the drive split and the ordinary draw")] = 0,
         no_snapshot: Annotated[bool, typer.Option("--no-snapshot", help="only show what would be mined")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="print the mining record as JSON")] = False) -> None:
    """Mine divergent scenario windows (by SQL or by score), print counts per condition, write a snapshot."""
    from retrain.cycle.dataset import DatasetConfig, SnapshotError, create_snapshot
    from retrain.cycle.mining import MiningConfig, MiningError
    from retrain.cycle.mining import mine as run_mine

    query = _query(sql, file, by_score)
    fields = {k: v for k, v in {"sql": query, "pair": pair, "max_windows": max_windows, "signal": signal,
                                "max_per_drive": max_per_drive, "tail_quantile": tail_quantile}.items()
              if v is not None}
    try:
        cfg = MiningConfig(**fields)
        result = run_mine(_lake(lake), cfg)
    except (MiningError, ValidationError) as exc:
        _fail(exc)
    Console().print(_counts_table(result))
    if result.threshold is not None:
        tail = ", ".join(f"{k} {v:.4g}" for k, v in result.tail.items())
        console.print(f"threshold {result.threshold:.4g} (noise floor {result.noise_floor})"
                      + (f", tail p{cfg.tail_quantile * 100:g} {tail}" if tail else "") + f"; {result.eligible} "
                      f"windows above it, {len(result.items)} kept; judged by "
                      + ", ".join(f"{k}: {v}" for k, v in result.counts("signal").items()))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), default=str))
    if no_snapshot:
        return
    try:
        snap = create_snapshot(_lake(lake), result, DatasetConfig(seed=seed), snapshots, {"pair": result.pair})
    except (SnapshotError, ValidationError) as exc:
        _fail(exc)
    frames = snap.manifest["counts"]["frames"]
    console.print(f"snapshot [bold]{snap.id}[/] at {snap.path}: " + ", ".join(
        f"{s} {v['mined']} mined / {v['ordinary']} ordinary frames ({snap.manifest['counts']['drives'][s]} drives)"
        for s, v in frames.items()))
    typer.echo(str(snap.path))


def _load_config(path: Path | None) -> dict:
    if path is None:
        return {}
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


@app.command()
def cycle(work_dir: Annotated[Path, typer.Option("--work-dir", "-w", help="the cycle's directory (records, "
                                                 "fine-tune state, artifacts); rerun to resume")],
          lake: LakeOpt = None,
          registry: Annotated[Optional[Path], typer.Option(help="model registry (default: jobs.registry_dir, else "
                                                           "data/registry)")] = None,
          teacher: Annotated[str, typer.Option(help="teacher: name[:version]")] = "teacher",
          student: Annotated[str, typer.Option(help="current student: name[:version]")] = "student",
          cycle_config: Annotated[Optional[Path], typer.Option(help="TOML or JSON file of CycleConfig fields "
                                                               "(options given here win)")] = None,
          sql: SqlOpt = None, file: FileOpt = None,
          fresh: Annotated[bool, typer.Option("--fresh", help="start over instead of resuming")] = False,
          as_json: Annotated[bool, typer.Option("--json", help="print the result record as JSON")] = False) -> None:
    """Run one flywheel cycle: mine, snapshot, fine-tune, compress per chip, verify, gate, register."""
    from retrain.cycle.cycle import STEPS, CycleConfig, CycleError, format_result, run_cycle
    from retrain.cycle.dataset import SnapshotError
    from retrain.cycle.finetune import FinetuneError
    from retrain.cycle.verify import VerificationError
    from retrain.cycle.mining import MiningError

    fields = _load_config(cycle_config)
    # command-line values win over the file, the file over the settings
    fields.update(lake=_lake(lake or fields.get("lake")), registry=_registry(registry or fields.get("registry")),
                  teacher=teacher if teacher != "teacher" else fields.get("teacher", teacher),
                  student=student if student != "student" else fields.get("student", student))
    if sql is not None or file is not None:
        fields.setdefault("mining", {})["sql"] = _query(sql, file, False)
    try:
        cfg = CycleConfig.model_validate(fields)
    except ValidationError as exc:
        _fail(exc)
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        tasks = {s: bar.add_task(s, total=None, info="", start=False) for s in STEPS}

        def show(step: str, done: int, total: int, info: dict) -> None:
            task = tasks[step]
            bar.start_task(task)
            text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                             if k not in ("state",))
            bar.update(task, completed=done, total=total or None, info=text[:60])

        try:
            result = run_cycle(cfg, work_dir, progress=show, resume=not fresh)
        except (MiningError, SnapshotError, FinetuneError, CycleError, VerificationError, KeyError) as exc:
            _fail(exc)
    Console().print(format_result(result), highlight=False, markup=False)
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), default=str))


@app.command()
def finetune(snapshot: Annotated[Path, typer.Option(help="dataset snapshot directory (`flywheel mine`)")],
             start: Annotated[Path, typer.Option(help="student checkpoint to start from")],
             teacher: Annotated[Path, typer.Option(help="teacher model dir (ONNX + spec)")],
             out: Annotated[Path, typer.Option(help="work directory (state, checkpoint, result); rerun resumes")],
             config: Annotated[Optional[Path], typer.Option(help="TOML or JSON file of FinetuneConfig fields")]
             = None,
             nproc: Annotated[int, typer.Option(help="processes under torchrun (DDP: gloo on CPU, NCCL on GPUs); "
                                                "1 runs in this process", min=1)] = 1,
             device: Annotated[Optional[str], typer.Option(help="torch device (default: execution.torch_device)")]
             = None) -> None:
    """Distil the teacher into the student on a snapshot, in this process or as `nproc` DDP processes."""
    import tempfile

    from retrain.cycle.dataset import SnapshotError, load_snapshot
    from retrain.cycle.finetune import FinetuneConfig, FinetuneError
    from retrain.cycle.finetune import finetune as run_finetune
    from retrain.cycle.finetune_launch import launch

    try:
        cfg = FinetuneConfig.model_validate(_load_config(config))
    except ValidationError as exc:
        _fail(exc)
    from shadow.config import configure_execution

    device = device or settings().execution.torch_device
    configure_execution(settings().execution.model_copy(update={"torch_device": device}))
    if nproc == 1:
        try:
            result = run_finetune(start, teacher, load_snapshot(snapshot), cfg, out)
        except (SnapshotError, FinetuneError) as exc:
            _fail(exc)
        typer.echo(result.model_dump_json(indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="flywheel-finetune-") as tmp:
        cfg_file = Path(tmp) / "finetune.json"
        cfg_file.write_text(cfg.model_dump_json())
        done = launch(start, teacher, snapshot, out, cfg_file, nproc, device)
    if done.returncode:
        console.print(f"[red]torchrun exited with status {done.returncode}[/]")
        raise typer.Exit(done.returncode)
