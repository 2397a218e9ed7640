"""What every importer shares: the source-side tracks, resampling onto the contract's 10 Hz grid, unknown values,
the per-drive drop report, the one validation (the ingest server's `ingest.contract.validate`) and the atomic write.

An importer reads its format into `SourceDrive`s: the ego's poses and the agents' observations at the source's own
times and ids (world frame, metres, radians, seconds as int ns), and optionally the on-board plan. `build_frames`
resamples them onto a grid of `ImportOptions.rate_hz` starting at the first ego pose:

- ego x, y, heading (unwrapped) and speed are interpolated linearly between the two poses around each grid time;
  a grid time with no pose within `max_ego_gap_s` on both sides is dropped (reason `ego_gap`); acceleration and yaw
  rate come from the source when it has them, else from finite differences of the resampled speed and heading;
- an agent is in a frame when it was observed within half a frame period of the grid time, or when two of its
  observations at most `max_agent_gap_s` apart bracket it (interpolated); otherwise it is absent (`agent_missing`,
  counted per frame between the agent's first and last observation);
- invalid states (not finite, outside the contract's physical ranges) are dropped before resampling
  (`ego_invalid_state`, `agent_invalid_state`), and beyond 64 agents the nearest are kept (`agents_over_limit`);
- lane context, lighting, weather and road type get the contract's unknown values (`ego_lane` -1, `lane_count` 0,
  enums 0); the lane heading is the ego's (relative heading 0) and the speed limit 0 (unknown); each frame is
  tagged `source:<format>` so every frame records where it came from.

Every drive then goes through `ingest.contract.validate`, the ingest server's checks; a drive that fails raises
`ImportFailed` naming the file and the record. `ingest.importers.run` writes the drives with
`ingest.lake.write_drive` (temporary name, fsync, rename) only after the whole source file converted, so a bad
record leaves nothing of its file behind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import COLUMN_BY_NAME, COLUMNS, MAX_AGENTS_PER_FRAME, ChunkRejected, Frames, check_id, validate


class MessageError(ValueError):
    """Message `index` of a batch that a column decoder (`cdr`, `pbcolumns`) cannot decode; `detail` says why."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index = index
        self.detail = detail


SOURCE_TAG_PREFIX = "source:"
Progress = Callable[[int], None]
"""Called with the number of bytes of the current source file read so far."""


class ImportOptions(BaseModel):
    """How sources map onto the frame contract; the defaults suit every format."""

    model_config = ConfigDict(extra="forbid")

    rate_hz: float = Field(10.0, gt=0, le=100, description="frames per second of the imported drives (the "
                           "contract's logging rate)")
    max_ego_gap_s: float = Field(0.5, gt=0, description="largest gap between two ego poses a frame may be "
                                 "interpolated across [s]")
    max_agent_gap_s: float = Field(0.35, gt=0, description="largest gap between two observations of an agent it "
                                   "is interpolated across [s]")
    plan_dt_s: float = Field(0.5, gt=0, le=5, description="spacing of the imported on-board plan's waypoints [s]")
    plan_waypoints: int = Field(8, ge=1, le=100, description="waypoints of the imported on-board plan")
    vehicle_id: str | None = Field(None, description="vehicle id of every imported drive; default from the source")
    base_time_ns: int = Field(1_577_836_800_000_000_000, description="UTC time [ns] of t=0 for sources whose "
                              "times are relative (Waymo scenarios): 2020-01-01T00:00:00Z")
    odometry_topic: str = Field("/localization/kinematic_state", description="ROS 2: nav_msgs/msg/Odometry topic")
    objects_topic: str = Field("/perception/object_recognition/tracking/objects", description="ROS 2: "
                               "TrackedObjects or PredictedObjects topic (autoware_perception_msgs)")
    trajectory_topic: str = Field("/planning/scenario_planning/trajectory", description="ROS 2: "
                                  "autoware_planning_msgs/msg/Trajectory topic (optional in the log)")


class ImportFailed(ValueError):
    """A source record that cannot become valid frames: names the file, the record and the rule."""

    def __init__(self, path: Path | str, record: str, detail: str) -> None:
        super().__init__(f"{path}: {record}: {detail}")
        self.path = str(path)
        self.record = record
        self.detail = detail


@dataclass
class EgoTrack:
    """Ego poses at the source's times, world frame. Each array (M,); optional ones None when the source lacks them."""

    t_ns: np.ndarray
    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray
    speed: np.ndarray | None = None        # m/s along the heading
    accel: np.ndarray | None = None        # m/s² along the heading
    yaw_rate: np.ndarray | None = None     # rad/s


@dataclass
class AgentObs:
    """Agent observations (K,) each, world frame: id (any int64, unique per agent in the drive), class (AgentClass
    code), position [m], velocity [m/s], heading [rad], length and width [m], confidence 0..1."""

    t_ns: np.ndarray
    id: np.ndarray
    cls: np.ndarray
    x: np.ndarray
    y: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    heading: np.ndarray
    length: np.ndarray
    width: np.ndarray
    conf: np.ndarray

    @staticmethod
    def empty() -> "AgentObs":
        z = np.zeros(0)
        return AgentObs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), *([z] * 8))

    @staticmethod
    def from_lists(rows: dict[str, list]) -> "AgentObs":
        if not rows["t_ns"]:
            return AgentObs.empty()
        f = np.asarray
        return AgentObs(f(rows["t_ns"], np.int64), f(rows["id"], np.int64), f(rows["cls"], np.int32),
                        *(f(rows[k], np.float64) for k in ("x", "y", "vx", "vy", "heading", "length", "width",
                                                            "conf")))


@dataclass
class PlanObs:
    """On-board plans: message i was issued at t_ns[i] and holds points [off[i], off[i+1]) of (tfs_s, x, y): time
    from the message's stamp [s] and world position [m]."""

    t_ns: np.ndarray
    off: np.ndarray
    tfs_s: np.ndarray
    x: np.ndarray
    y: np.ndarray


@dataclass
class SourceDrive:
    """One drive as read from a source, before resampling; `record` says where in the file it came from."""

    record: str
    drive_id: str
    vehicle_id: str
    ego: EgoTrack | None = None
    agents: AgentObs | None = None
    plan: PlanObs | None = None
    frames: Frames | None = None  # already contract frames (the project's own MCAP): no resampling
    dropped: Counter = field(default_factory=Counter)


@dataclass
class DriveReport:
    drive_id: str
    vehicle_id: str
    record: str
    frames: int
    path: str = ""


@dataclass
class ImportReport:
    """What an import wrote and what it dropped, and why (reason -> count, over every drive)."""

    format: str
    files: int = 0
    drives: list[DriveReport] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def frames(self) -> int:
        return sum(d.frames for d in self.drives)


def group_rows(off: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices of the groups [off[i], off[i+1]) for i in `order`, concatenated: (sum of their lengths,) int64."""
    lens = (off[1:] - off[:-1])[order]
    return np.repeat(off[:-1][order] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)


def safe_id(value: str) -> str:
    """A source's name made into a contract id (printable, no '/', at most 128 characters)."""
    out = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(value)).strip("_") or "unnamed"
    return out[:128]


def _finite(*arrays: np.ndarray) -> np.ndarray:
    ok = np.ones(arrays[0].shape[0], bool)
    for a in arrays:
        ok &= np.isfinite(a)
    return ok


def _in_range(name: str, a: np.ndarray) -> np.ndarray:
    c = COLUMN_BY_NAME[name]
    return (a >= c.lo) & (a <= c.hi)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _grid(ego: EgoTrack, opts: ImportOptions, dropped: Counter) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid times (F,) int64 with the ego's pose samples around each: lo, hi (F,) indices, both valid."""
    period = int(round(1e9 / opts.rate_hz))
    t = ego.t_ns
    grid = t[0] + np.arange((t[-1] - t[0]) // period + 1, dtype=np.int64) * period
    hi = np.searchsorted(t, grid, side="left")
    hi = np.minimum(hi, t.shape[0] - 1)
    lo = np.where(t[hi] == grid, hi, np.maximum(hi - 1, 0))
    ok = (grid - t[lo] <= opts.max_ego_gap_s * 1e9) & (t[hi] - grid <= opts.max_ego_gap_s * 1e9) & (t[lo] <= grid)
    ok &= (t[hi] - t[lo]) <= opts.max_ego_gap_s * 1e9
    if (~ok).any():
        dropped["ego_gap"] += int((~ok).sum())
    return grid[ok], lo[ok], hi[ok]


def _weights(t: np.ndarray, lo: np.ndarray, hi: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Interpolation weights of times `at` between samples t[lo] and t[hi] (0 where they coincide)."""
    span = (t[hi] - t[lo]).astype(np.float64)
    return np.divide((at - t[lo]).astype(np.float64), span, out=np.zeros_like(span), where=span > 0)


def _mix(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, values: np.ndarray) -> np.ndarray:
    return values[lo] * (1 - w) + values[hi] * w


def _clean_ego(ego: EgoTrack, dropped: Counter) -> EgoTrack:
    order = np.argsort(ego.t_ns, kind="stable")
    t = ego.t_ns[order]
    keep = np.ones(t.shape[0], bool)
    keep[1:] = t[1:] != t[:-1]  # a repeated stamp is the same pose logged twice
    arrays = [ego.x, ego.y, ego.heading] + [a for a in (ego.speed, ego.accel, ego.yaw_rate) if a is not None]
    ok = keep & _finite(*(np.asarray(a, np.float64)[order] for a in arrays))
    ok &= _in_range("ego_x", ego.x[order]) & _in_range("ego_y", ego.y[order])
    if ego.speed is not None:
        ok &= _in_range("ego_speed", ego.speed[order])  # NaN compares False: out
    dropped["ego_invalid_state"] += int((keep & ~ok).sum())
    sel = order[ok]

    def take(a):
        return None if a is None else np.asarray(a, np.float64)[sel]

    return EgoTrack(ego.t_ns[sel], take(ego.x), take(ego.y), take(ego.heading), take(ego.speed), take(ego.accel),
                    take(ego.yaw_rate))


def _agents_on_grid(ag: AgentObs, grid: np.ndarray, opts: ImportOptions, dropped: Counter) -> dict[str, np.ndarray]:
    """Per (frame, agent) rows of the resampled agents, sorted by frame: 'frame' (R,) and the agent columns."""
    ok = _finite(ag.x, ag.y, ag.vx, ag.vy, ag.heading, ag.length, ag.width, ag.conf)
    for name, a in (("agent_x", ag.x), ("agent_y", ag.y), ("agent_vx", ag.vx), ("agent_vy", ag.vy),
                    ("agent_length", ag.length), ("agent_width", ag.width), ("agent_confidence", ag.conf)):
        ok &= _in_range(name, a)
    ok &= (ag.cls >= 0) & (ag.cls <= 5)
    dropped["agent_invalid_state"] += int((~ok).sum())
    order = np.lexsort((ag.t_ns, ag.id))
    order = order[ok[order]]
    if order.size:  # one observation per (agent, time): a repeated stamp is the same state logged twice
        keep = np.ones(order.shape[0], bool)
        keep[1:] = (ag.id[order][1:] != ag.id[order][:-1]) | (ag.t_ns[order][1:] != ag.t_ns[order][:-1])
        order = order[keep]
    names = ("x", "y", "vx", "vy", "length", "width", "conf", "heading", "id", "cls")
    if not order.size or not grid.size:
        return {"frame": np.zeros(0, np.int64), **{k: np.zeros(0) for k in names}}
    # every (agent, grid time) query at once: observations and queries keyed by agent * span + time, one search
    _, agent = np.unique(ag.id[order], return_inverse=True)
    n_agents = int(agent.max()) + 1
    t0 = min(int(ag.t_ns[order].min()), int(grid[0]))
    t = ag.t_ns[order] - t0
    g = grid - t0
    span = int(max(t.max(), g.max())) + 1
    if n_agents * span >= 2**62:
        raise ValueError(f"{n_agents} agents over {span / 1e9:.0f} s: too long a log for one drive")
    keys = agent * span + t
    first = np.searchsorted(agent, np.arange(n_agents), side="left")
    last = np.searchsorted(agent, np.arange(n_agents), side="right") - 1
    half = 0.5e9 / opts.rate_hz
    gap = opts.max_agent_gap_s * 1e9
    g_lo = np.searchsorted(g, t[first] - half, side="left")
    g_hi = np.searchsorted(g, t[last] + half, side="right")
    counts = np.maximum(g_hi - g_lo, 0)
    qa = np.repeat(np.arange(n_agents), counts)
    qg = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(g_lo, counts)
    at = g[qg]
    hi = np.minimum(np.searchsorted(keys, qa * span + at, side="left"), last[qa])
    lo = np.where(t[hi] <= at, hi, np.maximum(hi - 1, first[qa]))
    near = np.minimum(np.abs(t[lo] - at), np.abs(t[hi] - at)) <= half
    bracket = (t[lo] <= at) & (t[hi] >= at) & (t[hi] - t[lo] <= gap)
    have = near | bracket
    dropped["agent_missing"] += int((~have).sum())
    qa, qg, at, lo, hi, bracket = qa[have], qg[have], at[have], lo[have], hi[have], bracket[have]
    # a nearest observation stands in where no bracket exists (the first or last stamp off the grid)
    lo = np.where(bracket, lo, np.where(np.abs(t[lo] - at) <= np.abs(t[hi] - at), lo, hi))
    hi = np.where(bracket, hi, lo)
    # headings unwrapped along each agent's track (never across agents) before interpolating
    h = ag.heading[order]
    d = _wrap(np.diff(h, prepend=h[0]))
    d[first] = 0.0
    cs = np.cumsum(d)
    unwrapped = h[first][agent] + cs - cs[first][agent]
    w = _weights(t, lo, hi, at)  # the same for every agent column
    rows = {"frame": qg}
    for name, a in (("x", ag.x), ("y", ag.y), ("vx", ag.vx), ("vy", ag.vy), ("length", ag.length),
                    ("width", ag.width), ("conf", ag.conf)):
        rows[name] = _mix(w, lo, hi, a[order])
    rows["heading"] = _wrap(_mix(w, lo, hi, unwrapped))
    rows["id"] = ag.id[order][lo]
    rows["cls"] = ag.cls[order][first][qa]
    by_frame = np.argsort(qg, kind="stable")
    return {k: v[by_frame] for k, v in rows.items()}


def _limit_agents(rows: dict[str, np.ndarray], ex: np.ndarray, ey: np.ndarray, dropped: Counter) -> dict:
    """Keep the MAX_AGENTS_PER_FRAME nearest agents of each frame (rows sorted by frame)."""
    if not rows["frame"].size:
        return rows
    f = rows["frame"].astype(np.int64)
    counts = np.bincount(f)
    if counts.max() <= MAX_AGENTS_PER_FRAME:
        return rows
    d = np.hypot(rows["x"] - ex[f], rows["y"] - ey[f])
    order = np.lexsort((d, f))
    rank = np.arange(f.shape[0]) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    keep = order[rank < MAX_AGENTS_PER_FRAME]
    dropped["agents_over_limit"] += int(f.shape[0] - keep.shape[0])
    keep = np.sort(keep)
    return {k: v[keep] for k, v in rows.items()}


def plans_on_grid(plan: PlanObs | None, grid: np.ndarray, ex: np.ndarray, ey: np.ndarray, psi: np.ndarray,
                   opts: ImportOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The latest plan issued at most 1 s before each frame, sampled at k * plan_dt_s after the frame's time, in the
    frame's ego frame: counts (F,), x, y (P,). Waypoints beyond the plan's end are left out."""
    n = grid.shape[0]
    if plan is None or not plan.t_ns.size:
        return np.zeros(n, np.uint32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    which = np.searchsorted(plan.t_ns, grid, side="right") - 1
    m = np.maximum(which, 0)
    dt_ns = grid - plan.t_ns[m]
    lens = np.diff(plan.off)
    # a usable plan has two waypoints or more, their times increasing (a NaN step passes, as np.diff(t) <= 0 says)
    bad = np.concatenate([[0], np.cumsum(np.diff(plan.tfs_s) <= 0)])
    ends = np.clip(plan.off[1:] - 1, 0, bad.shape[0] - 1)
    usable = (lens >= 2) & (bad[ends] - bad[np.minimum(plan.off[:-1], ends)] == 0)
    frames = np.flatnonzero((which >= 0) & (dt_ns <= 1e9) & usable[m])
    k = np.arange(1, opts.plan_waypoints + 1) * opts.plan_dt_s
    want = (k[None, :] + (dt_ns[frames] * 1e-9)[:, None]).ravel()
    qf = np.repeat(frames, k.shape[0])
    qm = m[qf]
    keep = want <= plan.tfs_s[plan.off[qm + 1] - 1]  # waypoints beyond the plan's end are left out
    want, qf, qm = want[keep], qf[keep], qm[keep]
    counts = np.bincount(qf, minlength=n).astype(np.uint32)
    if not want.size:
        return counts, np.zeros(0, np.float32), np.zeros(0, np.float32)
    # np.interp of every query in its own plan at once: the waypoints at or before it, by one sort of points and
    # queries together (a point equal to the query sorts first), then numpy's own formula and NaN fallbacks
    pm = np.repeat(np.arange(lens.shape[0]), lens)
    is_point = np.concatenate([np.ones(pm.shape[0], bool), np.zeros(want.shape[0], bool)])
    order = np.lexsort((~is_point, np.concatenate([plan.tfs_s, want]), np.concatenate([pm, qm])))
    before = np.cumsum(is_point[order])
    at = np.empty(order.shape[0], np.int64)
    at[order] = before
    j = at[pm.shape[0]:] - plan.off[qm] - 1       # last waypoint at or before the query, -1 if none
    last = plan.off[qm + 1] - plan.off[qm] - 1
    lo = plan.off[qm] + np.clip(j, 0, np.maximum(last - 1, 0))
    hi = lo + 1
    t0, t1 = plan.tfs_s[lo], plan.tfs_s[hi]

    def interp(v: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (v[hi] - v[lo]) / (t1 - t0)
            out = slope * (want - t0) + v[lo]
            nan = np.isnan(out)
            out[nan] = (slope * (want - t1) + v[hi])[nan]
        flat = np.isnan(out) & (v[lo] == v[hi])
        out[flat] = v[lo][flat]
        out = np.where(j < 0, v[plan.off[qm]], out)
        return np.where(j >= last, v[plan.off[qm] + last], out)

    px = interp(plan.x) - ex[qf]
    py = interp(plan.y) - ey[qf]
    c, sn = np.cos(psi[qf]), np.sin(psi[qf])
    return counts, (c * px + sn * py).astype(np.float32), (-sn * px + c * py).astype(np.float32)


def build_frames(src: SourceDrive, fmt: str, opts: ImportOptions) -> Frames:
    """Resample a SourceDrive onto the contract's grid (see the module docstring); drops are added to src.dropped."""
    dropped = src.dropped
    if src.ego is None or not src.ego.t_ns.size:
        raise ValueError("no ego pose")
    ego = _clean_ego(src.ego, dropped)
    if ego.t_ns.shape[0] < 2:
        raise ValueError("fewer than two valid ego poses")
    grid, lo, hi = _grid(ego, opts, dropped)
    if not grid.size:
        raise ValueError("no frame: every grid time falls in a gap of the ego poses")
    n = grid.shape[0]
    t = ego.t_ns
    w = _weights(t, lo, hi, grid)  # the same for every ego column
    ex, ey = _mix(w, lo, hi, ego.x), _mix(w, lo, hi, ego.y)
    uh = np.unwrap(ego.heading)
    head = _mix(w, lo, hi, uh)
    dt = 1.0 / opts.rate_hz
    if ego.speed is not None:
        speed = _mix(w, lo, hi, ego.speed)
    else:
        speed = np.hypot(np.gradient(ex, dt), np.gradient(ey, dt)) if n > 1 else np.zeros(n)
    accel = _mix(w, lo, hi, ego.accel) if ego.accel is not None else (
        np.gradient(speed, dt) if n > 1 else np.zeros(n))
    yaw_rate = _mix(w, lo, hi, ego.yaw_rate) if ego.yaw_rate is not None else (
        np.gradient(head, dt) if n > 1 else np.zeros(n))
    psi = _wrap(head)
    rows = _agents_on_grid(src.agents or AgentObs.empty(), grid, opts, dropped)
    rows = _limit_agents(rows, ex, ey, dropped)
    # agent ids of the contract: uint32, dense per drive in order of first appearance
    _, first = np.unique(rows["id"], return_index=True)
    dense = np.empty(first.shape[0], np.int64)
    dense[np.argsort(first)] = np.arange(1, first.shape[0] + 1)
    agent_id = dense[np.searchsorted(np.unique(rows["id"]), rows["id"])] if rows["id"].size else np.zeros(0)
    plan_count, plan_x, plan_y = plans_on_grid(src.plan, grid, ex, ey, psi, opts)
    tag = f"{SOURCE_TAG_PREFIX}{fmt}"
    cols = {
        "timestamp_ns": grid, "ego_x": ex, "ego_y": ey, "ego_heading": psi, "ego_speed": speed,
        "ego_accel": np.clip(accel, -30, 30), "ego_yaw_rate": np.clip(yaw_rate, -10, 10),
        "ego_lane": np.full(n, -1), "agent_count": np.bincount(rows["frame"].astype(np.int64), minlength=n),
        "agent_id": agent_id, "agent_class": rows["cls"], "agent_x": rows["x"], "agent_y": rows["y"],
        "agent_vx": rows["vx"], "agent_vy": rows["vy"], "agent_heading": _wrap(rows["heading"]),
        "agent_length": rows["length"], "agent_width": rows["width"], "agent_confidence": rows["conf"],
        "lane_count": np.zeros(n), "lane_width": np.zeros(n), "lane_offset": np.zeros(n), "lane_heading": psi,
        "lane_curvature": np.zeros(n), "speed_limit": np.zeros(n), "lighting": np.zeros(n),
        "weather": np.zeros(n), "road_type": np.zeros(n), "tag_count": np.ones(n),
        "tag": np.array([tag] * n, dtype=object), "plan_count": plan_count, "plan_x": plan_x, "plan_y": plan_y,
        "maneuver": np.zeros(n), "control_steer": np.zeros(n), "control_accel": np.zeros(n),
    }
    return Frames({c.name: np.asarray(cols[c.name]).astype(c.dtype) for c in COLUMNS}, opts.plan_dt_s)


def with_source_tag(frames: Frames, fmt: str) -> Frames:
    """Frames whose every frame carries a `source:` tag: `source:<fmt>` added where a frame has none (after its
    own tags)."""
    c = frames.cols
    off = np.concatenate([[0], np.cumsum(c["tag_count"], dtype=np.int64)])
    tags = c["tag"]
    is_source = np.fromiter((str(t).startswith(SOURCE_TAG_PREFIX) for t in tags), bool, tags.shape[0])
    sums = np.concatenate([[0], np.cumsum(is_source)])
    lacking = sums[off[1:]] == sums[off[:-1]]
    cols = dict(c)
    cols["tag_count"] = (c["tag_count"] + lacking).astype(np.uint32)
    cols["tag"] = np.insert(np.asarray(tags, dtype=object), off[1:][lacking], f"{SOURCE_TAG_PREFIX}{fmt}")
    return Frames(cols, frames.plan_dt_s)


def convert_file(path: Path, fmt: str, drives: Iterator[SourceDrive], opts: ImportOptions,
                 report: ImportReport) -> list[tuple[SourceDrive, Frames]]:
    """Every drive of one source file resampled and validated (nothing written); ImportFailed names the record."""
    return list(convert_drives(path, fmt, drives, opts, report))


def convert_drives(path: Path, fmt: str, drives: Iterator[SourceDrive], opts: ImportOptions,
                   report: ImportReport) -> Iterator[tuple[SourceDrive, Frames]]:
    """`convert_file` drive by drive, each yielded once resampled and validated; the file is whole only when the
    iterator ends (the check that no two of its drives share an id comes after the last one)."""
    seen: list[SourceDrive] = []
    for src in drives:
        try:
            for what in ("drive_id", "vehicle_id"):
                check_id(what, getattr(src, what))
            frames = with_source_tag(src.frames, fmt) if src.frames is not None else build_frames(src, fmt, opts)
            validate(frames)
        except (ChunkRejected, ValueError) as exc:
            if isinstance(exc, ImportFailed):
                raise
            raise ImportFailed(path, src.record, str(exc)) from None
        report.dropped.update(src.dropped)
        seen.append(src)
        yield src, frames
    first: dict[str, str] = {}
    for src in seen:
        if src.drive_id in first:
            raise ImportFailed(path, src.record, f"drive id {src.drive_id} also comes from {first[src.drive_id]}")
        first[src.drive_id] = src.record
