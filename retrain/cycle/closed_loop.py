"""Closed-loop evaluation: an ONNX planner drives the ego in highway-env, against the rule-based expert.

    from retrain.cycle.closed_loop import ClosedLoopConfig, OnnxPlanner, EXPERT, evaluate
    records = evaluate({"expert": EXPERT, "student": OnnxPlanner("artifacts/student/int8")}, ClosedLoopConfig())

Per step (10 Hz, one env step per logged frame as in the fleet): the ego's state, its lane context
(`sim.env.lane_context`, what the fleet logs) and the true vehicles around it are logged in highway-env
axes; the last `shadow.featurize.HISTORY` frames are turned into a scene, moved into the contract's world frame by
`sim.env.to_world`, seen through the fleet's perception model (`sim.perception.perceive`, the
configured condition, nominal by default) and featurized by the planner's own featurizer (`shadow.plugins`, found
from its graph's inputs) exactly as the fleet's frames are (`sim.frames.frames_from_scene` builds both). The planner's trajectory (8 waypoints, 0.5 s apart, ego frame) becomes the ego's command:

- steering: pure pursuit on the planned path, aiming at the point `lookahead_s * speed` metres along it (at least
  `min_lookahead_m`), turned into highway-env's bicycle-model steering angle;
- acceleration: the constant acceleration that best fits the distances planned for the first `accel_waypoints`
  waypoints from the current speed (least squares), clipped to the vehicle's limits.
The ego is a plain highway-env `Vehicle` (kinematic bicycle) that applies that command; it brakes to a stop and
never reverses. The expert episodes use the fleet's `ExpertVehicle` (IDM/MOBIL), same scenes from the same seeds.

Metrics per episode, with units: collision; minimum time-to-collision (s) against vehicles ahead in the ego's
corridor (constant velocities, capped at `ttc_cap_s`); comfort as nuPlan's ego_is_comfortable checks it (its
default limits; signals differentiated with a Savitzky-Golay filter, quadratic, 5 frames): longitudinal
acceleration (m/s^2), lateral acceleration (m/s^2), longitudinal jerk (m/s^3), yaw rate (rad/s), yaw acceleration
(rad/s^2), all judged after the first `settle_s` (spawn transients); progress: distance driven (m) and mean speed
(m/s). Everything is deterministic from the seeds.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from highway_env.vehicle.kinematics import Vehicle
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import Frames
from sim.env import ROAD_TYPES, SceneLog, lane_context, make_env, route_ended, step_env, to_world
from sim.config import CONDITIONS, FleetConfig
from sim.perception import perceive
from sim.frames import EPOCH_NS, frames_from_scene
from shadow.featurize import HISTORY, HORIZON_DT_S
from shadow.log_replay import ComfortLimits as LogReplayComfort
from shadow.models import session
from shadow.plugins import featurizer_for_inputs

log = logging.getLogger(__name__)


NUPLAN = LogReplayComfort()  # nuPlan's comfort limits


class ComfortLimits(BaseModel):
    """Comfort limits; defaults are nuPlan's (nuplan-devkit ego_is_comfortable), the same numbers the log-replay
    closed loop holds (`shadow.log_replay.ComfortLimits`, their one source)."""

    model_config = ConfigDict(extra="forbid")

    min_lon_accel: float = Field(NUPLAN.min_lon_accel_mps2, description="m/s^2, braking limit")
    max_lon_accel: float = Field(NUPLAN.max_lon_accel_mps2, description="m/s^2")
    max_abs_lat_accel: float = Field(NUPLAN.max_abs_lat_accel_mps2, description="m/s^2")
    max_abs_lon_jerk: float = Field(NUPLAN.max_abs_lon_jerk_mps3, description="m/s^3")
    max_abs_yaw_rate: float = Field(NUPLAN.max_abs_yaw_rate_radps, description="rad/s")
    max_abs_yaw_accel: float = Field(NUPLAN.max_abs_yaw_accel_radps2, description="rad/s^2")


class ControllerConfig(BaseModel):
    """Trajectory -> command."""

    model_config = ConfigDict(extra="forbid")

    lookahead_s: float = Field(1.0, gt=0, description="pure-pursuit lookahead, seconds of travel at current speed")
    min_lookahead_m: float = Field(5.0, gt=0, description="shortest pure-pursuit lookahead, m")
    accel_waypoints: int = Field(2, ge=1, le=8, description="waypoints the acceleration is fitted to")
    max_accel: float = Field(4.0, gt=0, description="largest commanded acceleration, m/s^2")
    max_brake: float = Field(8.0, gt=0, description="largest commanded deceleration, m/s^2")
    max_steering: float = Field(float(np.pi / 4), gt=0, description="largest steering angle, rad")


class ClosedLoopConfig(BaseModel):
    """Which scenes, how long, seen how; defaults evaluate every scenario a few times."""

    model_config = ConfigDict(extra="forbid")

    scenarios: list[str] = Field(default_factory=lambda: ["highway", "merge", "roundabout", "intersection"],
                                 description="highway-env scenarios")
    episodes: int = Field(3, ge=1, description="seeded episodes per scenario")
    seed: int = Field(0, ge=0, description="episode e of scenario s uses a seed drawn from (seed, s, e)")
    max_steps: int = Field(200, ge=2, description="steps (frames) per episode at most")
    condition: str = Field("nominal", description="perception condition of the planner's input")
    fleet: FleetConfig = Field(default_factory=lambda: FleetConfig(workers=1), description="frame rate, perception")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="trajectory -> command")
    comfort: ComfortLimits = Field(default_factory=ComfortLimits, description="comfort limits")
    settle_s: float = Field(1.0, ge=0, description="comfort and TTC are judged from this time on, s: highway-env "
                            "spawns vehicles at speeds their drivers correct at once (the merge ego starts at 30 m/s "
                            "and brakes at -6 m/s^2); collisions count from the start")
    ttc_cap_s: float = Field(10.0, gt=0, description="TTC reported when nothing is closing in, s")
    ttc_threshold_s: float = Field(0.95, gt=0, description="an episode whose minimum TTC is below this is unsafe "
                                   "(nuPlan's time_to_collision_within_bound)")
    threads: int = Field(1, ge=1, description="onnxruntime threads of the planner")
    workers: int = Field(0, ge=0, description="processes the episodes run in: 0 = one per CPU core this process may "
                         "use, at most one per two episodes; 1 = in this process. The records do not depend on it: "
                         "every episode is seeded and runs alone in its environment")


class PlannedVehicle(Vehicle):
    """A kinematic-bicycle ego that applies the command it is given, and stops rather than reverses."""

    command: dict = {"steering": 0.0, "acceleration": 0.0}

    def act(self, action: dict | str | None = None) -> None:
        self.action = dict(self.command)

    def step(self, dt: float) -> None:
        if not self.crashed and self.speed >= 0 and self.speed + float(self.action["acceleration"]) * dt < 0:
            self.action["acceleration"] = -self.speed / dt
        super().step(dt)


@dataclass(frozen=True)
class Policy:
    """Who drives: the expert, an ONNX planner (`model`), or a constant command (`accel`, `steer`; for tests)."""

    name: str
    model: Path | None = None
    accel: float | None = None
    steer: float = 0.0

    @property
    def expert(self) -> bool:
        return self.model is None and self.accel is None


EXPERT = Policy("expert")


def OnnxPlanner(model: Path | str, name: str = "planner") -> Policy:  # noqa: N802  (reads like a class)
    return Policy(name, model=Path(model))


def ConstantCommand(accel: float, steer: float = 0.0, name: str = "constant") -> Policy:  # noqa: N802
    return Policy(name, accel=accel, steer=steer)


def control_from_trajectory(traj: np.ndarray, speed: float, length: float, cfg: ControllerConfig) -> tuple[float, float]:
    """(acceleration m/s^2, steering rad, highway-env sign) from a planned trajectory (T, 3) in the contract's ego
    frame (x forward, y left, metres); see the module docstring."""
    pts = np.vstack([[0.0, 0.0], traj[:, :2].astype(np.float64)])
    seg = np.hypot(*np.diff(pts, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    look = max(cfg.min_lookahead_m, cfg.lookahead_s * max(speed, 0.0))
    if s[-1] > 1e-6:
        x, y = np.interp(min(look, s[-1]), s, pts[:, 0]), np.interp(min(look, s[-1]), s, pts[:, 1])
        d2 = x * x + y * y
        kappa = 2.0 * y / d2 if d2 > 1e-6 else 0.0  # left-positive curvature in the contract's frame
    else:
        kappa = 0.0
    # highway-env: heading rate = v sin(beta) / (L/2), beta = atan(tan(delta) / 2); its y axis points the other way
    beta = np.arcsin(np.clip(-kappa * length / 2.0, -1.0, 1.0))
    steer = float(np.clip(np.arctan(2.0 * np.tan(beta)), -cfg.max_steering, cfg.max_steering))
    k = cfg.accel_waypoints
    t = HORIZON_DT_S * np.arange(1, k + 1)
    h = 0.5 * t * t
    accel = float(np.sum(h * (s[1:k + 1] - speed * t)) / np.sum(h * h))
    return float(np.clip(accel, -cfg.max_brake, cfg.max_accel)), steer


class EpisodeLog:
    """The episode so far in highway-env axes: ego rows (SceneLog ego keys), true agents per frame."""

    EGO = ("x", "y", "heading", "speed", "lane_count", "lane_rank", "lane_width", "lane_offset", "lane_heading",
           "lane_curvature", "speed_limit", "steer", "accel_cmd", "target_offset")

    def __init__(self, truth_range_m: float) -> None:
        self.ego: list[list[float]] = []
        self.agents: list[np.ndarray] = []
        self.ids: dict = {}
        self.range = truth_range_m

    def record(self, env) -> None:
        ego = env.vehicle
        self.ego.append([ego.position[0], ego.position[1], ego.heading, ego.speed,
                         *lane_context(env, ego.lane_index, ego.position), 0.0, 0.0, 0.0])
        rows = [[self.ids.setdefault(v, len(self.ids) + 1), *v.position, *v.velocity, v.heading, v.LENGTH, v.WIDTH]
                for v in env.road.vehicles if v is not ego and np.hypot(*(v.position - ego.position)) <= self.range]
        self.agents.append(np.array(rows, dtype=np.float64).reshape(-1, 8))

    def window(self) -> tuple[SceneLog, tuple[float, float] | None]:
        """The last HISTORY frames as a scene, and (speed, heading) of the frame before them (None at the start)."""
        k = min(HISTORY, len(self.ego))
        e = np.array(self.ego[-k:])
        a = self.agents[-k:]
        flat = np.concatenate(a) if a else np.zeros((0, 8))
        keys = ("id", "x", "y", "vx", "vy", "heading", "length", "width")
        prev = (self.ego[-k - 1][3], self.ego[-k - 1][2]) if len(self.ego) > k else None
        return SceneLog(ego={key: e[:, i] for i, key in enumerate(self.EGO)},
                        agent_count=np.array([len(x) for x in a], np.int64),
                        agents={key: flat[:, i] for i, key in enumerate(keys)}), prev

    def command(self, steer: float, accel: float) -> None:
        """The command applied from the last logged frame (logged with it, as the fleet does)."""
        self.ego[-1][11:13] = [steer, accel]


def window_frames(scene: SceneLog, prev: tuple[float, float] | None, scenario: str, condition: int,
                  cfg: FleetConfig, rng: np.random.Generator) -> Frames:
    """The fleet's frames for a window of the episode (world frame, perceived agents; `sim.frames`).

    Acceleration and yaw rate are backward differences as the fleet logs them; `prev` is (speed, heading) of the
    frame before the window, and at an episode's first frame the commanded acceleration and zero yaw rate stand in.
    """
    w = to_world(scene, None)
    e, n = w.ego, scene.num_frames
    cond = np.full(n, condition)
    p = perceive(scene.agent_count, w.agents, e, cond, np.zeros(n, np.int64), cfg.perception.by_condition(), rng,
                 first_false_positive_id=10**6)
    dt = cfg.dt_s
    # world headings are mirrored (to_world): the previous frame's goes through the same sign change
    p_speed, p_heading = (e["speed"][0], e["heading"][0]) if prev is None else (prev[0], -prev[1])
    accel = np.diff(e["speed"], prepend=p_speed) / dt
    yaw = (np.diff(e["heading"], prepend=p_heading) + np.pi) % (2 * np.pi) - np.pi
    if prev is None:
        accel[0] = e["accel_cmd"][0]
    return frames_from_scene(e, p, cond, scenario, EPOCH_NS, accel, yaw / dt, cfg, tags=False)


def _ttc(env, cap: float) -> float:
    """Smallest time-to-collision with a vehicle ahead in the ego's corridor, constant velocities (s, <= cap)."""
    ego = env.vehicle
    c, s = np.cos(ego.heading), np.sin(ego.heading)
    best = cap
    for v in env.road.vehicles:
        if v is ego:
            continue
        d = v.position - ego.position
        dx, dy = c * d[0] + s * d[1], -s * d[0] + c * d[1]
        if dx <= 0 or abs(dy) > (ego.WIDTH + v.WIDTH) / 2:
            continue
        gap = dx - (ego.LENGTH + v.LENGTH) / 2
        closing = ego.speed - (c * v.velocity[0] + s * v.velocity[1])
        if gap <= 0:
            return 0.0
        if closing > 1e-6:
            best = min(best, gap / closing)
    return float(best)


def _savgol_derivative(y: np.ndarray, dt: float, window: int = 5, order: int = 2) -> np.ndarray:
    """First derivative by local quadratic fits over `window` samples (Savitzky-Golay; windows shift at the ends)."""
    n = y.shape[0]
    if n < 2:
        return np.zeros(n)
    w = min(window, n)
    h = w // 2
    out = np.empty(n)
    for i in range(n):
        lo = min(max(0, i - h), n - w)
        t = (np.arange(lo, lo + w) - i) * dt
        coef = np.polyfit(t, y[lo:lo + w], min(order, w - 1))
        out[i] = coef[-2] if coef.shape[0] >= 2 else 0.0  # d/dt of the fit at t = 0
    return out


def comfort_metrics(speed: np.ndarray, heading: np.ndarray, dt: float, limits: ComfortLimits) -> dict:
    """Comfort signals of an ego track (speed m/s, heading rad, dt s) against the limits; see the module doc."""
    lon = _savgol_derivative(speed, dt)
    yaw_rate = _savgol_derivative(np.unwrap(heading), dt)
    lat = speed * yaw_rate
    jerk = _savgol_derivative(lon, dt)
    yaw_acc = _savgol_derivative(yaw_rate, dt)

    def ext(x: np.ndarray, f) -> float:
        return float(f(x)) if x.size else 0.0

    m = {"min_lon_accel_mps2": ext(lon, np.min), "max_lon_accel_mps2": ext(lon, np.max),
         "max_abs_lat_accel_mps2": ext(np.abs(lat), np.max), "max_abs_lon_jerk_mps3": ext(np.abs(jerk), np.max),
         "max_abs_yaw_rate_radps": ext(np.abs(yaw_rate), np.max),
         "max_abs_yaw_accel_radps2": ext(np.abs(yaw_acc), np.max)}
    broken = [k for k, bad in (("lon_accel", m["min_lon_accel_mps2"] < limits.min_lon_accel or
                                m["max_lon_accel_mps2"] > limits.max_lon_accel),
                               ("lat_accel", m["max_abs_lat_accel_mps2"] > limits.max_abs_lat_accel),
                               ("lon_jerk", m["max_abs_lon_jerk_mps3"] > limits.max_abs_lon_jerk),
                               ("yaw_rate", m["max_abs_yaw_rate_radps"] > limits.max_abs_yaw_rate),
                               ("yaw_accel", m["max_abs_yaw_accel_radps2"] > limits.max_abs_yaw_accel)) if bad]
    return {**m, "comfortable": not broken, "comfort_violations": broken}


def run_episode(policy: Policy, scenario: str, seed: int, cfg: ClosedLoopConfig,
                sess: ort.InferenceSession | None = None) -> dict:
    """One seeded episode; a plain record of its metrics (units in the key names)."""
    if cfg.condition not in CONDITIONS:
        raise ValueError(f"unknown condition {cfg.condition!r}; known: {list(CONDITIONS)}")
    env = make_env(scenario, seed, cfg.fleet, expert=policy.expert)
    if not policy.expert:  # a plain kinematic vehicle in the ego's place, driven by our command
        old = env.vehicle
        ego = PlannedVehicle.create_from(old)
        env.road.vehicles[env.road.vehicles.index(old)] = ego
        env.vehicle = ego
    if policy.model is not None and sess is None:
        sess = session(policy.model, cfg.threads, verify=False)
    # the planner's own featurizer (shadow.plugins), found from its graph's inputs
    feat = featurizer_for_inputs([i.name for i in sess.get_inputs()]) if sess is not None else None
    rng = np.random.default_rng([seed, 7])
    cond = CONDITIONS.index(cfg.condition)
    track = EpisodeLog(cfg.fleet.truth_range_m)
    stall = int(round(cfg.fleet.stall_s * cfg.fleet.frame_rate_hz))
    min_ttc, still, reason, crashed = cfg.ttc_cap_s, 0, "length", False
    settle = int(round(cfg.settle_s * cfg.fleet.frame_rate_hz))
    for step in range(cfg.max_steps):
        track.record(env)
        if step >= settle:
            min_ttc = min(min_ttc, _ttc(env, cfg.ttc_cap_s))
        if policy.model is not None:
            inputs = feat(window_frames(*track.window(), scenario, cond, cfg.fleet, rng))
            traj = sess.run(["trajectory"], {k: v[-1:] for k, v in inputs.items()})[0][0]
            env.vehicle.command = dict(zip(("acceleration", "steering"), control_from_trajectory(
                traj, env.vehicle.speed, env.vehicle.LENGTH, cfg.controller)))
        elif policy.accel is not None:
            env.vehicle.command = {"acceleration": policy.accel, "steering": policy.steer}
        crashed = step_env(env, cfg.fleet.sim_radius_m)
        track.command(float(env.vehicle.action["steering"]), float(env.vehicle.action["acceleration"]))
        still = still + 1 if abs(env.vehicle.speed) < 0.1 else 0
        if crashed:
            reason = "collision"
            break
        if route_ended(env):
            reason = "route_end"
            break
        if still >= stall:
            reason = "stalled"
            break
    track.record(env)
    env.close()
    e = np.array(track.ego)
    speed, heading = e[settle:, 3], e[settle:, 2]
    dist = float(np.hypot(*np.diff(e[:, :2], axis=0).T).sum())
    dt = cfg.fleet.dt_s
    return {"policy": policy.name, "scenario": scenario, "seed": int(seed), "steps": len(e) - 1,
            "duration_s": (len(e) - 1) * dt, "end_reason": reason, "collision": bool(crashed),
            "min_ttc_s": float(min_ttc), "ttc_unsafe": bool(min_ttc < cfg.ttc_threshold_s), "distance_m": dist,
            "mean_speed_mps": dist / max((len(e) - 1) * dt, dt), **comfort_metrics(speed, heading, dt, cfg.comfort)}


def episode_seeds(cfg: ClosedLoopConfig, scenario: str) -> list[int]:
    """The seeds of a scenario's episodes: the same for every policy, drawn from (seed, scenario)."""
    ss = np.random.SeedSequence([cfg.seed, sorted(ROAD_TYPES).index(scenario)])
    return [int(x) for x in np.random.default_rng(ss).integers(0, 2**31 - 1, cfg.episodes)]


def summarize(episodes: list[dict], cfg: ClosedLoopConfig) -> dict:
    """A per-(policy, scenario) record from its episodes."""
    n = len(episodes)
    mean = lambda k: float(np.mean([e[k] for e in episodes]))  # noqa: E731
    return {"policy": episodes[0]["policy"], "scenario": episodes[0]["scenario"], "episodes": n,
            "collisions": sum(e["collision"] for e in episodes),
            "collision_rate": sum(e["collision"] for e in episodes) / n,
            "min_ttc_s": min(e["min_ttc_s"] for e in episodes), "mean_min_ttc_s": mean("min_ttc_s"),
            "ttc_unsafe_rate": sum(e["ttc_unsafe"] for e in episodes) / n,
            "comfortable_rate": sum(e["comfortable"] for e in episodes) / n,
            "min_lon_accel_mps2": min(e["min_lon_accel_mps2"] for e in episodes),
            "max_abs_lat_accel_mps2": max(e["max_abs_lat_accel_mps2"] for e in episodes),
            "max_abs_lon_jerk_mps3": max(e["max_abs_lon_jerk_mps3"] for e in episodes),
            "max_abs_yaw_rate_radps": max(e["max_abs_yaw_rate_radps"] for e in episodes),
            "mean_distance_m": mean("distance_m"), "mean_speed_mps": mean("mean_speed_mps"),
            "mean_duration_s": mean("duration_s"), "ttc_threshold_s": cfg.ttc_threshold_s}


def evaluate(policies: dict[str, Policy] | list[Policy], cfg: ClosedLoopConfig | None = None,
             with_episodes: bool = False) -> list[dict]:
    """Every policy on every scenario's seeded episodes; one summary record per (policy, scenario), plus
    `progress_vs_expert` (distance relative to the expert's on the same seeds) when the expert is among them.
    Episodes run in `cfg.workers` processes (highway-env is single-threaded Python: a 2-core host halves the wall
    time); the records are the same in any number of processes."""
    cfg = cfg or ClosedLoopConfig()
    pols = list(policies.values()) if isinstance(policies, dict) else list(policies)
    jobs = [(pol, sc, s) for pol in pols for sc in cfg.scenarios for s in episode_seeds(cfg, sc)]
    n = episode_workers(cfg, len(jobs))
    if n <= 1:
        try:
            episodes = [_episode(*job, cfg) for job in jobs]
        finally:  # a later call may find another model at the same path
            _SESSIONS.clear()
    else:  # spawned, not forked: the parent's onnxruntime and torch thread pools do not survive a fork
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            episodes = list(pool.map(_episode, *zip(*jobs), [cfg] * len(jobs)))
    out, eps_by = [], {}
    for (pol, sc, _), ep in zip(jobs, episodes):
        eps_by.setdefault((pol.name, sc), []).append(ep)
    for eps in eps_by.values():
        rec = summarize(eps, cfg)
        if with_episodes:
            rec["episode_records"] = eps
        out.append(rec)
    for rec in out:
        ref = eps_by.get(("expert", rec["scenario"]))
        if ref and rec["policy"] != "expert":
            mine = eps_by[(rec["policy"], rec["scenario"])]
            rec["progress_vs_expert"] = float(np.mean([m["distance_m"] / max(r["distance_m"], 1e-6)
                                                       for m, r in zip(mine, ref)]))
    return out


def episode_workers(cfg: ClosedLoopConfig, jobs: int) -> int:
    """Processes for `jobs` episodes: `cfg.workers`, or with 0 the CPU cores this process may use, at most one per
    two episodes, and one when the episodes hold fewer than PARALLEL_MIN_STEPS steps in all (a process costs seconds
    to start: importing highway-env and onnxruntime)."""
    if cfg.workers:
        return min(cfg.workers, jobs)
    if jobs * cfg.max_steps < PARALLEL_MIN_STEPS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, jobs // 2))


PARALLEL_MIN_STEPS = 2000  # env steps (~15 s of highway-env here) below which "auto" stays in this process
_SESSIONS: dict[tuple[str, int], ort.InferenceSession] = {}


def _episode(pol: Policy, scenario: str, seed: int, cfg: ClosedLoopConfig) -> dict:
    """One episode, its planner's session made once per process."""
    sess = None
    if pol.model is not None:
        key = (str(pol.model), cfg.threads)
        if key not in _SESSIONS:
            _SESSIONS[key] = session(pol.model, cfg.threads, verify=False)
        sess = _SESSIONS[key]
    return run_episode(pol, scenario, seed, cfg, sess)
