"""`flywheel demo`: the whole flywheel on embedded defaults, stage by stage, reusing what earlier runs finished.

Stages: simulate the fleet (highway-env, cached) -> start the embedded broker, the ingest server and the sink ->
every vehicle streams its drives concurrently through the agent -> wait until the lake holds every frame -> compact
-> register the shipped reference teacher and student v0 -> shadow replay (incremental) -> SQL summary of where they
diverge -> one retraining cycle for three chips (resumable) -> the HTML report. Ctrl-C stops every process and thread
it started (the broker runs in its own process group and is stopped on the way out).
"""

from __future__ import annotations

import asyncio
import hashlib
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

from flywheel.settings import DemoConfig, Settings
from ingest.agent import run_agent
from ingest.broker import EmbeddedBroker, ensure_topics
from ingest.compact import compact
from ingest.lake import DRIVE_SUFFIX, is_uploaded, list_drive_files, live_files, uploaded_marker
from ingest.server import IngestService
from ingest.sink import run_sink
from retrain.models.reference import reference_dir
from sim.config import FleetConfig

log = logging.getLogger(__name__)

TINY = DemoConfig(
    fleet=FleetConfig(vehicles=3, drives_per_vehicle=2, drive_duration_s=10.0), targets=("cpu",),
    cycle={"mining": {"max_windows": 8, "max_per_drive": 2, "noise_margin": 1.0},
           "finetune": {"steps": 4, "batch_size": 32, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1},
           "compress": {"calibration_frames": 64, "fallback_frames": 32, "latency_runs": 2, "latency_warmup": 1},
           "verification": {"closed_loop": {"scenarios": ["highway"], "episodes": 1, "max_steps": 10},
                            "conditions": ["nominal"]},
           "gates": {"min_mined_frames": 1, "min_elsewhere_frames": 1}})
"""`flywheel demo --tiny`: every stage on 6 drives of 10 s and a cycle of a few steps for the CPU target, to check
that an install works end to end (its gate judges on next to nothing)."""


def _bar(console: Console, label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def simulate(settings: Settings, console: Console) -> Path:
    from sim.fleet import simulate_fleet

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


def lake_drive_rows(lake: Path) -> dict[str, int]:
    """Frames per drive in the lake."""
    files = [str(f.path) for f in live_files(lake, "frames")]
    if not files:
        return {}
    con = duckdb.connect()
    try:
        rows = con.read_parquet(files).aggregate("drive_id, count(*)", "drive_id").fetchall()
    finally:
        con.close()
    return dict(rows)


def forget_lost_uploads(files: list[Path], lake: Path, console: Console) -> None:
    """The embedded broker keeps records in memory only: drives it acknowledged but died with before the sink wrote
    them (a Ctrl-C, a crash) are marked uploaded yet missing from the lake. Upload those again; the sink's dedup by
    (drive_id, seq) keeps whatever part did land from being stored twice."""
    stored = lake_drive_rows(lake)
    lost = [f for f in files if is_uploaded(f) and stored.get(f.name[: -len(DRIVE_SUFFIX)], 0) < pq.read_metadata(f).num_rows]
    for f in lost:
        uploaded_marker(f).unlink()
    if lost:
        console.print(f"ingest: {len(lost)} drives were acknowledged by the embedded broker but never reached the "
                      "lake (it keeps records in memory); uploading them again")


def ingest(settings: Settings, drives_dir: Path, lake: Path, console: Console) -> None:
    files = list_drive_files(drives_dir)
    forget_lost_uploads(files, lake, console)
    todo = [f for f in files if not is_uploaded(f)]
    if not todo:
        console.print(f"ingest: all {len(files)} drives already uploaded; lake holds {lake_rows(lake)} frames")
        return
    stored = lake_drive_rows(lake)
    expected = lake_rows(lake) + sum(pq.read_metadata(f).num_rows - stored.get(f.name[: -len(DRIVE_SUFFIX)], 0)
                                     for f in todo)
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


REFERENCE = reference_dir()


def register_reference(registry_dir: Path, console: Console) -> None:
    """The shipped teacher and student v0 in the demo's registry (once); the student is the promoted one."""
    from retrain.cycle.registry import Registry

    registry = Registry(registry_dir)
    known = {(e.name, e.version) for e in registry.list()}
    for name, version, sub, parents in [("teacher", "v1", "teacher", []),
                                        ("student-fp32", "v0", "student-v0-fp32", ["teacher:v1"]),
                                        ("student", "v0", "student-v0", ["teacher:v1"])]:
        if (name, version) not in known:
            registry.register(name, version, REFERENCE / sub, parents=parents, recipe="retrain/reference")
    if not any(e.name == "student" and e.status == "promoted" for e in registry.list("student")):
        registry.promote("student", "v0", note="shipped reference student v0")
    console.print(f"models: {', '.join(f'{e.name}:{e.version} ({e.status})' for e in registry.list())}")


def shadow_replay(settings: Settings, lake: Path, registry_dir: Path, console: Console) -> None:
    from retrain.cycle.registry import Registry
    from shadow.config import ReplayConfig
    from shadow.batch.replay import replay

    registry = Registry(registry_dir)
    teacher = registry.version_dir("teacher", registry.get("teacher").version)
    student = registry.version_dir("student", registry.get("student").version)
    # every upload was acknowledged to its last frame: no drive is still growing
    cfg = ReplayConfig(drive_end_idle_s=0.0)
    with _bar(console, "shadow replay (teacher + student)") as bar:
        task = bar.add_task("replay", total=None)
        report = replay(lake, teacher, student, cfg, progress=lambda d, t: bar.update(task, completed=d, total=t))
    console.print(f"shadow: {report.frames_replayed} frames replayed ({report.files_covered} files already done) "
                  f"at {report.frames_per_s:,.0f} frames/s, pair {report.pair}")


def sql_summary(lake: Path, console: Console) -> None:
    from shadow.catalog import Catalog

    shown = {
        "divergence_by_condition": ("where the student diverges (saved query divergence_by_condition)",
                                    ["road_type", "lighting", "weather", "frames", "mean_score", "mean_ade_4s",
                                     "miss_rate_4s", "disagree_rate"], 12),
        "top_divergent_scenarios": ("worst scenario windows per condition (saved query top_divergent_scenarios)",
                                    ["condition", "value", "rank", "drive_id", "window_start_seq", "max_score",
                                     "mean_ade_4s", "passed"], 10),
    }
    cat = Catalog(lake)
    try:
        for name, (title, columns, limit) in shown.items():
            t = cat.saved(name).select(columns).slice(0, limit)
            table = Table(*columns, title=title)
            for row in t.to_pylist():
                table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
            console.print(table)
    finally:
        cat.close()


def retrain_cycle(settings: Settings, lake: Path, registry_dir: Path, console: Console) -> dict:
    from retrain.cycle.cycle import CycleConfig, run_cycle

    targets = list(settings.demo.targets)
    # the candidate is verified (shadow replay, closed loop) through the first chip's artifact, numerics included
    fields = {"lake": lake, "registry": registry_dir, "teacher": "teacher", "student": "student:v0",
              "student_checkpoint": REFERENCE / "student-v0" / "checkpoint.pt", "targets": targets,
              "verification": {"chip": targets[0]}}
    for key, value in settings.demo.cycle.items():  # nested sections merge, so an override keeps the other keys
        fields[key] = {**fields[key], **value} if isinstance(value, dict) and isinstance(fields.get(key), dict) else value
    cfg = CycleConfig.model_validate(fields)
    # one work dir per configuration: the same settings resume their cycle, changed ones start a new one
    key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]
    work = settings.demo.data_dir / "cycles" / key
    with _bar(console, "retraining cycle") as bar:
        task = bar.add_task("cycle", total=None)

        def progress(step, done=None, total=None, info=None) -> None:
            bar.update(task, description=str(step), completed=done or 0, total=total)

        result = run_cycle(cfg, work, progress=progress, resume=True)
    from retrain.cycle.cycle import format_result

    console.print(format_result(result), highlight=False, markup=False)
    return result.model_dump(mode="json")


def write_report(result: dict, lake: Path, out: Path, console: Console) -> None:
    from retrain.cycle.report import render_report

    render_report(result, out, lake)
    console.print(f"report: {out}")


def stage_table(stages: dict[str, float], cycle_steps: dict) -> Table:
    """Wall time of every demo stage, the cycle's steps indented under it (resumed ones marked)."""
    table = Table("stage", "seconds", title="where the time went")
    for name, seconds in stages.items():
        table.add_row(name, f"{seconds:.1f}")
        if name == "retraining cycle":
            for step, rec in cycle_steps.items():
                table.add_row(f"  {step}" + (" (resumed)" if rec.get("resumed") else ""), f"{rec['seconds']:.1f}")
    return table


def run_demo(settings: Settings, console: Console | None = None) -> None:
    console = console or Console()
    started = time.perf_counter()
    data = settings.demo.data_dir
    lake = data / "lake"
    registry = data / "registry"
    stages: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        yield
        stages[name] = time.perf_counter() - t0

    with stage("simulate fleet"):
        drives_dir = simulate(settings, console)
    with stage("ingest (gRPC -> Kafka -> lake)"):
        ingest(settings, drives_dir, lake, console)
    with stage("compact + summary + models"):
        report = compact(lake, "frames", target_rows=settings.sink.compact_target_rows)
        console.print(f"compaction: {report.small_files_removed} small files merged")
        summarize(lake, console)
        register_reference(registry, console)
    with stage("shadow replay"):
        shadow_replay(settings, lake, registry, console)
    with stage("SQL summary"):
        sql_summary(lake, console)
    with stage("retraining cycle"):
        result = retrain_cycle(settings, lake, registry, console)
    with stage("report"):
        write_report(result, lake, data / "report.html", console)
    console.print(stage_table(stages, result.get("steps", {})))
    console.print(f"cycle: {result['status']}" + (" - " + "; ".join(result["reasons"]) if result["reasons"] else
                                                  " - every gate passed"))
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")
