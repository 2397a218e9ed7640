"""Acceptance criteria of scenario windows: a YAML file validated by pydantic, evaluated on window aggregates.

A criteria file names bounds on the aggregates of a scenario window (`shadow.metrics.WINDOW_METRICS`), optionally
only where another bound holds (`when`), overrides of those bounds for windows of some road types, lightings or
weathers, and the share of windows that must pass per road type / lighting / weather. See `criteria_default.yaml`
(the default file) for the format. Every window gets `passed` and the names of the criteria it failed; the criteria
version stored with it is the sha256 of the file's bytes, so any edit of the file is a new version.

Null aggregates (a window in which no plan conflicts with any agent has no minimum TTC) pass or fail as the bound's
`if_null` says.

A criterion's pass rate is the share of the windows it is evaluated on (its `enabled`, after the overrides for the
window's conditions) that did not fail it; a window outside its `when` passes it (`criterion_pass_rates`). Its
required rate is its optional `required_rate`, else `pass_rates.default` (`CriteriaFile.required_rate`): a
promotion gate holds a candidate student to it (`retrain.cycle.gates.criteria_checks`).
"""

from __future__ import annotations

import hashlib
from importlib import resources
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ingest.contract import ENUMS
from shadow.metrics import WINDOW_METRICS

log = logging.getLogger(__name__)

DEFAULT_CRITERIA = Path(str(resources.files("shadow") / "criteria_default.yaml"))  # package data
CONDITION_COLUMNS = ("road_type", "lighting", "weather")


class CriteriaError(ValueError):
    """A criteria file that cannot be used; the message names the file and the offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bound(_Model):
    """metric >= min and/or metric <= max."""

    metric: str = Field(description=f"window aggregate, one of {', '.join(WINDOW_METRICS)}")
    min: float | None = Field(None, description="lowest passing value (inclusive)")
    max: float | None = Field(None, description="highest passing value (inclusive)")
    if_null: Literal["pass", "fail"] = Field("fail", description="outcome when the aggregate is null")

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in WINDOW_METRICS:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(WINDOW_METRICS)}")
        return v

    @model_validator(mode="after")
    def _some_bound(self) -> "Bound":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class Criterion(Bound):
    """A named bound; with `when`, it applies only to windows where that other bound holds."""

    description: str = Field("", description="what it protects, in words")
    when: Bound | None = Field(None, description="applies only where this bound holds (else the window passes)")
    enabled: bool = Field(True, description="false: never evaluated (an override may enable it)")
    required_rate: float | None = Field(None, description="share of the windows it is evaluated on that must pass "
                                        "it (0..1); None: pass_rates.default")

    @field_validator("required_rate")
    @classmethod
    def _rate(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:  # NaN fails too
            raise ValueError(f"required_rate {v} outside [0, 1]")
        return v


class CriterionOverride(_Model):
    """Replacements for some fields of a criterion; the fields left out keep their value."""

    min: float | None = Field(None, description="new lowest passing value")
    max: float | None = Field(None, description="new highest passing value")
    if_null: Literal["pass", "fail"] | None = Field(None, description="new outcome for null aggregates")
    enabled: bool | None = Field(None, description="switch the criterion on or off")


class Match(_Model):
    """Which windows an override is for: every key given must match (values are enum names)."""

    road_type: list[str] | None = Field(None, description=f"any of {ENUMS['road_type'][1]}")
    lighting: list[str] | None = Field(None, description=f"any of {ENUMS['lighting'][1]}")
    weather: list[str] | None = Field(None, description=f"any of {ENUMS['weather'][1]}")

    @model_validator(mode="after")
    def _names(self) -> "Match":
        for key in CONDITION_COLUMNS:
            for v in getattr(self, key) or ():
                if v not in ENUMS[key][1]:
                    raise ValueError(f"{key}: unknown value {v!r}; known: {ENUMS[key][1]}")
        if all(getattr(self, k) is None for k in CONDITION_COLUMNS):
            raise ValueError(f"match needs at least one of {', '.join(CONDITION_COLUMNS)}")
        return self


class Override(_Model):
    match: Match = Field(description="windows the override applies to")
    criteria: dict[str, CriterionOverride] = Field(description="criterion name -> replaced fields")


class PassRates(_Model):
    """Share of windows that must pass: per road type, lighting and weather value, else the default."""

    default: float = Field(0.9, ge=0, le=1, description="required pass rate of every group not listed")
    road_type: dict[str, float] = Field(default_factory=dict, description="road type name -> required rate")
    lighting: dict[str, float] = Field(default_factory=dict, description="lighting name -> required rate")
    weather: dict[str, float] = Field(default_factory=dict, description="weather name -> required rate")

    @model_validator(mode="after")
    def _names(self) -> "PassRates":
        for key in CONDITION_COLUMNS:
            for name, rate in getattr(self, key).items():
                if name not in ENUMS[key][1]:
                    raise ValueError(f"{key}: unknown value {name!r}; known: {ENUMS[key][1]}")
                if not 0 <= rate <= 1:
                    raise ValueError(f"{key}.{name}: rate {rate} outside [0, 1]")
        return self

    def required(self, group: str, value: str) -> float:
        return getattr(self, group, {}).get(value, self.default) if group in CONDITION_COLUMNS else self.default


class CriteriaFile(_Model):
    """The whole file."""

    version: Literal[1] = Field(1, description="format version of the criteria file")
    criteria: dict[str, Criterion] = Field(description="name -> criterion")
    overrides: list[Override] = Field(default_factory=list, description="applied in order; later ones win")
    pass_rates: PassRates = Field(default_factory=PassRates, description="required pass rates")

    @model_validator(mode="after")
    def _consistent(self) -> "CriteriaFile":
        if not self.criteria:
            raise ValueError("criteria: at least one criterion is needed")
        for i, o in enumerate(self.overrides):
            for name in o.criteria:
                if name not in self.criteria:
                    raise ValueError(f"overrides[{i}].criteria.{name}: no criterion of that name; "
                                     f"known: {', '.join(self.criteria)}")
        return self

    def evaluated(self) -> list[str]:
        """Names of the criteria evaluated on some windows: enabled, or enabled by an override (file order)."""
        on = {n for o in self.overrides for n, ov in o.criteria.items() if ov.enabled}
        return [n for n, c in self.criteria.items() if c.enabled or n in on]

    def required_rate(self, name: str) -> float:
        """The pass rate criterion `name` must reach: its `required_rate`, else `pass_rates.default`."""
        r = self.criteria[name].required_rate
        return self.pass_rates.default if r is None else r


@dataclass(frozen=True)
class Criteria:
    """A loaded criteria file: its content, where it came from and its version (sha256 of its bytes)."""

    spec: CriteriaFile
    version: str
    path: Path | None = None


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<top>"


def parse_criteria(text: str | bytes, path: Path | None = None) -> Criteria:
    """Validate criteria YAML; raises CriteriaError naming the file and key on any problem."""
    raw = text.encode() if isinstance(text, str) else text
    where = str(path) if path else "<criteria>"
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CriteriaError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CriteriaError(f"{where}: expected a mapping with a 'criteria' key, got {type(data).__name__}")
    try:
        spec = CriteriaFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CriteriaError(f"{where}: {problems}") from None
    return Criteria(spec, hashlib.sha256(raw).hexdigest(), path)


def load_criteria(path: Path | None = None) -> Criteria:
    """Read a criteria file (the packaged default when None)."""
    p = Path(path) if path is not None else DEFAULT_CRITERIA
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise CriteriaError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_criteria(raw, p)


# --------------------------------------------------------------------------------------------------- evaluation


def _names(values, key: str) -> np.ndarray:
    """Condition values as enum names (G,) object: accepts names or integer codes."""
    a = np.asarray(values)
    if a.dtype.kind in "iu":
        return np.asarray(ENUMS[key][1], dtype=object)[a]
    return a.astype(object)


def _bound_ok(value: np.ndarray, lo: np.ndarray, hi: np.ndarray, if_null: np.ndarray) -> np.ndarray:
    null = np.isnan(value)
    with np.errstate(invalid="ignore"):
        ok = (value >= lo) & (value <= hi)
    return np.where(null, if_null, ok)


def _override_masks(windows: Mapping[str, np.ndarray], criteria: Criteria) -> list[np.ndarray]:
    """Per override of the file, (G,) bool: the windows its match selects."""
    g = len(np.asarray(windows[CONDITION_COLUMNS[0]]))
    cond = {k: _names(windows[k], k) for k in CONDITION_COLUMNS}
    masks = []
    for o in criteria.spec.overrides:
        m = np.ones(g, bool)
        for k in CONDITION_COLUMNS:
            allowed = getattr(o.match, k)
            if allowed is not None:
                m &= np.isin(cond[k], allowed)
        masks.append(m)
    return masks


def criterion_enabled(windows: Mapping[str, np.ndarray], criteria: Criteria,
                      masks: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per criterion (file order), (G,) bool: the windows it is evaluated on, its `enabled` after the overrides for
    each window's conditions (`windows`: road_type, lighting, weather as (G,) enum names or codes; `masks`: the
    overrides' windows when the caller has them, `_override_masks`)."""
    g = len(np.asarray(windows[CONDITION_COLUMNS[0]]))
    masks = _override_masks(windows, criteria) if masks is None else masks
    out = {}
    for name, c in criteria.spec.criteria.items():
        enabled = np.full(g, c.enabled)
        for o, m in zip(criteria.spec.overrides, masks):
            ov = o.criteria.get(name)
            if ov is not None and ov.enabled is not None:
                enabled[m] = ov.enabled
        out[name] = enabled
    return out


def criterion_pass_rates(windows: Mapping[str, np.ndarray], failed: Sequence[Sequence[str]], criteria: Criteria,
                         select: np.ndarray | None = None) -> dict[str, dict]:
    """Pass rate of each criterion of the file (file order) over G judged windows, as plain records.

    `windows`: road_type, lighting, weather as (G,) enum names or codes; `failed`: per window the names of the
    criteria it failed (the scenarios table's `failed_criteria`); `select`: (G,) bool, the windows counted (all when
    None). Each record: windows (selected windows the criterion is evaluated on), passed (those that did not fail
    it), pass_rate (passed / windows; None for no windows), required (`CriteriaFile.required_rate`).
    """
    g = len(failed)
    sel = np.ones(g, bool) if select is None else np.asarray(select, bool)
    out = {}
    for name, enabled in criterion_enabled(windows, criteria).items():
        hit = np.array([name in f for f in failed], bool) if g else np.zeros(0, bool)
        n = int((enabled & sel).sum())
        k = int((enabled & sel & ~hit).sum())
        out[name] = {"windows": n, "passed": k, "pass_rate": k / n if n else None,
                     "required": criteria.spec.required_rate(name)}
    return out


def evaluate_windows(windows: Mapping[str, np.ndarray], criteria: Criteria) -> tuple[np.ndarray, list[list[str]]]:
    """Judge G windows -> (passed (G,) bool, failed criterion names per window, in file order).

    `windows` maps each WINDOW_METRICS name used by the criteria to (G,) numbers (NaN = null) and road_type,
    lighting, weather to (G,) enum names or codes.
    """
    g = len(np.asarray(windows[CONDITION_COLUMNS[0]]))
    masks = _override_masks(windows, criteria)
    enabled_in = criterion_enabled(windows, criteria, masks)  # the same rule the pass rates count with
    failed_any = np.zeros(g, bool)
    failures: list[tuple[str, np.ndarray]] = []
    for name, c in criteria.spec.criteria.items():
        lo = np.full(g, -np.inf if c.min is None else c.min)
        hi = np.full(g, np.inf if c.max is None else c.max)
        if_null = np.full(g, c.if_null == "pass")
        for o, m in zip(criteria.spec.overrides, masks):
            ov = o.criteria.get(name)
            if ov is None:
                continue
            if ov.min is not None:
                lo[m] = ov.min
            if ov.max is not None:
                hi[m] = ov.max
            if ov.if_null is not None:
                if_null[m] = ov.if_null == "pass"
        value = np.asarray(windows[c.metric], np.float64)
        ok = _bound_ok(value, lo, hi, if_null)
        if c.when is not None:
            w = c.when
            applies = _bound_ok(np.asarray(windows[w.metric], np.float64),
                                np.full(g, -np.inf if w.min is None else w.min),
                                np.full(g, np.inf if w.max is None else w.max), np.full(g, w.if_null == "pass"))
            ok |= ~applies
        bad = enabled_in[name] & ~ok
        failed_any |= bad
        failures.append((name, bad))
    failed = [[name for name, bad in failures if bad[i]] for i in range(g)]
    return ~failed_any, failed


def pass_rates(windows: Mapping[str, np.ndarray], passed: np.ndarray, criteria: Criteria) -> list[dict]:
    """Pass rates against the required ones, as plain records, overall and per road type, lighting and weather.

    Each record: group ("all" or a condition), value, windows, passed, pass_rate, required, ok (rate >= required).
    """
    passed = np.asarray(passed, bool)
    rates = criteria.spec.pass_rates

    def record(group: str, value: str, sel: np.ndarray) -> dict:
        n = int(sel.sum())
        k = int(passed[sel].sum())
        rate = k / n if n else float("nan")
        req = rates.required(group, value)
        return {"group": group, "value": value, "windows": n, "passed": k, "pass_rate": rate, "required": req,
                "ok": bool(n and rate >= req)}

    out = [record("all", "all", np.ones(len(passed), bool))] if len(passed) else []
    for key in CONDITION_COLUMNS:
        names = _names(windows[key], key)
        for value in sorted(set(names.tolist())):
            out.append(record(key, value, names == value))
    return out
