"""Promotion gates: the rules a fine-tuned candidate must pass against the current student, as a pydantic config.

    decision = evaluate_gates(GateConfig(), figures)        # figures: the cycle's verification record
    decision.passed, decision.reasons                      # rejected: one reason per failed check, in words

Checks (each can be switched off or re-tuned):

- divergence where mined (held-out mined windows, test drives never trained on): the candidate's mean `metric`
  (shadow's per-frame divergence score by default) is at least `mined_reduction` (50%) below the current student's;
- divergence elsewhere (ordinary frames of the same held-out drives): at most `elsewhere_increase` (10%) above it,
  relative;
- closed loop (highway-env, same seeded episodes): the candidate collides at most `max_extra_collisions` more often
  than the current student, its mean minimum time-to-collision is at most `ttc_margin_s` below, and (when
  `comfort_margin` is set) its share of comfortable episodes at most that much below;
- per target chip: size budget met, latency budget met (estimate on chips, measured on the CPU target), and the
  numeric verification (chip rules obeyed, error against the FP32 reference within tolerance) passed;
- enough evidence: at least `min_mined_frames` held-out mined frames and `min_elsewhere_frames` ordinary ones.

A missing figure fails its check (nothing is passed by default).

The figures come from `verify`: shadow replay (`shadow.replay`) of the current student ("before") and the candidate
("after") on the snapshot's test drives, written as a lake of its own, and the same seeded closed-loop episodes in
highway-env (`retrain.closed_loop`) for both, with the expert as reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.fleet.config import CONDITIONS
from retrain.closed_loop import EXPERT, ClosedLoopConfig, OnnxPlanner, evaluate
from retrain.dataset import Snapshot, write_frames_lake
from retrain.mining import condition_of
from shadow.catalog import Catalog
from shadow.replay import ReplayConfig, replay
from shadow.spec import MODEL_FILE


class VerificationError(RuntimeError):
    """A candidate that cannot be verified: no test drives in the snapshot, the same model id as the student."""


class VerificationConfig(BaseModel):
    """How a candidate is verified against the current student."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chip: str = Field("cpu", description="target whose artifact is replayed and driven (the others are checked "
                      "numerically against their FP32 reference by the compression)")
    replay: ReplayConfig = Field(default_factory=lambda: ReplayConfig(drive_end_idle_s=0.0, noise_every=1_000_000),
                                 description="shadow replay of both students on the test drives (their drives have "
                                 "ended: no idle wait; the noise floor is not needed here)")
    closed_loop: ClosedLoopConfig = Field(default_factory=lambda: ClosedLoopConfig(episodes=2),
                                          description="episodes per scenario and their length")
    conditions: list[str] = Field(default_factory=lambda: ["nominal", "glare"], min_length=1,
                                  description="perception conditions the closed loop runs under, each in turn")
    expert: bool = Field(True, description="also drive the expert on the same episodes (reference)")
    fp32_reference: bool = Field(True, description="also replay both students' FP32 models (when both exist): "
                                 "the fine-tune's effect without the compression's, for attribution (not gated)")

    @model_validator(mode="after")
    def _known(self) -> "VerificationConfig":
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown closed-loop conditions {bad}; known: {list(CONDITIONS)}")
        return self


class GateConfig(BaseModel):
    """Promotion rules; defaults are the design's: mined divergence down >= 50%, elsewhere up <= 10%, closed loop
    no worse, every target within budget and verified."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["mean_score", "mean_ade_4s", "mean_fde_4s", "miss_rate_4s", "disagree_rate"] = Field(
        "mean_score", description="divergence figure the divergence checks compare (shadow.metrics)")
    mined_reduction: float | None = Field(0.5, ge=0, le=1, description="required relative decrease of divergence "
                                          "where mined (0.5 = halved); None: not checked")
    elsewhere_increase: float | None = Field(0.10, ge=0, description="allowed relative increase of divergence "
                                             "elsewhere (0.1 = +10%); None: not checked")
    min_mined_frames: int = Field(50, ge=0, description="held-out mined frames needed to judge at all")
    min_elsewhere_frames: int = Field(50, ge=0, description="held-out ordinary frames needed to judge at all")
    closed_loop: bool = Field(True, description="check the closed-loop figures")
    max_extra_collisions: int = Field(0, ge=0, description="collisions the candidate may have beyond the current "
                                      "student's on the same episodes")
    ttc_margin_s: float | None = Field(0.5, ge=0, description="mean minimum TTC may drop at most this much [s]; "
                                       "None: not checked")
    comfort_margin: float | None = Field(None, ge=0, le=1, description="share of comfortable episodes may drop at "
                                         "most this much; None: reported, not checked")
    budgets: bool = Field(True, description="every target's size and latency budgets must be met")
    verification: bool = Field(True, description="every target's numeric verification must have passed")


class Check(BaseModel):
    """One gate check: what was compared, the figures and the outcome."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool
    value: float | None = Field(None, description="the candidate's figure (or the relative change)")
    limit: float | None = Field(None, description="the threshold it was held against")
    detail: str = Field("", description="the comparison in words")


class GateDecision(BaseModel):
    """A plain record: passed or rejected, the reasons (failed checks in words) and every check."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    status: Literal["promoted", "rejected"]
    reasons: list[str]
    checks: list[Check]


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def relative_change(before: float | None, after: float | None) -> float | None:
    """(after - before) / before; None when either is missing or before is 0."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def evaluate_gates(config: GateConfig, figures: dict) -> GateDecision:
    """Judge a candidate from the cycle's verification figures:

    figures = {"divergence": {"mined": {"before": {metric: .., "frames": n}, "after": {...}}, "elsewhere": {...}},
               "closed_loop": {"before": {"collisions", "mean_min_ttc_s", "comfortable_rate"}, "after": {...}},
               "targets": [TargetResult dicts]}
    """
    checks: list[Check] = []
    m = config.metric
    div = figures.get("divergence") or {}
    for where, limit, sign in (("mined", config.mined_reduction, -1), ("elsewhere", config.elsewhere_increase, 1)):
        if limit is None:
            continue
        rec = div.get(where) or {}
        before, after = rec.get("before") or {}, rec.get("after") or {}
        frames = int(after.get("frames") or 0)
        need = config.min_mined_frames if where == "mined" else config.min_elsewhere_frames
        b, a = _num(before.get(m)), _num(after.get(m))
        change = relative_change(b, a)
        if frames < need:
            checks.append(Check(name=f"divergence_{where}", passed=False, value=float(frames), limit=float(need),
                                detail=f"only {frames} held-out {where} frames; {need} needed to judge"))
        elif change is None:
            checks.append(Check(name=f"divergence_{where}", passed=False,
                                detail=f"{m} {where}: no comparable figures (before {b}, after {a})"))
        elif sign < 0:
            checks.append(Check(name="divergence_mined", passed=change <= -limit, value=change, limit=-limit,
                                detail=f"{m} where mined {b:.4g} -> {a:.4g} ({change:+.1%}); needs <= {-limit:+.0%}"))
        else:
            checks.append(Check(name="divergence_elsewhere", passed=change <= limit, value=change, limit=limit,
                                detail=f"{m} elsewhere {b:.4g} -> {a:.4g} ({change:+.1%}); allowed <= {limit:+.0%}"))
    if config.closed_loop:
        cl = figures.get("closed_loop") or {}
        before, after = cl.get("before") or {}, cl.get("after") or {}
        if not before or not after:
            checks.append(Check(name="closed_loop", passed=False, detail="no closed-loop figures"))
        else:
            cb, ca = int(before.get("collisions", 0)), int(after.get("collisions", 0))
            checks.append(Check(name="closed_loop_collisions", passed=ca <= cb + config.max_extra_collisions,
                                value=float(ca), limit=float(cb + config.max_extra_collisions),
                                detail=f"collisions {cb} -> {ca} over {after.get('episodes')} episodes"))
            if config.ttc_margin_s is not None:
                tb, ta = _num(before.get("mean_min_ttc_s")), _num(after.get("mean_min_ttc_s"))
                ok = tb is not None and ta is not None and ta >= tb - config.ttc_margin_s
                checks.append(Check(name="closed_loop_min_ttc", passed=ok, value=ta,
                                    limit=None if tb is None else tb - config.ttc_margin_s,
                                    detail=f"mean min TTC {_fmt(tb)} -> {_fmt(ta)} s; may drop at most "
                                           f"{config.ttc_margin_s} s"))
            if config.comfort_margin is not None:
                fb, fa = _num(before.get("comfortable_rate")), _num(after.get("comfortable_rate"))
                ok = fb is not None and fa is not None and fa >= fb - config.comfort_margin
                checks.append(Check(name="closed_loop_comfort", passed=ok, value=fa,
                                    limit=None if fb is None else fb - config.comfort_margin,
                                    detail=f"comfortable episodes {_fmt(fb)} -> {_fmt(fa)}; may drop at most "
                                           f"{config.comfort_margin}"))
    targets = figures.get("targets") or []
    if (config.budgets or config.verification) and not targets:
        checks.append(Check(name="targets", passed=False, detail="no compressed targets"))
    for t in targets:
        chip = t.get("chip", "?")
        if config.budgets:
            checks.append(Check(name=f"{chip}_size", passed=bool(t.get("size_budget_met")), value=t.get("bytes"),
                                limit=t.get("size_budget_bytes"),
                                detail=f"{chip}: {t.get('bytes')} bytes, budget {t.get('size_budget_bytes')}"))
            basis = t.get("latency_budget_basis", "estimate")
            lat = t.get("cpu_latency_ms_measured") if basis == "measured" else t.get("latency_ms_estimate")
            checks.append(Check(name=f"{chip}_latency", passed=bool(t.get("latency_budget_met")), value=lat,
                                limit=t.get("latency_budget_ms"),
                                detail=f"{chip}: {lat} ms ({basis}), budget {t.get('latency_budget_ms')} ms"))
        if config.verification:
            checks.append(Check(name=f"{chip}_verified", passed=bool(t.get("verified")), value=t.get("max_abs_error"),
                                detail=f"{chip}: rules ok {t.get('rules_ok')}, tolerance met "
                                       f"{t.get('tolerance_met')}, violations {t.get('violations') or 'none'}"))
    reasons = [c.detail for c in checks if not c.passed]
    passed = not reasons
    return GateDecision(passed=passed, status="promoted" if passed else "rejected", reasons=reasons, checks=checks)


# ------------------------------------------------------------------------------------------------ figures judged

DIVERGENCE_COLUMNS = ("score", "ade_4s", "fde_4s", "miss_4s", "maneuver_disagree")
SETS = {"mined": "mined", "ordinary": "elsewhere"}


def divergence_summary(cols: dict[str, np.ndarray]) -> dict:
    """frames, mean_score, mean_ade_4s [m], mean_fde_4s [m], miss_rate_4s, disagree_rate of per-frame divergence
    columns (shadow's divergences table); None figures for no frames."""
    n = int(cols["score"].shape[0])
    mean = (lambda x: float(np.mean(x)) if n else None)  # noqa: E731
    return {"frames": n, "mean_score": mean(cols["score"]), "mean_ade_4s": mean(cols["ade_4s"]),
            "mean_fde_4s": mean(cols["fde_4s"]), "miss_rate_4s": mean(cols["miss_4s"]),
            "disagree_rate": mean(cols["maneuver_disagree"])}


def divergence_figures(before: pa.Table, after: pa.Table, roles: pa.Table) -> dict:
    """Divergence of two students (rows of the divergences table: drive_id, seq, DIVERGENCE_COLUMNS, lighting,
    weather, road_type) on the same frames, where mined and elsewhere (`roles`: drive_id, seq, role = mined |
    ordinary), overall, per condition and per road type. Only frames both students were replayed on count."""
    keys = ["drive_id", "seq"]
    b = before.select([*keys, *DIVERGENCE_COLUMNS, "lighting", "weather", "road_type"])
    a = after.select([*keys, *DIVERGENCE_COLUMNS]).rename_columns(keys + [f"a_{c}" for c in DIVERGENCE_COLUMNS])
    t = roles.select([*keys, "role"]).join(b, keys, join_type="inner").join(a, keys, join_type="inner")
    t = t.sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    role = t["role"].to_numpy(zero_copy_only=False)
    cond = np.array([condition_of(li, we) for li, we in zip(t["lighting"].to_pylist(), t["weather"].to_pylist())],
                    object)
    road = np.array(t["road_type"].to_pylist(), object)
    num = (lambda name: pc.fill_null(t[name].cast(pa.float64()), 0.0).to_numpy())  # noqa: E731
    col = {c: num(c) for c in DIVERGENCE_COLUMNS}
    acol = {c: num(f"a_{c}") for c in DIVERGENCE_COLUMNS}

    def pair(sel: np.ndarray) -> dict:
        bs = divergence_summary({c: v[sel] for c, v in col.items()})
        af = divergence_summary({c: v[sel] for c, v in acol.items()})
        change = {k: relative_change(bs[k], af[k]) for k in bs if k != "frames"}
        return {"before": bs, "after": af, "change": change}

    out: dict = {"frames": int(t.num_rows), "by_condition": [], "by_road_type": []}
    for r, name in SETS.items():
        in_set = role == r
        out[name] = pair(in_set)
        for key, values in (("by_condition", cond), ("by_road_type", road)):
            for v in sorted(set(values[in_set].tolist())):
                out[key].append({"set": name, key[3:]: v, **pair(in_set & (values == v))})
    return out


def closed_loop_figures(records: list[dict]) -> dict:
    """Per policy, over every scenario and condition: episodes, collisions, collision_rate, mean and smallest
    minimum TTC [s], ttc_unsafe_rate, comfortable_rate, mean_speed_mps, progress_vs_expert (episode-weighted), from
    `retrain.closed_loop.evaluate` records (each tagged with its condition)."""
    out: dict[str, dict] = {}
    for policy in dict.fromkeys(r["policy"] for r in records):
        rs = [r for r in records if r["policy"] == policy]
        n = sum(r["episodes"] for r in rs)
        w = (lambda k: float(sum(r[k] * r["episodes"] for r in rs) / n) if all(k in r for r in rs) else None)  # noqa
        out[policy] = {"episodes": n, "collisions": int(sum(r["collisions"] for r in rs)),
                       "collision_rate": sum(r["collisions"] for r in rs) / n, "mean_min_ttc_s": w("mean_min_ttc_s"),
                       "min_ttc_s": float(min(r["min_ttc_s"] for r in rs)), "ttc_unsafe_rate": w("ttc_unsafe_rate"),
                       "comfortable_rate": w("comfortable_rate"), "mean_speed_mps": w("mean_speed_mps"),
                       "progress_vs_expert": w("progress_vs_expert")}
    return out


def target_summary(t: dict) -> dict:
    """The figures of a TargetResult a cycle reports (latency on the chip is an ESTIMATE, on this CPU measured)."""
    keys = ("chip", "name", "bytes", "size_budget_bytes", "size_budget_met", "cpu_latency_ms_measured",
            "cpu_latency_fp32_ms_measured", "latency_ms_estimate", "latency_budget_ms", "latency_budget_basis",
            "latency_budget_met", "verified", "max_abs_error", "precision_mix", "parameters", "artifact")
    return {**{k: t.get(k) for k in keys}, "latency_estimate_label": "estimate (roofline, datasheet figures)"}


# ------------------------------------------------------------------------------------------- verification


def verify(cfg: VerificationConfig, snap: Snapshot, teacher: Path, parent: Path, candidate: Path, out: Path,
           progress: Callable[[str, int, int, dict], None] | None = None,
           fp32: tuple[Path, Path] | None = None) -> dict:
    """Shadow replay of the current student ("before") and the candidate ("after") (model directories) on the
    snapshot's test drives in a lake of its own under `out`, and both in the same closed-loop episodes. `fp32`:
    (student FP32, candidate FP32) directories with distinct model ids, replayed too (divergence["fp32"])."""
    test = _test_rows(snap)
    lake = out / "lake"
    write_frames_lake(lake, test, topic="flywheel.verify")  # same names on a rerun: idempotent
    tell = progress or (lambda *a: None)
    models = {"before": parent, "after": candidate}
    if cfg.fp32_reference and fp32 is not None:
        models.update(before_fp32=fp32[0], after_fp32=fp32[1])
    pairs = {}
    for who, model in models.items():
        rep = replay(lake, teacher, model, cfg.replay, progress=lambda d, n, w=who: tell(f"replay {w}", d, n, {}))
        pairs[who] = rep.pair
    if len(set(pairs.values())) < len(pairs):
        raise VerificationError(f"two of the replayed models have the same model id: {pairs}")
    cols = ("drive_id, seq, score, ade_4s, fde_4s, miss_4s, maneuver_disagree, lighting::VARCHAR AS lighting, "
            "weather::VARCHAR AS weather, road_type::VARCHAR AS road_type")
    with Catalog(lake) as cat:
        rows = {w: cat.arrow(f"SELECT {cols} FROM divergences WHERE pair = $p", {"p": p}) for w, p in pairs.items()}
    roles = test.select(["drive_id", "seq", "role"])
    roles = roles.filter(pc.not_equal(roles["role"], "context"))
    divergence = divergence_figures(rows["before"], rows["after"], roles)
    if "after_fp32" in rows:  # the same figures for the FP32 models: what the fine-tune did before compression
        fp = divergence_figures(rows["before_fp32"], rows["after_fp32"], roles)
        divergence["fp32"] = {k: fp[k] for k in ("mined", "elsewhere", "by_condition")}
    policies = {**({"expert": EXPERT} if cfg.expert else {}), "before": OnnxPlanner(parent / MODEL_FILE, "before"),
                "after": OnnxPlanner(candidate / MODEL_FILE, "after")}
    records = []
    for i, cond in enumerate(cfg.conditions):
        recs = evaluate(policies, cfg.closed_loop.model_copy(update={"condition": cond}))
        records += [{**r, "condition": cond} for r in recs]
        tell("closed loop", i + 1, len(cfg.conditions), {"condition": cond})
    agg = closed_loop_figures(records)
    return {"lake": str(lake), "pairs": pairs, "divergence": divergence,
            "closed_loop": {"before": agg["before"], "after": agg["after"], "expert": agg.get("expert", {}),
                            "conditions": cfg.conditions, "records": records}}


def _test_rows(snap: Snapshot) -> pa.Table:
    t = snap.table()
    test = t.filter(pc.equal(t["split"], "test"))
    if test.num_rows == 0:
        raise VerificationError(f"snapshot {snap.id} has no test drives to verify on")
    return test
