"""The acceptance criteria in the promotion gate: per-criterion pass rates of both students on held-out scenario
windows (`retrain.cycle.verify.criteria_figures`), the gate's checks on them and their reasons, and the criteria
file's `required_rate`. The same on a real verification lake: tests/retrain/test_cycle.py."""

from __future__ import annotations

import pyarrow as pa
import pytest

from retrain.cycle.gates import GateConfig, criteria_checks, evaluate_gates
from retrain.cycle.verify import criteria_figures
from shadow.criteria import CriteriaError, load_criteria, parse_criteria

ONLY_CRITERIA = GateConfig(mined_reduction=None, elsewhere_increase=None, closed_loop=False, log_replay=False,
                           budgets=False, verification=False, compression=False)


def rates(n: int, before: int, after: int, required: float = 0.9) -> dict:
    """A criterion's figures on n held-out windows: `before` and `after` of them passed."""
    cmp = {"windows": n, "before": {"passed": before, "pass_rate": before / n if n else None},
           "after": {"passed": after, "pass_rate": after / n if n else None}}
    return {"required": required, "all": cmp, "mined": cmp, "elsewhere": cmp}


def figures(**criteria: dict) -> dict:
    return {"criteria": {"overall": rates(40, 40, 40), "criteria": criteria}}


def failed(d) -> dict[str, str]:
    return {c.name: c.detail for c in d.checks if not c.passed}


def test_candidate_below_a_required_rate_the_current_student_met_is_rejected_naming_the_criterion():
    d = evaluate_gates(ONLY_CRITERIA, figures(fde_4s=rates(40, 36, 35), ade_4s=rates(40, 40, 40)))
    assert not d.passed and list(failed(d)) == ["criterion_fde_4s"]
    # one window fewer is within the margin, but 87.5% is below the 90% the current student met
    assert d.reasons == ["criterion fde_4s: pass rate 90.0% -> 87.5% (35/40 held-out windows): below its required "
                         "90.0%, which the current student met"]
    # a criterion's own required rate
    d = evaluate_gates(ONLY_CRITERIA, figures(student_ttc=rates(40, 40, 39, required=1.0)))
    assert list(failed(d)) == ["criterion_student_ttc"] and "below its required 100.0%" in d.reasons[0]


def test_candidate_falling_against_the_current_student_is_rejected_even_below_the_bar():
    d = evaluate_gates(ONLY_CRITERIA, figures(miss_rate_4s=rates(40, 30, 28)))  # 75% -> 70%, bar 90% never met
    assert d.reasons == ["criterion miss_rate_4s: pass rate 75.0% -> 70.0% (28/40 held-out windows): 5.0 points "
                         "below the current student's; may fall at most 2.5 points"]
    d = evaluate_gates(ONLY_CRITERIA, figures(miss_rate_4s=rates(40, 40, 30)))  # both at once, in one reason
    assert list(failed(d)) == ["criterion_miss_rate_4s"]
    assert "below its required 90.0%" in d.reasons[0] and "25.0 points below the current student's" in d.reasons[0]


def test_within_the_margin_or_improving_below_the_bar_passes():
    ok = {"ade_4s": rates(40, 30, 29),  # one window fewer, bar not met before either: within max(2 points, 1 window)
          "fde_4s": rates(72, 50, 62),  # 69% -> 86%: still below 90%, but the flywheel improves a student below it
          "disagree": rates(36, 34, 33),  # 94.4% -> 91.7%: one window of 36 (2.8 points), still above the bar
          "ttc": rates(1000, 950, 935)}  # 1.5 points on 1000 windows: within 2 points
    d = evaluate_gates(ONLY_CRITERIA, figures(**ok))
    assert d.passed, d.reasons
    assert {c.name for c in d.checks} == {"criterion_ade_4s", "criterion_fde_4s", "criterion_disagree",
                                          "criterion_ttc", "criteria_all"}
    fde = next(c for c in d.checks if c.name == "criterion_fde_4s")
    assert "not met by the current student: judged against it" in fde.detail and fde.value == pytest.approx(62 / 72)
    d = evaluate_gates(ONLY_CRITERIA, figures(ttc=rates(1000, 950, 925)))  # 2.5 points on 1000 windows: too much
    assert list(failed(d)) == ["criterion_ttc"]
    assert evaluate_gates(ONLY_CRITERIA.model_copy(update={"criteria_margin": 0.03}), figures(ttc=rates(
        1000, 950, 925))).passed


def test_windows_passing_every_criterion_are_gated_too():
    fig = figures(ade_4s=rates(40, 40, 40))
    fig["criteria"]["overall"] = rates(40, 38, 35)
    d = evaluate_gates(ONLY_CRITERIA, fig)
    assert list(failed(d)) == ["criteria_all"] and d.reasons[0].startswith("every criterion (windows passing all)")


def test_missing_figures_fail():
    assert list(failed(evaluate_gates(ONLY_CRITERIA, {}))) == ["criteria"]  # no figures at all
    assert failed(evaluate_gates(ONLY_CRITERIA, figures()))["criteria"]  # no criterion in them
    fig = figures(fde_4s=rates(0, 0, 0), ade_4s=rates(40, 40, 40))
    fig["criteria"]["criteria"]["ade_4s"]["all"]["after"] = {}
    del fig["criteria"]["overall"]
    bad = failed(evaluate_gates(ONLY_CRITERIA, fig))
    assert set(bad) == {"criterion_fde_4s", "criterion_ade_4s", "criteria_all"}
    assert bad["criterion_fde_4s"].startswith("criterion fde_4s: no pass rates to compare on the held-out windows "
                                              "(0 windows")
    assert "after n/a" in bad["criterion_ade_4s"]
    assert evaluate_gates(ONLY_CRITERIA.model_copy(update={"criteria": False}), {}).passed  # switched off
    with pytest.raises(ValueError):
        GateConfig(criteria_margin=1.5)


def test_check_limit_is_the_effective_floor():
    fig = figures(a=rates(50, 49, 49), b=rates(50, 45, 45), c=rates(50, 30, 30))["criteria"]
    c = {x.name: x for x in criteria_checks(GateConfig(), fig)}
    assert c["criterion_a"].limit == pytest.approx(0.96)  # 98% - 2 points, above the bar
    assert c["criterion_b"].limit == pytest.approx(0.9)  # the bar the current student met is above 90% - 2 points
    assert c["criterion_c"].limit == pytest.approx(0.58)  # the current student below the bar: 60% - 2 points


# ----------------------------------------------------------------------------------------- criteria file


CRITERIA = """
criteria:
  ade_4s: {metric: mean_ade_4s, max: 1.5}
  fde_4s: {metric: max_fde_4s, max: 4.0, required_rate: 0.8}
  night_only: {metric: miss_rate_4s, max: 0.2, enabled: false}
  never: {metric: disagree_rate, max: 0.3, enabled: false}
overrides:
  - match: {lighting: [night]}
    criteria:
      night_only: {enabled: true}
pass_rates: {default: 0.95}
"""


def test_required_rate_in_the_criteria_file():
    c = parse_criteria(CRITERIA)
    assert [c.spec.required_rate(n) for n in ("ade_4s", "fde_4s")] == [0.95, 0.8]
    assert c.spec.evaluated() == ["ade_4s", "fde_4s", "night_only"]  # `never` is evaluated nowhere
    default = load_criteria()
    assert all(default.spec.required_rate(n) == default.spec.pass_rates.default for n in default.spec.criteria)
    for bad, msg in ((1.5, "criteria.fde_4s.required_rate: Value error, required_rate 1.5 outside [0, 1]"),
                     (-0.1, "required_rate -0.1 outside [0, 1]"), (".nan", "required_rate nan outside [0, 1]"),
                     ("high", "criteria.fde_4s.required_rate: Input should be a valid number")):
        with pytest.raises(CriteriaError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            parse_criteria(CRITERIA.replace("required_rate: 0.8", f"required_rate: {bad}"), None)
    with pytest.raises(CriteriaError, match="overrides.0.criteria.night_only.required_rate: Extra inputs"):
        parse_criteria(CRITERIA.replace("night_only: {enabled: true}", "night_only: {required_rate: 0.5}"))


def test_pass_rates_per_criterion_where_mined_and_elsewhere():
    c = parse_criteria(CRITERIA)
    # five windows of two drives (50 frames each); d1's second window holds mined frames 60..70
    windows = pa.table({
        "drive_id": ["d1", "d1", "d1", "d2", "d2"], "window_start_seq": [0, 50, 100, 0, 50],
        "window_end_seq": [49, 99, 149, 49, 99],
        "road_type": ["highway"] * 5, "lighting": ["day", "night", "night", "day", "day"], "weather": ["clear"] * 5,
        "b_passed": [True, False, False, True, False],
        "b_failed": [[], ["fde_4s", "night_only"], ["ade_4s"], [], ["ade_4s", "fde_4s"]],
        "a_passed": [True, True, False, True, True],
        "a_failed": [[], [], ["night_only"], [], []]})
    mined = pa.table({"drive_id": ["d1", "d1", "d2"], "seq": [60, 70, 100]})  # d2's seq 100: no window holds it
    f = criteria_figures(windows, mined, c)
    assert list(f["criteria"]) == ["ade_4s", "fde_4s", "night_only"]
    ade, fde, night = (f["criteria"][n] for n in ("ade_4s", "fde_4s", "night_only"))
    assert ade["required"] == 0.95 and fde["required"] == 0.8 and f["overall"]["required"] == 0.95
    assert ade["all"] == {"windows": 5, "before": {"passed": 3, "pass_rate": 0.6},
                          "after": {"passed": 5, "pass_rate": 1.0}, "change": pytest.approx(0.4)}
    assert (fde["all"]["before"]["passed"], fde["all"]["after"]["passed"]) == (3, 5)
    # night_only is evaluated on the two night windows alone
    assert night["all"]["windows"] == 2 and night["all"]["before"]["passed"] == 1 and night["all"]["after"][
        "passed"] == 1
    assert [fde[w]["windows"] for w in ("mined", "elsewhere")] == [1, 4]
    assert fde["mined"]["before"]["pass_rate"] == 0.0 and fde["mined"]["after"]["pass_rate"] == 1.0
    assert night["mined"]["windows"] == 1 and night["elsewhere"]["windows"] == 1
    o = f["overall"]
    assert (o["all"]["before"]["passed"], o["all"]["after"]["passed"], o["all"]["windows"]) == (2, 4, 5)
    assert o["mined"]["windows"] == 1 and o["elsewhere"]["after"]["pass_rate"] == 0.75
    # no mined window at all: the mined figures are None, not zero
    f = criteria_figures(windows, mined.slice(2), c)
    assert f["criteria"]["ade_4s"]["mined"] == {"windows": 0, "before": {"passed": 0, "pass_rate": None},
                                                "after": {"passed": 0, "pass_rate": None}, "change": None}
    assert f["overall"]["mined"]["before"]["pass_rate"] is None
