"""An optional trigger policy: queue a retraining job when a scenario class's divergence crosses a threshold.

    [[rules]]
    name = "night-merge"
    student = "student"
    road_type = "merge"          # the class: road_type and/or lighting and/or weather
    lighting = "night"
    metric = "mean_score"        # mean_score | miss_rate_4s | disagree_rate | mean_ade_4s | fail_rate
    threshold = 1.5
    min_frames = 500             # no decision on fewer frames of the class
    lookback_days = 7
    cooldown_s = 86400
    targets = ["orin", "journey6"]

Each evaluation measures every rule's metric over the lake with SQL (the catalog's read-only views): frame metrics
over `divergences`, `fail_rate` (share of scenario windows that failed their criteria) over `scenarios`, restricted
to the class, the student (its promoted version when a registry is configured, else `student_version`, else every
version) and the lookback. A rule whose metric is at or above its threshold on at least `min_frames` frames queues a
job mining that class by score (`ScoreRule` with the class as its filter), requested by `policy:<rule name>`.

Idempotent by construction, with no state of its own: the job store refuses (in the same transaction that would
create the job) while the student has a queued or running job, and while this rule created a job for the student
less than `cooldown_s` ago. Evaluating twice, or from two processes, triggers at most once.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrain.jobs.models import CoolingDown, JobsConfig, JobSpec, ScoreRule, StudentBusy
from retrain.jobs.store import JobStore

log = logging.getLogger(__name__)

Metric = Literal["mean_score", "miss_rate_4s", "disagree_rate", "mean_ade_4s", "fail_rate"]
_FRAME_METRICS = {"mean_score": "avg(score)", "miss_rate_4s": "avg(miss_4s::INTEGER)",
                  "disagree_rate": "avg(maneuver_disagree::INTEGER)", "mean_ade_4s": "avg(ade_4s)"}


class PolicyRule(BaseModel):
    """One class of scenarios, the metric watched over it, and the job to queue when it crosses the threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="rule name; jobs are requested by policy:<name>")
    student: str = Field(description="registry name of the student (student_name in the lake)")
    student_version: str | None = Field(None, description="version to watch; None: the registry's promoted "
                                        "version when a registry is configured, else every version")
    road_type: str | None = Field(None, description="class: this road type (e.g. merge)")
    lighting: str | None = Field(None, description="class: this lighting (e.g. night, glare)")
    weather: str | None = Field(None, description="class: this weather (e.g. rain)")
    metric: Metric = Field("mean_score", description="frame metric over divergences, or fail_rate over scenarios")
    threshold: float = Field(gt=0, allow_inf_nan=False, description="trigger at or above this value")
    min_frames: int = Field(100, ge=1, description="no decision on fewer frames of the class")
    lookback_days: int | None = Field(7, ge=1, description="only lake dates this recent; None: all of it")
    cooldown_s: float = Field(86400.0, ge=0, description="no second job from this rule for the student sooner")
    targets: tuple[str, ...] = Field((), description="target chips of the job; empty = every target")
    min_score: float = Field(0.0, ge=0, description="the job's score rule: smallest window max_score mined")
    top_k: int = Field(200, ge=0, description="the job's score rule: windows mined at most (0 = no limit)")
    options: dict[str, Any] = Field(default_factory=dict, description="cycle options of the job")

    @model_validator(mode="after")
    def _class(self) -> "PolicyRule":
        from ingest.contract import ENUMS

        if not (self.road_type or self.lighting or self.weather):
            raise ValueError(f"rule {self.name}: name the class (road_type and/or lighting and/or weather)")
        for key in ("road_type", "lighting", "weather"):
            value = getattr(self, key)
            if value is not None and value not in ENUMS[key][1]:
                raise ValueError(f"rule {self.name}: unknown {key} {value!r}; known: {ENUMS[key][1]}")
        return self

    @property
    def requester(self) -> str:
        return f"policy:{self.name}"

    def describe(self) -> str:
        cls = "/".join(v for v in (self.road_type, self.lighting, self.weather) if v)
        return f"{self.name} ({self.student}, {cls}, {self.metric} >= {self.threshold:g})"


class PolicyConfig(BaseModel):
    """The rules of the trigger policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[PolicyRule, ...] = Field((), description="evaluated in order; a student triggers at most once")

    @model_validator(mode="after")
    def _unique(self) -> "PolicyConfig":
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names repeat: {names}")
        return self

    @classmethod
    def from_file(cls, path: Path) -> "PolicyConfig":
        return cls.model_validate(tomllib.loads(Path(path).read_text()))


@dataclass
class Decision:
    """What one rule found and did."""

    rule: str
    student: str
    value: float | None
    frames: int
    triggered: bool
    reason: str
    job_id: str | None = None
    pair: str | None = None


def _version(rule: PolicyRule, registry_dir: Path | None) -> str | None:
    if rule.student_version is not None or registry_dir is None:
        return rule.student_version
    from retrain.cycle.registry import Registry

    promoted = [e for e in Registry(registry_dir).list(rule.student) if e.status == "promoted"]
    return promoted[-1].version if promoted else None


def measure(catalog, rule: PolicyRule, version: str | None, now: float) -> tuple[float | None, int, str | None]:
    """(metric value, frames of the class, the pair with most frames) of a rule over the lake."""
    params = {"student": rule.student, "version": version or "", "road": rule.road_type or "",
              "light": rule.lighting or "", "weather": rule.weather or "",
              "since": (datetime.fromtimestamp(now, timezone.utc) - timedelta(days=rule.lookback_days)).date()
              if rule.lookback_days else datetime(1970, 1, 1).date()}
    where = ("student_name = $student AND ($version = '' OR student_version = $version) "
             "AND ($road = '' OR road_type::VARCHAR = $road) AND ($light = '' OR lighting::VARCHAR = $light) "
             "AND ($weather = '' OR weather::VARCHAR = $weather) AND date >= $since")
    if rule.metric == "fail_rate":  # windows weighted by their frames, so that min_frames means frames here too
        sql = (f"SELECT pair, sum(frames)::BIGINT AS n, sum(frames * (NOT passed)::INTEGER)::DOUBLE AS s "
               f"FROM scenarios WHERE {where} GROUP BY pair")
    else:
        sql = (f"SELECT pair, count(*)::BIGINT AS n, {_FRAME_METRICS[rule.metric]} * count(*) AS s "
               f"FROM divergences WHERE {where} GROUP BY pair")
    rows = catalog.arrow(sql, params).to_pylist()
    frames = sum(r["n"] for r in rows)
    if not frames:
        return None, 0, None
    value = sum(r["s"] or 0.0 for r in rows) / frames
    return value, frames, max(rows, key=lambda r: (r["n"], r["pair"]))["pair"]


def evaluate(catalog, policy: PolicyConfig, store: JobStore, registry_dir: Path | None = None, validator=None,
             now: float | None = None, dry_run: bool = False) -> list[Decision]:
    """Evaluate every rule once; queue the jobs due (none with `dry_run`). Returns one Decision per rule."""
    now = time.time() if now is None else now
    out: list[Decision] = []
    for rule in policy.rules:
        version = _version(rule, registry_dir)
        value, frames, pair = measure(catalog, rule, version, now)
        d = Decision(rule.name, rule.student, value, frames, False, "", pair=pair)
        out.append(d)
        if frames < rule.min_frames:
            d.reason = f"{frames} frames of the class, fewer than min_frames {rule.min_frames}"
            continue
        if value is None or value < rule.threshold:
            d.reason = f"{rule.metric} {value:.4g} below {rule.threshold:g}"
            continue
        spec = JobSpec(student=rule.student, targets=rule.targets, options=rule.options,
                       score_rule=ScoreRule(min_score=rule.min_score, top_k=rule.top_k,
                                            pair=pair if version else "",
                                            road_types=(rule.road_type,) if rule.road_type else (),
                                            lightings=(rule.lighting,) if rule.lighting else (),
                                            weathers=(rule.weather,) if rule.weather else ()))
        crossed = f"{rule.metric} {value:.4g} >= {rule.threshold:g} on {frames} frames"
        if dry_run:
            d.reason = f"{crossed}; would trigger (dry run)"
            continue
        try:
            if validator is not None:
                validator.check(spec)
            job, created = store.create(spec, requested_by=rule.requester, cooldown_s=rule.cooldown_s)
        except (StudentBusy, CoolingDown) as exc:
            d.reason = f"{crossed}; not triggered: {exc}"
            continue
        except Exception as exc:  # a rule that cannot make a valid job: say so, keep evaluating the others
            d.reason = f"{crossed}; the job was refused: {exc}"
            log.warning("policy rule %s: %s", rule.name, d.reason)
            continue
        d.triggered, d.job_id, d.reason = created, job.id, f"{crossed}; queued job {job.id}"
        log.info("policy %s triggered job %s: %s", rule.describe(), job.id, crossed)
    return out


class PolicyLoop:
    """Evaluates a policy every `interval_s` over the configured lake (the `flywheel control --policy` thread)."""

    def __init__(self, policy: PolicyConfig, jobs: JobsConfig, interval_s: float, validator=None) -> None:
        if jobs.lake_dir is None:
            raise ValueError("a trigger policy needs the lake: set jobs.lake_dir")
        self.policy, self.jobs, self.interval_s, self.validator = policy, jobs, interval_s, validator

    @classmethod
    def from_file(cls, path: Path, jobs: JobsConfig, interval_s: float, validator=None) -> "PolicyLoop":
        return cls(PolicyConfig.from_file(path), jobs, interval_s, validator)

    def run(self, stop: threading.Event) -> None:
        from shadow.catalog import Catalog

        store = JobStore.from_config(self.jobs)
        catalog = Catalog(self.jobs.lake_dir)
        try:
            while not stop.is_set():
                try:
                    catalog.refresh()
                    for d in evaluate(catalog, self.policy, store, self.jobs.registry_dir, self.validator):
                        log.debug("policy %s: %s", d.rule, d.reason)
                except Exception:  # the loop outlives a bad evaluation (lake mid-compaction, DB busy)
                    log.exception("policy evaluation failed")
                stop.wait(self.interval_s)
        finally:
            catalog.close()
