"""True shadow mode: the logged on-board decision against the teacher and against the fleet-side emulation.

A fleet's frames carry what the deployed model computed in the car (`plan_x`, `plan_y`, `maneuver`) and which model
that was (`decision_model`, `decision_model_version`, frame schema version 2). The replay records, per frame with a
whole logged plan (the horizon's T waypoints at the featurizer's spacing), in the `onboard` table:

- **fleet divergence**, teacher against the logged decision (`fleet_*`): what the fleet really did differently from
  the teacher; the same metrics as `divergences` (`shadow.metrics.pair_metrics`), the logged plan's headings taken
  from its waypoints' directions and its maneuver as a certain distribution;
- **chip parity**, the replay's student (the fleet-side emulation of the artifact) against the logged decision
  (`parity_*`), only where the frame names the replayed student's id and version: the largest waypoint distance and
  whether the maneuvers agree. A chip, vehicle or software version whose on-board outputs drift from the emulation
  (a compiler or firmware fault, other rounding) shows as `parity_ok` false (`PipelineConfig.parity_tolerance_m`);
- teacher against the emulation, as in `divergences` (`emulation_score`, repeated here for one-table queries).

`run_deployed` is the simulated fleet's on-board runner (`sim.onboard`, its plug-in hook): the same featurizer and
`shadow.models` session the replay uses, over one drive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.contract import arrow_to_frames
from shadow import featurize as fz
from shadow.config import RuntimeConfig
from shadow.metrics import pair_metrics
from shadow.models import LoadedModel, load_model
from shadow.plugins import FeatureCache

# [m] a logged plan's waypoint step shorter than this keeps the heading before it (`plan_headings`): below 2 m/s at
# 0.5 s spacing a step's direction is mostly the plan's lateral wiggle. On the demo's lake, twice the mean heading
# error of the teacher against the derived headings (the fleet score's heading term) on frames below 1 m/s: 0.74 at
# 0.05 m, 0.26 at 0.25, 0.12 at 0.5, 0.07 at 1.0 (the emulation's, from the student's own heading head: 0.04)
MIN_STEP_M = 1.0
_CERTAIN = 30.0  # logit gap that makes a logged maneuver a near one-hot distribution (e^-30 ~ 1e-13)


@functools.lru_cache(maxsize=8)
def _deployed(model_dir: str) -> LoadedModel:
    # one single-threaded run at a time: the simulator's worker processes already fill the cores
    return load_model(Path(model_dir), RuntimeConfig(intra_op_threads=1, workers=1, batch_size=256))


def run_deployed(model_dir: str, drive: pa.Table) -> dict:
    """The deployed model over one drive (FRAME_SCHEMA rows, seq order): {traj (n, T, 3) float32 [m, m, rad],
    maneuver (n,) int (arg-max of its head), name, version, dt_s}; featurized as the replay featurizes."""
    model = _deployed(str(model_dir))
    frames = arrow_to_frames(drive)
    segments = np.zeros(frames.num_frames, np.int64)
    traj, logits = model.predict(FeatureCache(frames, segments).inputs(model.featurizer))
    return {"traj": traj, "maneuver": logits.argmax(axis=1), "name": model.name, "version": model.version,
            "dt_s": model.spec.horizon_dt_s}


def plan_headings(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Headings (n, T) [rad] of plans given as waypoints x, y (n, T) [m] in the ego frame: the direction of each
    waypoint's step from the one before (from the ego at the origin for the first), where that step says where the
    car points. A step shorter than MIN_STEP_M, or one turning back more than 90 degrees from the heading so far,
    keeps the heading before it (the ego's own, 0, before the first): a stopped or creeping car's plan jitters back
    and forth and sideways by tenths of a metre, and arctan2 of a backward step is pi off (a car never turns round
    between two waypoints 0.5 s apart; one reversing keeps pointing forward)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx = np.diff(x, axis=1, prepend=0.0)
    dy = np.diff(y, axis=1, prepend=0.0)
    step = np.arctan2(dy, dx)
    moved = np.hypot(dx, dy) >= MIN_STEP_M
    out = np.zeros(x.shape)
    heading = np.zeros(x.shape[0])
    for t in range(x.shape[1]):  # T waypoints (8): each depends on the heading before it
        ok = moved[:, t] & (np.cos(step[:, t] - heading) > 0.0)
        heading = np.where(ok, step[:, t], heading)
        out[:, t] = heading
    return out


def logged_decision(table: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The logged plans of frames `rows` of a frames table: (whole (n,) bool: T waypoints at the featurizer's
    spacing; traj (n, T, 3) float32 [m, m, rad], headings from the waypoints' directions (`plan_headings`), zero
    where not whole;
    maneuver (n,) int codes)."""
    n = rows.shape[0]
    idx = pa.array(rows)
    px, py = table["plan_x"].take(idx).combine_chunks(), table["plan_y"].take(idx).combine_chunks()
    counts = np.asarray(px.value_lengths().fill_null(0), np.int64)
    dt = table["plan_dt_s"].take(idx).to_numpy()
    whole = (counts >= fz.HORIZON) & (np.abs(dt - fz.HORIZON_DT_S) < 1e-6)
    traj = np.zeros((n, fz.HORIZON, 3), np.float32)
    if whole.any():
        off = np.asarray(px.offsets)[:-1][whole]
        j = off[:, None] + np.arange(fz.HORIZON)[None, :]
        x, y = px.values.to_numpy()[j], py.values.to_numpy()[j]
        traj[whole] = np.stack([x, y, plan_headings(x, y)], axis=-1)
    maneuver = table["maneuver"].take(idx).combine_chunks().indices.to_numpy().astype(np.int64)
    return whole, traj, maneuver


def onboard_rows(table: pa.Table, rows: np.ndarray, teacher: tuple[np.ndarray, np.ndarray],
                 student: tuple[np.ndarray, np.ndarray], student_id: tuple[str, str], emulation_score: np.ndarray,
                 agents_of: Callable[[np.ndarray], dict[str, np.ndarray]], config
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The three comparisons of frames `rows` (n,) of a frames table (context included): -> (positions (m,) in
    `rows` of the frames with a whole logged plan, their columns of ONBOARD_SCHEMA's metrics). `teacher`,
    `student`: (traj (n, T, 3), logits (n, 6)) of the rows; `student_id` (name, version) of the replayed student;
    `agents_of(positions)`: the logged agents of those rows (`shadow.compute.take_agents`); `config`: the
    replay's PipelineConfig."""
    whole, logged, maneuver = logged_decision(table, rows)
    pos = np.flatnonzero(whole)
    logits = np.where(np.arange(fz.NUM_MANEUVERS)[None, :] == maneuver[pos, None], 0.0, -_CERTAIN).astype(np.float32)
    fleet = pair_metrics((teacher[0][pos], teacher[1][pos]), (logged[pos], logits), config.metrics,
                         agents_of(pos))
    idx = pa.array(rows[pos])
    model = table["decision_model"].take(idx).to_numpy(zero_copy_only=False).astype(str)
    version = table["decision_model_version"].take(idx).to_numpy(zero_copy_only=False).astype(str)
    checked = (model == student_id[0]) & (version == student_id[1])
    d = np.hypot(student[0][pos, :, 0] - logged[pos, :, 0], student[0][pos, :, 1] - logged[pos, :, 1]).max(axis=1)
    agree = student[1][pos].argmax(axis=1) == maneuver[pos]
    err = np.where(checked, d, np.nan).astype(np.float32)
    cols = {"fleet_ade_4s": fleet["ade_4s"], "fleet_fde_4s": fleet["fde_4s"], "fleet_miss_4s": fleet["miss_4s"],
            "fleet_maneuver_disagree": fleet["maneuver_disagree"], "fleet_score": fleet["score"],
            "emulation_score": emulation_score[pos], "parity_checked": checked, "parity_max_err_m": err,
            "parity_maneuver_agree": np.where(checked, agree, None).astype(object),
            "parity_ok": np.where(checked, agree & (d <= config.parity_tolerance_m), None).astype(object),
            "decision_model": model, "decision_model_version": version}
    return pos, cols

