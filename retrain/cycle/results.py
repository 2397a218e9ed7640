"""What a cycle returns, typed: every section of `CycleResult` and the verification step's record are pydantic models
(`retrain.cycle.records.Record`: unknown fields refused, still readable as mappings), so the report and the job
service read fields instead of re-parsing JSON. `CycleResult.model_dump(mode="json")` is `result.json`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from retrain.cycle.gates import GateDecision
from retrain.cycle.records import Record

RESULT_FORMAT_VERSION = 1


class ModelRef(Record):
    """A registered model the cycle used."""

    ref: str = Field(description="name:version in the registry")
    path: str = Field(description="its version directory")
    sha256: str = Field(description="sha256 of its model.onnx")


class Parent(ModelRef):
    """The current student, and the torch checkpoint it was fine-tuned from."""

    checkpoint: str
    checkpoint_source: str = Field(description="how the checkpoint was found (config, spec, rebuilt from ONNX)")


class Candidate(Record):
    name: str
    version: str
    checkpoint: str = Field(description="the fine-tuned torch checkpoint")
    artifacts: dict[str, str] = Field(description="chip -> directory of its artifact")
    verified_chip: str = Field(description="the chip whose artifact was replayed and driven")


class MiningSummary(Record):
    """`retrain.cycle.mining.MiningResult.to_dict()` without its items."""

    rule: str
    sql: str | None = None
    pair: str | None = None
    threshold: float | None = None
    noise_floor: dict[str, Any] = Field(default_factory=dict)
    tail: dict[str, float] = Field(default_factory=dict, description="by score: per signal, the tail quantile of the "
                                   "pair's window scores a mined window exceeds; absent from older records")
    eligible: int = 0
    config: dict[str, Any] = Field(default_factory=dict)
    windows: int
    frames: int
    by_condition: dict[str, int]
    by_road_type: dict[str, int]
    by_source: dict[str, int] = Field(default_factory=dict, description="mined windows per source (imports' "
                                      "format, else fleet); absent from records made before sources")
    signal: str | None = Field(None, description="by score: the divergence signals that judged the mined windows "
                               "(fleet, emulation or fleet+emulation); None for SQL mining and older records")
    by_signal: dict[str, int] = Field(default_factory=dict, description="mined windows per signal; absent from "
                                      "records made before the fleet signal")
    drives: int


class SnapshotSummary(Record):
    id: str
    path: str
    content_sha256: str
    counts: dict[str, Any] = Field(description="the manifest's counts per split, role, condition")
    drives: dict[str, int] = Field(description="drives per split")


class FinetuneSummary(Record):
    """`retrain.cycle.finetune.FinetuneResult` without its history (`evaluations` counts it)."""

    format_version: int = 1
    checkpoint: str
    key: str
    planned_steps: int
    steps_run: int
    best_step: int
    stopped_early: bool
    resumed_from_step: int
    initial: dict[str, Any]
    best: dict[str, Any]
    frames: dict[str, int]
    teacher_label_seconds: float
    seconds: float
    evaluations: int
    # the fine-tune's later fields (retrain.cycle.finetune.FinetuneResult), absent from older records
    qat_started_at: int | None = None
    qat_skipped: list[str] = Field(default_factory=list)
    prune_back: dict[str, Any] | None = None
    numerics: dict[str, Any] = Field(default_factory=dict)
    train_steps_per_s: float | None = None


class Summary(Record):
    """Divergence of one student on a set of frames (None figures for no frames)."""

    frames: int
    mean_score: float | None = None
    mean_ade_4s: float | None = None
    mean_fde_4s: float | None = None
    miss_rate_4s: float | None = None
    disagree_rate: float | None = None


class Comparison(Record):
    """Before (current student) and after (candidate) on the same frames; change relative to before."""

    before: Summary
    after: Summary
    change: dict[str, float | None]


class ConditionComparison(Comparison):
    set: str = Field(description="mined | elsewhere")
    condition: str


class RoadTypeComparison(Comparison):
    set: str = Field(description="mined | elsewhere")
    road_type: str


class Fp32Divergence(Record):
    """The same for the FP32 models: the fine-tune's effect without the compression's (attribution, not gated)."""

    mined: Comparison
    elsewhere: Comparison
    by_condition: list[ConditionComparison]


class Divergence(Record):
    """Held-out test drives: where mined and elsewhere, overall, per condition and per road type."""

    frames: int
    mined: Comparison
    elsewhere: Comparison
    by_condition: list[ConditionComparison]
    by_road_type: list[RoadTypeComparison]
    fp32: Fp32Divergence | None = None


class ClosedLoopFigures(Record):
    """One policy over every scenario and condition (`retrain.cycle.verify.closed_loop_figures`)."""

    episodes: int
    collisions: int
    collision_rate: float
    mean_min_ttc_s: float | None = None
    min_ttc_s: float
    ttc_unsafe_rate: float | None = None
    comfortable_rate: float | None = None
    mean_speed_mps: float | None = None
    progress_vs_expert: float | None = None


class ClosedLoop(Record):
    before: ClosedLoopFigures = Field(description="the current student")
    after: ClosedLoopFigures = Field(description="the candidate")
    expert: ClosedLoopFigures | None = Field(None, description="the rule-based expert on the same episodes")
    conditions: list[str]
    records: list[dict[str, Any]] = Field(default_factory=list, description="per policy, scenario and condition")

    @field_validator("expert", mode="before")
    @classmethod
    def _no_expert(cls, v: Any) -> Any:
        return None if v == {} else v


class PassRate(Record):
    """One student's windows that passed (a criterion, or all of them) and their share."""

    passed: int
    pass_rate: float | None = Field(None, description="passed / windows (0..1); None for no windows")


class PassRateComparison(Record):
    """Both students on the same scenario windows."""

    windows: int = Field(description="held-out windows evaluated (the criterion enabled there)")
    before: PassRate = Field(description="the current student")
    after: PassRate = Field(description="the candidate")
    change: float | None = Field(None, description="after - before pass rate")


class CriterionPassRates(Record):
    """A criterion's pass rates on all held-out windows (gated), where mined and elsewhere (reported)."""

    required: float = Field(description="the pass rate the criteria file requires of it")
    all: PassRateComparison
    mined: PassRateComparison = Field(description="windows holding a held-out mined frame")
    elsewhere: PassRateComparison = Field(description="the other held-out windows")


class CriteriaPassRates(Record):
    """Acceptance criteria (`shadow.criteria`) on the held-out scenario windows of both students
    (`retrain.cycle.verify.criteria_figures`)."""

    version: str = Field(description="the criteria file's version (sha256 of its bytes)")
    path: str | None = Field(None, description="the criteria file the windows were judged with")
    overall: CriterionPassRates = Field(description="windows passing every criterion, against pass_rates.default")
    criteria: dict[str, CriterionPassRates] = Field(description="criterion name -> its pass rates")


class TargetSummary(Record):
    """What the cycle reports of one chip's artifact: latency on the chip is an ESTIMATE, on this CPU measured."""

    chip: str
    name: str | None = None
    bytes: int | None = None
    size_budget_bytes: int | None = None
    size_budget_met: bool | None = None
    cpu_latency_ms_measured: float | None = None
    cpu_latency_fp32_ms_measured: float | None = None
    latency_ms_estimate: float | None = None
    latency_budget_ms: float | None = None
    latency_budget_basis: str | None = None
    latency_budget_met: bool | None = None
    verified: bool | None = None
    max_abs_error: float | None = None
    precision_mix: dict[str, int] | None = None
    parameters: int | None = None
    artifact: str | None = None
    int8_matmul_share: float | None = None
    integer_matmul_share: float | None = None
    baseline: dict[str, Any] | None = Field(None, description="the current student's artifact on this chip: ref, "
                                            "bytes, latency_ms_estimate, int8 and integer shares")
    latency_estimate_label: str


class RegisteredEntry(Record):
    ref: str
    status: str
    parents: list[str]
    sha256: str


class Registration(Record):
    status: str = Field(description="promoted | rejected | not registered")
    ref: str | None = None
    entries: list[RegisteredEntry] = Field(default_factory=list)
    note: str | None = None


class StepTiming(Record):
    seconds: float
    resumed: bool


class VerifyRecord(Record):
    """The verification step's output (`<work_dir>/verify.json`): where it replayed, the pair and model ids of each
    replayed student ("before", "after", and "before_fp32", "after_fp32" when the FP32 models were replayed too)."""

    lake: str
    pairs: dict[str, str]
    models: dict[str, str] = Field(default_factory=dict, description="teacher and each student's model id")
    execution: dict[str, Any] = Field(default_factory=dict, description="the execution providers each replayed "
                                      "model ran on (shadow.models.execution_record); absent from older records")
    divergence: Divergence
    log_replay: dict = Field(default_factory=dict, description="log-replay closed loop of both students on the "
                             "held-out windows (retrain.cycle.verify.log_replay_figures); absent from older records")
    criteria: CriteriaPassRates | None = Field(None, description="pass rates of the acceptance criteria on the "
                                               "held-out windows; absent from older records")
    closed_loop: ClosedLoop


class CycleResult(Record):
    """Every figure of a cycle (model_dump(mode="json") for JSON)."""

    format_version: int = Field(RESULT_FORMAT_VERSION, description="version of this record's format")
    cycle_id: str
    work_dir: str
    status: str = Field(description="promoted | rejected | not registered")
    passed: bool
    reasons: list[str]
    teacher: ModelRef
    parent: Parent = Field(description="the current student: ref, ONNX, checkpoint and where it came from")
    candidate: Candidate = Field(description="name, version, checkpoint, artifact per chip")
    mining: MiningSummary
    snapshot: SnapshotSummary
    finetune: FinetuneSummary
    divergence: Divergence = Field(description="held-out test drives: where mined and elsewhere, before/after, per "
                                               "condition and road type")
    closed_loop: ClosedLoop = Field(description="before (current student), after (candidate), expert; collisions, "
                                                "min TTC, comfort")
    log_replay: dict = Field(default_factory=dict, description="log-replay closed loop on the held-out windows: "
                             "where mined and elsewhere, windows, before/after mean score and sub-scores, change "
                             "(retrain.cycle.verify.log_replay_figures; empty in records made before it)")
    criteria: CriteriaPassRates | None = Field(None, description="acceptance criteria on the held-out scenario "
                                               "windows: per criterion and overall, required rate, before/after "
                                               "pass rates (None in records made before it)")
    targets: list[TargetSummary] = Field(description="per chip: bytes, measured CPU latency, ESTIMATED chip latency, "
                                                     "budgets")
    gate: GateDecision
    registry: Registration
    steps: dict[str, StepTiming] = Field(description="per step: seconds, resumed")
    wall_s: float
