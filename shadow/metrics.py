"""Divergence metrics between two planners on the same frames, per frame and per scenario window; numpy, vectorised.

The planning community's open-loop metrics, with the teacher in the place of the expert. Trajectories are (N, T, 3):
x, y [m] and yaw [rad] in the ego frame, waypoints at t = dt, 2 dt, ... T dt (dt = 0.5 s, T = 8). For a horizon of h
seconds the first k = h / dt waypoints count:

- ADE_h: mean over those waypoints of the L2 distance in (x, y) [m]; FDE_h: the L2 distance at waypoint k [m];
- AHE_h / FHE_h: mean / final absolute heading difference, wrapped to [0, pi] [rad];
- miss_h: the largest L2 distance up to waypoint k exceeds the miss threshold (2 m by default, nuScenes' MissRate@2m);
- maneuver disagreement: the arg-max maneuvers differ; JSD: Jensen-Shannon divergence of the two softmax
  distributions in bits (base 2), so 0 for identical and 1 for disjoint distributions;
- TTC of each plan against the frame's logged agents (`shadow.ttc`: constant-velocity agents, 3-disc footprints);
- against the driver (the logged future, `shadow.featurize` targets): ADE / FDE over the whole horizon, NaN (null)
  unless every waypoint of the horizon is in the drive.

Score (one number to rank frames by, `MetricsConfig.weights`; defaults in brackets), at the longest horizon H:

    score = w_ade [1 /m] * ADE_H + w_heading [2 /rad] * AHE_H + w_miss [0.5] * miss_H
          + w_jsd [1] * JSD + w_disagree [0.5] * disagree
          + w_ttc [2] * clip((min(TTC_teacher, H) - min(TTC_student, H)) / H, 0, 1)

The last term is how much sooner (as a share of the horizon) the student's plan runs into a logged agent than the
teacher's; no collision counts as H, and a student that is safer than its teacher adds nothing.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.tables import DIVERGENCE_HORIZONS_S
from shadow import featurize as fz
from shadow.ttc import time_to_collision

LONGEST_H = max(DIVERGENCE_HORIZONS_S)


class ScoreWeights(BaseModel):
    """Weights of the combined divergence score (see the module docstring for the formula)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ade: float = Field(1.0, ge=0, description="per metre of ADE at the longest horizon")
    heading: float = Field(2.0, ge=0, description="per radian of average heading error at the longest horizon")
    miss: float = Field(0.5, ge=0, description="added when the longest horizon is a miss")
    jsd: float = Field(1.0, ge=0, description="per bit of maneuver Jensen-Shannon divergence")
    disagree: float = Field(0.5, ge=0, description="added when the arg-max maneuvers differ")
    ttc: float = Field(2.0, ge=0, description="per horizon-share by which the student's TTC is below the teacher's")


class MetricsConfig(BaseModel):
    """Parameters of the divergence metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    miss_threshold_m: dict[int, float] = Field(
        default_factory=lambda: {h: 2.0 for h in DIVERGENCE_HORIZONS_S},
        description="per horizon [s]: a plan misses when its largest L2 distance up to the horizon exceeds this [m]")
    ttc_horizon_s: float = Field(4.0, gt=0, le=fz.HORIZON * fz.HORIZON_DT_S,
                                 description="collisions later than this are not counted [s]")
    ttc_step_s: float = Field(0.1, gt=0, le=0.5, description="time step of the collision check [s]")
    ego_length_m: float = Field(5.0, gt=0, description="ego footprint length (highway-env's vehicle) [m]")
    ego_width_m: float = Field(2.0, gt=0, description="ego footprint width [m]")
    weights: ScoreWeights = Field(default_factory=ScoreWeights, description="weights of the combined score")

    @model_validator(mode="after")
    def _horizons(self) -> "MetricsConfig":
        if set(self.miss_threshold_m) != set(DIVERGENCE_HORIZONS_S):
            raise ValueError(f"miss_threshold_m needs exactly the horizons {list(DIVERGENCE_HORIZONS_S)} s")
        if min(self.miss_threshold_m.values()) <= 0:
            raise ValueError("miss thresholds must be positive")
        return self


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def waypoints_of(horizon_s: float, dt: float = fz.HORIZON_DT_S) -> int:
    k = int(round(horizon_s / dt))
    if abs(k * dt - horizon_s) > 1e-9 or not 1 <= k <= fz.HORIZON:
        raise ValueError(f"horizon {horizon_s} s is not a whole number of {dt} s waypoints within {fz.HORIZON}")
    return k


def displacement_metrics(a: np.ndarray, b: np.ndarray, config: MetricsConfig,
                         dt: float = fz.HORIZON_DT_S) -> dict[str, np.ndarray]:
    """ade_h, fde_h, ahe_h, fhe_h (N,) float32 and miss_h (N,) bool for every h in DIVERGENCE_HORIZONS_S.

    a, b (N, T, 3) [m, m, rad]: the two plans of the same frames.
    """
    d = np.hypot(a[..., 0] - b[..., 0], a[..., 1] - b[..., 1])  # (N, T) m
    he = np.abs(_wrap(a[..., 2].astype(np.float64) - b[..., 2]))  # (N, T) rad
    out: dict[str, np.ndarray] = {}
    for h in DIVERGENCE_HORIZONS_S:
        k = waypoints_of(h, dt)
        out[f"ade_{h}s"] = d[:, :k].mean(axis=1).astype(np.float32)
        out[f"fde_{h}s"] = d[:, k - 1].astype(np.float32)
        out[f"ahe_{h}s"] = he[:, :k].mean(axis=1).astype(np.float32)
        out[f"fhe_{h}s"] = he[:, k - 1].astype(np.float32)
        out[f"miss_{h}s"] = d[:, :k].max(axis=1) > config.miss_threshold_m[h]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) scores -> (N, C) probabilities, float64 (shifted by the max, so large logits do not overflow)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JSD (N,) in bits of distributions p, q (N, C): 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2; in [0, 1]."""
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> np.ndarray:
        # 0 * log 0 = 0; where x > 0, m > 0 too
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 0, x * np.log2(np.where(x > 0, x, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
        return t.sum(axis=1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def driver_metrics(traj: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ADE and FDE (N,) float32 [m] of plans (N, T, 3) against the logged future `target` (N, T, 3); NaN where
    `mask` (N, T) is not all True (the drive ends, or a frame is missing, within the horizon)."""
    d = np.hypot(traj[..., 0] - target[..., 0], traj[..., 1] - target[..., 1])
    full = mask.all(axis=1)
    ade = np.where(full, d.mean(axis=1), np.nan).astype(np.float32)
    fde = np.where(full, d[:, -1], np.nan).astype(np.float32)
    return ade, fde


def ttc_drop(ttc_teacher: np.ndarray, ttc_student: np.ndarray, horizon_s: float) -> np.ndarray:
    """(N,) share of the horizon by which the student's TTC is below the teacher's, 0..1 (NaN TTC = horizon)."""
    t = np.minimum(np.nan_to_num(ttc_teacher, nan=horizon_s), horizon_s)
    s = np.minimum(np.nan_to_num(ttc_student, nan=horizon_s), horizon_s)
    return np.clip((t - s) / horizon_s, 0.0, 1.0)


def score(m: dict[str, np.ndarray], ttc_teacher: np.ndarray, ttc_student: np.ndarray,
          config: MetricsConfig) -> np.ndarray:
    """The combined score (N,) float32 of the module docstring; `m` holds displacement metrics, maneuver_jsd and
    maneuver_disagree."""
    w = config.weights
    h = LONGEST_H
    s = (w.ade * m[f"ade_{h}s"].astype(np.float64) + w.heading * m[f"ahe_{h}s"] + w.miss * m[f"miss_{h}s"]
         + w.jsd * m["maneuver_jsd"] + w.disagree * m["maneuver_disagree"]
         + w.ttc * ttc_drop(ttc_teacher, ttc_student, config.ttc_horizon_s))
    return s.astype(np.float32)


def plan_ttc(traj: np.ndarray, agents: dict[str, np.ndarray], config: MetricsConfig) -> np.ndarray:
    """TTC (N,) float32 [s] of plans (N, T, 3) against `agents` (see `shadow.ttc.time_to_collision` for the keys:
    frame, x, y, vx, vy, heading, length, width, all (M,) in the ego frame); NaN for none within the horizon."""
    return time_to_collision(traj, fz.HORIZON_DT_S, agents["frame"], agents["x"], agents["y"], agents["vx"],
                             agents["vy"], agents["heading"], agents["length"], agents["width"], config.ego_length_m,
                             config.ego_width_m, config.ttc_horizon_s, config.ttc_step_s).astype(np.float32)


def pair_metrics(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], config: MetricsConfig,
                 agents: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every per-frame divergence of plan/logits pair `b` (the student) from `a` (the teacher).

    a, b: (trajectory (N, T, 3), maneuver logits (N, 6)). Returns the displacement metrics, maneuver_teacher and
    maneuver_student (N,) int (arg-max), maneuver_disagree (N,) bool, maneuver_jsd (N,) float32, and with `agents`
    ttc_teacher, ttc_student (N,) float32 (NaN = none) and score (N,) float32 (without agents the TTC term is 0).
    """
    out = displacement_metrics(a[0], b[0], config)
    pa_, pb_ = softmax(a[1]), softmax(b[1])
    out["maneuver_teacher"] = a[1].argmax(axis=1)
    out["maneuver_student"] = b[1].argmax(axis=1)
    out["maneuver_disagree"] = out["maneuver_teacher"] != out["maneuver_student"]
    out["maneuver_jsd"] = jensen_shannon(pa_, pb_).astype(np.float32)
    n = a[0].shape[0]
    if agents is not None:
        out["ttc_teacher"] = plan_ttc(a[0], agents, config)
        out["ttc_student"] = plan_ttc(b[0], agents, config)
    none = np.full(n, np.nan, np.float32)
    out["score"] = score(out, out.get("ttc_teacher", none), out.get("ttc_student", none), config)
    return out


# ------------------------------------------------------------------------------------------------ scenario windows

WINDOW_METRICS = ("frames", "mean_ade_4s", "max_fde_4s", "miss_rate_4s", "disagree_rate", "mean_jsd",
                  "min_ttc_teacher", "min_ttc_student", "mean_score", "max_score")


def window_aggregates(group: np.ndarray, n_groups: int, m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Aggregate per-frame metrics `m` (arrays (N,) from `pair_metrics`) over groups (N,) int in 0..n_groups-1.

    Returns WINDOW_METRICS, each (G,): frames int32; means and rates float32; maxima; min TTC float32 NaN when no
    frame of the window had one. Every group must hold at least one frame.
    """
    g = np.asarray(group, np.int64)
    count = np.bincount(g, minlength=n_groups).astype(np.float64)
    if (count == 0).any():
        raise ValueError("window_aggregates: empty group")

    def mean(x: np.ndarray) -> np.ndarray:
        return (np.bincount(g, weights=x.astype(np.float64), minlength=n_groups) / count).astype(np.float32)

    def extreme(x: np.ndarray, fn, fill: float) -> np.ndarray:
        out = np.full(n_groups, fill)
        fn.at(out, g, np.where(np.isnan(x), fill, x).astype(np.float64))
        return out

    out = {"frames": count.astype(np.int32), "mean_ade_4s": mean(m["ade_4s"]),
           "max_fde_4s": extreme(m["fde_4s"], np.maximum, -np.inf).astype(np.float32),
           "miss_rate_4s": mean(m["miss_4s"]), "disagree_rate": mean(m["maneuver_disagree"]),
           "mean_jsd": mean(m["maneuver_jsd"]), "mean_score": mean(m["score"]),
           "max_score": extreme(m["score"], np.maximum, -np.inf).astype(np.float32)}
    for who in ("teacher", "student"):
        lo = extreme(m[f"ttc_{who}"], np.minimum, np.inf)
        out[f"min_ttc_{who}"] = np.where(np.isinf(lo), np.nan, lo).astype(np.float32)
    return out


def dominant(group: np.ndarray, n_groups: int, codes: np.ndarray, n_codes: int) -> np.ndarray:
    """The most frequent code (G,) per group (ties: the smallest code); codes (N,) int in 0..n_codes-1."""
    counts = np.bincount(np.asarray(group, np.int64) * n_codes + codes, minlength=n_groups * n_codes)
    return counts.reshape(n_groups, n_codes).argmax(axis=1)
