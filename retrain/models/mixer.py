"""The second reference planner: an MLP-Mixer over the `mixer` featurizer's tokens (`shadow.featurize_mixer`). It
shares nothing with the transformer `Planner` but the heads, and proves that a plug-in pair goes through the flywheel.

Inputs (B = batch): motion (B, 5, 6), actors (B, 24, 9) (last feature 1.0 for a real actor), state (B, 5).
Tokens: one for the flattened ego motion, one per actor (padding tokens zeroed), one for the ego state: S = 26
tokens of width d. Each block mixes across tokens (an MLP over the token axis, S -> token_hidden -> S) and then
across channels (d -> channel_hidden -> d), both pre-norm and residual (Tolstikhin et al. 2021). The heads read the
mean of the tokens plus the motion token:
- trajectory (B, 8, 3): x, y [m] and yaw [rad] at 0.5 .. 4 s in the current ego frame;
- maneuver_logits (B, 6).

Pruning hooks: the channel-mixing MLPs' hidden units, ranked by the magnitude of their weights (the product of each
unit's input and output norms), pruned structurally (rows and columns removed, the rest copied unchanged).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from shadow import featurize_mixer as fm

HORIZON, NUM_MANEUVERS = 8, 6
TOKENS = 1 + fm.ACTORS + 1
TRAJ_SCALE = (10.0, 2.0, 0.2)  # the head's unit-sized outputs -> metres, metres, radians


class MixerConfig(BaseModel):
    """Sizes of a MixerPlanner."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(64, ge=8, description="token width d")
    depth: int = Field(2, ge=1, le=16, description="mixer blocks")
    token_hidden: int = Field(48, ge=4, description="hidden units of the token-mixing MLP")
    channel_hidden: list[int] | int = Field(128, description="hidden units of each block's channel-mixing MLP (one "
                                            "value for every block, or one per block after pruning)")

    def channel_of(self, i: int) -> int:
        return self.channel_hidden[i] if isinstance(self.channel_hidden, list) else self.channel_hidden


class MixerBlock(nn.Module):
    def __init__(self, width: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.tok1 = nn.Linear(TOKENS, token_hidden)
        self.tok2 = nn.Linear(token_hidden, TOKENS)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, channel_hidden)
        self.fc2 = nn.Linear(channel_hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x).transpose(1, 2)                    # (B, d, S)
        x = x + self.tok2(torch.nn.functional.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class MixerPlanner(nn.Module):
    """MLP-Mixer planner; forward(motion, actors, state) -> (trajectory (B, 8, 3), maneuver_logits (B, 6))."""

    def __init__(self, config: MixerConfig | None = None) -> None:
        super().__init__()
        self.config = config or MixerConfig()
        d = self.config.width
        self.motion_embed = nn.Sequential(nn.Linear(fm.MOTION_TOKENS * fm.MOTION_FEATURES, d), nn.GELU(),
                                          nn.Linear(d, d))
        self.actor_embed = nn.Sequential(nn.Linear(fm.ACTOR_FEATURES, d), nn.GELU(), nn.Linear(d, d))
        self.state_embed = nn.Linear(fm.STATE_FEATURES, d)
        self.blocks = nn.ModuleList(MixerBlock(d, self.config.token_hidden, self.config.channel_of(i))
                                    for i in range(self.config.depth))
        self.norm = nn.LayerNorm(d)
        self.traj_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, HORIZON * 3))
        self.maneuver_head = nn.Linear(d, NUM_MANEUVERS)
        self.register_buffer("traj_scale", torch.tensor(TRAJ_SCALE, dtype=torch.float32), persistent=False)

    def forward(self, motion: torch.Tensor, actors: torch.Tensor, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.motion_embed(motion.flatten(1)).unsqueeze(1)           # (B, 1, d)
        a = self.actor_embed(actors) * actors[..., -1:]                  # (B, K, d), padding zeroed
        s = self.state_embed(state).unsqueeze(1)                         # (B, 1, d)
        x = torch.cat([m, a, s], dim=1)                                  # (B, S, d)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x.mean(dim=1) + x[:, 0]
        traj = self.traj_head(pooled).reshape(-1, HORIZON, 3) * self.traj_scale
        return traj, self.maneuver_head(pooled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_frame(model: MixerPlanner) -> int:
    """FLOPs (2 per multiply-accumulate) of one frame's forward pass (the linear layers)."""
    cfg = model.config
    d, k = cfg.width, fm.ACTORS
    macs = fm.MOTION_TOKENS * fm.MOTION_FEATURES * d + d * d + k * (fm.ACTOR_FEATURES * d + d * d)
    macs += fm.STATE_FEATURES * d
    for i in range(cfg.depth):
        macs += d * 2 * TOKENS * cfg.token_hidden + TOKENS * 2 * d * cfg.channel_of(i)
    macs += d * d + d * HORIZON * 3 + d * NUM_MANEUVERS
    return 2 * macs


def prune_channels(model: MixerPlanner, keep: float) -> MixerPlanner:
    """A copy keeping the share `keep` of each block's channel-MLP hidden units, those of largest weight magnitude
    (||fc1 row|| * ||fc2 column||); every other weight is copied unchanged."""
    cfg = model.config
    kept = [max(1, int(round(cfg.channel_of(i) * keep))) for i in range(cfg.depth)]
    new = MixerPlanner(cfg.model_copy(update={"channel_hidden": kept}))
    state = model.state_dict()
    out = new.state_dict()
    for k in out:
        if ".fc1." not in k and ".fc2." not in k:
            out[k] = state[k].clone()
    for i, block in enumerate(model.blocks):
        score = block.fc1.weight.norm(dim=1) * block.fc2.weight.norm(dim=0)
        idx = torch.sort(torch.topk(score, kept[i]).indices).values
        p = f"blocks.{i}."
        out[p + "fc1.weight"] = state[p + "fc1.weight"][idx].clone()
        out[p + "fc1.bias"] = state[p + "fc1.bias"][idx].clone()
        out[p + "fc2.weight"] = state[p + "fc2.weight"][:, idx].clone()
        out[p + "fc2.bias"] = state[p + "fc2.bias"].clone()
    new.load_state_dict(out)
    return new.eval()


def prunable_units(model: MixerPlanner) -> int:
    return int(sum(model.config.channel_of(i) for i in range(model.config.depth)))


def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros((batch, *shape)) for _, shape in fm.INPUTS)
