"""Recipe: student v0, made the way a vehicle team makes one, from a teacher ONNX model and a drives directory.

    from retrain.recipes.student import StudentConfig, run
    result = run(StudentConfig(drives_dir="fleet/", teacher="artifacts/teacher", out_dir="artifacts/student"))

1. Distil: a smaller planner of the same class learns the teacher's outputs (soft targets: the teacher's trajectory,
   KL divergence on the maneuver logits at a temperature) plus a little of the expert's, on the training drives as
   they come from the fleet (mostly nominal conditions; nothing is rebalanced).
2. Prune: Taylor importance of every attention head and FFN channel on the distillation loss; the least important
   are physically removed, then a short distillation fine-tune.
3. Export to ONNX (FP32), then quantize to INT8 with onnxruntime static quantization (QDQ, symmetric per-channel
   INT8 weights, activations calibrated on featurized training frames). The embeddings and output heads stay FP32:
   their inputs and outputs mix units (metres, radians, one-hots) that one per-tensor INT8 scale cannot hold.
4. Score FP32 and INT8 against the teacher and the expert on the held-out drives (the split of the teacher recipe
   for the same seed and fraction).

A leaf: nothing imports it but the command line (`flywheel models build|student`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.passes.quantize import quantize_qdq
from retrain.cycle.registry import Registry
from retrain.models.architectures import Importance, Planner, PlannerConfig, prune
from retrain.models.evaluate import compare, predict, vs_expert
from retrain.models.training import (DistillConfig, OptimConfig, dataset_hash, distill_loss, export_with_spec, fit,
                                     load_split, save_checkpoint)
from shadow.featurize import Features
from shadow.models import session
from shadow.spec import MODEL_FILE, ModelSpec, model_file, read_spec, write_spec

log = logging.getLogger(__name__)

# Node-name prefixes (TorchScript export) kept in FP32 by default: the first and last layers.
IO_LAYERS = ("/ego_embed/", "/agent_embed/", "/lane_embed/", "/traj_head/", "/maneuver_head/")


class PruneConfig(BaseModel):
    """Structured pruning and its fine-tune."""

    model_config = ConfigDict(extra="forbid")

    keep_heads: float = Field(0.5, gt=0, le=1, description="share of attention heads kept in every layer")
    keep_ffn: float = Field(0.5, gt=0, le=1, description="share of FFN channels kept in every layer")
    importance_batches: int = Field(16, ge=1, description="batches to score heads and channels on")
    finetune: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=400, lr=3e-4, warmup_steps=20),
                                  description="fine-tune after pruning")


class QuantConfig(BaseModel):
    """onnxruntime static quantization."""

    model_config = ConfigDict(extra="forbid")

    calibration_frames: int = Field(2048, ge=1, description="training frames the activation ranges come from")
    calibration_batch: int = Field(256, ge=1, description="frames per calibration batch")
    per_channel: bool = Field(True, description="per-output-channel weight scales (symmetric INT8)")
    activation_type: str = Field("QUInt8", description="QUInt8 (x86 U8S8 kernels) or QInt8")
    method: str = Field("MinMax", description="calibration: MinMax, Entropy or Percentile")
    keep_io_fp32: bool = Field(True, description="leave the embeddings and output heads in FP32")


class StudentConfig(BaseModel):
    """Everything the student recipe needs; defaults make the reference student v0."""

    model_config = ConfigDict(extra="forbid")

    drives_dir: Path = Field(description="directory of <vehicle>/<drive>.drive.parquet files")
    teacher: Path = Field(description="teacher model directory (model.onnx + spec.json) or .onnx file")
    out_dir: Path = Field(description="gets fp32/, int8/ (model.onnx + spec.json each), checkpoint.pt, result.json")
    seed: int = Field(0, description="seeds the split, the initial weights and the data order")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of drives held out (as for the teacher)")
    frame_stride: int = Field(2, ge=1, description="train on every n-th frame")
    model: PlannerConfig = Field(default_factory=lambda: PlannerConfig(width=128, depth=2, heads=4, head_dim=32,
                                                                       ffn=512),
                                 description="student architecture before pruning")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=1500, lr=1e-3),
                               description="distillation optimiser")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="distillation loss")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="structured pruning")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="INT8 quantization")
    threads: int = Field(2, ge=1, description="torch and onnxruntime intra-op threads")
    teacher_batch: int = Field(1024, ge=1, description="frames per teacher inference batch")
    name: str = Field("student", description="model name; the FP32 artifact is registered as <name>-fp32")
    version: str = Field("v0", description="model version")
    registry: Path | None = Field(None, description="register both artifacts in this registry when given")


class StudentResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    parameters_distilled: int
    parameters_pruned: int
    layer_heads: list[int]
    layer_ffn: list[int]
    fp32_bytes: int
    int8_bytes: int
    teacher_bytes: int
    size_ratio_int8_vs_teacher: float
    train_seconds: float
    teacher_label_seconds: float
    quantize_seconds: float
    train_frames: int
    heldout_frames: int
    heldout_fp32: list[dict] = Field(description="evaluate.compare records, FP32 student vs teacher")
    heldout_int8: list[dict] = Field(description="evaluate.compare records, INT8 student vs teacher")
    expert_fp32: dict[str, float]
    expert_int8: dict[str, float]
    expert_teacher: dict[str, float]
    int8_vs_fp32_max_abs_traj_m: float
    dataset_sha256: str


def quantize(fp32_dir: Path, int8_dir: Path, calib: Features, cfg: QuantConfig) -> ModelSpec:
    """INT8 QDQ model of an FP32 planner directory, with its spec. Calibration frames: `calib`."""
    int8_dir.mkdir(parents=True, exist_ok=True)
    pre = int8_dir / ".preprocessed.onnx"
    quant_pre_process(str(model_file(fp32_dir)), str(pre))  # shape inference + graph optimisation first, as advised
    graph = onnx.load(str(pre)).graph
    weights = {i.name for i in graph.initializer}
    # Weight products only: attention's activation x activation products are small at these token counts, and
    # quantizing them costs a quantize/dequantize pair each for no speed.
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    exclude = [n.name for n in products if n.name.startswith(IO_LAYERS)] if cfg.keep_io_fp32 else []
    chosen = [n.name for n in products if n.name not in exclude]
    out = int8_dir / MODEL_FILE
    quantize_qdq(pre, out, calib, cfg.calibration_batch, chosen, ["MatMul", "Gemm"], per_channel=cfg.per_channel,
                 activation_type=QuantType[cfg.activation_type], method=cfg.method)
    pre.unlink()
    src = read_spec(fp32_dir)
    spec = src.model_copy(update={"precision": "int8", "extra": {**src.extra, "quantization": {
        **cfg.model_dump(), "format": "QDQ", "int8_nodes": chosen, "fp32_weight_nodes": exclude,
        "weights": "symmetric INT8"}}})
    write_spec(spec, out)
    return read_spec(out)


def run(config: StudentConfig) -> StudentResult:
    """Distil, prune, fine-tune, export and quantize the student; evaluate it on held-out drives."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    teacher_spec = read_spec(config.teacher)
    t_cfg = teacher_spec.extra.get("config", {})
    if t_cfg and (t_cfg.get("seed"), t_cfg.get("holdout_fraction")) != (config.seed, config.holdout_fraction):
        log.warning("teacher was trained with seed/holdout %s/%s, student uses %s/%s: held-out drives differ",
                    t_cfg.get("seed"), t_cfg.get("holdout_fraction"), config.seed, config.holdout_fraction)
    train, held, train_f, held_f = load_split(config.drives_dir, config.holdout_fraction, config.seed,
                                              config.frame_stride)
    t_sess = session(config.teacher, config.threads)
    t0 = time.perf_counter()
    t_traj, t_logits = predict(t_sess, train_f, config.teacher_batch)
    label_s = time.perf_counter() - t0
    log.info("teacher labelled %d training frames in %.1f s", len(train_f), label_s)
    data = {**train_f.inputs(), "traj": train_f.traj, "traj_mask": train_f.traj_mask,
            "maneuver": train_f.maneuver, "t_traj": t_traj, "t_logits": t_logits}

    def loss_fn(m: Planner, b: dict[str, np.ndarray]) -> torch.Tensor:
        return distill_loss(m, b, config.distill)

    t0 = time.perf_counter()
    model = Planner(config.model)
    fit(model, data, loss_fn, config.optim, config.seed)
    distilled_params = model.num_parameters()

    # Importance on the distillation loss, over batches drawn from the seed.
    imp = Importance(model)
    model.set_record(True)
    rng = np.random.default_rng(config.seed + 1)
    for _ in range(config.prune.importance_batches):
        idx = np.sort(rng.choice(len(train_f), min(len(train_f), config.optim.batch_size), replace=False))
        model.zero_grad()
        loss_fn(model, {k: v[idx] for k, v in data.items()}).backward()
        imp.accumulate(model)
    model.set_record(False)
    model = prune(model, imp, config.prune.keep_heads, config.prune.keep_ffn)
    fit(model, data, loss_fn, config.prune.finetune, config.seed + 2)
    train_s = time.perf_counter() - t0

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_hash = dataset_hash(train)
    save_checkpoint(model, out / "checkpoint.pt", {"teacher_sha256": teacher_spec.sha256})
    extra = {"recipe": "retrain.recipes.student", "config": json.loads(config.model_dump_json()), "dataset_sha256": ds_hash,
             "teacher": f"{teacher_spec.name}:{teacher_spec.version}", "teacher_sha256": teacher_spec.sha256}
    fp32 = export_with_spec(model, out / "fp32", f"{config.name}-fp32", config.version, extra)
    t0 = time.perf_counter()
    calib = train_f.take(np.sort(np.random.default_rng(config.seed + 3).choice(
        len(train_f), min(len(train_f), config.quant.calibration_frames), replace=False)))
    int8 = quantize(out / "fp32", out / "int8", calib, config.quant)
    int8.name = config.name
    write_spec(int8, out / "int8" / MODEL_FILE)
    quant_s = time.perf_counter() - t0

    teacher_out = predict(t_sess, held_f, config.teacher_batch)
    fp32_out = predict(session(out / "fp32", config.threads), held_f)
    int8_out = predict(session(out / "int8", config.threads), held_f)
    result = StudentResult(
        out_dir=out, parameters_distilled=distilled_params, parameters_pruned=model.num_parameters(),
        layer_heads=model.config.layer_heads or [], layer_ffn=model.config.layer_ffn or [],
        fp32_bytes=fp32.size_bytes, int8_bytes=read_spec(out / "int8").size_bytes,
        teacher_bytes=teacher_spec.size_bytes,
        size_ratio_int8_vs_teacher=teacher_spec.size_bytes / read_spec(out / "int8").size_bytes,
        train_seconds=train_s, teacher_label_seconds=label_s, quantize_seconds=quant_s, train_frames=len(train_f),
        heldout_frames=len(held_f), heldout_fp32=compare(fp32_out, teacher_out, held_f),
        heldout_int8=compare(int8_out, teacher_out, held_f), expert_fp32=vs_expert(*fp32_out, held_f),
        expert_int8=vs_expert(*int8_out, held_f), expert_teacher=vs_expert(*teacher_out, held_f),
        int8_vs_fp32_max_abs_traj_m=float(np.abs(int8_out[0] - fp32_out[0]).max(initial=0)), dataset_sha256=ds_hash)
    (out / "result.json").write_text(result.model_dump_json(indent=2))
    if config.registry is not None:
        _register(config, result, teacher_spec, ds_hash)
    return result


def _register(config: StudentConfig, result: StudentResult, teacher_spec: ModelSpec, ds_hash: str) -> None:
    reg = Registry(config.registry)
    known = {e.ref for e in reg.list(teacher_spec.name)}
    teacher_ref = f"{teacher_spec.name}:{teacher_spec.version}"
    parents = [teacher_ref] if teacher_ref in known else []
    overall = {k: v for r in result.heldout_int8 if r["group"] == "all" for k, v in r.items()
               if isinstance(v, float)}
    reg.register(f"{config.name}-fp32", config.version, result.out_dir / "fp32", parents=parents,
                 recipe="retrain.recipes.student", dataset_sha256=ds_hash, metrics=result.expert_fp32)
    reg.register(config.name, config.version, result.out_dir / "int8",
                 parents=[f"{config.name}-fp32:{config.version}", *parents], recipe="retrain.recipes.student",
                 dataset_sha256=ds_hash, metrics={**overall, "size_ratio_vs_teacher": result.size_ratio_int8_vs_teacher})
