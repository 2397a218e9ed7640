"""The second reference featurizer, `mixer` (version `mix-v1`): another input layout for another planner, to prove
that a plug-in pair runs through the whole flywheel. It shares nothing with `shadow.featurize` but the frame contract.

Inputs (N frames; float32, C-contiguous):

- `motion` (N, 5, 6): the ego at the current frame and 2, 4, 6, 8 frames before it (0.2 s apart at 10 Hz, newest
  first), in the current ego frame: x / 30 m, y / 30 m, heading change [rad], speed / 30 m/s, acceleration / 5 m/s²,
  and 1.0 where that frame exists in the run (else the token is all zero).
- `actors` (N, 24, 9): the 24 agents nearest to the ego, nearest first: x / 50 m, y / 50 m, velocity relative to the
  ego / 15 m/s (x, y, ego frame), heading relative to the ego [rad, wrapped], length / 10 m, width / 3 m, kind
  (+1 vehicle, -1 pedestrian or cyclist, 0 unknown), 1.0 for a real agent (padding rows all zero).
- `state` (N, 5): speed / 30 m/s, acceleration / 5 m/s², yaw rate [rad/s], 1.0 if the lane is known, speed limit /
  30 m/s.
"""

from __future__ import annotations

import numpy as np

from ingest.contract import Frames

VERSION = "mix-v1"
MOTION_TOKENS, MOTION_STRIDE, MOTION_FEATURES = 5, 2, 6
ACTORS, ACTOR_FEATURES = 24, 9
STATE_FEATURES = 5
HISTORY = MOTION_STRIDE * (MOTION_TOKENS - 1)  # frames before the current one that are read
INPUTS = (("motion", (MOTION_TOKENS, MOTION_FEATURES)), ("actors", (ACTORS, ACTOR_FEATURES)),
          ("state", (STATE_FEATURES,)))
# AgentClass codes: unknown, car, truck, motorcycle, bicycle, pedestrian
_KIND = np.array([0.0, 1.0, 1.0, 1.0, -1.0, -1.0], np.float32)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def featurize(frames: Frames, segments: np.ndarray) -> dict[str, np.ndarray]:
    """`mix-v1` inputs of every frame (see the module docstring); `segments` (N,) marks contiguous runs."""
    c = frames.cols
    n = frames.num_frames
    idx = np.arange(n)
    seg = np.asarray(segments)
    start = np.zeros(n, np.int64)
    if n:
        new = np.ones(n, bool)
        new[1:] = seg[1:] != seg[:-1]
        start = np.maximum.accumulate(np.where(new, idx, 0))
    ex, ey = c["ego_x"].astype(np.float64), c["ego_y"].astype(np.float64)
    psi = c["ego_heading"].astype(np.float64)
    cp, sp = np.cos(psi), np.sin(psi)
    speed = c["ego_speed"].astype(np.float64)

    back = idx[:, None] - MOTION_STRIDE * np.arange(MOTION_TOKENS)[None, :]
    ok = back >= start[:, None]
    j = np.where(ok, back, idx[:, None])
    dx, dy = ex[j] - ex[:, None], ey[j] - ey[:, None]
    motion = np.stack([(cp[:, None] * dx + sp[:, None] * dy) / 30.0, (-sp[:, None] * dx + cp[:, None] * dy) / 30.0,
                       _wrap(psi[j] - psi[:, None]), speed[j] / 30.0, c["ego_accel"][j] / 5.0, ok], axis=-1)
    motion *= ok[..., None]

    counts = c["agent_count"].astype(np.int64)
    off = np.concatenate([[0], np.cumsum(counts)])
    fi = np.repeat(idx, counts)
    actors = np.zeros((n, ACTORS, ACTOR_FEATURES), np.float64)
    if fi.size:
        ax, ay = c["agent_x"] - ex[fi], c["agent_y"] - ey[fi]
        lx, ly = cp[fi] * ax + sp[fi] * ay, -sp[fi] * ax + cp[fi] * ay
        vx, vy = c["agent_vx"].astype(np.float64), c["agent_vy"].astype(np.float64)
        rvx, rvy = cp[fi] * vx + sp[fi] * vy - speed[fi], -sp[fi] * vx + cp[fi] * vy
        dist = np.hypot(lx, ly)
        # rank of each agent by distance within its frame: sort by (frame, distance)
        order = np.lexsort((dist, fi))
        rank = np.empty_like(order)
        rank[order] = np.arange(order.shape[0]) - off[fi[order]]
        keep = rank < ACTORS
        feats = np.stack([lx / 50.0, ly / 50.0, rvx / 15.0, rvy / 15.0, _wrap(c["agent_heading"] - psi[fi]),
                          c["agent_length"] / 10.0, c["agent_width"] / 3.0, _KIND[c["agent_class"]],
                          np.ones(fi.shape[0])], axis=-1)
        actors[fi[keep], rank[keep]] = feats[keep]
    state = np.stack([speed / 30.0, c["ego_accel"] / 5.0, c["ego_yaw_rate"], c["ego_lane"] >= 0,
                      c["speed_limit"] / 30.0], axis=-1)
    return {"motion": motion.astype(np.float32), "actors": actors.astype(np.float32),
            "state": state.astype(np.float32).reshape(n, STATE_FEATURES)}
