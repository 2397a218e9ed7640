"""Held-out evaluation: the drive split, onnxruntime inference over featurized frames, and student-vs-teacher reports.

Metrics (planning community definitions; trajectories (N, T, 3) in the ego frame, metres):
- ADE: mean over the T waypoints of the L2 distance in (x, y), averaged over frames;
- FDE: the L2 distance at the last waypoint, averaged over frames;
- maneuver agreement: share of frames whose arg-max maneuver equals the reference's.
Against the expert (the logged future) only frames with their whole horizon in the drive count, and maneuver
accuracy only frames whose logged maneuver is known (not 0).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ingest.contract import ENUMS
from shadow.featurize import HORIZON, NUM_MANEUVERS, Features, featurize_drive_files
from shadow.models import session

log = logging.getLogger(__name__)

CONDITION_GROUPS = ("lighting", "weather", "road_type")


def split_drives(paths: Sequence[Path], holdout_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split drive files into (train, held-out) by drive, deterministically from `seed` and the sorted paths.

    At least one drive is held out when there are two or more, and at least one is kept for training.
    """
    paths = sorted(Path(p) for p in paths)
    if len(paths) < 2:
        raise ValueError(f"need at least two drives to hold one out, got {len(paths)}")
    n_hold = min(len(paths) - 1, max(1, round(holdout_fraction * len(paths))))
    order = np.random.default_rng(seed).permutation(len(paths))
    held = sorted(paths[i] for i in order[:n_hold])
    train = sorted(paths[i] for i in order[n_hold:])
    return train, held


def predict(model: ort.InferenceSession | Path, feats: Features, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Run a planner over all frames in batches -> (trajectory (N, T, 3) [m, m, rad], maneuver logits (N, 6))."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    # the inputs of the featurizer the graph was built for: feat-v1, or a plug-in's kept in feats.extra
    inputs = feats.inputs_for([i.name for i in sess.get_inputs()])
    trajs, logits = [], []
    for start in range(0, len(feats), batch_size):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        t, m = sess.run(["trajectory", "maneuver_logits"], batch)
        trajs.append(t)
        logits.append(m)
    if not trajs:
        return np.zeros((0, HORIZON, 3), np.float32), np.zeros((0, NUM_MANEUVERS), np.float32)
    return np.concatenate(trajs), np.concatenate(logits)


def displacement(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ADE and FDE in metres of trajectories (N, T, >=2)."""
    d = np.linalg.norm(pred[..., :2] - ref[..., :2], axis=-1)
    return d.mean(axis=1), d[:, -1]


def vs_expert(traj: np.ndarray, logits: np.ndarray, feats: Features) -> dict[str, float]:
    """ADE/FDE against the logged future on frames with a full horizon, maneuver accuracy on known maneuvers."""
    full = feats.traj_mask.all(axis=1)
    ade, fde = displacement(traj[full], feats.traj[full])
    known = feats.maneuver != 0
    acc = float((logits[known].argmax(1) == feats.maneuver[known]).mean()) if known.any() else float("nan")
    return {"frames": int(full.sum()), "ade_m": float(ade.mean()) if full.any() else float("nan"),
            "fde_m": float(fde.mean()) if full.any() else float("nan"), "maneuver_accuracy": acc}


def expert_by_condition(traj: np.ndarray, logits: np.ndarray, feats: Features) -> list[dict]:
    """`vs_expert` overall and per condition value: records of group, value, frames, ade_m, fde_m, maneuver_accuracy."""
    records = [{"group": "all", "value": "all", **vs_expert(traj, logits, feats)}] if len(feats) else []
    for group in CONDITION_GROUPS:
        codes = getattr(feats, group)
        for code in np.unique(codes):
            sel = np.flatnonzero(codes == code)
            records.append({"group": group, "value": ENUMS[group][1][int(code)],
                            **vs_expert(traj[sel], logits[sel], feats.take(sel))})
    return records


def compare(student: tuple[np.ndarray, np.ndarray], teacher: tuple[np.ndarray, np.ndarray],
            feats: Features) -> list[dict]:
    """Student against teacher (and both against the expert), overall and per condition value, as plain records.

    Each record: group ("all", "lighting", "weather", "road_type"), value, frames, ade_m, fde_m,
    maneuver_agreement (student vs teacher), student_ade_expert_m, teacher_ade_expert_m.
    """
    s_traj, s_logits = student
    t_traj, t_logits = teacher
    ade, fde = displacement(s_traj, t_traj)
    agree = s_logits.argmax(1) == t_logits.argmax(1)
    full = feats.traj_mask.all(axis=1) if feats.traj_mask is not None else np.zeros(len(feats), bool)
    s_exp = displacement(s_traj, feats.traj)[0] if feats.traj is not None else np.full(len(feats), np.nan)
    t_exp = displacement(t_traj, feats.traj)[0] if feats.traj is not None else np.full(len(feats), np.nan)

    def record(group: str, value: str, sel: np.ndarray) -> dict:
        f = sel & full
        return {"group": group, "value": value, "frames": int(sel.sum()), "ade_m": float(ade[sel].mean()),
                "fde_m": float(fde[sel].mean()), "maneuver_agreement": float(agree[sel].mean()),
                "student_ade_expert_m": float(s_exp[f].mean()) if f.any() else float("nan"),
                "teacher_ade_expert_m": float(t_exp[f].mean()) if f.any() else float("nan")}

    records = [record("all", "all", np.ones(len(feats), bool))] if len(feats) else []
    for group in CONDITION_GROUPS:
        codes = getattr(feats, group)
        for code in np.unique(codes):
            records.append(record(group, ENUMS[group][1][int(code)], codes == code))
    return records


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of `compare` records."""
    head = f"{'group':<10} {'value':<13} {'frames':>8} {'ADE m':>7} {'FDE m':>7} {'agree':>6} {'S-exp':>7} {'T-exp':>7}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['group']:<10} {r['value']:<13} {r['frames']:>8d} {r['ade_m']:>7.3f} {r['fde_m']:>7.3f} "
                     f"{r['maneuver_agreement']:>6.3f} {r['student_ade_expert_m']:>7.3f} {r['teacher_ade_expert_m']:>7.3f}")
    return "\n".join(lines)


def report(student_path: Path, teacher_path: Path, drive_paths: Sequence[Path], batch_size: int = 1024,
           threads: int | None = None) -> list[dict]:
    """Featurize the (held-out) drives, run both models with onnxruntime, and compare them."""
    feats = featurize_drive_files(drive_paths)
    s = predict(session(student_path, threads), feats, batch_size)
    t = predict(session(teacher_path, threads), feats, batch_size)
    return compare(s, t, feats)
