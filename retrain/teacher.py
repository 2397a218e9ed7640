"""Recipe: train the reference teacher planner by behaviour cloning on a drives directory, export it to ONNX.

    from retrain.teacher import TeacherConfig, run
    result = run(TeacherConfig(drives_dir="fleet/", out_dir="artifacts/teacher"))

Drives are split by drive (deterministic from the seed) into training and held-out ones. The teacher learns the
expert's future trajectory (from the later frames of each drive) and its maneuver; it is exported to ONNX (dynamic
batch) with its spec, and scored against the expert on the held-out drives with onnxruntime, the way it will run.
Reproducible: the same config and drives give the same weights (torch.manual_seed, seeded data order, fixed threads).

The training loop, the losses and the dataset helpers here are shared by the student recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import list_drive_files
from retrain.architectures import Planner, PlannerConfig, export_onnx, tensors
from retrain.evaluate import expert_by_condition, predict, session, split_drives, vs_expert
from shadow.featurize import Features, featurize_drive_files
from shadow.spec import MODEL_FILE, ModelSpec, read_spec, write_spec

log = logging.getLogger(__name__)


class OptimConfig(BaseModel):
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to 5% of the peak rate."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1500, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=1, description="frames per step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")


class LossConfig(BaseModel):
    """Weights of the planning loss: Huber on x, y (m) + weighted Huber on yaw (rad) + maneuver cross-entropy."""

    model_config = ConfigDict(extra="forbid")

    yaw_weight: float = Field(10.0, ge=0, description="weight of yaw error (rad) relative to position error (m)")
    maneuver_weight: float = Field(1.0, ge=0, description="weight of the maneuver classification loss")
    huber_delta_m: float = Field(1.0, gt=0, description="Huber transition point, metres")


class TeacherConfig(BaseModel):
    """Everything the teacher recipe needs; defaults are the reference teacher."""

    model_config = ConfigDict(extra="forbid")

    drives_dir: Path = Field(description="directory of <vehicle>/<drive>.drive.parquet files")
    out_dir: Path = Field(description="where model.onnx, spec.json and checkpoint.pt go")
    seed: int = Field(0, description="seeds the split, the initial weights and the data order")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of drives held out for evaluation")
    frame_stride: int = Field(2, ge=1, description="train on every n-th frame (10 Hz neighbours are near duplicates)")
    model: PlannerConfig = Field(default_factory=PlannerConfig, description="architecture (default ~3.4M weights)")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser and schedule")
    loss: LossConfig = Field(default_factory=LossConfig, description="loss weights")
    threads: int = Field(2, ge=1, description="torch intra-op threads (fixed, for reproducibility)")
    name: str = Field("teacher", description="model name in the spec and registry")
    version: str = Field("v1", description="model version in the spec and registry")
    registry: Path | None = Field(None, description="register the exported model in this registry when given")


class TeacherResult(BaseModel):
    """What the recipe produced and measured."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path
    parameters: int
    onnx_bytes: int
    train_seconds: float
    steps: int
    final_loss: float
    train_drives: int
    heldout_drives: int
    train_frames: int
    heldout_frames: int
    heldout: dict[str, float] = Field(description="ADE/FDE (m) and maneuver accuracy vs the expert, held-out drives")
    heldout_by_condition: list[dict] = Field(description="the same per lighting, weather and road type")
    onnx_max_abs_diff: float = Field(description="largest |onnxruntime - torch| output on held-out frames")
    dataset_sha256: str
    heldout_drive_files: list[str]


# ------------------------------------------------------------------------------------------------ shared pieces


def dataset_hash(paths: list[Path]) -> str:
    """sha256 over the names and contents of drive files: identifies the data a model was trained on."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(f"{p.parent.name}/{p.name}\0".encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_split(drives_dir: Path, holdout_fraction: float, seed: int, stride: int
               ) -> tuple[list[Path], list[Path], Features, Features]:
    """Drive files split by drive, and their features (training frames thinned by `stride`, held-out not)."""
    paths = list_drive_files(Path(drives_dir))
    if not paths:
        raise FileNotFoundError(f"no drive files under {drives_dir}")
    train, held = split_drives(paths, holdout_fraction, seed)
    train_f = featurize_drive_files(train, stride=stride)
    held_f = featurize_drive_files(held)
    # Frames without a single future waypoint teach nothing about trajectories; keep those with one at least.
    train_f = train_f.take(np.flatnonzero(train_f.traj_mask.any(axis=1)))
    return train, held, train_f, held_f


def planning_loss(traj: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  maneuver: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """traj, target (B, T, 3) [m, m, rad]; mask (B, T) bool; logits (B, 6); maneuver (B,) int64, 0 = unknown."""
    m = mask.unsqueeze(-1).float()
    xy = F.huber_loss(traj[..., :2], target[..., :2], reduction="none", delta=cfg.huber_delta_m) * m
    yaw = F.huber_loss(traj[..., 2:], target[..., 2:], reduction="none", delta=0.1) * m
    denom = m.sum().clamp(min=1.0)
    loss = xy.sum() / denom + cfg.yaw_weight * yaw.sum() / denom
    known = maneuver != 0
    if cfg.maneuver_weight and bool(known.any()):
        loss = loss + cfg.maneuver_weight * F.cross_entropy(logits[known], maneuver[known])
    return loss


def lr_at(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


BatchLoss = Callable[[Planner, dict[str, np.ndarray]], torch.Tensor]


def fit(model: Planner, data: dict[str, np.ndarray], loss_fn: BatchLoss, cfg: OptimConfig, seed: int,
        log_every: int = 100) -> float:
    """Train `model` in place for cfg.steps steps over `data` (arrays with a common first axis N), epoch by epoch in
    an order drawn from `seed`. Returns the mean loss of the last 50 steps."""
    n = next(iter(data.values())).shape[0]
    if n == 0:
        raise ValueError("no training frames")
    rng = np.random.default_rng(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; biases and norms do not
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr)
    model.train()
    order, pos, recent = rng.permutation(n), 0, []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n and pos > 0:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos:pos + cfg.batch_size])  # sorted: gathers walk memory forwards
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = loss_fn(model, {k: v[idx] for k, v in data.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if log_every and (step + 1) % log_every == 0:
            log.info("step %d/%d loss %.4f (%.1f steps/s)", step + 1, cfg.steps, np.mean(recent),
                     (step + 1) / (time.perf_counter() - t0))
    model.eval()
    return float(np.mean(recent))


def training_arrays(feats: Features) -> dict[str, np.ndarray]:
    return {**feats.inputs(), "traj": feats.traj, "traj_mask": feats.traj_mask, "maneuver": feats.maneuver}


def save_checkpoint(model: Planner, path: Path, extra: dict | None = None) -> Path:
    """State dict plus the PlannerConfig, enough to rebuild and fine-tune the model later."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save({"config": model.config.model_dump(), "state_dict": model.state_dict(), "extra": extra or {}}, tmp)
    tmp.replace(path)
    return Path(path)


def load_checkpoint(path: Path) -> Planner:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = Planner(PlannerConfig.model_validate(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def export_with_spec(model: Planner, model_dir: Path, name: str, version: str, extra: dict) -> ModelSpec:
    """model_dir/model.onnx + model_dir/spec.json for an FP32 planner."""
    path = export_onnx(model, Path(model_dir) / MODEL_FILE)
    spec = ModelSpec(name=name, version=version, precision="fp32", parameters=model.num_parameters(),
                     flops_per_frame=model.flops_per_frame(), architecture=model.config.model_dump(), extra=extra)
    write_spec(spec, path)
    return read_spec(path)


@torch.no_grad()
def torch_predict(model: Planner, feats: Features, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    outs = [model(*tensors({k: v[s:s + batch_size] for k, v in feats.inputs().items()}))
            for s in range(0, len(feats), batch_size)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


# ------------------------------------------------------------------------------------------------------ the recipe


def run(config: TeacherConfig) -> TeacherResult:
    """Train, export and evaluate the teacher; register it when `config.registry` is set."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train, held, train_f, held_f = load_split(config.drives_dir, config.holdout_fraction, config.seed,
                                              config.frame_stride)
    log.info("teacher: %d train drives (%d frames), %d held-out drives (%d frames)", len(train), len(train_f),
             len(held), len(held_f))
    model = Planner(config.model)
    t0 = time.perf_counter()

    def loss_fn(m: Planner, b: dict[str, np.ndarray]) -> torch.Tensor:
        traj, logits = m(*tensors(b))
        return planning_loss(traj, logits, torch.from_numpy(b["traj"]), torch.from_numpy(b["traj_mask"]),
                             torch.from_numpy(b["maneuver"]), config.loss)

    final_loss = fit(model, training_arrays(train_f), loss_fn, config.optim, config.seed)
    train_seconds = time.perf_counter() - t0
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / "checkpoint.pt")
    ds_hash = dataset_hash(train)
    sess_path = out / MODEL_FILE
    spec = export_with_spec(model, out, config.name, config.version,
                            {"recipe": "retrain.teacher", "config": json.loads(config.model_dump_json()),
                             "dataset_sha256": ds_hash, "seed": config.seed})
    onnx_out = predict(session(sess_path, config.threads), held_f)
    torch_out = torch_predict(model, held_f)
    diff = max(float(np.abs(onnx_out[0] - torch_out[0]).max(initial=0)),
               float(np.abs(onnx_out[1] - torch_out[1]).max(initial=0)))
    metrics = vs_expert(*onnx_out, held_f)
    log.info("teacher held-out: %s (onnx vs torch max diff %.2e)", metrics, diff)
    result = TeacherResult(model_dir=out, parameters=model.num_parameters(), onnx_bytes=spec.size_bytes,
                           train_seconds=train_seconds, steps=config.optim.steps, final_loss=final_loss,
                           train_drives=len(train), heldout_drives=len(held), train_frames=len(train_f),
                           heldout_frames=len(held_f), heldout=metrics,
                           heldout_by_condition=expert_by_condition(*onnx_out, held_f), onnx_max_abs_diff=diff,
                           dataset_sha256=ds_hash, heldout_drive_files=[str(p) for p in held])
    (out / "result.json").write_text(result.model_dump_json(indent=2))
    if config.registry is not None:
        from retrain.registry import Registry

        Registry(config.registry).register(config.name, config.version, out, parents=[], recipe="retrain.teacher",
                                           dataset_sha256=ds_hash, metrics=metrics)
    return result


def main(argv: list[str] | None = None) -> None:
    """python -m retrain.teacher DRIVES OUT [--registry DIR] [--seed N] [--steps N] [--config JSON-FILE]"""
    import argparse

    ap = argparse.ArgumentParser(description="Train the teacher planner on a drives directory.")
    ap.add_argument("drives_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--registry", type=Path)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--config", type=Path, help="JSON file with TeacherConfig fields (command-line values win)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fields = json.loads(args.config.read_text()) if args.config else {}
    fields.update(drives_dir=args.drives_dir, out_dir=args.out_dir)
    for key in ("registry", "seed"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.steps is not None:
        fields.setdefault("optim", {})["steps"] = args.steps
    print(run(TeacherConfig.model_validate(fields)).model_dump_json(indent=2))


if __name__ == "__main__":
    main()
