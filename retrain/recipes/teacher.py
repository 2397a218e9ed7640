"""Recipe: train the reference teacher planner by behaviour cloning on a drives directory, export it to ONNX.

    from retrain.recipes.teacher import TeacherConfig, run
    result = run(TeacherConfig(drives_dir="fleet/", out_dir="artifacts/teacher"))

Drives are split by drive (deterministic from the seed) into training and held-out ones. The teacher learns the
expert's future trajectory (from the later frames of each drive) and its maneuver; it is exported to ONNX (dynamic
batch) with its spec, and scored against the expert on the held-out drives with onnxruntime, the way it will run.
Reproducible: the same config and drives give the same weights (torch.manual_seed, seeded data order, fixed threads).

The training loop, the losses and the dataset helpers are `retrain.models.training`'s. A leaf: nothing imports it
but the command line (`flywheel models build|teacher`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from retrain.cycle.registry import Registry
from retrain.models.architectures import Planner, PlannerConfig, tensors
from retrain.models.evaluate import expert_by_condition, predict, vs_expert
from retrain.models.training import (LossConfig, OptimConfig, dataset_hash, export_with_spec, fit, load_split,
                                     planning_loss, save_checkpoint, torch_predict, training_arrays)
from shadow.models import session
from shadow.spec import MODEL_FILE

log = logging.getLogger(__name__)


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
                            {"recipe": "retrain.recipes.teacher", "config": json.loads(config.model_dump_json()),
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
        Registry(config.registry).register(config.name, config.version, out, parents=[], recipe="retrain.recipes.teacher",
                                           dataset_sha256=ds_hash, metrics=metrics)
    return result
