"""Criteria files: validation with clear errors, pass/fail per window, overrides per condition, pass rates."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from shadow.criteria import DEFAULT_CRITERIA, CriteriaError, evaluate_windows, load_criteria, parse_criteria, pass_rates

BASIC = """
criteria:
  ade_4s: {metric: mean_ade_4s, max: 1.5}
  miss: {metric: miss_rate_4s, max: 0.2}
  student_ttc:
    metric: min_ttc_student
    min: 1.5
    if_null: pass
    when: {metric: min_ttc_teacher, min: 3.0, if_null: pass}
overrides:
  - match: {lighting: [night]}
    criteria:
      ade_4s: {max: 2.0}
  - match: {road_type: [intersection], lighting: [night]}
    criteria:
      miss: {enabled: false}
pass_rates:
  default: 0.75
  lighting: {night: 0.5}
"""


def windows(**over) -> dict:
    """Four windows, all passing unless changed."""
    w = {"mean_ade_4s": np.array([1.0, 1.0, 1.0, 1.0]), "miss_rate_4s": np.zeros(4),
         "min_ttc_student": np.full(4, np.nan), "min_ttc_teacher": np.full(4, np.nan),
         "road_type": np.array(["highway"] * 4, object), "lighting": np.array(["day"] * 4, object),
         "weather": np.array(["clear"] * 4, object)}
    w.update({k: np.asarray(v) for k, v in over.items()})
    return w


def test_default_file_loads_and_its_version_is_the_content_hash():
    c = load_criteria()
    assert c.version == hashlib.sha256(DEFAULT_CRITERIA.read_bytes()).hexdigest()
    assert {"ade_4s", "miss_rate_4s", "maneuver_disagreement", "student_ttc"} <= set(c.spec.criteria)
    assert parse_criteria(BASIC + "\n# a comment\n").version != parse_criteria(BASIC).version


def test_pass_and_fail_with_the_names_of_the_failed_criteria():
    c = parse_criteria(BASIC)
    passed, failed = evaluate_windows(windows(mean_ade_4s=[1.0, 1.6, 1.6, 1.5], miss_rate_4s=[0, 0, 0.5, 0.2]), c)
    assert passed.tolist() == [True, False, False, True]
    assert failed == [[], ["ade_4s"], ["ade_4s", "miss"], []]


def test_overrides_per_condition():
    c = parse_criteria(BASIC)
    w = windows(mean_ade_4s=[1.8, 1.8, 2.1, 1.0], miss_rate_4s=[0, 0, 0, 0.9],
                lighting=np.array(["day", "night", "night", "night"], object),
                road_type=np.array(["highway", "highway", "highway", "intersection"], object))
    passed, failed = evaluate_windows(w, c)
    # 1.8 m fails by day, passes at night (max 2.0); the miss criterion is off at night at intersections
    assert failed == [["ade_4s"], [], ["ade_4s"], []]
    # enum codes work as well as names (lighting 2 = night)
    w["lighting"] = np.array([1, 2, 2, 2])
    w["road_type"] = np.array([1, 1, 1, 4])
    w["weather"] = np.array([1, 1, 1, 1])
    assert evaluate_windows(w, c)[1] == failed


def test_conditional_ttc_criterion():
    c = parse_criteria(BASIC)
    w = windows(min_ttc_teacher=[2.0, 5.0, np.nan, 5.0], min_ttc_student=[1.0, 1.0, 1.0, np.nan])
    passed, failed = evaluate_windows(w, c)
    # teacher itself close (2 s): not applicable; teacher safe (5 s or none): the student's 1 s fails;
    # the student without any conflict passes
    assert passed.tolist() == [True, False, False, True]
    assert failed[1] == ["student_ttc"]


def test_pass_rates_against_required_rates():
    c = parse_criteria(BASIC)
    w = windows(mean_ade_4s=[1.0, 1.6, 1.0, 2.5], lighting=np.array(["day", "day", "night", "night"], object))
    passed, _ = evaluate_windows(w, c)
    rec = {(r["group"], r["value"]): r for r in pass_rates(w, passed, c)}
    assert rec[("all", "all")]["pass_rate"] == 0.5 and rec[("all", "all")]["required"] == 0.75
    assert not rec[("all", "all")]["ok"]
    assert rec[("lighting", "day")]["windows"] == 2 and rec[("lighting", "day")]["required"] == 0.75
    assert rec[("lighting", "night")]["pass_rate"] == 0.5 and rec[("lighting", "night")]["ok"]
    assert rec[("road_type", "highway")]["passed"] == 2


@pytest.mark.parametrize("text, needle", [
    ("criteria:\n  a: {metric: mean_ade_5s, max: 1}\n", "criteria.a.metric"),
    ("criteria:\n  a: {metric: mean_ade_4s, maximum: 1}\n", "criteria.a.maximum"),
    ("criteria:\n  a: {metric: mean_ade_4s}\n", "give min, max or both"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: [1]}\n", "criteria.a.max"),
    ("criteria: {}\n", "at least one criterion"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: 1}\noverrides:\n  - match: {lighting: [twilight]}\n"
     "    criteria: {a: {max: 2}}\n", "overrides.0.match"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: 1}\noverrides:\n  - match: {lighting: [night]}\n"
     "    criteria: {b: {max: 2}}\n", "overrides[0].criteria.b"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: 1}\npass_rates: {default: 1.5}\n", "pass_rates.default"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: 1}\npass_rates: {weather: {hail: 0.5}}\n", "hail"),
    ("criteria:\n  a: {metric: mean_ade_4s, max: 1\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("criterias:\n  a: {metric: mean_ade_4s, max: 1}\n", "criterias"),
])
def test_malformed_files_get_a_clear_error_naming_the_key(text, needle, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CriteriaError) as exc:
        load_criteria(path)
    assert needle in str(exc.value) and str(path) in str(exc.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CriteriaError, match="cannot read"):
        load_criteria(tmp_path / "nope.yaml")
