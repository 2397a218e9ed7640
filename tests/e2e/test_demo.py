"""`flywheel demo` through the real CLI at a reduced size: every stage runs, and a second run reuses them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from ingest.lake import live_files

TINY_CYCLE = {
    "mining": {"max_windows": 8, "max_per_drive": 2, "noise_margin": 1.0},
    "finetune": {"steps": 4, "batch_size": 32, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1},
    "compress": {"calibration_frames": 64, "fallback_frames": 32, "latency_runs": 2, "latency_warmup": 1},
    "verification": {"closed_loop": {"scenarios": ["highway"], "episodes": 1, "max_steps": 10},
                     "conditions": ["nominal"]},
    "gates": {"min_mined_frames": 1, "min_elsewhere_frames": 1},
}


def _demo(data, env_extra=None) -> subprocess.CompletedProcess:
    cfg = data / "flywheel.toml"
    cfg.write_text(f'[demo]\ndata_dir = "{data}"\ntargets = ["cpu"]\n'
                   "[demo.fleet]\nvehicles = 3\ndrives_per_vehicle = 2\ndrive_duration_s = 10.0\n")
    env = {**os.environ, "FLYWHEEL_DEMO__CYCLE": json.dumps(TINY_CYCLE), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flywheel", "--config", str(cfg), "demo"], capture_output=True,
                          text=True, env=env, timeout=900)


def test_demo_runs_every_stage_and_reuses_them(tmp_path):
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for stage in ("fleet:", "ingest:", "models:", "shadow:", "divergence_by_condition", "cycle:", "report:"):
        assert stage in out, stage
    frames = sum(pq.read_metadata(f.path).num_rows for f in live_files(tmp_path / "lake", "frames"))
    assert frames == 600  # 6 drives x 10 s x 10 Hz, each once
    assert sum(pq.read_metadata(f.path).num_rows for f in live_files(tmp_path / "lake", "divergences")) == 600
    report = (tmp_path / "report.html").read_text()
    assert "<html" in report and "data:image/png;base64," in report
    [result] = (tmp_path / "cycles").glob("*/result.json")
    cycle = json.loads(result.read_text())
    assert cycle["status"] in ("promoted", "rejected")

    second = _demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    again = " ".join(second.stdout.split())  # rich wraps long lines
    assert "0 drives simulated, 6 cached" in again
    assert "all 6 drives already uploaded" in again
    assert "shadow: 0 frames replayed" in again
    assert sum(pq.read_metadata(f.path).num_rows for f in live_files(tmp_path / "lake", "frames")) == 600
