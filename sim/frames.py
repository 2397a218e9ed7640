"""The one builder of the frame contract's columns from a simulated scene: what the fleet logs and what the closed
loop feeds its planner are the same frames.

A scene's ego state (world frame, `sim.env.to_world`), the agents perception reported (`sim.perception.perceive`)
and the condition of every frame become `ingest.contract.Frames`: lighting, weather and tags from the condition,
road type from the scenario, acceleration and yaw rate as given (the fleet differentiates within scenes, the closed
loop against the frame before its window). The logged decision (planned waypoints, maneuver) is the fleet's; frames
without one (the closed loop's) get none.
"""

from __future__ import annotations

import numpy as np

from ingest.contract import COLUMNS, Frames
from ingest.wire import drive_pb2 as pb
from sim.config import CONDITIONS, FleetConfig
from sim.env import ROAD_TYPES
from sim.perception import Perceived

EPOCH_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z: the fleet's first day
LIGHTING = {"nominal": pb.LIGHTING_DAY, "night": pb.LIGHTING_NIGHT, "rain": pb.LIGHTING_DAY,
            "glare": pb.LIGHTING_GLARE}
WEATHER = {"nominal": pb.WEATHER_CLEAR, "night": pb.WEATHER_CLEAR, "rain": pb.WEATHER_RAIN,
           "glare": pb.WEATHER_CLEAR}
TAGS = {"glare": ("tunnel_exit",)}


def frames_from_scene(ego: dict[str, np.ndarray], perceived: Perceived, condition: np.ndarray, scenario: str,
                      start_ns: int, accel: np.ndarray, yaw_rate: np.ndarray, config: FleetConfig,
                      plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                      maneuver: np.ndarray | None = None, tags: bool = True) -> Frames:
    """Frames of n logged steps: `ego` (`sim.env.SceneLog` ego columns in the world frame, (n,) each), the
    perceived agents, `condition` (n,) indices into `CONDITIONS`, the first timestamp [ns], acceleration [m/s^2]
    and yaw rate [rad/s] (n,); `plan` = (counts (n,), x, y) planned waypoints and `maneuver` (n,) the logged
    decision (none: empty plans, maneuver unknown); `tags` whether conditions tag their frames (tunnel exit)."""
    n = condition.shape[0]
    dt = config.dt_s
    tags_per_cond = [TAGS.get(c, ()) if tags else () for c in CONDITIONS]
    plan_count, plan_x, plan_y = plan if plan is not None else (np.zeros(n), np.zeros(0), np.zeros(0))
    a = perceived.agents
    cols = {
        "timestamp_ns": start_ns + np.arange(n, dtype=np.int64) * int(round(1e9 * dt)),
        "ego_x": ego["x"], "ego_y": ego["y"], "ego_heading": ego["heading"], "ego_speed": ego["speed"],
        "ego_accel": accel, "ego_yaw_rate": yaw_rate, "ego_lane": ego["lane_rank"],
        "agent_count": perceived.count, "agent_id": a["id"], "agent_class": a["agent_class"],
        "agent_x": a["x"], "agent_y": a["y"], "agent_vx": a["vx"], "agent_vy": a["vy"],
        "agent_heading": a["heading"], "agent_length": a["length"], "agent_width": a["width"],
        "agent_confidence": a["confidence"],
        "lane_count": ego["lane_count"], "lane_width": ego["lane_width"],
        "lane_offset": np.clip(ego["lane_offset"], -20, 20), "lane_heading": ego["lane_heading"],
        "lane_curvature": np.clip(ego["lane_curvature"], -1, 1), "speed_limit": ego["speed_limit"],
        "lighting": np.array([LIGHTING[c] for c in CONDITIONS])[condition],
        "weather": np.array([WEATHER[c] for c in CONDITIONS])[condition],
        "road_type": np.full(n, ROAD_TYPES[scenario]),
        "tag_count": np.array([len(tags_per_cond[c]) for c in condition], dtype=np.uint32),
        "tag": np.array([t for c in condition for t in tags_per_cond[c]], dtype=object),
        "plan_count": plan_count, "plan_x": plan_x, "plan_y": plan_y,
        "maneuver": maneuver if maneuver is not None else np.zeros(n),
        "control_steer": ego["steer"], "control_accel": ego["accel_cmd"],
    }
    return Frames({c.name: np.asarray(cols[c.name]).astype(c.dtype) for c in COLUMNS}, config.plan_dt_s)
