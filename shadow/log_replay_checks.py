"""The checks of the log-replay closed loop (`shadow.log_replay`), vectorised over every (window, step, agent).

All positions here are world metres (x east, y north), headings rad counter-clockwise, speeds m/s. The simulated
ego has a length x width box centred on its reference point; a logged agent has its logged box.

- Collisions: oriented boxes overlap (separating axes). The first contact with each agent is classified as NAVSIM's
  PDM score does: ego stopped (not at fault), agent stopped (at fault), the ego's front bumper in the agent's box
  (active front: at fault), its rear bumper (active rear: not at fault), else lateral, at fault only while the ego
  straddles lanes or leaves the drivable area.
- Time to collision: at every step the ego and each agent ahead of it (centre ahead of the ego's) are extrapolated
  at constant velocity, each covered by `shadow.ttc.disc_cover`'s three discs (the project's TTC footprint), and the
  earliest contact is solved in closed form per disc pair; only contacts within the bound matter.
- Drivable area: the lanes the logged driver's frames describe (lane count, the ego's lane rank from the right,
  width, the ego's lateral offset, lane heading and curvature) form a corridor; each corner of the simulated ego is
  placed in the frame of the logged frame nearest to it and must lie within the corridor's outer edges.
- Comfort: nuPlan's limits judged on Savitzky-Golay filtered signals, as nuPlan's and NAVSIM's comfort metrics do
  (accelerations smoothed over 8 samples, derivatives over 15, quadratic fits; end windows fitted as scipy's
  `mode="interp"`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from shadow.ttc import DISCS, disc_cover


# ------------------------------------------------------------------------------------------------------------- boxes


def boxes_overlap(dx: np.ndarray, dy: np.ndarray, h1: np.ndarray, l1, w1, h2: np.ndarray, l2: np.ndarray,
                  w2: np.ndarray) -> np.ndarray:
    """Whether box 2 (centre at (dx, dy) from box 1's centre, heading h2, length l2, width w2) overlaps box 1
    (heading h1, length l1, width w1); every argument (P,) or scalar, result (P,) bool. Touching counts."""
    c1, s1, c2, s2 = np.cos(h1), np.sin(h1), np.cos(h2), np.sin(h2)
    a1, b1, a2, b2 = 0.5 * np.asarray(l1), 0.5 * np.asarray(w1), 0.5 * l2, 0.5 * w2
    cos_rel = np.abs(c1 * c2 + s1 * s2)  # |cos(h2 - h1)|
    sin_rel = np.abs(s2 * c1 - c2 * s1)  # |sin(h2 - h1)|
    # the centre offset on each of the four axes against the two boxes' projected half extents
    on_x1, on_y1 = np.abs(c1 * dx + s1 * dy), np.abs(-s1 * dx + c1 * dy)
    on_x2, on_y2 = np.abs(c2 * dx + s2 * dy), np.abs(-s2 * dx + c2 * dy)
    return ((on_x1 <= a1 + a2 * cos_rel + b2 * sin_rel) & (on_y1 <= b1 + a2 * sin_rel + b2 * cos_rel)
            & (on_x2 <= a2 + a1 * cos_rel + b1 * sin_rel) & (on_y2 <= b2 + a1 * sin_rel + b1 * cos_rel))


def segment_hits_box(px: np.ndarray, py: np.ndarray, qx: np.ndarray, qy: np.ndarray, half_l: np.ndarray,
                     half_w: np.ndarray) -> np.ndarray:
    """Whether the segment p -> q (in a box's own frame, (P,) each) meets the axis-aligned box |x| <= half_l,
    |y| <= half_w (Liang-Barsky clipping); (P,) bool."""
    dx, dy = qx - px, qy - py
    lo, hi = np.zeros_like(px), np.ones_like(px)
    ok = np.ones(px.shape, bool)
    for d, p, h in ((dx, px, half_l), (dy, py, half_w)):
        flat = np.abs(d) < 1e-12
        ok &= ~flat | (np.abs(p) <= h)  # parallel to this slab: inside it or never
        safe = np.where(flat, 1.0, d)
        t1, t2 = (-h - p) / safe, (h - p) / safe
        lo = np.where(flat, lo, np.maximum(lo, np.minimum(t1, t2)))
        hi = np.where(flat, hi, np.minimum(hi, np.maximum(t1, t2)))
    return ok & (lo <= hi)


def at_fault(ex: np.ndarray, ey: np.ndarray, eh: np.ndarray, ev: np.ndarray, ego_length: float, ego_width: float,
             ax: np.ndarray, ay: np.ndarray, ah: np.ndarray, al: np.ndarray, aw: np.ndarray, a_speed: np.ndarray,
             lanes_or_off_road: np.ndarray, stopped_mps: float) -> np.ndarray:
    """Whether the ego is at fault for first contacts (P,): ego pose and speed, agent pose, box and speed at the
    contact's step, and whether the ego straddles lanes or is off the drivable area then; see the module doc."""
    ego_stopped = ev <= stopped_mps
    agent_stopped = a_speed <= stopped_mps
    c, s = np.cos(eh), np.sin(eh)
    ca, sa = np.cos(ah), np.sin(ah)

    def bumper(x_off: float) -> np.ndarray:
        # the bumper's end points (x_off, -W/2) and (x_off, +W/2) of the ego, in the agent's frame
        ends = []
        for y_off in (-0.5 * ego_width, 0.5 * ego_width):
            wx, wy = ex + c * x_off - s * y_off - ax, ey + s * x_off + c * y_off - ay
            ends.append((ca * wx + sa * wy, -sa * wx + ca * wy))
        (px, py), (qx, qy) = ends
        return segment_hits_box(px, py, qx, qy, 0.5 * al, 0.5 * aw)

    front, rear = bumper(0.5 * ego_length), bumper(-0.5 * ego_length)
    lateral = ~front & ~rear
    return ~ego_stopped & (agent_stopped | front | (lateral & lanes_or_off_road))


# ------------------------------------------------------------------------------------------------- time to collision


def bounding_radius(length: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Radius [m] of a circle about the centre that holds both the length x width box and its disc cover."""
    off, r = disc_cover(length, width)
    return np.maximum(0.5 * np.hypot(length, width), np.abs(off).max(axis=-1) + r)


def time_to_contact(ex: np.ndarray, ey: np.ndarray, eh: np.ndarray, ev: np.ndarray, ego_length: float,
                    ego_width: float, ax: np.ndarray, ay: np.ndarray, ah: np.ndarray, avx: np.ndarray,
                    avy: np.ndarray, al: np.ndarray, aw: np.ndarray) -> np.ndarray:
    """Earliest time [s] >= 0 at which the disc covers of ego and agent touch when both keep their velocity and
    heading (ego: speed ev along eh; agent: (avx, avy)); inf where never. All (P,); 0 where they touch already."""
    e_off, e_r = disc_cover(np.float64(ego_length), np.float64(ego_width))  # (3,), ()
    a_off, a_r = disc_cover(al, aw)  # (P, 3), (P,)
    c, s, ca, sa = np.cos(eh), np.sin(eh), np.cos(ah), np.sin(ah)
    # disc centres relative to each other: agent disc m minus ego disc k, (P, 3, 3)
    px = (ax - ex)[:, None, None] + (ca[:, None] * a_off)[:, None, :] - (c[:, None] * e_off)[:, :, None]
    py = (ay - ey)[:, None, None] + (sa[:, None] * a_off)[:, None, :] - (s[:, None] * e_off)[:, :, None]
    vx, vy = (avx - ev * c)[:, None, None], (avy - ev * s)[:, None, None]
    rad = (e_r + a_r)[:, None, None]
    a = vx * vx + vy * vy
    b = px * vx + py * vy  # half the linear coefficient
    cc = px * px + py * py - rad * rad
    disc = b * b - a * cc
    approaching = (b < 0) & (disc >= 0) & (a > 1e-12)
    root = np.where(approaching, (-b - np.sqrt(np.maximum(disc, 0.0))) / np.where(a > 1e-12, a, 1.0), np.inf)
    t = np.where(cc <= 0, 0.0, root)
    return t.reshape(t.shape[0], DISCS * DISCS).min(axis=1, initial=np.inf)


# ------------------------------------------------------------------------------------------------------ drivable area


def corridor_check(px: np.ndarray, py: np.ndarray, lx: np.ndarray, ly: np.ndarray, lane_heading: np.ndarray,
                   lane_offset: np.ndarray, lane_curvature: np.ndarray, lane_width: np.ndarray,
                   lane_count: np.ndarray, ego_lane: np.ndarray, logged_heading: np.ndarray,
                   logged_half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Corners (..., C) at (px, py) against the corridor of a logged frame each (...,): the logged ego at (lx, ly),
    its lane's heading, the ego's offset from the lane centre (left positive), curvature [1/m], width, count and the
    ego's lane rank from the right. Returns (how far the farthest corner lies beyond the outer edges [m], >= 0;
    whether the corners lie in more than one lane), both (...). Unknown lanes (rank < 0, no lanes, no width) give
    (0, False).

    Where the logged driver drove is drivable too: a corner within `logged_half_width` of the logged ego's axis
    (heading `logged_heading`) is inside. This covers junctions, where the lane context describes one lane only
    (entering a roundabout, the ego crosses the entry lane's edge at an angle before the ring's lane holds it)."""
    c, s = np.cos(lane_heading)[..., None], np.sin(lane_heading)[..., None]
    dx, dy = px - lx[..., None], py - ly[..., None]
    along = c * dx + s * dy
    # lateral position from the lane centre, left positive: the logged offset, plus the corner's offset from the
    # logged ego across the lane, minus how far the centre line has curved away over the distance along it
    lat = lane_offset[..., None] + (-s * dx + c * dy) - 0.5 * lane_curvature[..., None] * along * along
    known = (ego_lane >= 0) & (lane_count > 0) & (lane_width > 0)
    w = np.where(known, lane_width, 1.0)[..., None]
    rank = np.where(known, ego_lane, 0)[..., None]
    right, left = -(rank + 0.5) * w, (lane_count[..., None] - rank - 0.5) * w
    off_lane = np.maximum(np.maximum(right - lat, lat - left), 0.0)
    off_track = np.maximum(np.abs(-np.sin(logged_heading)[..., None] * dx + np.cos(logged_heading)[..., None] * dy)
                           - logged_half_width, 0.0)
    beyond = np.minimum(off_lane, off_track).max(axis=-1)
    lane_of = np.floor((lat + 0.5 * w) / w)
    spans = lane_of.max(axis=-1) != lane_of.min(axis=-1)
    return np.where(known, beyond, 0.0), known & spans


# ------------------------------------------------------------------------------------------------------------ comfort


@functools.lru_cache(maxsize=32)
def savgol_operator(n: int, window: int, order: int, deriv: int, dt: float) -> np.ndarray:
    """(n, n) matrix D with y (..., n) @ D.T = the `deriv`-th derivative at every sample of least-squares
    polynomials of degree `order` fitted over `window` samples around it (windows shifted inside at the ends)."""
    w = max(1, min(window, n))
    p = min(order, w - 1)
    out = np.zeros((n, n))
    if deriv > p:
        return out
    half = (w - 1) // 2
    for i in range(n):  # once per shape (cached), not per window
        lo = min(max(0, i - half), n - w)
        t = (np.arange(lo, lo + w) - i) * dt
        coef = np.linalg.pinv(np.vander(t, p + 1, increasing=True))  # (p+1, w): polynomial coefficients
        out[i, lo:lo + w] = math.factorial(deriv) * coef[deriv]
    return out


def comfort_signals(accel_lon: np.ndarray, accel_lat: np.ndarray, heading: np.ndarray, dt: float,
                    smooth_window: int, deriv_window: int) -> dict[str, np.ndarray]:
    """Extremes (N,) of the comfort signals of simulated tracks (N, S) sampled every dt [s]: longitudinal and
    lateral acceleration [m/s^2], heading [rad, unwrapped here]."""
    n = accel_lon.shape[1]
    smooth = savgol_operator(n, smooth_window, 2, 0, dt).T
    d1 = savgol_operator(n, deriv_window, 2, 1, dt).T
    d2 = savgol_operator(n, deriv_window, 2, 2, dt).T
    lon, lat = accel_lon @ smooth, accel_lat @ smooth
    yaw = np.unwrap(heading, axis=1)
    return {"min_lon_accel_mps2": lon.min(axis=1), "max_lon_accel_mps2": lon.max(axis=1),
            "max_abs_lat_accel_mps2": np.abs(lat).max(axis=1),
            "max_abs_lon_jerk_mps3": np.abs(lon @ d1).max(axis=1),
            "max_abs_jerk_mps3": np.abs(np.hypot(lon, lat) @ d1).max(axis=1),
            "max_abs_yaw_rate_radps": np.abs(yaw @ d1).max(axis=1),
            "max_abs_yaw_accel_radps2": np.abs(yaw @ d2).max(axis=1)}
