"""The transformer planner shared by teacher and student, its structured pruning, and its ONNX export.

Tokens (B = batch): one ego token embedded from the whole ego history (B, H*Fe), K agent tokens (B, K, Fa) and one
lane token (B, Fl), each from its own embedding MLP, so a sequence of S = K + 2 tokens of width d. Pre-norm
encoder layers attend over them with padding agents masked out; the heads read the ego token after a final norm:

- trajectory (B, T, 3): future x, y in metres and yaw in rad in the current ego frame (see shadow.featurize);
- maneuver logits (B, 6): unnormalised scores of the `Maneuver` classes.

Teacher and student are the same class with different `PlannerConfig`s. Attention heads and FFN channels can
differ per layer (`layer_heads`, `layer_ffn`): that is how a pruned model is described and rebuilt.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from shadow import featurize as fz

log = logging.getLogger(__name__)

# Large negative instead of -inf: an exported graph stays finite under any runtime's softmax and quantizer.
_MASK_NEG = -1e4
# Output scales: the trajectory head predicts roughly unit-sized numbers that these turn into metres and radians.
_TRAJ_SCALE = (40.0, 4.0, 0.2)
TOKENS = fz.MAX_AGENTS + 2  # ego, agents, lane


class PlannerConfig(BaseModel):
    """Size of a planner. Heads and FFN width may be given per layer (a pruned model); otherwise uniform."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(256, ge=8, description="token width d")
    depth: int = Field(4, ge=1, description="number of encoder layers")
    heads: int = Field(8, ge=1, description="attention heads per layer (when layer_heads is not given)")
    head_dim: int = Field(32, ge=4, description="width of one attention head")
    ffn: int = Field(1024, ge=4, description="FFN hidden width per layer (when layer_ffn is not given)")
    layer_heads: list[int] | None = Field(None, description="attention heads of each layer, after pruning")
    layer_ffn: list[int] | None = Field(None, description="FFN hidden width of each layer, after pruning")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in attention output and FFN during training")
    featurizer_version: str = Field(fz.FEATURIZER_VERSION, description="features this model consumes")

    @model_validator(mode="after")
    def _per_layer(self) -> "PlannerConfig":
        for name in ("layer_heads", "layer_ffn"):
            v = getattr(self, name)
            if v is not None and (len(v) != self.depth or min(v) < 1):
                raise ValueError(f"{name} must list {self.depth} positive sizes, got {v}")
        if self.featurizer_version != fz.FEATURIZER_VERSION:
            raise ValueError(f"this code builds {fz.FEATURIZER_VERSION} planners, not {self.featurizer_version}")
        return self

    def heads_of(self, i: int) -> int:
        return self.layer_heads[i] if self.layer_heads else self.heads

    def ffn_of(self, i: int) -> int:
        return self.layer_ffn[i] if self.layer_ffn else self.ffn


class Attention(nn.Module):
    """Multi-head self-attention over a fixed number of tokens; whole heads can be cut out of it.

    x (B, S, d), bias (B, 1, 1, S) additive mask -> (B, S, d). One fused q|k|v projection and reshapes with constant
    shapes keep the exported graph small: at batch 1 a runtime's cost is mostly per node.
    """

    def __init__(self, width: int, heads: int, head_dim: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.tokens = heads, head_dim, tokens
        inner = heads * head_dim
        self.qkv = nn.Linear(width, 3 * inner)
        self.out = nn.Linear(inner, width)
        self.record = False  # keep the per-head context and its gradient for importance scores
        self.context: torch.Tensor | None = None
        self.keep_map = False
        self.map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).reshape(-1, self.tokens, 3 * self.heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.heads, dim=1)  # (B, h, S, hd) each; split, not unbind: no squeeze nodes
        att = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias, dim=-1)
        if self.keep_map:  # the heads' mean attention map (B, S, S), for attention-map distillation
            self.map = att.mean(dim=1)
        ctx = (att @ v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        if self.record and ctx.requires_grad:
            ctx.retain_grad()
            self.context = ctx
        return self.out(ctx)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ffn(norm(x)). Shapes (B, S, d) -> (B, S, d)."""

    def __init__(self, width: int, heads: int, head_dim: int, ffn: int, dropout: float, tokens: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_dim, tokens)
        self.fc1, self.fc2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.drop = nn.Dropout(dropout)
        self.record = False
        self.hidden: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), bias))
        h = F.gelu(self.fc1(self.norm2(x)))
        if self.record and h.requires_grad:
            h.retain_grad()
            self.hidden = h
        return x + self.drop(self.fc2(h))


def _mlp(d_in: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width))


class Planner(nn.Module):
    """The planner. forward(ego_hist (B,H,Fe), agents (B,K,Fa), agent_mask (B,K) 1/0, lane (B,Fl))
    -> (trajectory (B,T,3) [m, m, rad], maneuver logits (B,6))."""

    def __init__(self, config: PlannerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.ego_embed = _mlp(fz.HISTORY * fz.EGO_FEATURES, d)
        self.agent_embed = _mlp(fz.AGENT_FEATURES, d)
        self.lane_embed = _mlp(fz.LANE_FEATURES, d)  # the last bias of each embedding doubles as token-type code
        self.layers = nn.ModuleList(
            EncoderLayer(d, config.heads_of(i), config.head_dim, config.ffn_of(i), config.dropout, TOKENS)
            for i in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.traj_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, fz.HORIZON * 3))
        self.maneuver_head = nn.Linear(d, fz.NUM_MANEUVERS)
        self.register_buffer("traj_scale", torch.tensor(_TRAJ_SCALE, dtype=torch.float32), persistent=False)

    def forward(self, ego_hist: torch.Tensor, agents: torch.Tensor, agent_mask: torch.Tensor,
                lane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([self.ego_embed(ego_hist.flatten(1)).unsqueeze(1), self.agent_embed(agents),
                            self.lane_embed(lane).unsqueeze(1)], dim=1)
        valid = F.pad(agent_mask, (1, 1), value=1.0)  # the ego and lane tokens are always there
        bias = ((1.0 - valid) * _MASK_NEG).reshape(-1, 1, 1, TOKENS)
        x = tokens
        for layer in self.layers:
            x = layer(x, bias)
        ego = self.norm(x[:, 0])
        traj = self.traj_head(ego).reshape(-1, fz.HORIZON, 3) * self.traj_scale
        return traj, self.maneuver_head(ego)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_frame(self) -> int:
        """Multiply-add FLOPs (2 per multiply-accumulate) of one frame's forward pass: every weight product at its
        token count plus attention's two activation products; norms, activations and softmax are not counted."""
        def linear_macs(module: nn.Module) -> int:
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        macs = linear_macs(self.ego_embed) + fz.MAX_AGENTS * linear_macs(self.agent_embed) + linear_macs(self.lane_embed)
        for layer in self.layers:
            macs += TOKENS * (linear_macs(layer.attn) + linear_macs(layer.fc1) + linear_macs(layer.fc2))
            macs += 2 * layer.attn.heads * TOKENS * TOKENS * layer.attn.head_dim
        macs += linear_macs(self.traj_head) + linear_macs(self.maneuver_head)
        return 2 * macs

    def set_record(self, on: bool) -> None:
        for layer in self.layers:
            layer.record = layer.attn.record = on
            if not on:
                layer.hidden = layer.attn.context = None


def tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The model inputs as torch tensors, in forward() order."""
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in fz.INPUT_NAMES)


# ----------------------------------------------------------------------------------------------------------- pruning


class Importance:
    """First-order (Taylor) importance of every attention head and FFN channel, accumulated over batches.

    Score of a unit = mean over samples of |sum over its activations of activation * dLoss/dactivation|, the
    estimated change of the loss if the unit were removed (Michel et al. 2019 for heads, Molchanov et al. 2019 for
    channels). Call `accumulate(model)` after each backward pass of a model with `set_record(True)`.
    """

    def __init__(self, model: Planner) -> None:
        cfg = model.config
        self.heads = [torch.zeros(cfg.heads_of(i)) for i in range(cfg.depth)]
        self.ffn = [torch.zeros(cfg.ffn_of(i)) for i in range(cfg.depth)]
        self.samples = 0

    @torch.no_grad()
    def accumulate(self, model: Planner) -> None:
        for i, layer in enumerate(model.layers):
            ctx, h = layer.attn.context, layer.hidden
            if ctx is None or ctx.grad is None or h is None or h.grad is None:
                raise RuntimeError("importance needs set_record(True) and a backward pass first")
            b, s, _ = ctx.shape
            per_head = (ctx * ctx.grad).reshape(b, s, layer.attn.heads, -1).sum(dim=(1, 3)).abs()
            self.heads[i] += per_head.sum(0)
            self.ffn[i] += (h * h.grad).sum(1).abs().sum(0)
        self.samples += ctx.shape[0]


def _keep(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores, in their original order (ties broken by position)."""
    return torch.sort(torch.topk(scores, n, sorted=True).indices).values


def prune(model: Planner, importance: Importance, keep_heads: float, keep_ffn: float, ffn_multiple: int = 8) -> Planner:
    """A new, physically smaller Planner keeping the most important heads and FFN channels of every layer.

    Each layer keeps round(heads * keep_heads) heads (at least 1) and round(ffn * keep_ffn) FFN channels rounded up to
    a multiple of `ffn_multiple` (kernels like aligned widths). Weights of what is kept are copied unchanged, so with
    keep ratios of 1 the pruned model computes exactly what the original does.
    """
    cfg = model.config
    heads, ffns = [], []
    for i in range(cfg.depth):
        h = cfg.heads_of(i)
        f = cfg.ffn_of(i)
        heads.append(max(1, min(h, round(h * keep_heads))))
        ffns.append(max(1, min(f, -(-round(f * keep_ffn) // ffn_multiple) * ffn_multiple)))
    return prune_to(model, importance, heads, ffns)


def prune_to(model: Planner, importance: Importance, heads: list[int], ffns: list[int]) -> Planner:
    """A new Planner with `heads[i]` heads and `ffns[i]` FFN channels in layer i (at most what it has), keeping the
    most important ones; weights of what is kept are copied unchanged."""
    cfg = model.config
    if len(heads) != cfg.depth or len(ffns) != cfg.depth:
        raise ValueError(f"prune_to needs one head count and one FFN width per layer ({cfg.depth})")
    heads = [max(1, min(cfg.heads_of(i), h)) for i, h in enumerate(heads)]
    ffns = [max(1, min(cfg.ffn_of(i), f)) for i, f in enumerate(ffns)]
    new = Planner(cfg.model_copy(update={"layer_heads": heads, "layer_ffn": ffns}))
    state = {k: v for k, v in model.state_dict().items()}
    hd = cfg.head_dim
    for i, layer in enumerate(model.layers):
        hk = _keep(importance.heads[i], heads[i])
        cols = (hk[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
        fk = _keep(importance.ffn[i], ffns[i])
        p = f"layers.{i}."
        inner = layer.attn.heads * hd
        rows = torch.cat([cols, inner + cols, 2 * inner + cols])  # the kept heads' rows of q, of k and of v
        state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"] = layer.attn.qkv.weight[rows], layer.attn.qkv.bias[rows]
        state[p + "attn.out.weight"] = layer.attn.out.weight[:, cols]
        state[p + "fc1.weight"], state[p + "fc1.bias"] = layer.fc1.weight[fk], layer.fc1.bias[fk]
        state[p + "fc2.weight"] = layer.fc2.weight[:, fk]
    new.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    log.info("pruned %d -> %d parameters (heads %s, ffn %s)", model.num_parameters(), new.num_parameters(), heads, ffns)
    return new


def grow(model: Planner, heads: int, ffn: int, seed: int = 0) -> Planner:
    """A new Planner with at least `heads` attention heads and `ffn` FFN channels in every layer, computing exactly
    what `model` computes: the kept weights are copied, new heads and channels get fresh (seeded) input weights and
    zero output weights, so they start silent and are learnt by a fine-tune. The inverse of `prune` in size; a
    pruned student grown back has the capacity pruning took, and the compression prunes it to each chip's budget."""
    cfg = model.config
    hs = [max(cfg.heads_of(i), heads) for i in range(cfg.depth)]
    fs = [max(cfg.ffn_of(i), ffn) for i in range(cfg.depth)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = Planner(cfg.model_copy(update={"layer_heads": hs, "layer_ffn": fs}))
    state, old = new.state_dict(), model.state_dict()
    for k, v in old.items():
        if state[k].shape == v.shape:
            state[k] = v.detach().clone()
    hd = cfg.head_dim
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        n0, n1 = layer.attn.heads * hd, hs[i] * hd
        for j in range(3):  # q, k and v blocks: the old heads first, then the new ones
            state[p + "attn.qkv.weight"][j * n1:j * n1 + n0] = old[p + "attn.qkv.weight"][j * n0:(j + 1) * n0]
            state[p + "attn.qkv.bias"][j * n1:j * n1 + n0] = old[p + "attn.qkv.bias"][j * n0:(j + 1) * n0]
        state[p + "attn.out.weight"] = torch.zeros_like(state[p + "attn.out.weight"])
        state[p + "attn.out.weight"][:, :n0] = old[p + "attn.out.weight"]
        f0 = layer.fc1.out_features
        state[p + "fc1.weight"][:f0], state[p + "fc1.bias"][:f0] = old[p + "fc1.weight"], old[p + "fc1.bias"]
        state[p + "fc2.weight"] = torch.zeros_like(state[p + "fc2.weight"])
        state[p + "fc2.weight"][:, :f0] = old[p + "fc2.weight"]
    new.load_state_dict(state)
    log.info("grew %d -> %d parameters (heads %s, ffn %s)", model.num_parameters(), new.num_parameters(), hs, fs)
    return new


# ------------------------------------------------------------------------------------------------------------ export

OUTPUT_NAMES = ("trajectory", "maneuver_logits")


def export_onnx(model: Planner, path: Path, opset: int = 17) -> Path:
    """Export to ONNX with a dynamic batch axis: inputs `shadow.featurize.INPUT_NAMES`, outputs `OUTPUT_NAMES`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = tuple(torch.zeros((2, *fz.INPUT_SHAPES[n])) for n in fz.INPUT_NAMES)
    axes = {n: {0: "batch"} for n in (*fz.INPUT_NAMES, *OUTPUT_NAMES)}
    tmp = path.with_name(f".{path.name}.tmp")
    # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency; node names stay readable
    # (/layers.0/attn/q/MatMul), which the quantizer's exclusion lists rely on.
    with warnings.catch_warnings():  # the exporter's deprecation and shape-inference chatter, on every export
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        torch.onnx.export(model, example, str(tmp), dynamo=False, opset_version=opset,
                          input_names=list(fz.INPUT_NAMES), output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          do_constant_folding=True)
    tmp.replace(path)
    return path
