"""Scaling benchmark: 1 vs 2 shadow stream workers in one consumer group over the same frames topic.

    python -m bench.scaling                    # the shipped reference teacher and student v0, 12,000 frames
    python -m bench.scaling --frames 4000      # smaller

An embedded broker's frames topic (4 partitions) is filled once with synthetic drives (chunks of 100 frames, each
drive's last chunk final, as the ingest server produces them); then, for 1 and for 2 workers, `flywheel shadow
stream` processes start in a fresh consumer group over a fresh lake and the clock runs until the lake's
`divergences` hold every frame. Reported per worker count: frames/s from the start of the processes (model load and
group join included) and frames/s between the first and the last file written (the steady state), and the ratio
of 2 workers to 1. The whole machine is shared by the workers: each runs cores / workers single-threaded
onnxruntime runs at a time (the default runtime's shape), so the two runs use the same CPU. Backfill scaling on Ray
(1 vs 2 CPUs) is measured by `python -m bench.shadow` (with `backfill_fps` of this module). The LAST line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from kafka import KafkaProducer

from ingest.broker import EmbeddedBroker, ensure_topics
from ingest.bus import encode_record
from ingest.config import KafkaConfig
from ingest.contract import SCHEMA_VERSION
from ingest.lake import live_files
from ingest.synth import EPOCH_NS, synthetic_frames
from retrain.models.reference import reference_dir
from shadow.config import BackfillConfig, ReplayConfig, physical_cores

REPO = Path(__file__).resolve().parents[1]


def fill_topic(kafka: KafkaConfig, frames: int, drive_frames: int = 600, chunk: int = 100) -> int:
    """Produce synthetic drives to the frames topic; returns the frames produced."""
    producer = KafkaProducer(**kafka.client_options(), acks="all", enable_idempotence=True, linger_ms=5)
    n = 0
    try:
        futures = []
        for d in range(max(1, frames // drive_frames)):
            f = synthetic_frames(drive_frames, agents=20, waypoints=10, seed=d, start_ns=EPOCH_NS + d * 10**12)
            for s in range(0, drive_frames, chunk):
                part = f.slice(s, min(s + chunk, drive_frames))
                value, headers = encode_record(part, f"drive-{d:05d}", "veh-1", s, s + chunk >= drive_frames,
                                               SCHEMA_VERSION)
                futures.append(producer.send(kafka.frames_topic, key=f"drive-{d:05d}".encode(), value=value,
                                             headers=headers))
                n += part.num_frames
        producer.flush()
        for fut in futures:
            fut.get(timeout=30)
    finally:
        producer.close()
    return n


def divergence_rows(lake: Path) -> tuple[int, list[float]]:
    files = live_files(lake, "divergences")
    return sum(pq.read_metadata(f.path).num_rows for f in files), [f.path.stat().st_mtime for f in files]


def run_workers(kafka: KafkaConfig, k: int, teacher: Path, student: Path, total: int, root: Path,
                timeout_s: float) -> dict:
    lake = root / f"lake-{k}-{uuid.uuid4().hex[:6]}"
    threads = max(1, physical_cores() // k)
    # the default runtime's shape (single-threaded runs, one per core) with the cores shared out between workers
    stream = {"group_id": f"bench-{uuid.uuid4().hex[:8]}", "max_age_s": 1.0,
              "runtime": {"intra_op_threads": 1, "workers": threads}}
    env = {**os.environ, "FLYWHEEL_SHADOW__STREAM": json.dumps(stream)}
    cmd = [sys.executable, "-m", "flywheel", "shadow", "stream", "--bootstrap", kafka.bootstrap_servers,
           "--lake", str(lake), "--teacher", str(teacher), "--student", str(student)]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(k)]
    try:
        done = 0
        while time.time() - t0 < timeout_s:
            done, _ = divergence_rows(lake)
            if done >= total:
                break
            time.sleep(0.2)
        end = time.time()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    done, stamps = divergence_rows(lake)
    steady = (max(stamps) - min(stamps)) if len(stamps) > 1 else float("nan")
    shutil.rmtree(lake, ignore_errors=True)
    return {"workers": k, "threads_each": threads, "frames": done, "complete": done >= total,
            "seconds_from_start": end - t0, "fps_from_start": done / (end - t0),
            "seconds_first_to_last_file": steady, "fps_steady": done / steady if steady == steady and steady else None}


def backfill_fps(lake: Path, teacher: Path, student: Path, cfg: ReplayConfig, cpus: list[int], repeats: int,
                 files_per_task: int) -> dict[int, dict]:
    """Best-of-`repeats` backfill of the whole lake (`shadow.batch.backfill`) on a local Ray of each CPU count in
    `cpus`, started before the clock (its start-up is not the backfill's); the tasks load their models on the
    clock, as they do in use. {cpus: backfill report dict}."""
    import ray

    from shadow.batch.backfill import backfill

    out: dict[int, dict] = {}
    for n in cpus:
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
        try:
            for _ in range(repeats):
                _clean_outputs(lake)
                r = backfill(lake, teacher, student, cfg, BackfillConfig(files_per_task=files_per_task)
                             ).model_dump(mode="json")
                if n not in out or r["seconds"] < out[n]["seconds"]:
                    out[n] = r
        finally:
            ray.shutdown()
    _clean_outputs(lake)
    return out


def _clean_outputs(lake: Path) -> None:
    for table in ("decisions", "divergences", "scenarios", "noise_floor"):
        shutil.rmtree(lake / table, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=12_000)
    ap.add_argument("--teacher", type=Path, default=reference_dir() / "teacher")
    ap.add_argument("--student", type=Path, default=reference_dir() / "student-v0")
    ap.add_argument("--timeout", type=float, default=300.0, help="per run")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-scaling-"))
    try:
        with EmbeddedBroker() as broker:
            kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, partitions=4)
            ensure_topics(kafka)
            total = fill_topic(kafka, args.frames)
            runs = {k: run_workers(kafka, k, args.teacher, args.student, total, root, args.timeout) for k in (1, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"bench": "scaling", "frames": total, "partitions": 4, "cores": physical_cores(), "runs": runs,
              "stream_2_vs_1_from_start": runs[2]["fps_from_start"] / runs[1]["fps_from_start"]}
    if runs[1]["fps_steady"] and runs[2]["fps_steady"]:
        result["stream_2_vs_1_steady"] = runs[2]["fps_steady"] / runs[1]["fps_steady"]
    for k, r in runs.items():
        print(f"{k} stream worker(s), {r['threads_each']} concurrent run(s) each: {r['frames']:,} frames, "
              f"{r['fps_from_start']:,.0f} frames/s from start ({r['seconds_from_start']:.1f} s), "
              f"steady {r['fps_steady'] or float('nan'):,.0f} frames/s" + ("" if r["complete"] else " INCOMPLETE"))
    print(f"2 workers vs 1: {result['stream_2_vs_1_from_start']:.2f}x from start"
          + (f", {result['stream_2_vs_1_steady']:.2f}x steady" if "stream_2_vs_1_steady" in result else ""))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
