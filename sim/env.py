"""highway-env as the fleet's simulator: environment construction, the rule-based expert ego, and one scene's log.

How the expert drives (highway-env 1.12.1): every scenario builds its ego as the action type's vehicle class
(`MDPVehicle`, which only moves when an agent sends it discrete meta-actions). After each reset we replace that
vehicle, in `road.vehicles` and as `env.vehicle`, by `ExpertVehicle.create_from(ego)` (an `IDMVehicle` that does not
roll backwards at a stop): same pose, speed, target lane, target speed and route, but `IDMVehicle.act()` ignores
its argument and decides by itself, IDM for the longitudinal acceleration and MOBIL for lane changes, then steers
with highway-env's lane-following controller. In the roundabout the expert's exit is drawn (right, straight, left);
in the intersection the env draws it (`destination=None`). The env is then stepped with `env.step(None)`: no action reaches the action type, `road.act()` lets every vehicle (ego included)
choose its own command and `road.step()` integrates the kinematic bicycle model. So the ego is the same rule-based
driver highway-env uses for all traffic, and the other vehicles are what the ego's perception tracks.

With `policy_frequency = frame_rate_hz` and `simulation_frequency = frame_rate_hz * simulation_substeps` one
`env.step` is exactly one logged frame (0.1 s at 10 Hz). Nothing is rendered; the env's observation and reward are
not needed for logging and are replaced by no-ops (the Kinematics observation builds a pandas frame per step).

Coordinates: highway-env uses screen axes (x right, y down, headings clockwise on screen). The contract wants a
right-handed world (x east, y north, headings counter-clockwise), so `y`, headings, lateral offsets, curvatures and
steering angles change sign on the way out (`to_world`). Then right-hand traffic stays right-hand and roundabouts
run counter-clockwise, as highway-env draws them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import gymnasium as gym
import highway_env  # noqa: F401  (registers the environments with gymnasium)
import numpy as np
from highway_env.envs.common.abstract import AbstractEnv
from highway_env.envs.roundabout_env import RoundaboutEnv
from highway_env.vehicle.behavior import IDMVehicle

from sim.config import FleetConfig
from ingest.wire import drive_pb2 as pb

logger = logging.getLogger(__name__)

SCENARIO_ENV_IDS = {"highway": "highway-v0", "merge": "merge-v0", "roundabout": "roundabout-v0",
                    "intersection": "intersection-v0"}
ROAD_TYPES = {"highway": pb.ROAD_TYPE_HIGHWAY, "merge": pb.ROAD_TYPE_MERGE, "roundabout": pb.ROAD_TYPE_ROUNDABOUT,
              "intersection": pb.ROAD_TYPE_INTERSECTION}
# IntersectionEnv._make_vehicles overwrites these IDMVehicle *class* attributes on every reset, which would leak into
# the next drive simulated by the same process; every reset starts from highway-env's own defaults instead.
_IDM_DEFAULTS = {"DISTANCE_WANTED": 5.0 + IDMVehicle.LENGTH, "COMFORT_ACC_MAX": 3.0, "COMFORT_ACC_MIN": -5.0}
_ROUNDABOUT_EXITS = ("exr", "nxr", "wxr")  # right, straight on, left; highway-env always sends the ego to "nxs"
ROUTE_END_MARGIN_M = 15.0  # a scene ends this close to the end of a lane that leads nowhere ahead
DEFAULT_SPEED_LIMIT = 30.0  # lanes without a limit [m/s]


def env_config(scenario: str, config: FleetConfig) -> dict:
    """highway-env config overrides of a scenario: frame-synchronous stepping, randomised intersection route."""
    cfg = {"policy_frequency": config.frame_rate_hz,
           "simulation_frequency": config.frame_rate_hz * config.simulation_substeps,
           "offscreen_rendering": True}
    if scenario == "intersection":
        cfg["destination"] = None  # the env then draws the ego's exit (o1..o3) instead of always turning to o1
    return cfg


def make_env(scenario: str, seed: int, config: FleetConfig | None = None, expert: bool = True,
             lightweight: bool = True) -> AbstractEnv:
    """A reset highway-env environment of `scenario` ("highway", "merge", "roundabout", "intersection").

    `expert=True` puts highway-env's IDM/MOBIL driver in the ego's seat (see the module docstring); with
    `expert=False` the ego stays the env's action-driven vehicle for a policy to control (closed loop).
    `lightweight=True` replaces the observation, reward and info by no-ops (`info` keeps "crashed"): step with
    `step_env`. Same scenario, seed and config give the same scene.
    """
    if scenario not in SCENARIO_ENV_IDS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {sorted(SCENARIO_ENV_IDS)}")
    config = config or FleetConfig()
    with warnings.catch_warnings():
        # gymnasium flags the v0 ids as "out of date"; they are the reference scenarios named in the design.
        warnings.simplefilter("ignore")
        env = gym.make(SCENARIO_ENV_IDS[scenario], config=env_config(scenario, config)).unwrapped
    reset_env(env, seed, expert=expert, lightweight=lightweight)
    return env


def reset_env(env: AbstractEnv, seed: int, expert: bool = True, lightweight: bool = True) -> None:
    """Reset `env` to the scene of `seed` (a new scene of the same scenario), with the expert ego if asked."""
    for name, value in _IDM_DEFAULTS.items():
        setattr(IDMVehicle, name, value)
    env.reset(seed=int(seed))
    if expert:
        install_expert(env)
    if lightweight:
        env.observation_type.observe = lambda: None
        env._reward = lambda action: 0.0
        env._info = lambda obs, action=None: {"crashed": bool(env.vehicle.crashed)}


class ExpertVehicle(IDMVehicle):
    """highway-env's IDM/MOBIL driver that brakes to a standstill instead of rolling backwards.

    IDM keeps commanding deceleration at a stop line; integrated at 10 Hz that overshoots zero speed and the
    vehicle reverses (highway-env allows speeds down to -40 m/s). A driver stops; the last step's deceleration is
    capped at what reaches exactly zero.
    """

    def step(self, dt: float) -> None:
        if not self.crashed and self.speed >= 0 and self.speed + float(self.action["acceleration"]) * dt < 0:
            self.action["acceleration"] = -self.speed / dt
        super().step(dt)


def install_expert(env: AbstractEnv) -> IDMVehicle:
    """Swap the ego for an `ExpertVehicle` (an `IDMVehicle`) in the same state, so it drives itself."""
    old = env.vehicle
    ego = ExpertVehicle.create_from(old)
    ego.route = list(old.route) if old.route else old.route  # next_lane pops from the route: do not share it
    env.road.vehicles[env.road.vehicles.index(old)] = ego
    env.vehicle = ego
    if isinstance(env, RoundaboutEnv):
        ego.plan_route_to(str(env.np_random.choice(_ROUNDABOUT_EXITS)))
    return ego


def step_env(env: AbstractEnv, sim_radius_m: float | None = None) -> bool:
    """Advance one frame (every vehicle, the ego included, acts on its own); returns whether the ego crashed.

    Traffic farther than `sim_radius_m` from the ego is removed afterwards: it cannot come into perception range
    within a drive, and highway-env's step is quadratic in the number of vehicles.
    """
    env.step(None)
    ego = env.vehicle
    if sim_radius_m is not None and len(env.road.vehicles) > 1:
        pos = np.array([v.position for v in env.road.vehicles])
        near = np.hypot(*(pos - ego.position).T) <= sim_radius_m
        if not near.all():
            env.road.vehicles = [v for v, k in zip(env.road.vehicles, near) if k or v is ego]
    return bool(ego.crashed)


def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def route_ended(env: AbstractEnv) -> bool:
    """The ego is near the end of a lane with no lane ahead in its direction (dead end, or only the way back)."""
    ego = env.vehicle
    net = env.road.network
    lane = net.get_lane(ego.lane_index)
    s, _ = lane.local_coordinates(ego.position)
    if s < lane.length - ROUTE_END_MARGIN_M:
        return False
    end_heading = lane.heading_at(lane.length)
    for lanes in net.graph.get(ego.lane_index[1], {}).values():
        if lanes and abs(_wrap(lanes[0].heading_at(0.0) - end_heading)) < np.pi / 2:
            return False
    return True


@dataclass
class SceneLog:
    """One scene (one env episode) in highway-env coordinates, frame by frame; n frames, A agent rows in total.

    Ego columns have shape (n,): position [m], heading [rad], speed [m/s]; lane context of the lane the ego is on
    (count, rank from the right-most lane, width [m], lateral offset [m], heading [rad], curvature [1/m], speed
    limit [m/s]); the expert's command computed at that frame (steering [rad], acceleration [m/s^2]) and the ego's
    lateral offset from its target lane [m]. Agent columns have shape (A,), grouped by frame (`agent_count`).
    `end_*` is the ego state one frame after the last logged one (where the next scene continues), `end_reason`
    why the scene stopped: "length", "collision", "route_end" or "stalled".
    """

    ego: dict[str, np.ndarray]
    agent_count: np.ndarray
    agents: dict[str, np.ndarray]
    end_pose: np.ndarray = field(default_factory=lambda: np.zeros(3))
    end_speed: float = 0.0
    end_reason: str = "length"

    @property
    def num_frames(self) -> int:
        return int(self.agent_count.shape[0])


_EGO_KEYS = ("x", "y", "heading", "speed", "lane_count", "lane_rank", "lane_width", "lane_offset", "lane_heading",
             "lane_curvature", "speed_limit", "steer", "accel_cmd", "target_offset")
_AGENT_KEYS = ("id", "x", "y", "vx", "vy", "heading", "length", "width")


def lane_context(env: AbstractEnv, lane_index, position) -> tuple:
    """What the fleet logs of the lane at `position` on `lane_index` (highway-env axes): lane count, rank from the
    right-most lane, width [m], lateral offset [m], heading [rad], curvature [1/m], speed limit [m/s]."""
    net = env.road.network
    lane = net.get_lane(lane_index)
    s, lat = lane.local_coordinates(position)
    count = len(net.graph[lane_index[0]][lane_index[1]])
    curvature = float(_wrap(lane.heading_at(s + 1.0) - lane.heading_at(s - 1.0))) / 2.0
    limit = lane.speed_limit if lane.speed_limit is not None else DEFAULT_SPEED_LIMIT
    return (count, count - 1 - int(lane_index[2]), lane.width_at(s), lat, lane.heading_at(s), curvature, limit)


def record_scene(env: AbstractEnv, ids: dict, max_frames: int, config: FleetConfig) -> SceneLog:
    """Step `env` (expert ego) for up to `max_frames` frames and log ego, lane context, command and true agents.

    `ids` maps simulator vehicles to agent ids and is shared by all scenes of a drive, so ids stay unique within it
    (it holds the vehicles themselves, so a Python id is never reused for another vehicle).
    """
    ego = env.vehicle
    stall_frames = int(round(config.stall_s * config.frame_rate_hz))
    ego_rows: list[list[float]] = []
    agent_rows: list[np.ndarray] = []
    counts: list[int] = []
    stalled = 0
    reason = "length"

    def log_state() -> None:
        ego_rows.append([ego.position[0], ego.position[1], ego.heading, ego.speed,
                         *lane_context(env, ego.lane_index, ego.position), 0.0, 0.0, 0.0])
        others = [v for v in env.road.vehicles if v is not ego]
        rows = np.zeros((0, len(_AGENT_KEYS)))
        if others:
            pos = np.array([v.position for v in others])
            near = np.hypot(*(pos - ego.position).T) <= config.truth_range_m
            kept = [v for v, k in zip(others, near) if k]
            if kept:
                rows = np.array([[ids.setdefault(v, len(ids) + 1), v.position[0], v.position[1], v.velocity[0],
                                  v.velocity[1], v.heading, v.LENGTH, v.WIDTH] for v in kept])
        agent_rows.append(rows)
        counts.append(rows.shape[0])

    log_state()
    while True:
        before, lane_before = ego.position.copy(), ego.lane_index
        crashed = step_env(env, config.sim_radius_m)
        # The step applied the command the expert chose at the last logged frame: complete that frame. A target
        # lane on another road segment is the route going on (roundabout entry, turn), and an offset on a one-lane
        # road is the lane-keeping controller settling after a turn: neither is a lane change.
        target = ego.target_lane_index
        offset = 0.0
        if target[:2] == lane_before[:2] and len(env.road.network.graph[target[0]][target[1]]) > 1:
            offset = env.road.network.get_lane(target).local_coordinates(before)[1]
        ego_rows[-1][-3:] = [ego.action["steering"], ego.action["acceleration"], offset]
        stalled = stalled + 1 if abs(ego.speed) < 0.1 else 0
        if crashed:
            reason = "collision"
        elif len(counts) >= max_frames:
            reason = "length"
        elif route_ended(env):
            reason = "route_end"
        elif stalled >= stall_frames:
            reason = "stalled"
        else:
            log_state()
            continue
        break
    ego_arr = np.array(ego_rows, dtype=np.float64)
    agents = np.concatenate(agent_rows) if agent_rows else np.zeros((0, len(_AGENT_KEYS)))
    return SceneLog(ego={k: ego_arr[:, i] for i, k in enumerate(_EGO_KEYS)},
                    agent_count=np.array(counts, dtype=np.int64),
                    agents={k: agents[:, i] for i, k in enumerate(_AGENT_KEYS)},
                    end_pose=np.array([ego.position[0], ego.position[1], ego.heading]),
                    end_speed=float(ego.speed), end_reason=reason)


def to_world(scene: SceneLog, anchor: np.ndarray | None) -> SceneLog:
    """Place a scene in the drive's world frame (x east, y north, CCW headings).

    A drive chains scenes; `anchor` is the pose (highway-env axes, drive frame) where the previous scene's ego was
    one frame after its last log, and the scene is moved rigidly so that its first ego pose lands there: the ego's
    path stays continuous across scenes. `None` keeps the first scene where highway-env put it.
    """
    e, a = dict(scene.ego), dict(scene.agents)
    rot, tx, ty = 0.0, 0.0, 0.0
    if anchor is not None:
        rot = float(anchor[2] - e["heading"][0])
        c, s = np.cos(rot), np.sin(rot)
        tx = anchor[0] - (c * e["x"][0] - s * e["y"][0])
        ty = anchor[1] - (s * e["x"][0] + c * e["y"][0])
    c, s = np.cos(rot), np.sin(rot)

    def place(x, y):  # rigid move in highway-env axes, then mirror y into the right-handed world
        return c * x - s * y + tx, -(s * x + c * y + ty)

    e["x"], e["y"] = place(e["x"], e["y"])
    a["x"], a["y"] = place(a["x"], a["y"])
    a["vx"], a["vy"] = c * a["vx"] - s * a["vy"], -(s * a["vx"] + c * a["vy"])
    for d, key in ((e, "heading"), (e, "lane_heading"), (a, "heading")):
        d[key] = _wrap(-(d[key] + rot))
    for key in ("lane_offset", "lane_curvature", "steer", "target_offset"):
        e[key] = -e[key]
    px, py = c * scene.end_pose[0] - s * scene.end_pose[1] + tx, s * scene.end_pose[0] + c * scene.end_pose[1] + ty
    # end_pose stays in highway-env axes (drive frame): it is the next scene's anchor
    return SceneLog(e, scene.agent_count, a, np.array([px, py, scene.end_pose[2] + rot]), scene.end_speed,
                    scene.end_reason)
