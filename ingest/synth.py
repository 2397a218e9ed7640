"""Kinematically plausible synthetic drives, for tests and the ingest benchmark (no simulator needed).

The ego follows a multi-lane road at about highway speed; agents drive in neighbouring lanes around it; perception
confidence, planned waypoints, maneuvers and controls are consistent with the motion. The reference fleet of real
simulator drives lives in `sim`; this generator only has to produce valid frames of realistic size fast.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ingest.contract import COLUMNS, ENUMS, Frames, frames_to_arrow

FRAME_DT_NS = 100_000_000  # 10 Hz
EPOCH_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def synthetic_frames(num_frames: int, agents: int = 30, waypoints: int = 10, seed: int = 0,
                     start_ns: int = EPOCH_NS) -> Frames:
    """`num_frames` frames at 10 Hz with `agents` tracked agents and `waypoints` planned waypoints each."""
    rng = np.random.default_rng(seed)
    n, na, nw = num_frames, agents, waypoints
    t = np.arange(n) * 0.1
    speed = (25 + 3 * np.sin(t / 7 + rng.uniform(0, 6))).astype(np.float32)
    heading = np.full(n, rng.uniform(-np.pi, np.pi), np.float32)
    x0, y0 = rng.uniform(-5e3, 5e3, 2)
    dist = np.cumsum(speed) * 0.1
    ego_x = x0 + dist * np.cos(heading)
    ego_y = y0 + dist * np.sin(heading)
    lane_width = 3.5
    lanes = int(rng.integers(2, 5))
    ego_lane = np.full(n, int(rng.integers(0, lanes)), np.int32)

    # agents: fixed offsets along and across the road, drifting slowly relative to the ego
    along = rng.uniform(-60, 120, na)[None, :] + np.outer(t, rng.normal(0, 1.5, na))
    across = (rng.integers(-1, 2, na) * lane_width + rng.normal(0, 0.3, na))[None, :].repeat(n, 0)
    c, s = np.cos(heading)[:, None], np.sin(heading)[:, None]
    agent_x = ego_x[:, None] + along * c - across * s
    agent_y = ego_y[:, None] + along * s + across * c
    agent_speed = speed[:, None] + rng.normal(0, 1.5, na)[None, :]
    cols: dict[str, np.ndarray] = {
        "timestamp_ns": start_ns + np.arange(n, dtype=np.int64) * FRAME_DT_NS,
        "ego_x": ego_x, "ego_y": ego_y, "ego_heading": heading, "ego_speed": speed,
        "ego_accel": np.gradient(speed, 0.1).astype(np.float32),
        "ego_yaw_rate": np.zeros(n, np.float32), "ego_lane": ego_lane,
        "agent_count": np.full(n, na, np.uint32),
        "agent_id": np.tile(np.arange(1, na + 1, dtype=np.uint32), n),
        "agent_class": np.tile(rng.choice([1, 1, 1, 1, 2, 3], na).astype(np.int32), n),
        "agent_x": agent_x.ravel(), "agent_y": agent_y.ravel(),
        "agent_vx": (agent_speed * c).astype(np.float32).ravel(),
        "agent_vy": (agent_speed * s).astype(np.float32).ravel(),
        "agent_heading": np.repeat(heading, na),
        "agent_length": np.tile(rng.uniform(4.2, 5.0, na).astype(np.float32), n),
        "agent_width": np.tile(rng.uniform(1.7, 2.0, na).astype(np.float32), n),
        "agent_confidence": np.clip(rng.normal(0.9, 0.05, n * na), 0, 1).astype(np.float32),
        "lane_count": np.full(n, lanes, np.uint32), "lane_width": np.full(n, lane_width, np.float32),
        "lane_offset": rng.normal(0, 0.2, n).astype(np.float32), "lane_heading": heading.copy(),
        "lane_curvature": np.zeros(n, np.float32), "speed_limit": np.full(n, 33.3, np.float32),
        "lighting": np.ones(n, np.int32), "weather": np.ones(n, np.int32), "road_type": np.ones(n, np.int32),
        "tag_count": np.zeros(n, np.uint32), "tag": np.array([], dtype=object),
        "plan_count": np.full(n, nw, np.uint32),
        "plan_x": (speed[:, None] * 0.5 * np.arange(1, nw + 1)[None, :]).astype(np.float32).ravel(),
        "plan_y": np.zeros(n * nw, np.float32),
        "maneuver": np.ones(n, np.int32),
        "control_steer": np.zeros(n, np.float32), "control_accel": np.gradient(speed, 0.1).astype(np.float32),
    }
    missing = {c.name for c in COLUMNS} - cols.keys()
    if missing:
        raise RuntimeError(f"synthetic generator misses {missing}")
    cols = {c.name: np.asarray(cols[c.name], dtype=c.dtype) for c in COLUMNS}
    if len(ENUMS["lighting"][1]) < 2:
        raise RuntimeError("enum tables are empty")
    return Frames(cols, 0.5)


def synthetic_drive(drive_id: str, vehicle_id: str, num_frames: int, **kw) -> pa.Table:
    """A whole drive as FRAME_SCHEMA rows, ready for `ingest.lake.write_drive`."""
    return pa.Table.from_batches([frames_to_arrow(synthetic_frames(num_frames, **kw), drive_id, vehicle_id, 0)])
