"""Time to collision of planned ego trajectories against the logged agents of their frames, vectorised.

Geometry (all in the ego frame of the planning frame at t = 0, x forward, y left, metres; that frame stays fixed,
so it is inertial for the few seconds of a plan):

- the ego follows its plan: (0, 0, yaw 0) at t = 0, then the T waypoints at t = dt, 2 dt, ... linearly interpolated
  in position and yaw;
- each agent keeps its logged velocity (constant-velocity extrapolation) and its logged heading;
- a footprint of length L and width W is covered by n = 3 discs of radius r = sqrt((L / 2n)^2 + (W / 2)^2) centred
  on its longitudinal axis at -L/3, 0, +L/3 (the usual multi-disc cover of a car in planning, e.g. Ziegler and
  Stiller 2010): it contains the whole box, overstates the width by r - W/2 (0.27 m for a 4.5 x 1.8 m car) and, unlike
  one circumscribed disc, does not merge cars in neighbouring lanes;
- a collision is any ego disc overlapping any agent disc. The gap g(t) = min over disc pairs of (centre distance -
  r_ego - r_agent) is sampled every `step_s`; TTC is the first time it drops to 0, interpolated linearly between
  the last positive and the first negative sample (exact for straight, constant-velocity approaches). A pair already
  overlapping at t = 0 has TTC 0. No collision within the horizon is NaN (stored as null).

Cost: agents that cannot reach the ego's plan within the horizon are dropped first; a broad phase at the plan's
waypoints bounds the distance of the bounding discs over each 0.5 s segment and keeps only segments where they may
touch; the disc pairs are computed only on the fine samples of those segments.
"""

from __future__ import annotations

import numpy as np

DISCS = 3


def disc_cover(length: np.ndarray, width: np.ndarray, n: int = DISCS) -> tuple[np.ndarray, np.ndarray]:
    """Offsets along the heading (..., n) [m] and radius (...) [m] of the n-disc cover of a length x width box."""
    length = np.asarray(length, np.float64)
    width = np.asarray(width, np.float64)
    frac = (np.arange(n) + 0.5) / n - 0.5  # -1/3, 0, 1/3 for n = 3
    offsets = length[..., None] * frac
    radius = np.sqrt((length / (2 * n)) ** 2 + (width / 2) ** 2)
    return offsets, radius


def ego_poses(traj: np.ndarray, dt: float, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plan (N, T, 3) [m, m, rad] with waypoints at dt..T*dt -> x, y, yaw (N, S) at `times` (S,) s, starting from
    the origin at t = 0; linear interpolation, held at the last waypoint beyond it."""
    n, t = traj.shape[:2]
    pts = np.concatenate([np.zeros((n, 1, 3)), traj.astype(np.float64)], axis=1)  # (N, T+1, 3)
    pos = np.clip(times / dt, 0, t)
    i0 = np.minimum(np.floor(pos).astype(np.int64), t - 1) if t else np.zeros_like(times, np.int64)
    frac = (pos - i0)[None, :, None]
    p = pts[:, i0] * (1 - frac) + pts[:, i0 + 1] * frac
    return p[..., 0], p[..., 1], p[..., 2]


def time_to_collision(traj: np.ndarray, dt: float, agent_frame: np.ndarray, agent_x: np.ndarray,
                      agent_y: np.ndarray, agent_vx: np.ndarray, agent_vy: np.ndarray, agent_heading: np.ndarray,
                      agent_length: np.ndarray, agent_width: np.ndarray, ego_length: float, ego_width: float,
                      horizon_s: float, step_s: float = 0.1) -> np.ndarray:
    """TTC [s] of each plan against the agents of its frame; NaN where no collision within `horizon_s`.

    traj (N, T, 3) ego plans; agents flat (M,): `agent_frame` the plan (0..N-1) each belongs to, position [m],
    velocity [m/s] and heading [rad] in that plan's ego frame, length and width [m].
    """
    n = traj.shape[0]
    out = np.full(n, np.nan)
    if n == 0 or agent_frame.size == 0:
        return out
    steps = int(round(horizon_s / step_s))
    times = np.arange(steps + 1) * step_s  # (S,)
    ex, ey, eyaw = ego_poses(traj, dt, times)  # (N, S)
    e_off, e_r = disc_cover(np.float64(ego_length), np.float64(ego_width))
    e_bound = np.abs(e_off).max() + e_r
    a_off, a_r = disc_cover(agent_length, agent_width)  # (M, n), (M,)
    a_bound = np.abs(a_off).max(axis=1) + a_r

    ax0, ay0 = agent_x.astype(np.float64), agent_y.astype(np.float64)
    avx, avy = agent_vx.astype(np.float64), agent_vy.astype(np.float64)
    # drop agents that cannot come near the plan: start distance minus own travel beyond the plan's reach
    reach = np.hypot(ex, ey).max(axis=1)  # (N,)
    f = agent_frame.astype(np.int64)
    speed = np.hypot(avx, avy)
    keep = np.hypot(ax0, ay0) - speed * horizon_s <= reach[f] + e_bound + a_bound
    if not keep.any():
        return out
    idx = np.flatnonzero(keep)
    f, ax0, ay0, avx, avy = f[idx], ax0[idx], ay0[idx], avx[idx], avy[idx]
    a_off, a_r, a_bound = a_off[idx], a_r[idx], a_bound[idx]
    ah = agent_heading[idx].astype(np.float64)

    # broad phase per segment of the coarse grid (every `sub` steps = the plan's waypoints): within a segment the
    # ego moves at constant velocity (linear interpolation), so the reference points' relative motion is linear and
    # its closest approach is exact; only segments where the bounding discs can touch get fine samples
    sub = max(1, int(round(dt / step_s)))
    coarse = np.unique(np.append(np.arange(0, steps + 1, sub), steps))  # (C+1,) fine indices
    tc = times[coarse]
    ego_cx, ego_cy = ex[:, coarse][f], ey[:, coarse][f]  # (M', C+1)
    rx = ax0[:, None] + avx[:, None] * tc[None, :] - ego_cx  # agent relative to the ego at the segment ends
    ry = ay0[:, None] + avy[:, None] * tc[None, :] - ego_cy
    seg = np.diff(tc)[None, :]  # (1, C) s
    vx, vy = np.diff(rx, axis=1) / seg, np.diff(ry, axis=1) / seg  # relative velocity in each segment
    v2 = np.maximum(vx * vx + vy * vy, 1e-12)
    tau = np.clip(-(rx[:, :-1] * vx + ry[:, :-1] * vy) / v2, 0.0, seg)
    mx, my = rx[:, :-1] + vx * tau, ry[:, :-1] + vy * tau
    live = mx * mx + my * my < ((e_bound + a_bound) ** 2)[:, None]  # (M', C)
    seg_of = np.minimum(np.searchsorted(coarse, np.arange(steps + 1), side="right") - 1, live.shape[1] - 1)
    need = live[:, seg_of]  # a fine step belongs to the segment starting at or before it...
    boundary = np.isin(np.arange(steps + 1), coarse[1:-1])
    need[:, boundary] |= live[:, seg_of[boundary] - 1]  # ...and a boundary step to the one ending there too
    mi, si = np.nonzero(need)
    if mi.size == 0:
        return out
    # fine broad phase on those samples only: separating axes of the ego. Every ego disc is centred on the ego's
    # axis, so no disc pair overlaps when the agent's discs lie further to the side (or ahead) than the ego's reach.
    # This rejects agents in the neighbouring lanes, which the bounding discs would keep.
    t_s = times[si]
    fm = f[mi]
    cx = ax0[mi] + avx[mi] * t_s - ex[fm, si]
    cy = ay0[mi] + avy[mi] * t_s - ey[fm, si]
    cyaw, syaw = np.cos(eyaw[fm, si]), np.sin(eyaw[fm, si])
    rel = ah[mi] - eyaw[fm, si]
    a_reach = (a_bound - a_r)[mi]  # how far the agent's disc centres reach from its reference point
    lat = np.abs(cyaw * cy - syaw * cx) < e_r + np.abs(np.sin(rel)) * a_reach + a_r[mi]
    lon = np.abs(cyaw * cx + syaw * cy) < e_bound + np.abs(np.cos(rel)) * a_reach + a_r[mi]
    near = np.zeros(need.shape, bool)
    near[mi, si] = lat & lon
    # the sample before a near one is kept to interpolate the crossing time
    near[:, :-1] |= near[:, 1:]
    mi, si = np.nonzero(near)
    if mi.size == 0:
        return out
    # narrow phase on the needed (agent, time) samples: every ego disc against every agent disc
    fi = f[mi]
    ce, se = np.cos(eyaw[fi, si]), np.sin(eyaw[fi, si])
    ecx = ex[fi, si][:, None] + ce[:, None] * e_off[None, :]  # (P, n)
    ecy = ey[fi, si][:, None] + se[:, None] * e_off[None, :]
    ca, sa = np.cos(ah[mi]), np.sin(ah[mi])
    t_s = times[si]
    acx = (ax0[mi] + avx[mi] * t_s)[:, None] + ca[:, None] * a_off[mi]  # (P, n)
    acy = (ay0[mi] + avy[mi] * t_s)[:, None] + sa[:, None] * a_off[mi]
    dx = ecx[:, :, None] - acx[:, None, :]  # (P, n, n)
    dy = ecy[:, :, None] - acy[:, None, :]
    d2 = (dx * dx + dy * dy).reshape(dx.shape[0], -1).min(axis=1)  # squared: one square root per sample
    gap = np.sqrt(d2) - (e_r + a_r[mi])  # (P,), samples in (agent, time) order

    hit = np.flatnonzero(gap <= 0)
    if hit.size == 0:
        return out
    agent, first = np.unique(mi[hit], return_index=True)
    j = hit[first]  # first colliding sample of each colliding agent
    ttc = times[si[j]].copy()
    later = si[j] > 0
    jl = j[later]
    # the previous sample of the same agent sits just before it (see `near`), with a positive gap
    g0, g1 = gap[jl - 1], gap[jl]
    ttc[later] = times[si[jl] - 1] + step_s * g0 / (g0 - g1)
    np.fmin.at(out, f[agent], ttc)
    return out
