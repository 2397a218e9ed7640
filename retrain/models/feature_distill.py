"""Distillation of intermediate features and attention maps, beside the soft targets.

    fd = FeatureDistiller(student, teacher, FeatureDistillConfig(hidden_weight=0.1, attention_weight=0.1))
    with fd.capture(student):
        loss = distill_loss(student, batch, cfg)       # the student's forward pass, its layers observed
    loss = loss + fd.loss(batch)                        # the teacher's forward pass on the same inputs, no gradient

Layer i of an L_s-layer student is matched with layer round((i + 1) * L_t / L_s) - 1 of an L_t-layer teacher
(the last with the last). Two terms:
- hidden: the student layer's output tokens (B, S, d_s), through a learnt linear map to the teacher's width d_t,
  against the teacher layer's output (B, S, d_t); mean squared error divided by the teacher's mean square, so the
  term does not depend on the scale of the residual stream;
- attention: the student's head-mean attention map (B, S, S) against the teacher's, KL(teacher || student) per
  query token, mean over queries and frames. Head counts may differ: maps are averaged over heads first.

The maps (`learnable()`) join the optimiser; they are not part of the student and are not exported.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from retrain.models.architectures import Planner, tensors


class FeatureDistillConfig(BaseModel):
    """Weights of the intermediate-feature terms (0: off; then no teacher forward pass in torch is made)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_weight: float = Field(0.0, ge=0, description="weight of the normalised MSE between projected student "
                                 "layer outputs and the matched teacher layers'")
    attention_weight: float = Field(0.0, ge=0, description="weight of KL(teacher || student) between head-mean "
                                    "attention maps of matched layers")

    @property
    def enabled(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


def layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """Teacher layer matched with each student layer."""
    return [max(0, round((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth)]


class FeatureDistiller:
    """Observes a student's layers during its forward pass and scores them against a frozen teacher."""

    def __init__(self, student: Planner, teacher: Planner, config: FeatureDistillConfig) -> None:
        self.config, self.teacher = config, teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.match = layer_map(student.config.depth, teacher.config.depth)
        self.proj = nn.ModuleList(nn.Linear(student.config.width, teacher.config.width, bias=False)
                                  for _ in range(student.config.depth))
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def learnable(self) -> list[nn.Parameter]:
        return list(self.proj.parameters())

    def state(self) -> dict:
        return self.proj.state_dict()

    def load(self, state: dict) -> None:
        self.proj.load_state_dict(state)

    @contextlib.contextmanager
    def _observe(self, model: Planner, into: list) -> Iterator[None]:
        hooks = []
        for layer in model.layers:
            layer.attn.keep_map = self.config.attention_weight > 0
            hooks.append(layer.register_forward_hook(
                lambda mod, args, out: into.append((out, mod.attn.map))))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for layer in model.layers:
                layer.attn.keep_map, layer.attn.map = False, None

    @contextlib.contextmanager
    def capture(self, student: Planner) -> Iterator[None]:
        """Within the block, the student's layer outputs and attention maps are kept for `loss`."""
        self.seen = []
        with self._observe(student, self.seen):
            yield

    def loss(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """The weighted feature terms for the student forward pass captured last and the teacher on `batch`."""
        if len(self.seen) != len(self.match):
            raise RuntimeError(f"captured {len(self.seen)} student layers, expected {len(self.match)}")
        ref: list = []
        with torch.no_grad(), self._observe(self.teacher, ref):
            self.teacher(*tensors(batch))
        total = torch.zeros(())
        for i, (t_idx, (s_out, s_map)) in enumerate(zip(self.match, self.seen)):
            t_out, t_map = ref[t_idx]
            if self.config.hidden_weight:
                err = (self.proj[i](s_out) - t_out).pow(2).mean() / t_out.pow(2).mean().clamp(min=1e-8)
                total = total + self.config.hidden_weight * err / len(self.match)
            if self.config.attention_weight:
                kl = (t_map * (t_map.clamp(min=1e-9).log() - s_map.clamp(min=1e-9).log())).sum(-1).mean()
                total = total + self.config.attention_weight * kl / len(self.match)
        self.seen = []
        return total
