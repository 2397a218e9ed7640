"""Compress a student for target chips: prune to budget, export, quantize with accuracy-aware fallback under the
chip's numeric rules, estimate on-chip latency, verify, and measure on this CPU.

    from retrain.compress.workflow import CompressConfig, compress_all, compress_for_target
    from retrain.compress.targets import load_targets
    results = compress_all(load_targets().values(), student, calibration, validation, "artifacts/compressed",
                           mined=mined_frames)

`student` is a `Planner` or a checkpoint path (retrain.models.training.save_checkpoint); frames are `shadow.featurize`
Features. Per chip, `<out_dir>/<chip>/` holds `prune/`, `fp32/` (the chip's FP32 reference), `fallback/` (the
artifact: model.onnx + spec.json) and `result.json`, a `TargetResult`.

What is measured and what is estimated, plainly:
- bytes, error vs FP32, rule checks: measured on this machine (onnxruntime);
- `cpu_latency_ms_measured`: onnxruntime on this CPU, batch 1, median. For the chip artifacts that emulate FP16
  (Cast pairs) or INT16 (QDQ) this includes the emulation's overhead and says nothing about the chip;
- `latency_ms_estimate`: roofline ESTIMATE on the chip from datasheet figures (see retrain.compress.passes.roofline).
The latency budget is checked against the estimate, except on the `cpu` target, where it is checked against the
measurement.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from retrain.models.architectures import Planner
from retrain.models.evaluate import predict
from shadow.models import session
from retrain.compress.passes import (AccuracyAwareFallback, Artifact, ExportConfig, ExportOnnx, FallbackConfig,
                                     PruneConfig, PruneToBudget, RooflineConfig, RooflinePass, VerifyArtifact,
                                     VerifyConfig, calibration_mix)
from retrain.compress.targets import TargetProfile
from retrain.models.training import save_checkpoint
from shadow.featurize import Features

log = logging.getLogger(__name__)

MEASURED_LATENCY_CHIPS = frozenset({"cpu"})


class CompressConfig(BaseModel):
    """The whole per-target pipeline; defaults make the reference artifacts."""

    model_config = ConfigDict(extra="forbid")

    calibration_frames: int = Field(1024, ge=1, description="calibration frames (ordinary plus mined)")
    mined_share: float = Field(0.25, ge=0, le=1, description="share of calibration frames drawn from mined frames")
    fallback_frames: int = Field(512, ge=1, description="validation frames the fallback measures divergence on; "
                                 "the rest of the validation frames are held out for verification")
    prune_enabled: bool = Field(True, description="prune to the target's budgets first")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="structured pruning")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export")
    fallback: FallbackConfig = Field(default_factory=FallbackConfig, description="quantization and fallback")
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="verification tolerances")
    latency_runs: int = Field(200, ge=1, description="timed batch-1 runs on this CPU")
    latency_warmup: int = Field(20, ge=0, description="untimed runs first")
    latency_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads for the latency measurement")
    seed: int = Field(0, description="seeds the calibration draw")


class TargetResult(BaseModel):
    """What compressing for one chip produced, as a plain record."""

    model_config = ConfigDict(extra="forbid")

    chip: str
    name: str
    toolchain: str
    artifact: str = Field(description="path of the chip artifact (model.onnx)")
    fp32_artifact: str = Field(description="path of the chip's FP32 reference")
    bytes: int = Field(description="artifact file size (measured)")
    fp32_bytes: int = Field(description="FP32 reference file size (measured)")
    parameters: int = Field(description="weights after pruning")
    prune_keep: float = Field(description="share of heads and FFN channels kept")
    precision_mix: dict[str, int] = Field(description="compute nodes per precision")
    reverted: dict[str, str] = Field(description="nodes the accuracy-aware fallback moved up, node -> from->to")
    cpu_latency_ms_measured: float = Field(description="artifact, batch 1, onnxruntime on this CPU, median (ms)")
    cpu_latency_fp32_ms_measured: float = Field(description="FP32 reference, same measurement (ms)")
    latency_ms_estimate: float = Field(description="roofline ESTIMATE on the chip, batch 1 (ms)")
    latency_estimate: dict = Field(description="the estimate's breakdown (label 'estimate')")
    latency_budget_ms: float
    latency_budget_basis: str = Field(description="'estimate' (chips) or 'measured' (cpu)")
    latency_budget_met: bool
    size_budget_bytes: int
    size_budget_met: bool
    max_abs_error: float = Field(description="largest |trajectory - FP32| on held-out frames (m or rad), measured")
    mean_abs_error: float = Field(description="mean |trajectory - FP32| on held-out frames, measured")
    error_vs_fp32: dict = Field(description="all divergence figures vs FP32 on held-out frames")
    fallback: dict = Field(description="tolerance, initial and final divergence, steps")
    tolerance_met: bool
    rules_ok: bool
    violations: list[str]
    verified: bool = Field(description="rules obeyed and numerics within the verification tolerances")
    int8_matmul_share: float = Field(0.0, description="share of the product FLOPs (batch 1) run at INT8")
    integer_matmul_share: float = Field(0.0, description="share of the product FLOPs run at INT8 or INT16")
    baseline: dict | None = Field(None, description="the current student's figures on this chip (bytes, "
                                  "latency_ms_estimate, int8_matmul_share, integer_matmul_share, ref), when a "
                                  "cycle compared with it")
    lineage: list[str]
    seconds: float


def median_run_ms(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], runs: int, warmup: int) -> float:
    """Median wall time of `runs` runs of a session on `inputs` after `warmup` runs (measured, this CPU), ms."""
    for _ in range(warmup):
        sess.run(None, inputs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_latency_ms(path: Path, inputs: dict[str, np.ndarray], runs: int, warmup: int, threads: int) -> float:
    """Median wall time of `runs` onnxruntime runs of a model on `inputs` (measured, this CPU), ms."""
    return median_run_ms(session(path, threads, verify=False), inputs, runs, warmup)


def _source(student: Planner | Path, out: Path, chip: str) -> Artifact:
    if isinstance(student, Planner):
        out.mkdir(parents=True, exist_ok=True)
        student = save_checkpoint(student.eval(), out / "student.pt")
    return Artifact.from_file(Path(student), chip)


def compress_for_target(student: Planner | Path, target: TargetProfile, calibration: Features, validation: Features,
                        out_dir: Path, config: CompressConfig | None = None, teacher: Path | None = None,
                        mined: Features | None = None, floor: dict[str, float] | None = None) -> TargetResult:
    """Run the passes for one chip; see the module docstring. `teacher` (ONNX), when given, guides pruning and
    sets the fallback's relative tolerance (a share of the FP32 student's divergence from it). `floor`: shares of
    product FLOPs the fallback may not go below ({"int8": .., "integer": ..}, the current student's)."""
    config = config or CompressConfig()
    t0 = time.perf_counter()
    if len(validation) < 2:
        raise ValueError("validation needs at least 2 frames (fallback and verification halves)")
    out = Path(out_dir) / target.chip
    n_fb = min(config.fallback_frames, len(validation) // 2)
    fb_frames, held = validation.take(slice(0, n_fb)), validation.take(slice(n_fb, None))
    calib = calibration_mix(calibration, mined, config.calibration_frames, config.mined_share, config.seed)

    art = _source(student, out, target.chip)
    if config.prune_enabled:
        art = PruneToBudget(target, calib, teacher).run(art, config.prune, out / "prune")
    fp32 = ExportOnnx(target).run(art, config.export, out / "fp32")
    # the teacher's outputs on the fallback frames let its tolerance scale with the student's own divergence
    t_out = predict(session(teacher, config.fallback.threads), fb_frames) if teacher is not None else None
    chip_art = AccuracyAwareFallback(target, calib, fb_frames, cache_dir=out / "calibration", teacher=t_out,
                                     floor=floor).run(fp32, config.fallback, out / "fallback")
    chip_art = RooflinePass(target).run(chip_art, RooflineConfig(), out / "roofline")
    chip_art = VerifyArtifact(target, held).run(chip_art, config.verify, out / "verify")

    one = {k: v[:1] for k, v in held.inputs().items()}
    lat = measure_latency_ms(chip_art.path, one, config.latency_runs, config.latency_warmup, config.latency_threads)
    lat32 = measure_latency_ms(fp32.path, one, config.latency_runs, config.latency_warmup, config.latency_threads)
    est = chip_art.metrics["latency_estimate"]
    ver = chip_art.metrics["verification"]
    basis = "measured" if target.chip in MEASURED_LATENCY_CHIPS else "estimate"
    size = chip_art.path.stat().st_size
    prune = chip_art.metrics.get("prune", {})
    shares = chip_art.metrics["fallback"]["matmul_shares"]
    result = TargetResult(
        chip=target.chip, name=target.name, toolchain=target.toolchain, artifact=str(chip_art.path),
        fp32_artifact=str(fp32.path), bytes=size, fp32_bytes=fp32.path.stat().st_size,
        parameters=fp32.spec.parameters if fp32.spec else 0, prune_keep=prune.get("keep", 1.0),
        precision_mix=chip_art.precision_mix(), reverted=chip_art.metrics["fallback"]["reverted"],
        cpu_latency_ms_measured=lat, cpu_latency_fp32_ms_measured=lat32, latency_ms_estimate=est["estimate_ms"],
        latency_estimate=est, latency_budget_ms=target.budget.latency_ms, latency_budget_basis=basis,
        latency_budget_met=(lat if basis == "measured" else est["estimate_ms"]) <= target.budget.latency_ms,
        size_budget_bytes=target.budget.size_bytes, size_budget_met=size <= target.budget.size_bytes,
        max_abs_error=ver["vs_fp32"]["traj_max_abs"], mean_abs_error=ver["vs_fp32"]["traj_mean_abs"],
        error_vs_fp32=ver["vs_fp32"], fallback=chip_art.metrics["fallback"],
        tolerance_met=chip_art.metrics["fallback"]["met"], rules_ok=ver["rules_ok"], violations=ver["violations"],
        verified=ver["passed"], lineage=chip_art.lineage(), seconds=time.perf_counter() - t0,
        int8_matmul_share=shares.get("int8", 0.0), integer_matmul_share=shares.get("integer", 0.0))
    (out / "result.json").write_text(result.model_dump_json(indent=2))
    log.info("%s: %d bytes, %s, CPU %.3f ms (measured), chip %.4f ms (estimate), max err %.4f, verified %s",
             target.chip, size, result.precision_mix, lat, est["estimate_ms"], result.max_abs_error, result.verified)
    return result


def compress_all(targets: Iterable[TargetProfile], student: Planner | Path, calibration: Features,
                 validation: Features, out_dir: Path, config: CompressConfig | None = None,
                 teacher: Path | None = None, mined: Features | None = None) -> list[TargetResult]:
    """`compress_for_target` for every target, in order; one `TargetResult` each."""
    out_dir = Path(out_dir)
    if isinstance(student, Planner):
        student = save_checkpoint(student.eval(), _mkdir(out_dir) / "student.pt")
    return [compress_for_target(student, t, calibration, validation, out_dir, config, teacher, mined)
            for t in targets]


def format_results(results: list[TargetResult]) -> str:
    """A fixed-width table of results (measured and estimated columns named as such)."""
    head = (f"{'chip':<10} {'bytes':>9} {'mix':<28} {'CPU ms meas.':>12} {'chip ms est.':>12} {'max err':>8} "
            f"{'size ok':>7} {'lat ok':>6} {'verified':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        mix = ",".join(f"{k}:{v}" for k, v in r.precision_mix.items())
        lines.append(f"{r.chip:<10} {r.bytes:>9d} {mix:<28} {r.cpu_latency_ms_measured:>12.3f} "
                     f"{r.latency_ms_estimate:>12.4f} {r.max_abs_error:>8.4f} {str(r.size_budget_met):>7} "
                     f"{str(r.latency_budget_met):>6} {str(r.verified):>8}")
    return "\n".join(lines)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
