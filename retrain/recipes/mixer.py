"""Recipe: the second reference student, an MLP-Mixer planner plug-in (`mixer`), distilled from a teacher ONNX model
on a drives directory (any registered planner plug-in with `planner` and `architecture`). It shares nothing with the transformer student but the heads: its own featurizer
(`shadow.featurize_mixer`), its own architecture (`retrain.models.mixer`), its own pruning hooks.

    from retrain.recipes.mixer import MixerRecipeConfig, run
    spec = run(MixerRecipeConfig(drives_dir="fleet/", teacher="artifacts/teacher", out_dir="artifacts/mixer"))

The teacher labels every training frame once (its featurizer's inputs); the mixer learns its outputs from the mixer
featurizer's inputs of the same frames (`retrain.models.plugins.distill`), then is exported as a plug-in model
directory (model.onnx, spec.json naming featurizer `mixer` and planner `mixer`, state_dict.pt). A leaf: nothing
imports it but the benchmarks and tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import list_drive_files
from retrain.models.evaluate import compare, predict, split_drives
from retrain.models.mixer import MixerConfig
from retrain.models.plugins import MIXER, distill, export, planner
from retrain.models.training import DistillConfig, OptimConfig
from shadow.models import session
from shadow.plugins import featurize_files
from shadow.spec import ModelSpec

log = logging.getLogger(__name__)


class MixerRecipeConfig(BaseModel):
    """Where from, where to, and how long."""

    model_config = ConfigDict(extra="forbid")

    drives_dir: Path = Field(description="drive directory (ingest.lake layout)")
    teacher: Path = Field(description="teacher model directory (model.onnx + spec.json)")
    out_dir: Path = Field(description="where the mixer model directory is written")
    planner: str = Field("mixer", description="registered planner plug-in to distil (retrain.models.plugins)")
    architecture: dict | None = Field(None, description="the plug-in's config; None: `mixer` for the mixer")
    name: str = Field("student-mixer", description="model name in the spec")
    version: str = Field("v0", description="model version in the spec")
    mixer: MixerConfig = Field(default_factory=MixerConfig, description="architecture")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=1500, batch_size=256, lr=1e-3,
                                                                   warmup_steps=50), description="optimiser")
    loss: DistillConfig = Field(default_factory=DistillConfig, description="distillation loss")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="drives held out for the report")
    stride: int = Field(2, ge=1, description="keep every stride-th training frame")
    seed: int = Field(0, description="seeds the split, the weights and the batch order")
    threads: int = Field(2, ge=1, description="torch and onnxruntime threads")


def run(cfg: MixerRecipeConfig) -> ModelSpec:
    """Distil, export and score the mixer student; returns its spec (extra: held-out ADE against the teacher)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    paths = list_drive_files(cfg.drives_dir)
    if not paths:
        raise FileNotFoundError(f"no drive files under {cfg.drives_dir}")
    train, held = split_drives(paths, cfg.holdout_fraction, cfg.seed) if len(paths) > 1 else (paths, [])
    plugin = planner(cfg.planner)
    train_f = featurize_files(train, [plugin.featurizer], stride=cfg.stride)
    teacher = session(cfg.teacher, cfg.threads)
    t_traj, t_logits = predict(teacher, train_f)
    data = {**train_f.inputs(plugin.featurizer), "t_traj": t_traj, "t_logits": t_logits, "traj": train_f.traj,
            "traj_mask": train_f.traj_mask, "maneuver": train_f.maneuver}
    arch = cfg.architecture if cfg.architecture is not None else (
        cfg.mixer.model_dump() if plugin.name == MIXER.name else {})
    module = plugin.build(arch)
    final = distill(plugin, module, data, cfg.optim, cfg.loss, cfg.seed)
    extra: dict = {"recipe": "retrain.recipes.mixer", "train_frames": len(train_f), "final_loss": final,
                   "teacher": str(cfg.teacher)}
    spec = export(plugin, module, cfg.out_dir, cfg.name, cfg.version, extra)
    if held:
        held_f = featurize_files(held, [plugin.featurizer])
        mixer_out = predict(session(cfg.out_dir, cfg.threads), held_f)
        overall = next(r for r in compare(mixer_out, predict(teacher, held_f), held_f) if r["group"] == "all")
        log.info("mixer vs teacher on %d held-out frames: %s", len(held_f), overall)
        spec.extra["held_out_vs_teacher"] = overall
    return spec
