"""Accuracy-aware fallback: quantize by the chip's defaults, then revert the most sensitive quantized nodes to the
next precision the chip allows until the divergence from the FP32 model is within tolerance.

1. Build the default plan's artifact (`QuantizeInt8`, then `ApplyNumericRules`) and measure its divergence from
   the FP32 reference on the fallback frames (onnxruntime, this CPU): by default the mean displacement (ADE, m).
   The tolerance is the absolute `tolerance`, or, when the teacher's outputs on the fallback frames are given and
   `relative_tolerance` is set, that share of the FP32 model's own divergence from the teacher if it is smaller:
   a student that tracks the teacher to 0.2 m ADE must not lose another 0.1 m to quantization, while one that is
   0.5 m off can afford more. Quantization error adds to the student's divergence, so it is held against it.
2. Within tolerance: done, nothing reverted.
3. Otherwise, sensitivity of every quantized node that has a higher precision on the chip (INT8 products; on
   Journey 6 also the INT16 vector operators): the divergence with that node alone moved one step up its ladder
   (INT8 -> FP16 on Orin and Ascend, INT8 -> INT16 on Journey 6, INT8 -> FP32 on the CPU, INT16 -> FP32 on
   Journey 6). Gain = divergence now - divergence then.
4. Revert nodes in order of gain, `group_size` at a time, re-measuring the whole model after each step, until the
   divergence is within tolerance or nothing is left to revert (then reported as not met).

The fallback is the last resort, and bounded: given a `floor` (the current student's shares of product FLOPs at
INT8 and at integer precisions on this chip), no revert is made that would take the artifact below it, so a
candidate never buys accuracy by giving the compression back. Nodes held by the floor are reported.

Calibration ranges are computed once and reused; a build whose INT8 node set was built before reuses its QDQ graph.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from retrain.models.evaluate import displacement, predict
from shadow.models import session
from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.passes.numerics import ApplyNumericRules, NumericsConfig
from retrain.compress.passes.quantize import QuantizeConfig, QuantizeInt8
from retrain.compress.passes.roofline import matmul_shares
from retrain.compress.targets import TargetProfile
from shadow.featurize import Features
from shadow.spec import MODEL_FILE, read_spec, write_spec

log = logging.getLogger(__name__)


class FallbackConfig(BaseModel):
    """Accuracy-aware fallback options."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="search for reverts; False builds the default plan only")
    metric: Literal["ade_m", "traj_max_abs", "traj_mean_abs"] = Field(
        "ade_m", description="divergence vs FP32: mean displacement (m), largest or mean |trajectory error|")
    tolerance: float = Field(0.1, gt=0, description="largest divergence accepted, in the metric's unit")
    relative_tolerance: float | None = Field(
        0.25, gt=0, description="largest divergence accepted as a share of the FP32 model's own divergence from "
        "the teacher on the same frames (same metric), when the teacher's outputs are given; the smaller of this "
        "and `tolerance` applies. 0.25: errors of a quarter of the FP32 divergence add a few percent to it, where "
        "the absolute 0.1 m alone (half the divergence of a good student) cost about +10% elsewhere; None: only "
        "the absolute tolerance")
    group_size: int = Field(1, ge=1, description="nodes reverted per step")
    max_reverts: int | None = Field(None, ge=0, description="stop after this many reverted nodes (None: no limit)")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="INT8 quantization options")
    numerics: NumericsConfig = Field(default_factory=NumericsConfig, description="FP16 / INT16 options")
    threads: int = Field(2, ge=1, description="onnxruntime threads")


class AccuracyAwareFallback(Pass[FallbackConfig]):
    """FP32 ONNX -> chip artifact (QDQ INT8 + FP16/INT16 per the plan) within the divergence tolerance."""

    name: ClassVar[str] = "fallback"
    config_class: ClassVar[type[BaseModel]] = FallbackConfig

    def __init__(self, target: TargetProfile, calibration: Features, frames: Features,
                 cache_dir: Path | None = None, teacher: tuple[np.ndarray, np.ndarray] | None = None,
                 floor: dict[str, float] | None = None) -> None:
        """`teacher`: the teacher's (trajectory, logits) on `frames`, for `relative_tolerance`. `floor`: the least
        shares of product FLOPs that must stay at INT8 ("int8") and at an integer precision ("integer"), e.g. the
        current student's on this chip: a revert that would go below either is not made."""
        super().__init__(target)
        self.floor = floor or {}
        if len(frames) == 0:
            raise ValueError("the fallback needs frames to measure divergence on")
        if teacher is not None and len(teacher[0]) != len(frames):
            raise ValueError(f"teacher outputs for {len(teacher[0])} frames, fallback frames {len(frames)}")
        self.frames, self.teacher = frames, teacher
        self.quantizer = QuantizeInt8(target, calibration, cache_dir)
        self.rules = ApplyNumericRules(target, calibration)

    def run(self, model: Artifact, config: FallbackConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        out = Path(out)
        work = out / "work"
        if work.exists():
            shutil.rmtree(work)
        reference = Path(model.reference or model.path)
        fp32 = G.load(reference)
        kinds = G.kinds_of(fp32)
        plan = dict(config.quantize.plan or model.plan or
                    G.default_plan(fp32, self.target, tuple(config.quantize.keep_float),
                                   config.quantize.keep_input_products))
        ref_traj, _ = predict(session(reference, config.threads), self.frames)
        fp32_vs_teacher = None if self.teacher is None else _metric(ref_traj, self.teacher[0], config.metric)
        tolerance = config.tolerance
        if fp32_vs_teacher is not None and config.relative_tolerance is not None:
            tolerance = min(tolerance, config.relative_tolerance * fp32_vs_teacher)
        quantized: dict[frozenset, Artifact] = {}
        builds: list[Path] = []

        def build(p: dict[str, str]) -> tuple[Artifact, float]:
            tag = f"b{len(builds):03d}"
            int8 = frozenset(n for n, v in p.items() if v == "int8")
            if int8 not in quantized:
                qcfg = config.quantize.model_copy(update={"plan": p})
                quantized[int8] = self.quantizer.run(model, qcfg, work / tag / "int8")
            q = quantized[int8]
            # the QDQ graph is shared; only the plan (which nodes are FP16 / INT16) differs
            q = q.model_copy(update={"plan": dict(p)})
            art = self.rules.run(q, config.numerics, work / tag / "rules")
            builds.append(work / tag)
            traj, _ = predict(session(art.path, config.threads), self.frames)
            return art, _metric(traj, ref_traj, config.metric)

        best, err = build(plan)
        initial = err
        steps = [{"reverted": [], "error": err}]
        sensitivity: dict[str, float] = {}
        reverted: dict[str, str] = {}
        held: list[str] = []  # reverts the floor forbids
        shapes = G.shapes_at_batch(fp32, 1)

        def allowed(p: dict[str, str]) -> bool:
            shares = matmul_shares(fp32, p, shapes)
            return all(shares.get(k, 0.0) >= v - 1e-9 for k, v in self.floor.items())

        if config.enabled and err > tolerance:
            candidates = G.quantized_nodes(plan, self.target, kinds)
            held = [n for n in candidates if not allowed({**plan, n: self.target.fallback(kinds[n], plan[n])})]
            candidates = [n for n in candidates if n not in held]
            for n in candidates:
                trial = {**plan, n: self.target.fallback(kinds[n], plan[n])}
                sensitivity[n] = err - build(trial)[1]
            order = sorted(candidates, key=lambda n: (-sensitivity[n], n))
            limit = len(order) if config.max_reverts is None else min(len(order), config.max_reverts)
            i = 0
            while err > tolerance and i < limit:
                group = order[i:min(limit, i + config.group_size)]
                i += len(group)
                trial = {**plan, **{n: self.target.fallback(kinds[n], plan[n]) for n in group}}
                if not allowed(trial):  # cumulatively over the floor: this group stays where it is
                    held += group
                    continue
                for n in group:
                    reverted[n] = f"{plan[n]}->{self.target.fallback(kinds[n], plan[n])}"
                    plan[n] = self.target.fallback(kinds[n], plan[n])
                best, err = build(plan)
                steps.append({"reverted": group, "error": err})
                log.info("%s fallback: reverted %s -> %s %.4f", self.target.chip, group, config.metric, err)
        final = _keep_final(best, out)
        keep = {Path(best.path).parent.parent, Path(best.parent.path).parent.parent}
        for b in builds:  # trial builds are scratch; the chosen one's files stay with its artifact's lineage
            if b not in keep:
                shutil.rmtree(b, ignore_errors=True)
        summary = {"metric": config.metric, "tolerance": tolerance, "tolerance_absolute": config.tolerance,
                   "relative_tolerance": config.relative_tolerance, "fp32_vs_teacher": fp32_vs_teacher,
                   "initial_error": initial, "final_error": err, "met": err <= tolerance, "reverted": reverted,
                   "sensitivity": sensitivity, "steps": steps, "builds": len(builds),
                   "floor": dict(self.floor), "held_by_floor": sorted(set(held)),
                   "matmul_shares": matmul_shares(fp32, plan, shapes),
                   "measured_on": f"{len(self.frames)} frames, onnxruntime on this CPU"}
        if config.enabled and not summary["met"]:
            log.warning("%s fallback: %s %.4f still above tolerance %.4f", self.target.chip, config.metric, err,
                        tolerance)
        return self.derive(best, config, path=final, spec=read_spec(final), plan=dict(plan), reference=reference,
                           metrics={**model.metrics, "fallback": summary},
                           notes=[f"{len(reverted)} nodes reverted; {config.metric} {initial:.4g} -> {err:.4g} "
                                  f"(tolerance {tolerance:.4g})"])


def _metric(traj: np.ndarray, ref: np.ndarray, metric: str) -> float:
    if metric == "ade_m":
        return float(displacement(traj, ref)[0].mean())
    err = np.abs(traj - ref)
    return float(err.max(initial=0.0) if metric == "traj_max_abs" else err.mean())


def _keep_final(art: Artifact, out: Path) -> Path:
    """Copy the chosen build to out/model.onnx with its spec."""
    dest = out / MODEL_FILE
    shutil.copyfile(art.path, dest)
    spec = (art.spec or read_spec(art.path)).model_copy(deep=True)
    spec.extra = {**spec.extra, "made_by": "fallback"}
    write_spec(spec, dest)
    return dest
