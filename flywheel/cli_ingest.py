"""Ingest subcommands: server, agent, sink, compact, token, import-mcap."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer
from prometheus_client import start_http_server
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flywheel.cli import app, console, settings

token_app = typer.Typer(help="Vehicle bearer tokens (stored hashed).", no_args_is_help=True)
app.add_typer(token_app, name="token")


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
    from ingest.mcap_io import import_mcap

    out = drives or settings().agent.drives_dir
    for p in import_mcap(mcap_file, out):
        typer.echo(p)


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


def start_metrics(port: int) -> None:
    if port:
        start_http_server(port)


@app.command()
def topics() -> None:
    """Create the frames, dead-letter and progress topics on the configured Kafka cluster (idempotent)."""
    from ingest.broker import ensure_topics

    created = ensure_topics(settings().kafka)
    typer.echo(f"created: {', '.join(created) or 'nothing (all exist)'}")


@app.command()
def sink(lake: Annotated[Optional[Path], typer.Option(help="lake directory; overrides the config")] = None) -> None:
    """Consume the frames topic into the Parquet lake (exactly once) until SIGTERM/Ctrl-C."""
    import signal
    import threading

    from ingest.sink import run_sink

    s = settings()
    cfg = s.sink.model_copy(update={"lake_dir": lake} if lake else {})
    start_metrics(cfg.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stats = run_sink(s.kafka, cfg, stop)
    console.print(f"sink stopped: {stats.rows_written} rows in {stats.files_written} files; "
                  f"{stats.duplicate_frames} duplicate frames dropped; dead-lettered {stats.dead_lettered or 'none'}")


@app.command()
def compact(lake: Annotated[Optional[Path], typer.Option(help="lake directory; overrides the config")] = None,
            table: Annotated[str, typer.Option(help="lake table")] = "frames",
            dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be merged")] = False) -> None:
    """Merge runs of small lake files into large row groups, atomically for readers."""
    from ingest.compact import compact as run_compact

    s = settings()
    report = run_compact(lake or s.sink.lake_dir, table=table, target_rows=s.sink.compact_target_rows, dry_run=dry_run)
    console.print(report)
