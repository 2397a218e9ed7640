"""Compress a plug-in planner (`retrain.models.plugins`) for target chips: the same per-chip pipeline as
`retrain.compress.workflow` for the transformer, with the two steps that need the architecture asked of the plug-in.

- Structured pruning: the plug-in's pruning hooks (`PlannerPlugin.pruning`), keep ratios from `PruneConfig.keep_ratios`
  tried largest first until the exported graph's weight bytes (at the chip's default precisions) and roofline
  latency estimate fit the chip's budgets (as `PruneToBudget` judges them), then `finetune_steps` of distillation
  against the teacher on the calibration frames. A plug-in without hooks is not pruned: `<out>/<chip>/prune.json`
  and the log say "structured pruning skipped: planner <name> offers no pruning hooks".
- Export: the plug-in's own export (its featurizer's input names), onnxruntime's pre-processing, the chip's opset.

Everything after is the transformer's, unchanged: INT8 quantization with accuracy-aware fallback under the chip's
numeric rules, the roofline estimate, verification against the rules and the FP32 reference, measured CPU latency.
The frames are fed as the plug-in's featurizer's inputs (`shadow.plugins.as_inputs_of`), so the passes do not need
to know which featurizer it is.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization.shape_inference import quant_pre_process

from ingest.lake import write_json_atomic

from retrain.compress.passes import (AccuracyAwareFallback, Artifact, RooflineConfig, RooflinePass, VerifyArtifact,
                                     calibration_mix)
from retrain.compress.passes import graph as G
from retrain.compress.passes.roofline import estimate, weight_bytes
from retrain.compress.targets import TargetProfile
from retrain.compress.workflow import MEASURED_LATENCY_CHIPS, CompressConfig, TargetResult, measure_latency_ms
from retrain.models.evaluate import predict
from retrain.models.plugins import PlannerPlugin, distill, export, load_module, save_state
from retrain.models.plugins import predict as module_predict
from retrain.models.training import DistillConfig, OptimConfig
from shadow.featurize import Features
from shadow.models import session
from shadow.plugins import as_inputs_of
from shadow.spec import MODEL_FILE, read_spec, sha256_file, write_spec

log = logging.getLogger(__name__)


def _graph_fit(plugin: PlannerPlugin, module: torch.nn.Module, target: TargetProfile) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # the graph the export below makes, so the estimate matches
        export(plugin, module, Path(tmp) / "m", "candidate", "x")
        quant_pre_process(str(Path(tmp) / "m" / MODEL_FILE), str(Path(tmp) / "pre.onnx"))
        m = G.load(Path(tmp) / "pre.onnx")
    plan = G.default_plan(m, target)
    return {"weight_bytes_estimate": weight_bytes(m, plan, target),
            "latency_ms_estimate": estimate(m, plan, target).estimate_ms}


def prune_plugin(plugin: PlannerPlugin, module: torch.nn.Module, target: TargetProfile, calib: Features,
                 config: CompressConfig, teacher: Path | None) -> tuple[torch.nn.Module, dict]:
    """The module pruned to the chip's budgets by the plug-in's hooks (see the module docstring) and a summary."""
    cfg = config.prune
    if not config.prune_enabled:
        return module, {"keep": 1.0, "skipped": "pruning disabled"}
    if plugin.pruning is None:
        msg = f"structured pruning skipped: planner {plugin.name} offers no pruning hooks"
        log.warning("%s: %s", target.chip, msg)
        return module, {"keep": 1.0, "skipped": msg}
    size_budget = cfg.size_budget_bytes or target.budget.size_bytes
    latency_budget = cfg.latency_budget_ms or target.budget.latency_ms
    tried, chosen, info = [], module, {}
    for keep in cfg.keep_ratios:
        cand = module if keep >= 1.0 else plugin.pruning.prune(module, keep)
        info = {"keep": keep, "units": plugin.pruning.units(cand), **_graph_fit(plugin, cand, target)}
        info["fits"] = (info["weight_bytes_estimate"] <= cfg.size_margin * size_budget
                        and info["latency_ms_estimate"] <= latency_budget)
        tried.append(info)
        chosen = cand
        if info["fits"]:
            break
    if info["keep"] < 1.0 and cfg.finetune_steps:
        # recovery by distillation: the teacher's outputs, or the unpruned module's own, on the calibration frames
        t = (predict(session(teacher, cfg.threads), calib) if teacher is not None
             else module_predict(plugin, module, calib.inputs(plugin.featurizer)))
        data = {**calib.inputs(plugin.featurizer), "t_traj": t[0], "t_logits": t[1]}
        distill(plugin, chosen, data, OptimConfig(steps=cfg.finetune_steps, batch_size=cfg.batch_size,
                                                  lr=cfg.finetune_lr, warmup_steps=min(20, cfg.finetune_steps // 10)),
                DistillConfig(hard_weight=0.0), cfg.seed)
    return chosen.eval(), {"keep": info["keep"], "units_before": plugin.pruning.units(module),
                           "units_after": plugin.pruning.units(chosen), "budget_met": info["fits"],
                           "size_budget_bytes": size_budget, "latency_budget_ms": latency_budget, "tried": tried}


def compress_plugin_for_target(student: Path, target: TargetProfile, calibration: Features, validation: Features,
                               out_dir: Path, config: CompressConfig | None = None, teacher: Path | None = None,
                               mined: Features | None = None, floor: dict[str, float] | None = None) -> TargetResult:
    """`retrain.compress.workflow.compress_for_target` for a plug-in model directory `student` (`floor`: as there); the frames must
    hold its featurizer's inputs (`shadow.plugins.add_inputs`; the snapshot's `features([name])`)."""
    config = config or CompressConfig()
    t0 = time.perf_counter()
    plugin, module = load_module(student)
    feat = plugin.featurizer
    calibration, validation = as_inputs_of(calibration, feat), as_inputs_of(validation, feat)
    mined = as_inputs_of(mined, feat) if mined is not None else None
    if len(validation) < 2:
        raise ValueError("validation needs at least 2 frames (fallback and verification halves)")
    out = Path(out_dir) / target.chip
    n_fb = min(config.fallback_frames, len(validation) // 2)
    fb_frames, held = validation.take(slice(0, n_fb)), validation.take(slice(n_fb, None))
    calib = calibration_mix(calibration, mined, config.calibration_frames, config.mined_share, config.seed)

    torch.manual_seed(config.prune.seed)
    pruned, prune_info = prune_plugin(plugin, module, target, calib, config, teacher)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "prune.json", {"planner": plugin.name, **prune_info})
    source = Artifact.from_file(save_state(plugin, pruned, out / "pruned_state.pt"), target.chip,
                                metrics={"prune": prune_info},
                                notes=[prune_info.get("skipped") or f"kept {prune_info['keep']:.3f} of the "
                                       f"{plugin.name} planner's prunable units"])
    dest = out / "fp32" / MODEL_FILE
    with tempfile.TemporaryDirectory() as tmp:
        spec = export(plugin, pruned, Path(tmp) / "raw", config.export.name, config.export.version)
        quant_pre_process(str(Path(tmp) / "raw" / MODEL_FILE), str(Path(tmp) / "pre.onnx"))
        m = G.load(Path(tmp) / "pre.onnx")
        if G.opset(m) != target.onnx_opset:
            m = onnx.version_converter.convert_version(m, target.onnx_opset)
        dest.parent.mkdir(parents=True, exist_ok=True)
        G.save(m, dest)
    spec.extra = {"target": target.chip, "opset": target.onnx_opset, "made_by": "export_onnx",
                  "checkpoint_sha256": source.sha256}
    write_spec(spec, dest)
    fp32 = Artifact(kind="onnx", path=dest, sha256=sha256_file(dest), target=target.chip, made_by="export_onnx",
                    config={"planner": plugin.name}, parent=source, spec=read_spec(dest), plan={}, reference=dest,
                    metrics=dict(source.metrics), notes=[f"FP32 ONNX of plug-in {plugin.name}, opset "
                                                         f"{target.onnx_opset}"])
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
    result = TargetResult(
        chip=target.chip, name=target.name, toolchain=target.toolchain, artifact=str(chip_art.path),
        fp32_artifact=str(fp32.path), bytes=size, fp32_bytes=fp32.path.stat().st_size,
        parameters=int(sum(p.numel() for p in pruned.parameters())), prune_keep=float(prune_info["keep"]),
        precision_mix=chip_art.precision_mix(), reverted=chip_art.metrics["fallback"]["reverted"],
        cpu_latency_ms_measured=lat, cpu_latency_fp32_ms_measured=lat32, latency_ms_estimate=est["estimate_ms"],
        latency_estimate=est, latency_budget_ms=target.budget.latency_ms, latency_budget_basis=basis,
        latency_budget_met=(lat if basis == "measured" else est["estimate_ms"]) <= target.budget.latency_ms,
        size_budget_bytes=target.budget.size_bytes, size_budget_met=size <= target.budget.size_bytes,
        max_abs_error=ver["vs_fp32"]["traj_max_abs"], mean_abs_error=ver["vs_fp32"]["traj_mean_abs"],
        error_vs_fp32=ver["vs_fp32"], fallback=chip_art.metrics["fallback"],
        tolerance_met=chip_art.metrics["fallback"]["met"], rules_ok=ver["rules_ok"], violations=ver["violations"],
        verified=ver["passed"], lineage=chip_art.lineage(), seconds=time.perf_counter() - t0,
        int8_matmul_share=chip_art.metrics["fallback"]["matmul_shares"].get("int8", 0.0),
        integer_matmul_share=chip_art.metrics["fallback"]["matmul_shares"].get("integer", 0.0))
    (out / "result.json").write_text(result.model_dump_json(indent=2))
    log.info("%s (%s plug-in): %d bytes, %s, verified %s", target.chip, plugin.name, size, result.precision_mix,
             result.verified)
    return result


def compress_plugin_all(targets, student: Path, calibration: Features, validation: Features, out_dir: Path,
                        config: CompressConfig | None = None, teacher: Path | None = None,
                        mined: Features | None = None) -> list[TargetResult]:
    """`compress_plugin_for_target` for every target, in order."""
    return [compress_plugin_for_target(student, t, calibration, validation, out_dir, config, teacher, mined)
            for t in targets]


def is_plugin_model(model_dir: Path) -> bool:
    """Whether a model directory is a plug-in planner other than the project's transformer (its spec says so)."""
    try:
        spec = read_spec(model_dir, verify=False)
    except (FileNotFoundError, ValueError):
        return False
    return bool(spec.planner) and spec.planner != "transformer"
