"""The reference fleet: drives logged from highway-env with the rule-based expert at the wheel.

`simulate_drive(config, v, d)` turns drive d of vehicle v into two tables: the frames the car logged (FRAME_SCHEMA,
what perception reported and what the expert decided) and the simulator's truth (`sim.truth`).
`simulate_fleet(config, out_dir)` writes every drive of the fleet into a drive directory (`ingest.lake` layout) with
its truth beside it, in parallel, skipping drives already there for the same fingerprint.

A drive is a chain of scenes of one scenario type. highway-v0 runs as long as asked; the other scenarios end when the
ego has driven through (past the merge, out of the roundabout or the junction), collided or stalled, and the drive
continues with a new scene of the same type placed where the ego is: position, heading and speed carry over (see
`env.to_world`), the traffic is new. So a 40 s "roundabout" drive is a trip through consecutive roundabouts.

The on-board decision logged is the deployed student's (`sim.onboard`, shadow mode: it runs passively while the
expert drives), computed per drive after the simulation; the expert's decision is kept in the truth. The expert's:
planned waypoints are the ego's actual path over the next
`plan_waypoints * plan_dt_s` seconds (known because the drive is logged), in the ego frame of the frame (x forward,
y left); the last frames of a drive get fewer. The maneuver is a lane change while the ego is more than
`lane_change_offset_m` from the centre of the lane MOBIL chose, else accelerate / decelerate / keep lane from the
IDM command; the control is the expert's command (front-wheel angle, acceleration).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.contract import frames_to_arrow, validate
from ingest.lake import drive_path, list_drive_files, write_drive
from ingest.wire import drive_pb2 as pb
from sim.config import CONDITIONS, SCENARIOS, FleetConfig
from sim.env import SceneLog, make_env, record_scene, reset_env, to_world
from sim.frames import EPOCH_NS, frames_from_scene
from sim.perception import perceive
from sim.onboard import onboard_decision
from sim.truth import truth_footer, truth_path, truth_table, with_expert_decision, write_truth

logger = logging.getLogger(__name__)

DAY_NS = 86_400 * 10**9
HOUR_NS = 3_600 * 10**9
MANIFEST_NAME = "fleet.json"
MANIFEST_VERSION = 1


def vehicle_id(vehicle_index: int) -> str:
    return f"veh-{vehicle_index:04d}"


@dataclass(frozen=True)
class DrivePlan:
    """Who drives what: identities and the independent random streams of one drive (pure function of the seed)."""

    vehicle_id: str
    drive_id: str
    scenario: str
    streams: tuple  # numpy SeedSequences: env scenes, conditions, perception, timing


def plan_drive(config: FleetConfig, vehicle_index: int, drive_index: int) -> DrivePlan:
    """Identity and random streams of drive `drive_index` of vehicle `vehicle_index`; no simulation."""
    root = np.random.SeedSequence([config.seed, vehicle_index, drive_index])
    pick, *streams = root.spawn(5)
    w = np.array(config.scenario_mix.weights())
    scenario = SCENARIOS[int(np.random.default_rng(pick).choice(len(SCENARIOS), p=w / w.sum()))]
    # the seed is part of the id: fleets simulated from different seeds never collide in one lake
    drive_id = f"drive-{vehicle_index:04d}-{drive_index:04d}-{scenario}-s{config.seed}"
    return DrivePlan(vehicle_id(vehicle_index), drive_id, scenario, tuple(streams))


def _concat_scenes(scenes: list[SceneLog]) -> tuple[dict, np.ndarray, dict, np.ndarray, np.ndarray]:
    ego = {k: np.concatenate([s.ego[k] for s in scenes]) for k in scenes[0].ego}
    counts = np.concatenate([s.agent_count for s in scenes])
    agents = {k: np.concatenate([s.agents[k] for s in scenes]) for k in scenes[0].agents}
    scene = np.repeat(np.arange(len(scenes)), [s.num_frames for s in scenes])
    starts = np.cumsum([0] + [s.num_frames for s in scenes[:-1]])
    return ego, counts, agents, scene, starts[scene]


def _rates(values: np.ndarray, scene: np.ndarray, dt: float, fallback: np.ndarray, angular: bool) -> np.ndarray:
    """Backward difference per frame within a scene [unit/s]; a scene's first frame takes `fallback`."""
    d = np.diff(values, prepend=values[:1])
    if angular:
        d = (d + np.pi) % (2 * np.pi) - np.pi
    out = d / dt
    first = np.ones(values.shape[0], bool)
    first[1:] = scene[1:] != scene[:-1]
    out[first] = fallback[first]
    return out


def _plan(x: np.ndarray, y: np.ndarray, heading: np.ndarray, config: FleetConfig) -> tuple[np.ndarray, ...]:
    """Future ego positions at k * plan_dt_s (k = 1..K) in the ego frame of each frame: counts (n,), x, y (P,)."""
    n, step = x.shape[0], config.frames_per_waypoint
    counts = np.minimum(config.plan_waypoints, (n - 1 - np.arange(n)) // step).astype(np.int64)
    t = np.repeat(np.arange(n), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = np.arange(t.shape[0]) - np.repeat(starts, counts) + 1
    j = t + k * step
    dx, dy = x[j] - x[t], y[j] - y[t]
    c, s = np.cos(heading[t]), np.sin(heading[t])
    return counts, c * dx + s * dy, -s * dx + c * dy


def _maneuver(target_offset: np.ndarray, accel_cmd: np.ndarray, config: FleetConfig) -> np.ndarray:
    # target_offset is the ego's offset from its target lane, left positive: left of the target means moving right
    thr, acc = config.lane_change_offset_m, config.accel_threshold_mps2
    return np.select([target_offset > thr, target_offset < -thr, accel_cmd > acc, accel_cmd < -acc],
                     [pb.MANEUVER_CHANGE_RIGHT, pb.MANEUVER_CHANGE_LEFT, pb.MANEUVER_ACCELERATE,
                      pb.MANEUVER_DECELERATE], pb.MANEUVER_KEEP_LANE)


def simulate_drive(config: FleetConfig, vehicle_index: int, drive_index: int) -> tuple[pa.Table, pa.Table]:
    """Simulate one drive; returns (frames as FRAME_SCHEMA rows, truth as TRUTH_SCHEMA rows with footer metadata).

    Deterministic: the same config and indices give identical tables in any process.
    """
    plan = plan_drive(config, vehicle_index, drive_index)
    env_ss, cond_ss, perc_ss, time_ss = plan.streams
    scene_seeds = np.random.default_rng(env_ss)
    total = config.frames_per_drive
    scenes: list[SceneLog] = []
    ids: dict = {}
    env, anchor, speed, done = None, None, None, 0
    while done < total:
        seed = int(scene_seeds.integers(2**31))
        if env is None:
            env = make_env(plan.scenario, seed, config)
        else:
            reset_env(env, seed)
            env.vehicle.speed = speed  # the ego keeps its speed into the next scene
        scene = to_world(record_scene(env, ids, total - done, config), anchor)
        scenes.append(scene)
        anchor, speed, done = scene.end_pose, scene.end_speed, done + scene.num_frames
    env.close()
    ego, truth_count, truth, scene_of, scene_start = _concat_scenes(scenes)
    n = truth_count.shape[0]

    # Conditions per segment, drawn at the configured long-tail rates.
    seg = config.frames_per_segment
    seg_cond = np.random.default_rng(cond_ss).choice(len(CONDITIONS), size=-(-n // seg),
                                                     p=config.condition_rates.probabilities())
    cond = np.repeat(seg_cond, seg)[:n]
    perceived = perceive(truth_count, truth, ego, cond, scene_start, config.perception.by_condition(),
                         np.random.default_rng(perc_ss), first_false_positive_id=len(ids) + 1)

    dt = config.dt_s
    start_ns = (EPOCH_NS + drive_index * DAY_NS + 6 * HOUR_NS + vehicle_index * 10**6
                + int(np.random.default_rng(time_ss).integers(0, 12 * 3600 * 1000)) * 10**6)
    a = perceived.agents
    frames = frames_from_scene(ego, perceived, cond, plan.scenario, start_ns,
                               accel=_rates(ego["speed"], scene_of, dt, ego["accel_cmd"], angular=False),
                               yaw_rate=_rates(ego["heading"], scene_of, dt, np.zeros(n), angular=True),
                               config=config, plan=_plan(ego["x"], ego["y"], ego["heading"], config),
                               maneuver=_maneuver(ego["target_offset"], ego["accel_cmd"], config))
    validate(frames)
    drive = pa.Table.from_batches([frames_to_arrow(frames, plan.drive_id, plan.vehicle_id, 0)])

    collided = np.zeros(n, bool)
    ends = np.cumsum([s.num_frames for s in scenes]) - 1
    collided[ends[[s.end_reason == "collision" for s in scenes]]] = True
    reasons: dict[str, int] = {}
    for s in scenes:
        reasons[s.end_reason] = reasons.get(s.end_reason, 0) + 1
    stats = {"drive_id": plan.drive_id, "vehicle_id": plan.vehicle_id, "scenario": plan.scenario, "frames": n,
             "frames_by_condition": {c: int((cond == i).sum()) for i, c in enumerate(CONDITIONS)},
             "scenes": len(scenes), "scene_end_reasons": reasons, "expert_collisions": int(collided.sum())}
    meta = {"flywheel.drive_id": plan.drive_id, "flywheel.vehicle_id": plan.vehicle_id,
            "flywheel.config_hash": config.drive_hash(), "flywheel.drive_stats": json.dumps(stats, sort_keys=True)}
    fp_ids = a["id"][perceived.false_positive]
    fp_count = np.bincount(np.repeat(np.arange(n), perceived.count)[perceived.false_positive], minlength=n)
    truth_agents = {**truth, "agent_class": np.full(truth["id"].shape[0], pb.AGENT_CLASS_CAR)}
    truth_cols = {"scene": scene_of, "condition": cond, "source_seq": perceived.source_frame,
                  "ego_x": ego["x"], "ego_y": ego["y"], "ego_heading": ego["heading"], "ego_speed": ego["speed"],
                  "ego_crashed_next": collided}
    truth_tab = truth_table(plan.drive_id, truth_cols, truth_count, truth_agents, list(CONDITIONS), fp_count,
                            fp_ids, meta)
    return drive, truth_tab


# ------------------------------------------------------------------------------------------------------------ fleet


@dataclass
class FleetSummary:
    """What a fleet run produced: counts per scenario and condition, and how much was simulated vs. reused.

    `frames_by_scenario_condition[scenario][condition]` is the frame count of every (scenario, condition) pair;
    `sim_frames_per_s` is the simulated frames over the wall time of this call (0 when everything was cached).
    """

    config_hash: str
    out_dir: Path
    drives: int = 0
    frames: int = 0
    simulated: int = 0
    cached: int = 0
    expert_collisions: int = 0
    wall_s: float = 0.0
    sim_frames_per_s: float = 0.0
    drives_by_scenario: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SCENARIOS})
    frames_by_scenario: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SCENARIOS})
    frames_by_condition: dict[str, int] = field(default_factory=lambda: {c: 0 for c in CONDITIONS})
    frames_by_scenario_condition: dict[str, dict[str, int]] = field(
        default_factory=lambda: {s: {c: 0 for c in CONDITIONS} for s in SCENARIOS})
    drive_files: list[Path] = field(default_factory=list, repr=False)

    def add(self, stats: dict, path: Path, cached: bool) -> None:
        """Count one drive from its statistics (as stored in its truth footer)."""
        scenario = stats["scenario"]
        self.drives += 1
        self.frames += stats["frames"]
        self.cached += cached
        self.simulated += not cached
        self.expert_collisions += stats["expert_collisions"]
        self.drives_by_scenario[scenario] += 1
        self.frames_by_scenario[scenario] += stats["frames"]
        for c, k in stats["frames_by_condition"].items():
            self.frames_by_condition[c] += k
            self.frames_by_scenario_condition[scenario][c] += k
        self.drive_files.append(path)

    def rows(self) -> list[tuple[str, int, int, dict[str, int]]]:
        """(scenario, drives, frames, frames per condition) per scenario, for a table."""
        return [(s, self.drives_by_scenario[s], self.frames_by_scenario[s], dict(self.frames_by_scenario_condition[s]))
                for s in SCENARIOS]

    def _table_rows(self) -> list[list[str]]:
        rows = [[s, str(d), str(f), *(str(k[c]) for c in CONDITIONS)] for s, d, f, k in self.rows()]
        rows.append(["total", str(self.drives), str(self.frames), *(str(self.frames_by_condition[c]) for c in CONDITIONS)])
        return rows

    def _caption(self) -> str:
        speed = f", {self.sim_frames_per_s:.0f} frames/s" if self.simulated else ""
        return (f"{self.out_dir}: {self.simulated} drives simulated, {self.cached} cached, "
                f"{self.expert_collisions} expert collisions, {self.wall_s:.1f} s{speed} (config {self.config_hash})")

    def __str__(self) -> str:
        head = ["scenario", "drives", "frames", *CONDITIONS]
        rows = [head, *self._table_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([*lines, self._caption()])

    def __rich__(self):
        """A table when printed with rich (the CLI prints the summary as is)."""
        from rich.table import Table

        table = Table(title="reference fleet (frames per condition)", caption=self._caption())
        for i, name in enumerate(["scenario", "drives", "frames", *CONDITIONS]):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in self._table_rows():
            table.add_row(*row)
        return table


def _cached_stats(drive_file: Path, config_hash: str) -> dict | None:
    """The stored statistics of a drive if both its files exist and were made for `config_hash`, else None."""
    truth = truth_path(drive_file)
    if not (drive_file.exists() and truth.exists()):
        return None
    try:
        meta = truth_footer(truth)
    except (OSError, ValueError) as exc:  # unreadable or foreign file: simulate again
        logger.warning("ignoring %s: %s", truth, exc)
        return None
    if meta.get("flywheel.config_hash") != config_hash:
        return None
    return json.loads(meta["flywheel.drive_stats"])


def _simulate_to_disk(config_json: str, vehicle_index: int, drive_index: int, out_dir: str) -> dict:
    """Worker: simulate a drive and write its truth, then its drive file; returns its statistics."""
    config = FleetConfig.model_validate_json(config_json)
    drive, truth = simulate_drive(config, vehicle_index, drive_index)
    if config.onboard.model_for(vehicle_id(vehicle_index)) is not None:
        # shadow mode: the deployed student's decision is the logged one, the expert's goes to the truth
        truth = with_expert_decision(truth, drive)
        drive = onboard_decision(config.onboard, drive, config.plan_waypoints, config.plan_dt_s)
    plan = plan_drive(config, vehicle_index, drive_index)
    # truth first: a drive file without truth of the current fingerprint is re-simulated, never half-cached
    write_truth(drive_path(Path(out_dir), plan.vehicle_id, plan.drive_id), truth)
    write_drive(Path(out_dir), drive)
    return json.loads(truth.schema.metadata[b"flywheel.drive_stats"])


def simulate_fleet(config: FleetConfig, out_dir: Path,
                   progress: Callable[[int, int], None] | None = None) -> FleetSummary:
    """Simulate every drive of the fleet into `out_dir` (drive-directory layout of `ingest.lake`) with its truth.

    Drives already present for the same `config.drive_hash()` are not simulated again. The others run on a pool of
    `config.workers` processes (in this process when 1). `progress(done, total)` is called after each drive. A
    manifest `fleet.json` in `out_dir` lists the drives of this configuration.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_hash = config.drive_hash()
    summary = FleetSummary(config_hash=config_hash, out_dir=out_dir)
    total = config.total_drives
    todo: list[tuple[int, int, Path]] = []
    stats_by_path: dict[Path, tuple[dict, bool]] = {}
    done = 0
    for v in range(config.vehicles):
        for d in range(config.drives_per_vehicle):
            plan = plan_drive(config, v, d)
            path = drive_path(out_dir, plan.vehicle_id, plan.drive_id)
            stats = _cached_stats(path, config_hash)
            if stats is None:
                todo.append((v, d, path))
            else:
                stats_by_path[path] = (stats, True)
                done += 1
                if progress:
                    progress(done, total)
    logger.info("fleet %s: %d drives, %d cached, %d to simulate with %d worker(s)", config_hash, total,
                total - len(todo), len(todo), config.workers)

    def finished(path: Path, stats: dict) -> None:
        nonlocal done
        stats_by_path[path] = (stats, False)
        done += 1
        logger.info("simulated %s (%d frames, %s)", stats["drive_id"], stats["frames"], stats["scenario"])
        if progress:
            progress(done, total)

    config_json = config.model_dump_json()
    if config.workers == 1 or len(todo) <= 1:
        for v, d, path in todo:
            finished(path, _simulate_to_disk(config_json, v, d, str(out_dir)))
    else:
        # spawn, not fork: the parent may hold threads (gRPC, Kafka clients) that a forked child would inherit broken
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(config.workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_simulate_to_disk, config_json, v, d, str(out_dir)): path for v, d, path in todo}
            try:
                for fut in as_completed(futures):
                    finished(futures[fut], fut.result())
            except BaseException:
                # fail fast (a broken drive, Ctrl-C): do not wait for the rest of the fleet; finished drives stay
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    for path in sorted(stats_by_path):
        stats, cached = stats_by_path[path]
        summary.add(stats, path, cached)
    foreign = set(list_drive_files(out_dir)) - set(stats_by_path)
    if foreign:  # an agent would upload them too; deleting what someone else wrote is not ours to do
        logger.warning("%s holds %d drive files that are not part of this fleet (other seed or size), e.g. %s",
                       out_dir, len(foreign), min(foreign).name)
    summary.wall_s = time.perf_counter() - t0
    sim_frames = sum(s["frames"] for s, cached in stats_by_path.values() if not cached)
    summary.sim_frames_per_s = sim_frames / summary.wall_s if sim_frames else 0.0
    _write_manifest(out_dir, config, summary, stats_by_path)
    return summary


def _write_manifest(out_dir: Path, config: FleetConfig, summary: FleetSummary,
                    stats_by_path: dict[Path, tuple[dict, bool]]) -> None:
    drives = [{**stats, "path": str(path.relative_to(out_dir)), "truth_path": str(truth_path(path).relative_to(out_dir))}
              for path, (stats, _) in sorted(stats_by_path.items())]
    doc = {"format": "fleet-manifest", "format_version": MANIFEST_VERSION, "config_hash": summary.config_hash,
           "config": config.model_dump(mode="json"), "frames": summary.frames, "drives": drives}
    tmp = out_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(out_dir / MANIFEST_NAME)
