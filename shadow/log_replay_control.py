"""The controller of the log-replay closed loop (`shadow.log_replay`): a planned trajectory followed by a kinematic
bicycle, every window at once (a Python loop over the time steps only).

In the ego frame of the window's first frame (x forward, y left, metres):
- the reference is the plan's polyline from the origin through its waypoints and a speed profile: the ego's logged
  speed at t = 0, central differences of the polyline's arc length at the waypoints, linear in between, held after
  the last waypoint (planned yaws are not needed, so the logged on-board plans, positions only, are followed too);
- speed: a = dv_ref/dt + k_v (v_ref - v), clipped to [-max_brake, max_accel]; the ego stops, it never reverses;
- steering: pure pursuit on the polyline (extended along its last direction), aiming `lookahead_s * v` (at least
  `min_lookahead_m`) ahead of the ego's projection on it, curvature clipped to the steering limit (the reactive
  closed loop, `retrain.cycle.closed_loop`, steers the same way with the same lookahead);
- a kinematic bicycle integrated at the midpoint of each step: yaw rate v kappa, lateral acceleration v^2 kappa.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ControllerConfig(BaseModel):
    """How the ego follows a plan: pure pursuit and speed tracking on a kinematic bicycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lookahead_s: float = Field(1.0, gt=0, description="pure-pursuit lookahead, seconds of travel at current speed")
    min_lookahead_m: float = Field(5.0, gt=0, description="shortest pure-pursuit lookahead [m]")
    speed_gain_per_s: float = Field(1.0, ge=0, description="feedback gain on the speed error [1/s]")
    max_accel_mps2: float = Field(4.0, gt=0, description="largest acceleration the ego applies [m/s^2]")
    max_brake_mps2: float = Field(8.0, gt=0, description="largest deceleration the ego applies [m/s^2]")
    max_curvature_per_m: float = Field(0.4, gt=0, description="tightest turn: tan(max steering 45 deg) over the "
                                       "2.5 m wheelbase of highway-env's car [1/m]")


@dataclass
class Track:
    """The simulated ego of N windows at S+1 steps, window-start ego frame: x, y [m], heading [rad], speed [m/s],
    acceleration applied from each step [m/s^2], curvature [1/m]; (N, S+1) each."""

    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray
    speed: np.ndarray
    accel: np.ndarray
    curvature: np.ndarray


def follow(path: np.ndarray, plan_dt_s: float, speed0: np.ndarray, steps: int, dt: float,
           cfg: ControllerConfig) -> Track:
    """Drive N plans: `path` (N, T, 2) waypoints [m] at plan_dt_s, 2 plan_dt_s, ... in each window's ego frame,
    `speed0` (N,) the ego's speed at t = 0 [m/s], for `steps` steps of dt [s]; see the module docstring."""
    n, t = path.shape[:2]
    r = np.arange(n)
    pts = np.concatenate([np.zeros((n, 1, 2)), path.astype(np.float64)], axis=1)  # (N, T+1, 2)
    seg = np.diff(pts, axis=1)  # (N, T, 2)
    seg_len = np.hypot(seg[..., 0], seg[..., 1])
    l2 = np.maximum(seg_len * seg_len, 1e-12)
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(seg_len, axis=1)], axis=1)  # (N, T+1) arc length
    v_wp = np.empty((n, t + 1))
    v_wp[:, 0] = speed0
    v_wp[:, 1:t] = (cum[:, 2:] - cum[:, :-2]) / (2 * plan_dt_s)
    v_wp[:, t] = seg_len[:, -1] / plan_dt_s
    pos = np.clip(np.arange(steps + 1) * dt / plan_dt_s, 0, t)
    i0 = np.minimum(np.floor(pos).astype(np.int64), t - 1)
    frac = pos - i0
    v_ref = v_wp[:, i0] * (1 - frac) + v_wp[:, i0 + 1] * frac  # (N, S+1)
    a_ref = np.diff(v_ref, axis=1) / dt
    # beyond its end the polyline goes on along its last direction (straight ahead for a plan that never moves)
    moving = seg_len > 1e-6
    last = t - 1 - np.argmax(moving[:, ::-1], axis=1)
    ext = np.where(moving.any(axis=1)[:, None], seg[r, last] / np.maximum(seg_len[r, last], 1e-12)[:, None],
                   np.array([1.0, 0.0]))
    x, y, h = np.zeros(n), np.zeros(n), np.zeros(n)
    v = np.asarray(speed0, np.float64).copy()
    out = {k: np.empty((n, steps + 1)) for k in ("x", "y", "heading", "speed", "accel", "curvature")}
    for j in range(steps):
        out["x"][:, j], out["y"][:, j], out["heading"][:, j], out["speed"][:, j] = x, y, h, v
        # the ego's projection on the polyline, as arc length
        rx, ry = x[:, None] - pts[:, :-1, 0], y[:, None] - pts[:, :-1, 1]
        u = np.clip((rx * seg[..., 0] + ry * seg[..., 1]) / l2, 0.0, 1.0)
        ox, oy = rx - u * seg[..., 0], ry - u * seg[..., 1]
        k = np.argmin(ox * ox + oy * oy, axis=1)
        s_aim = cum[r, k] + u[r, k] * seg_len[r, k] + np.maximum(cfg.min_lookahead_m, cfg.lookahead_s * v)
        kk = np.minimum((cum[:, 1:] < s_aim[:, None]).sum(axis=1), t - 1)
        f = np.clip((s_aim - cum[r, kk]) / np.maximum(seg_len[r, kk], 1e-12), 0.0, 1.0)
        beyond = s_aim - cum[:, -1]
        inside = beyond <= 0
        tx = np.where(inside, pts[r, kk, 0] + f * seg[r, kk, 0], pts[:, -1, 0] + ext[:, 0] * beyond)
        ty = np.where(inside, pts[r, kk, 1] + f * seg[r, kk, 1], pts[:, -1, 1] + ext[:, 1] * beyond)
        c, s = np.cos(h), np.sin(h)
        lx, ly = c * (tx - x) + s * (ty - y), -s * (tx - x) + c * (ty - y)
        d2 = lx * lx + ly * ly
        kappa = np.clip(np.where(d2 > 1e-6, 2.0 * ly / np.maximum(d2, 1e-6), 0.0), -cfg.max_curvature_per_m,
                        cfg.max_curvature_per_m)
        acc = np.clip(a_ref[:, j] + cfg.speed_gain_per_s * (v_ref[:, j] - v), -cfg.max_brake_mps2,
                      cfg.max_accel_mps2)
        acc = np.maximum(acc, -v / dt)  # brake to a standstill, never reverse
        v_new = v + acc * dt
        vm = 0.5 * (v + v_new)
        hm = h + 0.5 * vm * kappa * dt
        x, y, h, v = x + vm * np.cos(hm) * dt, y + vm * np.sin(hm) * dt, h + vm * kappa * dt, v_new
        out["accel"][:, j], out["curvature"][:, j] = acc, kappa
    out["x"][:, steps], out["y"][:, steps], out["heading"][:, steps], out["speed"][:, steps] = x, y, h, v
    out["accel"][:, steps], out["curvature"][:, steps] = out["accel"][:, steps - 1], out["curvature"][:, steps - 1]
    return Track(**out)
