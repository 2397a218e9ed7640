"""Importer benchmark: frames per second of each `flywheel import` format on files it writes itself.

    python -m bench.importers [--agents 30] [--frames 6000] [--dir data/bench/importers]

For each format the files hold about `--frames` source frames of one synthetic scene family (`ingest.importers.samples`,
`--agents` agents each, 10% of the observations missing): Waymo TFRecords of 91-step scenarios, Argoverse 2
scenario files of 110 steps, one nuPlan log (ego poses at 50 Hz, boxes at 10 Hz), one ROS 2 MCAP (Odometry,
TrackedObjects and a Trajectory per step) and the project's own MCAP of the imported drives. The import (read,
resample, validate, write drive files atomically) runs once to warm up and then `--runs` times; the figure is the
best run. Reference in the same run, per format: writing the same drives as drive files alone
(`ingest.lake.write_drive`, one after the other, each fsynced twice), the part every importer shares (the importers
write through `ingest.lake.DriveBatch`, one fsync per drive, and overlap it with converting). Target: >= 20,000
frames/s per format, wall clock. Also printed: frames per CPU-second of the process (all its threads), what the
import costs whatever else runs on the machine. The host's CPU features and load average are printed first: the
figures are wall-clock times on a shared machine. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.importers import samples  # noqa: E402
from ingest.importers.mcap import export_mcap  # noqa: E402
from ingest.importers.ros2_samples import write_ros2  # noqa: E402
from ingest.importers.run import import_sources  # noqa: E402
from ingest.lake import list_drive_files, read_drive, write_drive  # noqa: E402

TARGET = 20_000


def cpu_features() -> list[str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted({w for w in text.split() if w == "avx2" or w.startswith("avx512")})


def write_sources(root: Path, frames: int, agents: int) -> dict[str, list[Path]]:
    """Source files of every format, about `frames` source frames each."""
    out: dict[str, list[Path]] = {}
    n = max(1, frames // 91)
    out["waymo"] = [samples.write_waymo(root / "waymo" / "bench.tfrecord-00000-of-00001",
                                        [(f"s{i}", samples.scene(91, agents=agents, seed=i)) for i in range(n)])]
    out["av2"] = [samples.write_av2(root / "av2", samples.scene(110, agents=agents, seed=i), f"s{i}")
                  for i in range(max(1, frames // 110))]
    big = samples.scene(frames, agents=agents, seed=7)
    out["nuplan"] = [samples.write_nuplan(root / "nuplan" / "log.db", big, "2021.08.26.bench")]
    out["ros2"] = [write_ros2(root / "ros2" / "drive.mcap", big)]
    imported = import_sources("av2", out["av2"], root / "av2-drives")
    out["mcap"] = [export_mcap([Path(d.path) for d in imported.drives], root / "own.mcap")]
    return out


def timed_import(fmt: str, files: list[Path], out: Path, runs: int) -> tuple[int, float, float]:
    """(frames, best wall-clock seconds, best CPU seconds of the process, all threads) over `runs` imports."""
    best = cpu = float("inf")
    frames = 0
    for i in range(runs + 1):
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        report = import_sources(fmt, files, out)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        frames = report.frames
        if i:  # the first run warms imports and caches
            best, cpu = min(best, dt), min(cpu, dc)
    return frames, best, cpu


def reference_write(drives: Path, out: Path, runs: int) -> tuple[int, float]:
    """Writing the drives alone (read beforehand): the floor every importer pays."""
    loaded = [read_drive(p) for p in list_drive_files(drives)]
    from ingest.contract import frames_to_arrow
    import pyarrow as pa

    tables = [pa.Table.from_batches([frames_to_arrow(d.frames, d.drive_id, d.vehicle_id, 0)]) for d in loaded]
    best = float("inf")
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        for t in tables:
            write_drive(out, t)
        best = min(best, time.perf_counter() - t0)
    return sum(t.num_rows for t in tables), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=6000)
    ap.add_argument("--agents", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=ROOT / "data" / "bench" / "importers")
    args = ap.parse_args()
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, features "
          f"{' '.join(cpu_features()) or 'unknown'}; load average {os.getloadavg()[0]:.2f}")
    shutil.rmtree(args.dir, ignore_errors=True)
    t0 = time.perf_counter()
    sources = write_sources(args.dir / "src", args.frames, args.agents)
    print(f"source files written in {time.perf_counter() - t0:.1f} s ({args.frames} frames per format, "
          f"{args.agents} agents)")
    fps: dict[str, float] = {}
    cpu_fps: dict[str, float] = {}
    ref: dict[str, float] = {}
    for fmt, files in sources.items():
        frames, dt, cpu = timed_import(fmt, files, args.dir / "out" / fmt, args.runs)
        fps[fmt], cpu_fps[fmt] = frames / dt, frames / cpu
        ref_frames, ref_dt = reference_write(args.dir / "out" / fmt, args.dir / "ref" / fmt, args.runs)
        ref[fmt] = ref_frames / ref_dt
        print(f"{fmt:7s} {frames:7,d} frames in {dt:6.3f} s = {fps[fmt]:9,.0f} frames/s "
              f"({'met' if fps[fmt] >= TARGET else 'MISSED'}: target {TARGET:,}); writing its drive files alone "
              f"{ref[fmt]:9,.0f} frames/s, ratio {fps[fmt] / ref[fmt]:.2f}; {cpu_fps[fmt]:9,.0f} frames per CPU-second")
    host = {"cpu": platform.processor() or platform.machine(), "features": cpu_features(), "cpus": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    print(json.dumps({"frames_per_s": {k: round(v) for k, v in fps.items()}, "target_frames_per_s": TARGET,
                      "frames_per_cpu_s": {k: round(v) for k, v in cpu_fps.items()},
                      "reference_write_frames_per_s": {k: round(v) for k, v in ref.items()},
                      "ratio_to_reference": {k: round(fps[k] / ref[k], 3) for k in fps}, "agents": args.agents,
                      "host": host}, sort_keys=True))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
