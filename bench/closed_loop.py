"""Closed-loop benchmark: windows per second of the log-replay closed loop against frames per second of the reactive
highway-env closed loop, measured in the same run.

    python -m bench.closed_loop                 # 4 simulated drives (one per scenario), 20,000 windows
    python -m bench.closed_loop --quick         # fewer drives, windows and episodes (smoke run)
    python -m bench.closed_loop --planner retrain/reference/student-v0 --episodes 2

In one run it measures:
- log replay (`shadow.log_replay.log_replay`): simulated drives of every scenario (highway-env, the fleet's
  simulator, 10 Hz, perceived agents, `sim.fleet.simulate_drive`; not timed) are concatenated, and every frame
  with a full on-board plan (8 waypoints, 0.5 s apart: the logged decision) is a window; windows are drawn from
  them until `--windows` and scored in batches of `--batch` (the plan followed for 4 s at 0.1 s steps against the
  logged agents, every sub-score and the combined score); best of `--repeats` passes, windows per second;
- the same on a denser scene: a synthetic drive (`ingest.synth`) with `--dense-agents` agents in every frame,
  windows per second reported beside the headline figure (which is the simulated fleet's);
- the reactive closed loop (`retrain.cycle.closed_loop.run_episode`: highway-env stepping, the fleet's perception and
  the planner's featurizer and ONNX session per step, the commanded ego): `--episodes` seeded episodes per scenario
  of up to `--max-steps` steps with the planner (default the shipped student v0), frames simulated per second;
- the ratio of the two, and log-replay steps per second (windows x steps) against simulated frames per second.
Prints what it measured; the LAST line is one JSON object with every figure, the target (>= 2,000 windows/s) and
the host's CPU features.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.contract import arrow_to_frames, frames_to_arrow
from ingest.synth import synthetic_frames
from retrain.cycle.closed_loop import ClosedLoopConfig, OnnxPlanner, episode_seeds, run_episode
from retrain.models.reference import reference_dir
from shadow.featurize import segments_of
from shadow.log_replay import LogReplayConfig, log_replay, logged_plans
from shadow.models import session
from shadow.numerics import host_features
from sim.config import SCENARIOS, FleetConfig, ScenarioMix
from sim.fleet import simulate_drive

TARGET_WINDOWS_PER_S = 2000.0


def load_average() -> float:
    return os.getloadavg()[0]


def simulated_drives(scenarios: list[str], seconds: float) -> pa.Table:
    """One simulated drive per scenario, concatenated (each ordered by seq)."""
    parts = []
    for i, sc in enumerate(scenarios):
        mix = ScenarioMix(**{s: float(s == sc) for s in SCENARIOS})
        drive, _ = simulate_drive(FleetConfig(scenario_mix=mix, drive_duration_s=seconds), 0, i)
        parts.append(drive)
    return pa.concat_tables(parts)


def replay_rate(table: pa.Table, windows: int, batch: int, repeats: int, config: LogReplayConfig) -> dict:
    """Best windows/s over `repeats` passes of `windows` windows in batches of `batch`, and the scores' means."""
    frames = arrow_to_frames(table)
    segments = segments_of(table)
    rows = np.arange(frames.num_frames)
    plans, full = logged_plans(frames, rows)
    pool = rows[full]
    pick = np.random.default_rng(0).choice(pool.shape[0], windows, replace=pool.shape[0] < windows)
    starts, trajs = pool[pick], plans[pool[pick]]
    log_replay(frames, starts[:batch], trajs[:batch], frames.plan_dt_s, segments, config)  # warm-up
    best, means = 0.0, {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [log_replay(frames, starts[i:i + batch], trajs[i:i + batch], frames.plan_dt_s, segments, config)
                for i in range(0, windows, batch)]
        best = max(best, windows / (time.perf_counter() - t0))
    cols = {k: np.concatenate([o.columns[k] for o in outs]) for k in outs[0].columns}
    for k in ("score", "no_at_fault_collision", "drivable_area_compliance", "ttc_within_bound", "ego_progress",
              "comfort"):
        means[k] = float(np.mean(cols[k]))
    agents = frames.cols["agent_count"][full]
    return {"windows_per_s": best, "windows": windows, "batch": batch, "frames": frames.num_frames,
            "distinct_windows": int(pool.shape[0]), "mean_agents_per_frame": float(np.mean(agents)),
            "mean_scores": means}


def episode_rate(planner: Path, scenarios: list[str], episodes: int, max_steps: int) -> dict:
    """Frames simulated per second by the reactive closed loop with an ONNX planner driving."""
    cfg = ClosedLoopConfig(scenarios=scenarios, episodes=episodes, max_steps=max_steps)
    policy = OnnxPlanner(planner, "planner")
    sess = session(policy.model, cfg.threads, verify=False)
    steps, seconds = 0, 0.0
    for sc in scenarios:
        for seed in episode_seeds(cfg, sc):
            t0 = time.perf_counter()
            rec = run_episode(policy, sc, seed, cfg, sess)
            seconds += time.perf_counter() - t0
            steps += rec["steps"]
    return {"frames_per_s": steps / seconds, "frames": steps, "seconds": seconds,
            "episodes": episodes * len(scenarios), "max_steps": max_steps, "planner": str(planner)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drive-s", type=float, default=30.0, help="seconds of each simulated drive")
    p.add_argument("--windows", type=int, default=20000, help="windows scored per pass")
    p.add_argument("--batch", type=int, default=4096, help="windows per log_replay call")
    p.add_argument("--repeats", type=int, default=3, help="passes; the best is reported")
    p.add_argument("--episodes", type=int, default=1, help="highway-env episodes per scenario")
    p.add_argument("--max-steps", type=int, default=100, help="steps per episode at most")
    p.add_argument("--dense-agents", type=int, default=30, help="agents per frame of the dense synthetic drive")
    p.add_argument("--planner", type=Path, default=reference_dir("student-v0"), help="ONNX planner directory")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = p.parse_args(argv)
    scenarios = list(SCENARIOS)
    if args.quick:
        args.drive_s, args.windows, args.repeats, args.max_steps = 10.0, 4096, 1, 30
        scenarios = ["highway", "roundabout"]
    load_before = load_average()
    config = LogReplayConfig()
    table = simulated_drives(scenarios, args.drive_s)
    lr = replay_rate(table, args.windows, args.batch, args.repeats, config)
    dense_table = pa.Table.from_batches([frames_to_arrow(
        synthetic_frames(1200, agents=args.dense_agents, waypoints=8, seed=1), "dense", "veh-dense", 0)])
    dense = replay_rate(dense_table, min(args.windows, 8192), args.batch, args.repeats, config)
    ep = episode_rate(args.planner, scenarios, args.episodes, args.max_steps)
    steps = config.steps
    result = {
        "bench": "closed_loop", "log_replay_windows_per_s": lr["windows_per_s"],
        "log_replay_steps_per_s": lr["windows_per_s"] * steps, "steps_per_window": steps,
        "horizon_s": config.horizon_s, "log_replay": lr, "highway_env_frames_per_s": ep["frames_per_s"],
        "dense_windows_per_s": dense["windows_per_s"], "dense_agents_per_frame": args.dense_agents,
        "highway_env": ep, "windows_per_highway_env_frame": lr["windows_per_s"] / ep["frames_per_s"],
        "log_replay_steps_per_highway_env_frame": lr["windows_per_s"] * steps / ep["frames_per_s"],
        "target_windows_per_s": TARGET_WINDOWS_PER_S,
        "meets_target": lr["windows_per_s"] >= TARGET_WINDOWS_PER_S, "scenarios": scenarios,
        "load_average_before": load_before, "load_average_after": load_average(),
        "host": {"cpu_features": list(host_features()), "cpus": os.cpu_count()},
    }
    print(f"{'log replay (windows of ' + str(config.horizon_s) + ' s, ' + str(steps) + ' steps)':<46} "
          f"{lr['windows_per_s']:,.0f} windows/s ({lr['windows']:,} windows in batches of {lr['batch']:,}, best of "
          f"{args.repeats}; {lr['distinct_windows']:,} distinct windows of {lr['frames']:,} simulated frames, "
          f"{lr['mean_agents_per_frame']:.1f} agents per frame) -> target {TARGET_WINDOWS_PER_S:,.0f} "
          + ("OK" if result["meets_target"] else "MISSED"))
    print(f"{'  scores of the logged on-board plans (means)':<46} "
          + ", ".join(f"{k} {v:.3f}" for k, v in lr["mean_scores"].items()))
    print(f"{'log replay, dense synthetic drive':<46} {dense['windows_per_s']:,.0f} windows/s "
          f"({args.dense_agents} agents in every frame)")
    print(f"{'reactive closed loop (highway-env, planner)':<46} {ep['frames_per_s']:,.1f} frames/s ({ep['frames']:,} "
          f"frames in {ep['episodes']} episodes, {ep['seconds']:.1f} s; planner {ep['planner']})")
    print(f"{'ratio':<46} {result['windows_per_highway_env_frame']:,.1f} log-replay windows per highway-env frame; "
          f"{result['log_replay_steps_per_highway_env_frame']:,.0f} simulated log-replay steps per highway-env frame")
    print(f"{'host':<46} {' '.join(result['host']['cpu_features'])}; load average {load_before:.2f} -> "
          f"{result['load_average_after']:.2f} (shared machine)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
