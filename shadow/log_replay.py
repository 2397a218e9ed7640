"""Log-replay closed loop, non-reactive, on any logged window: nuPlan's non-reactive closed loop and NAVSIM's PDM
score over the fleet's own logs.

A window starts at a logged frame. From there the planner's trajectory for that frame (waypoints in the frame's ego
frame, the replay's `trajectory` head) is followed by a kinematic controller for `horizon_s`, while every logged
agent moves as the log says: at step j the agents are those of the frame logged j steps later, where they were
logged. Nothing reacts to the ego. The same drive's later frames also give the logged driver's path and the lanes
around it, so this runs on any drive of the lake, simulated or imported, without a simulator or a map.

    from shadow.log_replay import LogReplayConfig, log_replay
    scores = log_replay(frames, rows, traj, plan_dt_s=0.5)   # scores.columns["score"] (N,), scores.records()

The plan is followed by pure pursuit and speed tracking on a kinematic bicycle (`shadow.log_replay_control`).

Sub-scores per window (the geometry is in `shadow.log_replay_checks`), over the steps the log covers (a window near
the end of its drive is scored over what follows it; `horizon_s` says how much):
- `no_at_fault_collision` 1 or 0: oriented boxes of the ego and the logged agents, the first contact with each
  agent classified as NAVSIM does;
- `drivable_area_compliance` 1 or 0: every corner of the ego within the outer edges of the lanes the logged frames
  describe or on the logged driver's own track, give or take `drivable_margin_m` (1 where the frames carry no lane
  context: `lane_known` False);
- `ttc_within_bound` 1 or 0: at no step does the ego, at constant velocity, meet an agent ahead within
  `ttc_bound_s`;
- `ego_progress` in [0, 1]: the ego's progress along the logged driver's path over the driver's own; 1 where the
  driver moved less than `min_progress_m`;
- `comfort` 1 or 0: nuPlan's limits on the simulated track;
- `score` = no_at_fault_collision x drivable_area_compliance x the weighted mean of progress, TTC and comfort:
  NAVSIM's PDM score (weights 5, 5, 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.contract import Frames, arrow_to_frames
from ingest.tables import LOG_REPLAY_FIELDS
from shadow.featurize import segments_of
from shadow.log_replay_checks import (at_fault, boxes_overlap, bounding_radius, comfort_signals, corridor_check,
                                      time_to_contact)
from shadow.log_replay_control import ControllerConfig, Track, follow


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComfortLimits(_Model):
    """Comfort limits; the defaults are nuPlan's (ego_is_comfortable, also NAVSIM's)."""

    min_lon_accel_mps2: float = Field(-4.05, lt=0, description="strongest braking [m/s^2]")
    max_lon_accel_mps2: float = Field(2.40, gt=0, description="strongest acceleration [m/s^2]")
    max_abs_lat_accel_mps2: float = Field(4.89, gt=0, description="lateral acceleration [m/s^2]")
    max_abs_lon_jerk_mps3: float = Field(4.13, gt=0, description="longitudinal jerk [m/s^3]")
    max_abs_jerk_mps3: float = Field(8.37, gt=0, description="jerk magnitude [m/s^3]")
    max_abs_yaw_rate_radps: float = Field(0.95, gt=0, description="yaw rate [rad/s]")
    max_abs_yaw_accel_radps2: float = Field(1.93, gt=0, description="yaw acceleration [rad/s^2]")


class ScoreWeights(_Model):
    """Weights of the weighted mean in the combined score (NAVSIM's PDM score)."""

    progress: float = Field(5.0, ge=0, description="weight of ego_progress")
    ttc: float = Field(5.0, ge=0, description="weight of ttc_within_bound")
    comfort: float = Field(2.0, ge=0, description="weight of comfort")


class LogReplayConfig(_Model):
    """Parameters of the log-replay closed loop; defaults follow nuPlan and NAVSIM where they have one."""

    horizon_s: float = Field(4.0, gt=0, le=20.0, description="how long the plan is followed [s]")
    step_s: float = Field(0.1, gt=0, le=0.5, description="simulation step; the log is read at this rate [s]")
    ego_length_m: float = Field(5.0, gt=0, description="ego footprint length (highway-env's car) [m]")
    ego_width_m: float = Field(2.0, gt=0, description="ego footprint width [m]")
    stopped_speed_mps: float = Field(0.05, ge=0, description="at or below this an ego or agent counts as stopped "
                                     "for the at-fault rules [m/s] (NAVSIM's)")
    ttc_bound_s: float = Field(0.95, gt=0, le=5.0, description="a time to collision below this fails the window [s] "
                               "(nuPlan's least_min_ttc)")
    min_progress_m: float = Field(5.0, ge=0, description="below this much logged progress ego_progress is 1 [m] "
                                  "(NAVSIM's threshold)")
    drivable_margin_m: float = Field(0.3, ge=0, description="how far a corner may pass the outer lane edge [m] "
                                     "(nuPlan's drivable-area violation tolerance)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="logged agents below this perception confidence "
                                  "are ignored")
    smooth_window: int = Field(8, ge=1, description="samples of the acceleration smoothing (NAVSIM's)")
    deriv_window: int = Field(15, ge=3, description="samples of the derivative fits (NAVSIM's)")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="how the plan is followed")
    comfort_limits: ComfortLimits = Field(default_factory=ComfortLimits, description="comfort limits")
    weights: ScoreWeights = Field(default_factory=ScoreWeights, description="weights of the combined score")

    @model_validator(mode="after")
    def _some_weight(self) -> "LogReplayConfig":
        w = self.weights
        if w.progress + w.ttc + w.comfort <= 0:
            raise ValueError("the combined score needs a positive weight on progress, ttc or comfort")
        return self

    @property
    def steps(self) -> int:
        return max(1, int(round(self.horizon_s / self.step_s)))


# the per-window record, in order: the lake's log_replay table holds the same fields (one on-disk schema module)
SCORE_FIELDS = LOG_REPLAY_FIELDS
SCORE_SCHEMA = pa.schema([pa.field(n, t, metadata={"description": d}) for n, t, d in SCORE_FIELDS])


@dataclass
class LogReplayScores:
    """One record per window: `rows` (N,) the windows' first frames, `columns` {SCORE_FIELDS name: (N,)}."""

    rows: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def records(self) -> list[dict]:
        """The windows as plain dicts (NaN as None)."""
        return self.table().to_pylist()

    def table(self) -> pa.Table:
        """The windows as an Arrow table of SCORE_SCHEMA (NaN as null)."""
        return pa.Table.from_arrays([pa.array(np.asarray(self.columns[f.name]).astype(f.type.to_pandas_dtype()),
                                              f.type, from_pandas=True) for f in SCORE_SCHEMA], schema=SCORE_SCHEMA)


@dataclass
class Logged:
    """What the log holds after each window's first frame: `frame` (N, S+1) the frame index logged j steps later,
    `valid` (N, S+1) whether it exists (a prefix of each row), `last` (N,) the last valid step, and the logged ego
    `x`, `y` (N, S+1) in the window-start ego frame [m]."""

    frame: np.ndarray
    valid: np.ndarray
    last: np.ndarray
    x: np.ndarray
    y: np.ndarray


def logged_future(cols: dict[str, np.ndarray], segments: np.ndarray, rows: np.ndarray,
                  config: LogReplayConfig) -> Logged:
    """The frames that follow each window's first frame within its drive (segment), at the simulation step (a frame
    must lie within half a frame period of its step's time, as the featurizer's targets)."""
    n = segments.shape[0]
    idx = np.arange(n)
    new_end = np.ones(n, bool)
    new_end[:-1] = segments[1:] != segments[:-1]
    seg_end = np.minimum.accumulate(np.where(new_end, idx, n - 1)[::-1])[::-1]
    ts = cols["timestamp_ns"].astype(np.int64)
    same = segments[1:] == segments[:-1]
    gaps = np.diff(ts)[same]
    period = float(np.median(gaps)) if gaps.size else config.step_s * 1e9
    if period <= 0:
        raise ValueError("timestamps do not increase within a drive")
    every = max(1, int(round(config.step_s * 1e9 / period)))
    j = np.arange(config.steps + 1)
    want = rows[:, None] + every * j[None, :]
    ok = want <= seg_end[rows][:, None]
    frame = np.minimum(want, n - 1)
    ok &= np.abs((ts[frame] - ts[rows][:, None]) - j * config.step_s * 1e9) <= 0.5 * period
    valid = np.cumprod(ok, axis=1).astype(bool)  # the log stops at its first missing step
    frame = np.where(valid, frame, rows[:, None])
    psi = cols["ego_heading"].astype(np.float64)[rows][:, None]
    dx = cols["ego_x"][frame] - cols["ego_x"][rows][:, None]
    dy = cols["ego_y"][frame] - cols["ego_y"][rows][:, None]
    return Logged(frame, valid, valid.sum(axis=1) - 1, np.cos(psi) * dx + np.sin(psi) * dy,
                  -np.sin(psi) * dx + np.cos(psi) * dy)


def logged_plans(frames: Frames, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The on-board decision of frames `rows` (N,) as plans: (N, T, 2) waypoints [m] for T the most waypoints any
    of them has, and (N,) whether a frame has all T (the others are zero-padded and should not be scored)."""
    counts = frames.cols["plan_count"].astype(np.int64)
    off = np.concatenate([[0], np.cumsum(counts)])
    t = int(counts[rows].max(initial=0))
    k = np.arange(t)
    have = k[None, :] < counts[rows][:, None]
    at = np.where(have, off[rows][:, None] + k[None, :], 0)
    px, py = frames.cols["plan_x"], frames.cols["plan_y"]
    plans = np.zeros((rows.shape[0], t, 2))
    if px.size:
        plans[..., 0], plans[..., 1] = np.where(have, px[at], 0.0), np.where(have, py[at], 0.0)
    return plans, have.all(axis=1) & (t > 0)


def score_windows(cols: dict[str, np.ndarray], rows: np.ndarray, track: Track, logged: Logged,
                  config: LogReplayConfig) -> dict[str, np.ndarray]:
    """The SCORE_FIELDS columns (N,) of N driven windows: contract columns `cols` of the frames, the windows' first
    frames `rows` (N,), the simulated ego `track` and the `logged` future (both (N, S+1))."""
    n, s1 = track.x.shape
    r = np.arange(n)
    dt, length, width = config.step_s, config.ego_length_m, config.ego_width_m
    valid = logged.valid
    psi0 = cols["ego_heading"].astype(np.float64)[rows][:, None]
    c0, s0 = np.cos(psi0), np.sin(psi0)
    # the simulated ego in world coordinates, where the logged agents are
    wx = cols["ego_x"][rows][:, None] + c0 * track.x - s0 * track.y
    wy = cols["ego_y"][rows][:, None] + s0 * track.x + c0 * track.y
    wh = psi0 + track.heading

    # ---- drivable area: every step against the lanes of the logged frame nearest to the ego
    lx, ly = np.where(valid, logged.x, np.inf), np.where(valid, logged.y, np.inf)
    near = np.argmin((track.x[:, :, None] - lx[:, None, :]) ** 2 + (track.y[:, :, None] - ly[:, None, :]) ** 2,
                     axis=2)  # (N, S+1)
    fr = np.take_along_axis(logged.frame, near, 1)
    ch, sh = np.cos(track.heading)[..., None], np.sin(track.heading)[..., None]
    along, across = np.array([1, 1, -1, -1]) * 0.5 * length, np.array([1, -1, 1, -1]) * 0.5 * width
    px = track.x[..., None] + ch * along - sh * across  # (N, S+1, 4) corners
    py = track.y[..., None] + sh * along + ch * across
    lane = {k: cols[k][fr].astype(np.float64) for k in ("lane_heading", "lane_offset", "lane_curvature",
                                                        "lane_width", "lane_count", "ego_lane")}
    beyond, spans = corridor_check(px, py, np.take_along_axis(logged.x, near, 1),
                                   np.take_along_axis(logged.y, near, 1), lane["lane_heading"] - psi0,
                                   lane["lane_offset"], lane["lane_curvature"], lane["lane_width"],
                                   lane["lane_count"], lane["ego_lane"],
                                   cols["ego_heading"].astype(np.float64)[fr] - psi0, 0.5 * width)
    beyond = np.where(valid, beyond, 0.0)
    lane_known = (valid & (lane["ego_lane"] >= 0) & (lane["lane_count"] > 0) & (lane["lane_width"] > 0)).any(1)
    violation = beyond.max(axis=1)
    straddling = (spans | (beyond > config.drivable_margin_m)).ravel()  # for lateral contacts

    # ---- the logged agents of every (window, step): broad phase on bounding circles (of the box and its TTC
    # discs) grown by the TTC reach...
    counts = cols["agent_count"].astype(np.int64)
    off = np.concatenate([[0], np.cumsum(counts)])
    at = np.flatnonzero(valid.ravel())  # window * (S+1) + step
    f = logged.frame.ravel()[at]
    cnt = counts[f]
    wj = np.repeat(at, cnt)
    row = np.repeat(off[f] - (np.cumsum(cnt) - cnt), cnt) + np.arange(wj.shape[0])
    if config.min_confidence > 0:
        keep = cols["agent_confidence"][row] >= config.min_confidence
        wj, row = wj[keep], row[keep]
    avx_all, avy_all = cols["agent_vx"].astype(np.float64), cols["agent_vy"].astype(np.float64)
    a_half = bounding_radius(cols["agent_length"].astype(np.float64), cols["agent_width"].astype(np.float64))
    a_reach = a_half + np.hypot(avx_all, avy_all) * config.ttc_bound_s  # per agent row of the source
    e_half = float(bounding_radius(np.float64(length), np.float64(width)))
    e_reach = e_half + track.speed.ravel() * config.ttc_bound_s
    dx, dy = cols["agent_x"][row] - wx.ravel()[wj], cols["agent_y"][row] - wy.ravel()[wj]
    close = dx * dx + dy * dy <= (a_reach[row] + e_reach[wj]) ** 2
    wj, row, dx, dy = wj[close], row[close], dx[close], dy[close]
    # ... then the closest approach of the bounding discs at the pair's relative velocity within the bound
    ex, ey, eh, ev = wx.ravel()[wj], wy.ravel()[wj], wh.ravel()[wj], track.speed.ravel()[wj]
    avx, avy = avx_all[row], avy_all[row]
    rvx, rvy = avx - ev * np.cos(eh), avy - ev * np.sin(eh)
    tau = np.clip(-(dx * rvx + dy * rvy) / np.maximum(rvx * rvx + rvy * rvy, 1e-12), 0.0, config.ttc_bound_s)
    close = (dx + rvx * tau) ** 2 + (dy + rvy * tau) ** 2 <= (a_half[row] + e_half) ** 2
    wj, row, dx, dy, ex, ey, eh, ev, avx, avy = (a[close] for a in (wj, row, dx, dy, ex, ey, eh, ev, avx, avy))
    w, j = wj // s1, wj % s1
    ah = cols["agent_heading"][row].astype(np.float64)
    al, aw = cols["agent_length"][row].astype(np.float64), cols["agent_width"][row].astype(np.float64)
    ids = cols["agent_id"][row].astype(np.int64)

    # ---- collisions: the first contact with each agent decides who is at fault
    hit = boxes_overlap(dx, dy, eh, length, width, ah, al, aw)
    collision = np.zeros(n, bool)
    fault_s = np.full(n, np.inf)
    hi = np.flatnonzero(hit)
    key = w * (int(ids.max(initial=0)) + 1) + ids  # (window, agent)
    if hi.size:
        collision[w[hi]] = True
        hs = hi[np.lexsort((j[hi], key[hi]))]
        first = hs[np.concatenate([[True], key[hs][1:] != key[hs][:-1]])]
        fault = at_fault(ex[first], ey[first], eh[first], ev[first], length, width, cols["agent_x"][row[first]],
                         cols["agent_y"][row[first]], ah[first], al[first], aw[first],
                         np.hypot(avx[first], avy[first]), straddling[wj[first]], config.stopped_speed_mps)
        np.minimum.at(fault_s, w[first][fault], j[first][fault] * dt)

    # ---- time to collision against agents ahead of a moving ego; from the first contact on, an agent is the
    # collision check's
    cand = ~hit & (np.cos(eh) * dx + np.sin(eh) * dy > 0) & (ev > config.stopped_speed_mps)
    if hi.size:
        hit_keys = key[first]  # sorted, one per (window, agent)
        at = np.minimum(np.searchsorted(hit_keys, key), hit_keys.shape[0] - 1)
        cand &= ~((hit_keys[at] == key) & (j >= j[first][at]))
    ti = np.flatnonzero(cand)
    ttc = time_to_contact(ex[ti], ey[ti], eh[ti], ev[ti], length, width, cols["agent_x"][row[ti]],
                          cols["agent_y"][row[ti]], ah[ti], avx[ti], avy[ti], al[ti], aw[ti])
    soon = ttc < config.ttc_bound_s
    min_ttc = np.full(n, np.inf)
    np.minimum.at(min_ttc, w[ti][soon], ttc[soon])

    # ---- progress along the logged path, at the last logged step
    last = logged.last
    sx, sy = np.diff(logged.x, axis=1), np.diff(logged.y, axis=1)  # (N, S) logged segments
    slen = np.hypot(sx, sy)
    k_seg = np.arange(s1 - 1)[None, :]
    seg_ok = k_seg < last[:, None]
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(np.where(seg_ok, slen, 0.0), axis=1)], axis=1)
    rx, ry = track.x[r, last][:, None] - logged.x[:, :-1], track.y[r, last][:, None] - logged.y[:, :-1]
    # projection on each segment; past the end of the last one the path goes straight on
    u = np.clip((rx * sx + ry * sy) / np.maximum(slen * slen, 1e-12), 0.0,
                np.where(k_seg == last[:, None] - 1, np.inf, 1.0))
    gap = np.where(seg_ok, (rx - u * sx) ** 2 + (ry - u * sy) ** 2, np.inf)
    k = np.argmin(gap, axis=1)
    progress = np.where(last > 0, cum[r, k] + u[r, k] * slen[r, k], 0.0)
    logged_progress = cum[r, last]
    ego_progress = np.where(logged_progress >= max(config.min_progress_m, 1e-9),
                            np.clip(progress / np.maximum(logged_progress, 1e-9), 0.0, 1.0), 1.0)

    # ---- comfort of the simulated track
    sig = comfort_signals(track.accel, track.speed ** 2 * track.curvature, track.heading, dt,
                          config.smooth_window, config.deriv_window)
    lim = config.comfort_limits
    comfortable = ((sig["min_lon_accel_mps2"] >= lim.min_lon_accel_mps2)
                   & (sig["max_lon_accel_mps2"] <= lim.max_lon_accel_mps2)
                   & (sig["max_abs_lat_accel_mps2"] <= lim.max_abs_lat_accel_mps2)
                   & (sig["max_abs_lon_jerk_mps3"] <= lim.max_abs_lon_jerk_mps3)
                   & (sig["max_abs_jerk_mps3"] <= lim.max_abs_jerk_mps3)
                   & (sig["max_abs_yaw_rate_radps"] <= lim.max_abs_yaw_rate_radps)
                   & (sig["max_abs_yaw_accel_radps2"] <= lim.max_abs_yaw_accel_radps2))

    nc = np.isinf(fault_s).astype(np.float64)
    dac = (violation <= config.drivable_margin_m).astype(np.float64)
    ttc_ok = np.isinf(min_ttc).astype(np.float64)
    wt = config.weights
    mean = (wt.progress * ego_progress + wt.ttc * ttc_ok + wt.comfort * comfortable) / (
        wt.progress + wt.ttc + wt.comfort)
    return {"score": nc * dac * mean, "no_at_fault_collision": nc, "drivable_area_compliance": dac,
            "ttc_within_bound": ttc_ok, "ego_progress": ego_progress, "comfort": comfortable.astype(np.float64),
            "collision": collision, "at_fault_collision_s": np.where(np.isinf(fault_s), np.nan, fault_s),
            "min_ttc_s": np.where(np.isinf(min_ttc), np.nan, min_ttc), "max_drivable_violation_m": violation,
            "lane_known": lane_known, "progress_m": progress, "logged_progress_m": logged_progress, **sig,
            "horizon_s": last * dt}


def _frames_of(source: Frames | pa.Table, segments: np.ndarray | None) -> tuple[Frames, np.ndarray]:
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        table = pa.Table.from_batches([source]) if isinstance(source, pa.RecordBatch) else source
        if segments is None and "drive_id" in table.column_names:
            segments = segments_of(table)
        source = arrow_to_frames(table)
    n = source.num_frames
    seg = np.zeros(n, np.int64) if segments is None else np.asarray(segments, np.int64)
    if seg.shape != (n,):
        raise ValueError(f"segments has shape {seg.shape}, expected ({n},)")
    return source, seg


def log_replay(source: Frames | pa.Table, rows: np.ndarray, traj: np.ndarray, plan_dt_s: float,
               segments: np.ndarray | None = None, config: LogReplayConfig | None = None) -> LogReplayScores:
    """Score N windows in the log-replay closed loop (see the module docstring).

    `source`: frames of one drive, or of several one after the other each ordered by seq (as `Frames` with
    `segments` (F,) equal for one contiguous run of one drive, or as an Arrow table with the frame schema's columns,
    whose drive_id and seq say it); `rows` (N,) the windows' first frames (indices into `source`); `traj` (N, T, 2+)
    the plan of each: waypoints x, y [m] (further columns such as yaw are ignored) at plan_dt_s, 2 plan_dt_s, ...
    [s] in the ego frame of its first frame, as the replay's trajectory head gives them.
    """
    config = config or LogReplayConfig()
    frames, seg = _frames_of(source, segments)
    rows = np.asarray(rows)
    traj = np.asarray(traj)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a 1-d integer array, got {rows.dtype} of shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= frames.num_frames):
        raise ValueError(f"rows must index the {frames.num_frames} frames given; got {rows.min()}..{rows.max()}")
    if traj.ndim != 3 or traj.shape[0] != rows.shape[0] or traj.shape[1] < 1 or traj.shape[2] < 2:
        raise ValueError(f"traj must have shape (N={rows.shape[0]}, T >= 1, >= 2), got {traj.shape}")
    if not np.isfinite(traj[..., :2]).all():
        raise ValueError("traj holds NaN or infinite waypoints")
    if not plan_dt_s > 0:
        raise ValueError(f"plan_dt_s must be positive, got {plan_dt_s}")
    rows = rows.astype(np.int64)
    if rows.size == 0:
        return LogReplayScores(rows, {name: np.zeros(0, t.to_pandas_dtype()) for name, t, _ in SCORE_FIELDS})
    cols = frames.cols
    track = follow(traj[..., :2], plan_dt_s, cols["ego_speed"].astype(np.float64)[rows], config.steps, config.step_s,
                   config.controller)
    logged = logged_future(cols, seg, rows, config)
    return LogReplayScores(rows, score_windows(cols, rows, track, logged, config))
