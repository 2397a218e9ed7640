"""`flywheel demo`: the pipeline on embedded defaults, stage by stage, reusing what earlier runs finished.

Stages: simulate the fleet (highway-env, cached) -> start the embedded broker, the ingest server and the sink ->
every vehicle streams its drives concurrently through the agent -> wait until the lake holds every frame -> compact
-> summarise the lake with SQL. Ctrl-C stops every process and thread it started.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flywheel.settings import Settings
from ingest.agent import run_agent
from ingest.broker import EmbeddedBroker, ensure_topics
from ingest.compact import compact
from ingest.lake import is_uploaded, list_drive_files, live_files
from ingest.server import IngestService
from ingest.sink import run_sink

log = logging.getLogger(__name__)


def _bar(console: Console, label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def simulate(settings: Settings, console: Console) -> Path:
    from ingest.fleet import simulate_fleet

    drives_dir = settings.demo.data_dir / "drives"
    with _bar(console, "simulating fleet") as bar:
        task = bar.add_task("sim", total=None)
        summary = simulate_fleet(settings.demo.fleet, drives_dir,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"fleet: {summary}")
    return drives_dir


@contextmanager
def ingest_services(settings: Settings, lake: Path):
    """Embedded broker + ingest server (its own event loop thread) + sink thread; yields (server port, kafka)."""
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker(settings.broker))
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        ensure_topics(kafka)
        loop = asyncio.new_event_loop()
        loop_thread = threading.Thread(target=loop.run_forever, name="ingest-server", daemon=True)
        loop_thread.start()
        service = IngestService(kafka, settings.server.model_copy(update={"listen": "127.0.0.1:0", "metrics_port": 0}))
        port = asyncio.run_coroutine_threadsafe(service.start(), loop).result(60)

        def stop_server() -> None:
            asyncio.run_coroutine_threadsafe(service.stop(2.0), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join(10)

        stack.callback(stop_server)
        stop_sink = threading.Event()
        sink_cfg = settings.sink.model_copy(update={"lake_dir": lake, "max_age_s": 1.0})
        sink_thread = threading.Thread(target=run_sink, args=(kafka, sink_cfg, stop_sink), name="sink", daemon=True)
        sink_thread.start()
        stack.callback(sink_thread.join, 30)
        stack.callback(stop_sink.set)
        yield port, kafka


def lake_rows(lake: Path) -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames"))


def ingest(settings: Settings, drives_dir: Path, lake: Path, console: Console) -> None:
    files = list_drive_files(drives_dir)
    todo = [f for f in files if not is_uploaded(f)]
    if not todo:
        console.print(f"ingest: all {len(files)} drives already uploaded; lake holds {lake_rows(lake)} frames")
        return
    expected = lake_rows(lake) + sum(pq.read_metadata(f).num_rows for f in todo)
    with ingest_services(settings, lake) as (port, _):
        agent_cfg = settings.agent.model_copy(update={"server": f"127.0.0.1:{port}"})
        with _bar(console, "vehicles uploading drives") as bar:
            task = bar.add_task("upload", total=len(todo))
            report = asyncio.run(run_agent(agent_cfg, paths=todo, progress=lambda d, n: bar.advance(task)))
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} drives failed to upload: {report.failed[0].error}")
        with _bar(console, "sink writing the lake") as bar:
            task = bar.add_task("lake", total=expected)
            deadline = time.monotonic() + 300
            while (rows := lake_rows(lake)) < expected:
                bar.update(task, completed=rows)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lake holds {rows} of {expected} frames after 300 s")
                time.sleep(0.2)
            bar.update(task, completed=rows)
    console.print(f"ingest: {report.uploaded} drives, {report.frames} frames in {report.seconds:.1f}s "
                  f"({report.frames / max(report.seconds, 1e-9):,.0f} frames/s through gRPC)")


def summarize(lake: Path, console: Console) -> None:
    files = [str(f.path) for f in live_files(lake, "frames")]
    if not files:
        console.print("lake is empty")
        return
    con = duckdb.connect()
    rel = con.read_parquet(files, hive_partitioning=True)
    rows = rel.aggregate("road_type, lighting, weather, count(*) AS frames, count(DISTINCT drive_id) AS drives",
                         "road_type, lighting, weather").order("road_type, frames DESC").fetchall()
    table = Table("road_type", "lighting", "weather", "frames", "drives", title=f"lake: {len(files)} files")
    for r in rows:
        table.add_row(*(str(v) for v in r))
    console.print(table)


def run_demo(settings: Settings, console: Console | None = None) -> None:
    console = console or Console()
    started = time.perf_counter()
    lake = settings.demo.data_dir / "lake"
    drives_dir = simulate(settings, console)
    ingest(settings, drives_dir, lake, console)
    report = compact(lake, "frames", target_rows=settings.sink.compact_target_rows)
    console.print(f"compaction: {report}")
    summarize(lake, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")
