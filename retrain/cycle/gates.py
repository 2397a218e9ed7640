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
- log-replay closed loop (every held-out mined and ordinary window driven for 4 s among the logged agents,
  `shadow.log_replay`): the candidate's mean PDM-form score at most `log_replay_margin` below the current
  student's, where mined and elsewhere;
- acceptance criteria (`shadow.criteria`, on the held-out scenario windows both students were judged on), one check
  per criterion and one for the windows passing every criterion (`criteria_checks`): the candidate's pass rate
  fails when it is below the criterion's required rate while the current student's met it, or when it is more
  than the margin below the current student's (`criteria_margin`, at least `criteria_margin_windows` windows);
- per target chip: size budget met, latency budget met (estimate on chips, measured on the CPU target), and the
  numeric verification (chip rules obeyed, error against the FP32 reference within tolerance) passed;
- per target chip, compression: at least as compressed as the current student on that chip (`compression_checks`):
  INT8 share of product FLOPs not lower, size and latency estimate at most 10% above;
- enough evidence: at least `min_mined_frames` held-out mined frames and `min_elsewhere_frames` ordinary ones.

A missing figure fails its check (nothing is passed by default).

The figures come from `retrain.cycle.verify`: shadow replay of the current student ("before") and the candidate
("after") on the snapshot's test drives, and the same seeded closed-loop episodes for both.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from retrain.cycle.records import Record


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
    log_replay: bool = Field(True, description="check the log-replay closed loop where mined and elsewhere")
    log_replay_margin: float = Field(0.0, ge=0, le=1, description="the mean log-replay score (0..1) may fall at "
                                     "most this much below the current student's (0: not worse)")
    criteria: bool = Field(True, description="check every acceptance criterion's pass rate on the held-out scenario "
                           "windows, and the windows passing all of them (criteria_checks)")
    criteria_margin: float = Field(0.02, ge=0, le=1, description="a criterion's pass rate (0..1) may fall at most "
                                   "this much below the current student's on the same windows (0.02 = 2 points)")
    criteria_margin_windows: int = Field(1, ge=0, description="... and at least this many windows' worth: on few "
                                         "held-out windows one window near a bound is more than the margin (1 of 36 "
                                         "is 2.8 points) and flips with noise")
    budgets: bool = Field(True, description="every target's size and latency budgets must be met")
    verification: bool = Field(True, description="every target's numeric verification must have passed")
    compression: bool = Field(True, description="on every chip the candidate is at least as compressed as the "
                              "current student there: its INT8 (and integer) share of product FLOPs not lower, "
                              "size and latency estimate at most the ratios below")
    max_size_ratio: float = Field(1.1, ge=1, description="candidate bytes / current student's bytes, per chip")
    max_latency_ratio: float = Field(1.1, ge=1, description="candidate / current student's on-chip latency "
                                     "ESTIMATE (roofline), per chip")


class Check(Record):
    """One gate check: what was compared, the figures and the outcome."""

    name: str
    passed: bool
    value: float | None = Field(None, description="the candidate's figure (or the relative change)")
    limit: float | None = Field(None, description="the threshold it was held against")
    detail: str = Field("", description="the comparison in words")


class GateDecision(Record):
    """Passed or rejected, the reasons (failed checks in words) and every check."""

    passed: bool
    status: Literal["promoted", "rejected"]
    reasons: list[str]
    checks: list[Check]


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


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
               "log_replay": {"mined" | "elsewhere": {"windows", "before": {"score"}, "after": {...}}},
               "criteria": {"overall": {...}, "criteria": {name: {"required", "all": {"windows", "before":
                            {"passed", "pass_rate"}, "after": {...}}}}},   # retrain.cycle.verify.criteria_figures
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
    if config.log_replay:
        checks += log_replay_checks(config, figures.get("log_replay") or {})
    if config.criteria:
        checks += criteria_checks(config, figures.get("criteria") or {})
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
        if config.compression:
            checks += compression_checks(config, t)
    reasons = [c.detail for c in checks if not c.passed]
    passed = not reasons
    return GateDecision(passed=passed, status="promoted" if passed else "rejected", reasons=reasons, checks=checks)


def log_replay_checks(config: GateConfig, figures: dict) -> list[Check]:
    """Where mined and elsewhere: the candidate's mean log-replay score not more than `log_replay_margin` below the
    current student's (`retrain.cycle.verify.log_replay_figures`)."""
    out = []
    for where in ("mined", "elsewhere"):
        rec = figures.get(where) or {}
        b, a = _num((rec.get("before") or {}).get("score")), _num((rec.get("after") or {}).get("score"))
        limit = None if b is None else b - config.log_replay_margin
        out.append(Check(name=f"log_replay_{where}", passed=limit is not None and a is not None and a >= limit,
                         value=a, limit=limit,
                         detail=f"log-replay score {'where mined' if where == 'mined' else where} {_g(b)} -> {_g(a)} "
                                f"over {rec.get('windows', 0)} windows; may fall at most {config.log_replay_margin}"))
    return out


def criteria_checks(config: GateConfig, figures: dict) -> list[Check]:
    """One check per acceptance criterion (`criterion_<name>`) and one for the windows passing every criterion
    (`criteria_all`, required `pass_rates.default`), on all held-out windows (`figures`:
    `retrain.cycle.verify.criteria_figures`; its mined / elsewhere split is reported, not gated). The candidate's
    pass rate fails when

    - it is below the required rate while the current student's met it: a candidate never breaks a bar its
      predecessor met, but a current student below the bar is judged against itself alone (the flywheel must be
      able to improve a student that does not meet the bar yet, one cycle at a time);
    - it is below the current student's by more than max(`criteria_margin`, `criteria_margin_windows` / windows).

    A criterion without figures or without windows fails."""
    rates = figures.get("criteria") or {}
    if not rates:
        return [Check(name="criteria", passed=False, detail="no pass rates of the acceptance criteria on the "
                                                            "held-out windows")]
    return [_criterion_check(config, f"criterion_{n}", f"criterion {n}", r) for n, r in rates.items()] + [
        _criterion_check(config, "criteria_all", "every criterion (windows passing all)", figures.get("overall"))]


def _criterion_check(config: GateConfig, name: str, label: str, rec: dict | None) -> Check:
    rec = rec or {}
    cmp = rec.get("all") or {}
    n = int(cmp.get("windows") or 0)
    before, after = cmp.get("before") or {}, cmp.get("after") or {}
    b, a, req = _num(before.get("pass_rate")), _num(after.get("pass_rate")), _num(rec.get("required"))
    if not n or b is None or a is None or req is None:
        return Check(name=name, passed=False, value=a, limit=req,
                     detail=f"{label}: no pass rates to compare on the held-out windows ({n} windows, before "
                            f"{_pct(b)}, after {_pct(a)}, required {_pct(req)})")
    allowed = max(config.criteria_margin, config.criteria_margin_windows / n)
    floor = b - allowed if b < req else max(b - allowed, req)
    figures = f"{label}: pass rate {_pct(b)} -> {_pct(a)} ({after.get('passed')}/{n} held-out windows)"
    problems = []
    if a < req <= b:
        problems.append(f"below its required {_pct(req)}, which the current student met")
    if a < b - allowed - 1e-9:  # k/n figures: the tolerance keeps an exact one-window drop within the margin
        problems.append(f"{_pts(b - a)} below the current student's; may fall at most {_pts(allowed)}")
    basis = "met by the current student" if b >= req else "not met by the current student: judged against it"
    return Check(name=name, passed=not problems, value=a, limit=floor,
                 detail=f"{figures}: " + ("; ".join(problems) if problems else
                                          f"required {_pct(req)} ({basis}), may fall at most {_pts(allowed)}"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _pts(x: float) -> str:
    return f"{x * 100:.1f} points"


def compression_checks(config: GateConfig, t: dict) -> list[Check]:
    """Per chip, the candidate's artifact against the current student's (`t["baseline"]`): INT8 share of product
    FLOPs (and integer share, which counts INT16 where the chip's ladder puts products there) not lower; bytes and
    latency ESTIMATE at most `max_size_ratio` / `max_latency_ratio` times."""
    chip, b = t.get("chip", "?"), t.get("baseline")
    if not b:
        return [Check(name=f"{chip}_compression", passed=False,
                      detail=f"{chip}: no current student on this chip to compare the compression with")]
    out = []
    for key, label in (("int8_matmul_share", "INT8"), ("integer_matmul_share", "integer")):
        c, r = _num(t.get(key)), _num(b.get(key))
        ok = c is not None and r is not None and c >= r - 1e-9
        out.append(Check(name=f"{chip}_compression_{label.lower()}_share", passed=ok, value=c, limit=r,
                         detail=f"{chip}: {label} share of product FLOPs {_g(r)} -> {_g(c)} "
                                f"(current student {b.get('ref')}); may not fall"))
    for key, ratio, label in (("bytes", config.max_size_ratio, "size"),
                              ("latency_ms_estimate", config.max_latency_ratio, "latency ESTIMATE")):
        c, r = _num(t.get(key)), _num(b.get(key))
        rel = None if c is None or not r else c / r
        out.append(Check(name=f"{chip}_compression_{label.split()[0]}", passed=rel is not None and rel <= ratio,
                         value=rel, limit=ratio,
                         detail=f"{chip}: {label} {_g(r)} -> {_g(c)} ({_g(rel)}x the current student's); "
                                f"allowed <= {ratio}x"))
    return out


def target_summary(t: dict) -> dict:
    """The figures of a TargetResult a cycle reports (latency on the chip is an ESTIMATE, on this CPU measured)."""
    keys = ("chip", "name", "bytes", "size_budget_bytes", "size_budget_met", "cpu_latency_ms_measured",
            "cpu_latency_fp32_ms_measured", "latency_ms_estimate", "latency_budget_ms", "latency_budget_basis",
            "latency_budget_met", "verified", "max_abs_error", "precision_mix", "parameters", "artifact",
            "int8_matmul_share", "integer_matmul_share", "baseline")
    return {**{k: t.get(k) for k in keys}, "latency_estimate_label": "estimate (roofline, datasheet figures)"}
