"""Structured pruning to the target's size and latency budgets: torch checkpoint in, torch checkpoint out.

Heads and FFN channels are scored by first-order Taylor importance (`retrain.models.architectures.Importance`) on a
distillation loss against the teacher's outputs on the calibration frames (or, without a teacher, against the
unpruned model's own outputs: pruning should change the outputs as little as possible). Keep ratios are tried
from the largest down; the first pruned model whose estimated artifact size (weights at the chip's default
precisions) and roofline latency estimate fit the budgets is kept, optionally fine-tuned by distillation. With a
keep ratio of 1 the model is unchanged. If no ratio fits, the smallest is kept and the budget is reported as missed.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict, Field

from retrain.models.architectures import Importance, Planner, export_onnx, prune
from retrain.models.evaluate import predict
from shadow.models import session
from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.passes.roofline import estimate, weight_bytes
from retrain.models.training import DistillConfig, distill_loss
from retrain.compress.targets import TargetProfile
from retrain.models.training import OptimConfig, fit, load_checkpoint, save_checkpoint, torch_predict
from shadow.featurize import Features

log = logging.getLogger(__name__)


class PruneConfig(BaseModel):
    """Pruning to a budget."""

    model_config = ConfigDict(extra="forbid")

    keep_ratios: list[float] = Field([1.0, 0.75, 0.5, 0.375, 0.25], min_length=1,
                                     description="shares of heads and FFN channels kept, tried in this order")
    size_budget_bytes: int | None = Field(None, gt=0, description="default: the target's size budget")
    latency_budget_ms: float | None = Field(None, gt=0, description="default: the target's latency budget "
                                            "(checked against the roofline estimate)")
    size_margin: float = Field(0.9, gt=0, le=1, description="weights may fill this share of the size budget; the "
                               "rest is for the graph and quantization parameters")
    importance_batches: int = Field(8, ge=1, description="batches the importance is accumulated over")
    batch_size: int = Field(64, ge=1, description="frames per importance / fine-tune batch")
    finetune_steps: int = Field(0, ge=0, description="distillation fine-tune steps after pruning (0: none)")
    finetune_lr: float = Field(3e-4, gt=0, description="peak learning rate of the fine-tune")
    ffn_multiple: int = Field(8, ge=1, description="kept FFN widths are rounded up to a multiple of this")
    seed: int = Field(0, description="seeds batch choice and fine-tune order")
    threads: int = Field(2, ge=1, description="torch threads")


class PruneToBudget(Pass[PruneConfig]):
    """Structured pruning (heads, FFN channels) until the model fits the target's budgets."""

    name: ClassVar[str] = "prune"
    config_class: ClassVar[type[BaseModel]] = PruneConfig
    accepts: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self, target: TargetProfile, calibration: Features, teacher: Path | None = None) -> None:
        super().__init__(target)
        if len(calibration) == 0:
            raise ValueError("pruning needs calibration frames")
        self.calibration = calibration
        self.teacher = teacher

    def _targets(self, model: Planner, threads: int) -> tuple[np.ndarray, np.ndarray]:
        if self.teacher is not None:
            return predict(session(self.teacher, threads), self.calibration)
        return torch_predict(model, self.calibration)

    def _fits(self, model: Planner, size_budget: int, latency_budget: float, margin: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:  # the graph ExportOnnx will make, so the estimate matches
            raw = export_onnx(model, Path(tmp) / "candidate.onnx")
            quant_pre_process(str(raw), str(Path(tmp) / "pre.onnx"))
            m = G.load(Path(tmp) / "pre.onnx")
        plan = G.default_plan(m, self.target)
        size = weight_bytes(m, plan, self.target)
        est = estimate(m, plan, self.target)
        return {"parameters": model.num_parameters(), "weight_bytes_estimate": size,
                "latency_ms_estimate": est.estimate_ms,
                "fits": size <= margin * size_budget and est.estimate_ms <= latency_budget}

    def run(self, model: Artifact, config: PruneConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        size_budget = config.size_budget_bytes or self.target.budget.size_bytes
        latency_budget = config.latency_budget_ms or self.target.budget.latency_ms
        base = load_checkpoint(model.path)
        t_traj, t_logits = self._targets(base, config.threads)
        data = {**self.calibration.inputs(), "t_traj": t_traj, "t_logits": t_logits}
        loss_cfg = DistillConfig(hard_weight=0.0)  # soft targets only: calibration frames carry no labels

        def loss_fn(m: Planner, b: dict[str, np.ndarray]) -> torch.Tensor:
            return distill_loss(m, b, loss_cfg)

        imp = Importance(base)
        base.set_record(True)
        rng = np.random.default_rng(config.seed)
        n = len(self.calibration)
        for _ in range(config.importance_batches):
            idx = np.sort(rng.choice(n, min(n, config.batch_size), replace=False))
            base.zero_grad()
            loss_fn(base, {k: v[idx] for k, v in data.items()}).backward()
            imp.accumulate(base)
        base.set_record(False)

        tried, chosen, chosen_info = [], None, None
        for keep in config.keep_ratios:
            cand = base if keep >= 1.0 else prune(base, imp, keep, keep, config.ffn_multiple)
            info = {"keep": keep, **self._fits(cand.eval(), size_budget, latency_budget, config.size_margin)}
            tried.append(info)
            chosen, chosen_info = cand, info
            if info["fits"]:
                break
        if not chosen_info["fits"]:
            log.warning("%s: no keep ratio in %s fits %d bytes / %.3f ms; keeping %.3f", self.target.chip,
                        config.keep_ratios, size_budget, latency_budget, chosen_info["keep"])
        if chosen_info["keep"] < 1.0 and config.finetune_steps:
            fit(chosen, data, loss_fn, OptimConfig(steps=config.finetune_steps, batch_size=config.batch_size,
                                                   lr=config.finetune_lr,
                                                   warmup_steps=min(20, config.finetune_steps // 10)), config.seed)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(chosen.eval(), out / "checkpoint.pt",
                               {"pruned_from_sha256": model.sha256, "keep": chosen_info["keep"]})
        summary = {"keep": chosen_info["keep"], "parameters_before": base.num_parameters(),
                   "parameters_after": chosen.num_parameters(), "budget_met": chosen_info["fits"],
                   "size_budget_bytes": size_budget, "latency_budget_ms": latency_budget, "tried": tried,
                   "layer_heads": chosen.config.layer_heads, "layer_ffn": chosen.config.layer_ffn}
        return self.derive(model, config, path=path, metrics={**model.metrics, "prune": summary},
                           notes=[f"kept {chosen_info['keep']:.3f} of heads and FFN channels: "
                                  f"{summary['parameters_before']} -> {summary['parameters_after']} parameters"])
