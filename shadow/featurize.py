"""The featurizer shared by every planner model: a drive's frames -> fixed float32 tensors, all frames at once.

Version `feat-v1`. Numpy only, no Python loop over frames or agents: the shadow replayer featurizes millions of
frames. A model's spec names the featurizer version it was trained with; a model may only be fed features of that
version.

Model inputs (N = number of frames; every array is float32 and C-contiguous):

- `ego_hist` (N, H=10, Fe=9): the ego's last H frames (1 s at 10 Hz, oldest first, the current frame last) in the
  *current* ego frame (x forward, y left). Per token: x / 20 m, y / 20 m, cos and sin of (heading - current heading),
  speed / 10 m/s, acceleration / 3 m/s², yaw rate in rad/s, time offset to the current frame in s (<= 0), and a
  validity flag (0 where the drive had not started yet; such tokens repeat the earliest frame of the drive).
- `agents` (N, K=16, Fa=16): the K tracked agents of the current frame nearest to the ego, nearest first, in the
  current ego frame. Per token: x / 20 m, y / 20 m, velocity relative to the ego (vx, vy) / 10 m/s, cos and sin of
  (agent heading - ego heading), length / 5 m, width / 2 m, perception confidence (0..1), distance / 20 m, and the
  agent class one-hot (6 classes of `AgentClass`). Padding tokens are all zero.
- `agent_mask` (N, K): 1.0 for a real agent, 0.0 for padding (float32 so it feeds the ONNX graph as it is).
- `lane` (N, Fl=17): lane_count / 4, lane_width / 3.5 m, lane_offset / 2 m, cos and sin of (lane heading - ego
  heading), lane_curvature * 100 m, speed_limit / 30 m/s, ego_lane / 4, lanes to the left / 4, (ego speed -
  speed limit) / 10 m/s, 1.0 if the ego lane is known, and the road type one-hot (6 classes of `RoadType`).

Training targets (a drive is its own ground truth):

- `traj` (N, T=8, 3): the ego's future pose at t = 0.5, 1.0, ... 4.0 s in the current ego frame: x and y in metres,
  yaw (heading change) in rad wrapped to [-pi, pi).
- `traj_mask` (N, T) bool: False where the drive ends before that waypoint (or a frame is missing there).
- `maneuver` (N,) int64: the logged maneuver, a `Maneuver` enum value 0..5 (0 = unknown).

Conditions for reporting (not model inputs): `lighting`, `weather`, `road_type` (N,) int32 enum values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.contract import ENUMS, Frames, arrow_to_frames
from ingest.lake import read_drive
from sim.truth import EXPERT_DECISION, truth_footer, truth_path

log = logging.getLogger(__name__)

FEATURIZER_VERSION = "feat-v1"
BUILTIN_NAME = "flywheel"  # its name among the registered featurizers (shadow.plugins)
HISTORY = 10            # ego history tokens, frames (current included)
MAX_AGENTS = 16         # agent tokens K
EGO_FEATURES = 9        # Fe
AGENT_FEATURES = 16     # Fa
LANE_FEATURES = 17      # Fl
HORIZON = 8             # future waypoints T
HORIZON_DT_S = 0.5      # waypoint spacing
NUM_MANEUVERS = len(ENUMS["maneuver"][1])
NUM_AGENT_CLASSES = len(ENUMS["agent_class"][1])
NUM_ROAD_TYPES = len(ENUMS["road_type"][1])

POS_SCALE_M = 20.0
VEL_SCALE_MPS = 10.0
ACC_SCALE_MPS2 = 3.0
# A future frame must lie within this fraction of a frame period of its nominal time to count as the target.
_TIME_TOLERANCE = 0.5

INPUT_NAMES = ("ego_hist", "agents", "agent_mask", "lane")
INPUT_SHAPES = {"ego_hist": (HISTORY, EGO_FEATURES), "agents": (MAX_AGENTS, AGENT_FEATURES),
                "agent_mask": (MAX_AGENTS,), "lane": (LANE_FEATURES,)}
if NUM_AGENT_CLASSES != 6 or NUM_ROAD_TYPES != 6 or NUM_MANEUVERS != 6:
    raise RuntimeError("feat-v1 is defined for 6 agent classes, 6 road types and 6 maneuvers; bump the version")


@dataclass
class Features:
    """Featurized frames; see the module docstring for every shape and unit. Target fields are None when not asked."""

    ego_hist: np.ndarray
    agents: np.ndarray
    agent_mask: np.ndarray
    lane: np.ndarray
    lighting: np.ndarray
    weather: np.ndarray
    road_type: np.ndarray
    traj: np.ndarray | None = None
    traj_mask: np.ndarray | None = None
    maneuver: np.ndarray | None = None
    drive_index: np.ndarray | None = None  # (N,) int32: which drive of a concatenation a frame came from
    # inputs of other featurizers (shadow.plugins) for the same frames: {featurizer name: {input name: (N, ...)}}
    extra: dict[str, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.ego_hist.shape[0])

    def inputs(self, featurizer: str | None = None) -> dict[str, np.ndarray]:
        """The model inputs by ONNX input name: this featurizer's, or those of the plug-in featurizer named (kept
        in `extra`; KeyError when the frames were not featurized by it)."""
        if featurizer is None or featurizer == BUILTIN_NAME:
            return {name: getattr(self, name) for name in INPUT_NAMES}
        if not self.extra or featurizer not in self.extra:
            raise KeyError(f"these features hold no inputs of featurizer {featurizer!r} "
                           f"(have: {[BUILTIN_NAME, *(self.extra or {})]})")
        return self.extra[featurizer]

    def inputs_for(self, names: set[str] | list[str]) -> dict[str, np.ndarray]:
        """The inputs of whichever featurizer gives exactly these input names (a graph's inputs)."""
        names = set(names)
        if names == set(INPUT_NAMES):
            return self.inputs(BUILTIN_NAME)
        for group in (self.extra or {}).values():
            if set(group) == names:
                return group
        raise KeyError(f"no featurizer of these features gives the inputs {sorted(names)}")

    def take(self, index: np.ndarray | slice) -> "Features":
        """Frames selected by an index array or slice, every field alike."""
        out = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
               for f in fields(Features) if f.name != "extra"}
        extra = None if self.extra is None else {k: {n: a[index] for n, a in g.items()} for k, g in self.extra.items()}
        return replace(self, **out, extra=extra)  # a subclass (shadow.plugins.PluginFeatures) stays one

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        if not parts:
            raise ValueError("nothing to concatenate")
        out = {}
        for f in fields(Features):
            if f.name == "extra":
                continue
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in vals) else np.concatenate(vals)
        extra = None
        if all(p.extra for p in parts) and len({tuple(sorted(p.extra)) for p in parts}) == 1:
            extra = {k: {n: np.concatenate([p.extra[k][n] for p in parts]) for n in parts[0].extra[k]}
                     for k in parts[0].extra}
        return replace(parts[0], **out, extra=extra)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def segments_of(table: pa.Table) -> np.ndarray:
    """Segment id per row: a new segment starts where the drive changes or seq does not follow its predecessor."""
    drive = table["drive_id"].to_numpy(zero_copy_only=False)
    seq = table["seq"].to_numpy()
    new = np.ones(len(seq), bool)
    if len(seq) > 1:
        new[1:] = (drive[1:] != drive[:-1]) | (seq[1:] != seq[:-1] + 1)
    return np.cumsum(new) - 1


def _one_hot(codes: np.ndarray, n: int) -> np.ndarray:
    return (codes[..., None] == np.arange(n)).astype(np.float32)


def featurize(source: Frames | pa.Table | pa.RecordBatch, segments: np.ndarray | None = None,
              with_targets: bool = True) -> Features:
    """Featurize every frame of `source` at once.

    `source` holds consecutive frames of one drive, or, as an Arrow table with the FRAME_SCHEMA columns (extra
    columns such as the lake's are ignored), several drives one after the other, each ordered by seq (history and
    future never cross from one drive, or a gap in seq, into the next). For `Frames`, pass `segments` (N,) int to
    say the same: equal values = one contiguous run of one drive.

    Frames near the edges of what is passed see less: the first HISTORY-1 frames of a run get invalid history
    tokens, the last 4 s get masked targets. A caller cutting a drive into batches should pass HISTORY-1 frames of
    context before each cut (and drop their rows), or pass whole drives.
    """
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        table = pa.Table.from_batches([source]) if isinstance(source, pa.RecordBatch) else source
        if segments is None and "drive_id" in table.column_names:
            segments = segments_of(table)
        frames = arrow_to_frames(table)
    else:
        frames = source
    c = frames.cols
    n = frames.num_frames
    seg = np.zeros(n, np.int64) if segments is None else np.asarray(segments, np.int64)
    if seg.shape != (n,):
        raise ValueError(f"segments has shape {seg.shape}, expected ({n},)")
    idx = np.arange(n)
    new_seg = np.ones(n, bool)
    new_seg[1:] = seg[1:] != seg[:-1]
    seg_start = np.maximum.accumulate(np.where(new_seg, idx, 0))
    new_end = np.ones(n, bool)
    new_end[:-1] = seg[1:] != seg[:-1]
    seg_end = np.minimum.accumulate(np.where(new_end, idx, n - 1)[::-1])[::-1]  # last frame of each frame's segment

    ex, ey = c["ego_x"].astype(np.float64), c["ego_y"].astype(np.float64)
    psi = c["ego_heading"].astype(np.float64)
    cos_p, sin_p = np.cos(psi), np.sin(psi)
    ts = c["timestamp_ns"].astype(np.int64)
    speed = c["ego_speed"].astype(np.float64)

    def to_ego(i: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (x, y) into the ego frame of frame(s) i (broadcasting)."""
        dx, dy = x - ex[i], y - ey[i]
        return cos_p[i] * dx + sin_p[i] * dy, -sin_p[i] * dx + cos_p[i] * dy

    # ---- ego history (N, H, Fe)
    want = idx[:, None] - np.arange(HISTORY - 1, -1, -1)[None, :]
    hist_valid = want >= seg_start[:, None]
    j = np.maximum(want, seg_start[:, None])
    cur = idx[:, None]
    hx, hy = to_ego(cur, ex[j], ey[j])
    dpsi = psi[j] - psi[cur]
    ego_hist = np.stack([hx / POS_SCALE_M, hy / POS_SCALE_M, np.cos(dpsi), np.sin(dpsi),
                         speed[j] / VEL_SCALE_MPS, c["ego_accel"][j] / ACC_SCALE_MPS2, c["ego_yaw_rate"][j],
                         (ts[j] - ts[cur]) * 1e-9, hist_valid], axis=-1).astype(np.float32)

    # ---- agents (N, K, Fa): pad the ragged agents to (N, A), keep the K nearest
    counts = c["agent_count"].astype(np.int64)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    fi = np.repeat(idx, counts)
    ax, ay = to_ego(fi, c["agent_x"].astype(np.float64), c["agent_y"].astype(np.float64))
    dist = np.hypot(ax, ay)
    a_max = int(counts.max()) if n else 0
    dense = np.full((n, max(a_max, MAX_AGENTS)), np.inf, np.float32)
    dense[fi, np.arange(fi.shape[0]) - off[fi]] = dist
    if dense.shape[1] > MAX_AGENTS:
        near = np.argpartition(dense, MAX_AGENTS - 1, axis=1)[:, :MAX_AGENTS]
    else:
        near = np.broadcast_to(np.arange(MAX_AGENTS), (n, MAX_AGENTS))
    near = np.take_along_axis(near, np.argsort(np.take_along_axis(dense, near, 1), axis=1, kind="stable"), 1)
    agent_valid = near < counts[:, None]
    sel = np.where(agent_valid, off[:n, None] + near, 0)  # flat agent index; 0 is a harmless stand-in for padding
    if fi.shape[0] == 0:
        sel = np.zeros((n, MAX_AGENTS), np.int64)
        agents = np.zeros((n, MAX_AGENTS, AGENT_FEATURES), np.float32)
    else:
        psi_c = psi[:, None]
        vx, vy = c["agent_vx"][sel].astype(np.float64), c["agent_vy"][sel].astype(np.float64)
        rvx = cos_p[:, None] * vx + sin_p[:, None] * vy - speed[:, None]  # ego velocity is (speed, 0) in its frame
        rvy = -sin_p[:, None] * vx + cos_p[:, None] * vy
        dh = c["agent_heading"][sel] - psi_c
        agents = np.concatenate([
            np.stack([ax[sel] / POS_SCALE_M, ay[sel] / POS_SCALE_M, rvx / VEL_SCALE_MPS, rvy / VEL_SCALE_MPS,
                      np.cos(dh), np.sin(dh), c["agent_length"][sel] / 5.0, c["agent_width"][sel] / 2.0,
                      c["agent_confidence"][sel], dist[sel] / POS_SCALE_M], axis=-1),
            _one_hot(c["agent_class"][sel], NUM_AGENT_CLASSES)], axis=-1).astype(np.float32)
        agents *= agent_valid[..., None]

    # ---- lane context (N, Fl)
    lane_known = c["ego_lane"] >= 0
    lane_count = c["lane_count"].astype(np.float64)
    dl = c["lane_heading"].astype(np.float64) - psi
    lanes_left = np.where(lane_known, np.maximum(lane_count - 1 - c["ego_lane"], 0), 0)
    lane = np.concatenate([
        np.stack([lane_count / 4.0, c["lane_width"] / 3.5, c["lane_offset"] / 2.0, np.cos(dl), np.sin(dl),
                  c["lane_curvature"] * 100.0, c["speed_limit"] / 30.0, np.where(lane_known, c["ego_lane"], 0) / 4.0,
                  lanes_left / 4.0, (speed - c["speed_limit"]) / VEL_SCALE_MPS, lane_known], axis=-1),
        _one_hot(c["road_type"], NUM_ROAD_TYPES)], axis=-1).astype(np.float32)

    out = Features(ego_hist=np.ascontiguousarray(ego_hist), agents=np.ascontiguousarray(agents),
                   agent_mask=agent_valid.astype(np.float32), lane=np.ascontiguousarray(lane),
                   lighting=c["lighting"].astype(np.int32), weather=c["weather"].astype(np.int32),
                   road_type=c["road_type"].astype(np.int32))
    if with_targets:
        out.traj, out.traj_mask = _future(ex, ey, psi, ts, idx, seg_end, to_ego)
        out.maneuver = c["maneuver"].astype(np.int64)
    return out


def _future(ex: np.ndarray, ey: np.ndarray, psi: np.ndarray, ts: np.ndarray, idx: np.ndarray, seg_end: np.ndarray,
            to_ego: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Future ego poses (N, T, 3) in the current ego frame and their validity (N, T); see the module docstring.

    ex, ey (N,) world metres, psi (N,) rad, ts (N,) ns, idx = arange(N), seg_end (N,) last frame of each frame's drive.
    """
    n = idx.shape[0]
    if n < 2:
        return np.zeros((n, HORIZON, 3), np.float32), np.zeros((n, HORIZON), bool)
    period_ns = float(np.median(np.diff(ts)))  # drives log at a fixed rate; a dropped frame only masks its target
    if period_ns <= 0:  # a concatenation whose median step crosses drives; fall back on 10 Hz
        period_ns = 1e8
    step = max(1, int(round(HORIZON_DT_S * 1e9 / period_ns)))
    k = np.arange(1, HORIZON + 1)
    want = idx[:, None] + step * k[None, :]
    ok = want <= seg_end[:, None]
    j = np.minimum(want, n - 1)
    ok &= np.abs((ts[j] - ts[idx][:, None]) - k[None, :] * HORIZON_DT_S * 1e9) <= _TIME_TOLERANCE * period_ns
    fx, fy = to_ego(idx[:, None], ex[j], ey[j])
    traj = np.stack([fx, fy, _wrap(psi[j] - psi[:, None])], axis=-1).astype(np.float32)
    traj[~ok] = 0.0
    return traj, ok


def featurize_drive_files(paths: Iterable[Path], with_targets: bool = True, stride: int = 1,
                          add: Callable[[Features, Frames], Features] | None = None) -> Features:
    """Featurize drive files and concatenate them; `drive_index` says which path (by position) each frame came from.

    `stride` keeps every stride-th frame of each drive after featurizing (history and targets still use every
    frame); neighbouring frames at 10 Hz are near duplicates, so training may thin them. `add(features, frames)`
    completes each drive's features before the stride (`shadow.plugins.featurize_files`: plug-in inputs).
    """
    parts = []
    for i, p in enumerate(paths):
        frames = read_drive(Path(p)).frames
        f = featurize(frames, with_targets=with_targets)
        if add is not None:
            f = add(f, frames)
        if with_targets:
            f.maneuver = driver_maneuver(Path(p), f.maneuver)
        if stride > 1:
            f = f.take(slice(0, None, stride))
        f.drive_index = np.full(len(f), i, np.int32)
        parts.append(f)
    return Features.concat(parts)


def driver_maneuver(drive_file: Path, logged: np.ndarray) -> np.ndarray:
    """The maneuver target (N,) int64 of a drive file's frames: the driver's. A simulated fleet in shadow mode logs
    the on-board student's decision in the frames and keeps the expert's (the driver's) in the truth file beside
    them (`sim.truth.EXPERT_DECISION`); training on the logged one would teach a model its student's choices.
    Elsewhere (real logs, fleets without an on-board model) the logged maneuver is returned unchanged."""
    path = truth_path(drive_file)
    if not path.is_file():
        return logged
    truth_footer(path)  # a truth file of a known version
    name = EXPERT_DECISION["maneuver"]
    if name not in pq.read_schema(path).names:
        return logged
    column = pq.read_table(path, columns=[name])[name]  # one column: a truth file also holds every agent
    codes = pc.index_in(column.cast(pa.string()), value_set=pa.array(ENUMS["maneuver"][1]))
    if codes.null_count or len(codes) != len(logged):
        raise ValueError(f"{path}: its expert maneuvers do not match the drive's {len(logged)} frames")
    return codes.to_numpy(zero_copy_only=False).astype(np.int64)
