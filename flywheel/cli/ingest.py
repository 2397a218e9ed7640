"""Ingest commands: broker, topics, server, agent, import, import-mcap, token issue, sink, compact."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.cli.common import console, settings, stop_on_signal, wait_for_stop

app = typer.Typer()
token_app = typer.Typer(help="Vehicle bearer tokens (stored hashed).", no_args_is_help=True)
app.add_typer(token_app, name="token")


def _given(**options) -> dict:
    """The options set on the command line; the others keep the configured values."""
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def broker() -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) with the project's topics, until Ctrl-C."""
    from ingest.broker import EmbeddedBroker, ensure_topics

    s = settings()
    with EmbeddedBroker(s.broker) as b:
        created = ensure_topics(s.kafka.model_copy(update={"bootstrap_servers": b.bootstrap}))
        console.print(f"broker serving on [bold]{b.bootstrap}[/] (topics created: {', '.join(created) or 'none'}); "
                      "Ctrl-C stops it")
        typer.echo(b.bootstrap)
        wait_for_stop()


@app.command()
def server(bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap; overrides the config")] = None,
           listen: Annotated[Optional[str], typer.Option(help="host:port; overrides the config")] = None) -> None:
    """Run the gRPC ingest server until SIGTERM/Ctrl-C, then drain open streams."""
    from ingest.server import serve

    s = settings()
    kafka = s.kafka.model_copy(update={"bootstrap_servers": bootstrap} if bootstrap else {})
    cfg = s.server.model_copy(update={"listen": listen} if listen else {})
    asyncio.run(serve(kafka, cfg, ready=lambda port: typer.echo(f"listening on port {port}", err=True)))


@app.command()
def agent(drives: Annotated[Optional[Path], typer.Argument(help="drive directory; default from config")] = None,
          server_addr: Annotated[Optional[str], typer.Option("--server", help="host:port of the ingest server")] = None,
          concurrency: Annotated[Optional[int], typer.Option(help="drives uploaded at once")] = None) -> None:
    """Upload every drive of a directory not yet marked uploaded; resumes and retries on failures."""
    from ingest.agent import run_agent
    from ingest.lake import is_uploaded, list_drive_files

    s = settings()
    update = {k: v for k, v in {"server": server_addr, "concurrency": concurrency, "drives_dir": drives}.items() if v}
    cfg = s.agent.model_copy(update=update)
    files = list_drive_files(cfg.drives_dir)
    todo = sum(not is_uploaded(f) for f in files)
    with Progress(TextColumn("uploading"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[frames]} frames"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("upload", total=todo, frames=0)
        count = {"frames": 0}

        def done(drive, n) -> None:
            count["frames"] += n
            bar.update(task, advance=1, frames=count["frames"])

        report = asyncio.run(run_agent(cfg, progress=done))
    console.print(f"uploaded {report.uploaded} drives ({report.frames} frames) in {report.seconds:.1f}s; "
                  f"{report.skipped} already uploaded; {len(report.failed)} failed")
    for r in report.failed:
        console.print(f"[red]failed[/] {r.drive_id}: {r.error}")
    if report.failed:
        raise typer.Exit(1)


@app.command("import-mcap")
def import_mcap_cmd(mcap_file: Path, drives: Annotated[Optional[Path], typer.Option(help="drive directory")] = None) -> None:
    """Convert the flywheel.v1.Frame messages of an MCAP log into drive files for the agent."""
    from ingest.importers.mcap import import_mcap

    out = drives or settings().agent.drives_dir
    for p in import_mcap(mcap_file, out):
        typer.echo(p)


@app.command("import")
def import_cmd(sources: Annotated[list[Path], typer.Argument(help="source files or directories")],
               fmt: Annotated[str, typer.Option("--format", "-f", help="ros2, waymo, av2, nuplan or mcap")],
               out: Annotated[Optional[Path], typer.Option("--out", help="drive directory; default from config")]
               = None,
               vehicle: Annotated[Optional[str], typer.Option(help="vehicle id of every drive; default from the "
                                                              "source")] = None,
               odometry_topic: Annotated[Optional[str], typer.Option(help="ROS 2: nav_msgs/msg/Odometry topic")]
               = None,
               objects_topic: Annotated[Optional[str], typer.Option(help="ROS 2: Tracked/PredictedObjects topic")]
               = None,
               trajectory_topic: Annotated[Optional[str], typer.Option(help="ROS 2: Trajectory topic")] = None,
               as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Import fleet logs or public datasets into drive files for the agent, resampled onto the frame contract and
    validated by the ingest server's checks; a bad record stops with the file and record named, writing nothing
    of that file."""
    from ingest.importers.common import ImportFailed, ImportOptions
    from ingest.importers.run import FORMATS, import_sources, source_files

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    opts = ImportOptions(**_given(vehicle_id=vehicle, odometry_topic=odometry_topic, objects_topic=objects_topic,
                                  trajectory_topic=trajectory_topic))
    drives = out or settings().agent.drives_dir
    try:
        files = source_files(fmt, sources)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None
    total = sum(f.stat().st_size for f in files)
    done: dict[Path, int] = {}
    with Progress(TextColumn(f"importing {fmt}"), BarColumn(), MofNCompleteColumn(), TextColumn("bytes"),
                  TimeElapsedColumn(), console=console, disable=as_json) as bar:
        task = bar.add_task("import", total=total)

        def tick(path: Path, n: int) -> None:
            done[path] = n
            bar.update(task, completed=sum(done.values()))

        try:
            report = import_sources(fmt, files, drives, opts, progress=tick)
        except ImportFailed as exc:
            console.print(f"[red]import failed[/] {exc}")
            raise typer.Exit(1) from None
    dropped = {k: v for k, v in sorted(report.dropped.items()) if v}
    if as_json:
        typer.echo(json.dumps({"format": fmt, "files": report.files, "frames": report.frames, "dropped": dropped,
                               "drives": [d.__dict__ for d in report.drives]}, indent=2))
        return
    table = Table("drive", "vehicle", "frames", "from", title=f"{fmt}: {len(report.drives)} drives, "
                  f"{report.frames:,} frames from {report.files} files into {drives}")
    for d in report.drives:
        table.add_row(d.drive_id, d.vehicle_id, f"{d.frames:,}", d.record)
    Console().print(table)
    console.print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "nothing"))


@token_app.command("issue")
def token_issue(vehicle_id: str,
                token_file: Annotated[Optional[Path], typer.Option(help="hashed token file of the server")] = None) -> None:
    """Create or rotate a vehicle's bearer token; prints the token once (only its hash is stored)."""
    from ingest.auth import issue_token
    from ingest.contract import ChunkRejected, check_id

    try:
        check_id("vehicle_id", vehicle_id)
    except ChunkRejected as exc:
        raise typer.BadParameter(str(exc)) from None
    path = token_file or settings().server.token_file
    if path is None:
        raise typer.BadParameter("no token file: pass --token-file or set server.token_file")
    typer.echo(issue_token(path, vehicle_id))


@app.command()
def topics() -> None:
    """Create the frames, dead-letter and progress topics on the configured Kafka cluster (idempotent)."""
    from ingest.broker import ensure_topics

    created = ensure_topics(settings().kafka)
    typer.echo(f"created: {', '.join(created) or 'nothing (all exist)'}")


@app.command()
def sink(lake: Annotated[Optional[Path], typer.Option(help="lake directory; overrides the config")] = None,
         bootstrap: Annotated[Optional[str], typer.Option(help="Kafka bootstrap; overrides the config")] = None,
         group: Annotated[Optional[str], typer.Option(help="consumer group; overrides the config")] = None,
         topic: Annotated[Optional[str], typer.Option(help="frames topic; overrides the config")] = None,
         dlq_topic: Annotated[Optional[str], typer.Option(help="dead-letter topic; overrides the config")] = None,
         max_rows: Annotated[Optional[int], typer.Option(help="rotate a partition's file at this many rows")] = None,
         max_age_s: Annotated[Optional[float], typer.Option(help="rotate a partition's file this many seconds after "
                                                            "its first record")] = None,
         metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus port; 0 disables")] = None) -> None:
    """Consume the frames topic into the Parquet lake (exactly once) until SIGTERM/Ctrl-C, then flush and commit."""
    from ingest.limits import serve_metrics
    from ingest.sink import run_sink

    s = settings()
    kafka = s.kafka.model_copy(update=_given(bootstrap_servers=bootstrap, frames_topic=topic,
                                             dead_letter_topic=dlq_topic))
    cfg = type(s.sink).model_validate({**s.sink.model_dump(), **_given(
        lake_dir=lake, group_id=group, max_rows=max_rows, max_age_s=max_age_s, metrics_port=metrics_port)})
    if cfg.metrics_port:
        serve_metrics(cfg.metrics_host, cfg.metrics_port)
    stats = run_sink(kafka, cfg, stop_on_signal())
    console.print(f"sink stopped: {stats.rows_written} rows in {stats.files_written} files; "
                  f"{stats.duplicate_frames} duplicate frames dropped; dead-lettered {stats.dead_lettered or 'none'}")


@app.command()
def compact(lake: Annotated[Optional[Path], typer.Option(help="lake directory; overrides the config")] = None,
            table: Annotated[str, typer.Option(help="lake table")] = "frames",
            target_rows: Annotated[Optional[int], typer.Option(help="rows per merged file; default "
                                                               "sink.compact_target_rows")] = None,
            max_run_mb: Annotated[int, typer.Option(help="uncompressed MiB read into memory for one merge")] = 512,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be merged")] = False,
            as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False) -> None:
    """Merge runs of small lake files into large row groups, atomically for readers."""
    from ingest.compact import compact as run_compact

    s = settings()
    report = run_compact(lake or s.sink.lake_dir, table=table, target_rows=target_rows or s.sink.compact_target_rows,
                         dry_run=dry_run, max_run_bytes=max_run_mb << 20)
    runs = [{"output": str(r.output), "inputs": len(r.inputs), "rows": r.rows} for r in report.runs]
    if as_json:
        typer.echo(json.dumps({k: v for k, v in report.__dict__.items() if k != "runs"} | {"runs": runs}, indent=2))
        return
    verb = "would merge" if report.dry_run else "merged"
    table = Table("merged file", "small files", "rows", title=f"{report.table}: {verb} {len(report.runs)} runs",
                  caption=f"live files {report.files_before} -> {report.files_after}; small files removed "
                          f"{report.small_files_removed}; leftovers of an earlier run removed "
                          f"{report.superseded_removed}")
    for r in runs:
        table.add_row(Path(r["output"]).relative_to(Path(lake or s.sink.lake_dir)).as_posix()
                      if Path(r["output"]).is_relative_to(Path(lake or s.sink.lake_dir)) else r["output"],
                      str(r["inputs"]), f"{r['rows']:,}")
    Console().print(table)
