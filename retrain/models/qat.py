"""Quantization-aware fine-tuning: fake INT8 quantization in torch that follows the chips' numeric rules.

    qat = FakeQuant(model, QatConfig())          # observes and fake-quantizes every weight product but the inputs'
    with qat.active(model):                       # inside: forward passes see INT8 weights and activations
        loss = distill_loss(model, batch, cfg)

What is simulated, per `torch.nn.Linear` the compression will quantize (the default precision plan,
`retrain.compress.passes.graph.default_plan`, puts every weight product at INT8):
- weights: INT8, symmetric (zero point 0), one scale per output channel, scale = max|w| / 127 on [-127, 127] — what every
  target's rules prescribe (`[numerics] weight_per_channel, weight_symmetric` in deploy/targets/*.toml) and what
  onnxruntime's symmetric quantizer computes;
- activations (the product's input): INT8 with one scale per tensor over the range the training batches reach
  (minimum and maximum so far: what the compression's MinMax calibration computes), symmetric signed by default: the strictest
  scheme among the targets (TensorRT and Horizon want it; a model that tolerates the symmetric grid tolerates
  Ascend's and the CPU's asymmetric ones, whose steps are at most as wide);
- gradients pass straight through the rounding (`torch.fake_quantize_*`), so weights learn to sit well on the grid.

Only the products the current student computes in INT8 on some chip (`products`, from the cycle's baselines) are
fake-quantized when given: the accuracy-aware fallback kept the rest in FP16 for the current student, the compression
condition asks the candidate for no more, and training the output layer on an INT8 grid it will not run on doubled
the divergence on ordinary frames (reference fleet, student v0 on the val drives: 0.257 in float, 0.420 with every
product fake-quantized, 0.269 with orin's INT8 products only).

Products whose input is a raw model input (the embeddings' first layers) are left alone by default
(`keep_input_products`), because the compression keeps them out of INT8 for the same reason: per-tensor INT8 over
raw features of mixed units (metres, m/s, flags) loses the small ones (`graph.input_products`).

The observers' ranges are state (`state()` / `load()`), so a resumed fine-tune continues with the same grid.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

QMIN, QMAX = -128, 127
SYM = 127  # symmetric INT8 uses [-127, 127], scale = max|x| / 127: onnxruntime's symmetric quantizer does the same


class QatConfig(BaseModel):
    """Fake quantization during the fine-tune's last part."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="fake-quantize weight products during the fine-tune")
    start_fraction: float = Field(0.5, ge=0, le=1, description="share of the planned steps trained in float before "
                                  "fake quantization starts: the student first moves towards the teacher on the "
                                  "mined windows, then settles onto the INT8 grid")
    activation: Literal["symmetric", "asymmetric"] = Field("symmetric", description="activation scheme: symmetric "
                                                           "signed (strictest of the targets) or asymmetric")
    keep_input_products: bool = Field(True, description="leave products fed by raw model inputs in float, as the "
                                      "compression does")
    products: list[str] | None = Field(None, description="ONNX node names of the weight products to fake-quantize "
                                       "(`/layers.0/fc1/MatMul`): the current student's INT8 products on any chip, "
                                       "which the cycle fills in from its baselines; the rest stay float, as the "
                                       "current student keeps them in FP16 on every chip. None: every product")


def weight_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """(out, in) weights fake-quantized to symmetric per-output-channel INT8; gradient straight through."""
    absmax = w.detach().abs().amax(dim=1).clamp(min=1e-8)
    scale = (absmax / SYM).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -SYM, SYM)


def activation_fake_quant(x: torch.Tensor, lo: float, hi: float, symmetric: bool) -> torch.Tensor:
    """x fake-quantized to INT8 over the range [lo, hi] (symmetric: [-m, m], m = max(|lo|, |hi|))."""
    if symmetric:
        m = max(abs(lo), abs(hi), 1e-8)
        return torch.fake_quantize_per_tensor_affine(x, m / SYM, 0, -SYM, SYM)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact on the grid (padding, masks)
    scale = max(hi - lo, 1e-8) / (QMAX - QMIN)
    zero = int(round(QMIN - lo / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, max(QMIN, min(QMAX, zero)), QMIN, QMAX)


def module_of_node(node: str) -> str:
    """The module name of a weight product's ONNX node as torch's exporter names it: `/layers.0/attn/qkv/MatMul` ->
    `layers.0.attn.qkv`, `/traj_head/traj_head.2/Gemm` -> `traj_head.2` (a container's child carries the
    container's name as its prefix, so that scope is dropped)."""
    scopes = node.strip("/").split("/")[:-1]
    kept = [c for c, nxt in zip(scopes, scopes[1:] + [""]) if not nxt.startswith(c + ".")]
    return ".".join(kept)


def input_fed_linears(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> set[str]:
    """Names of the Linear modules whose input is one of `inputs` (or a view of one: same storage), found by a
    forward pass with hooks."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    found: set[str] = set()
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: found.add(name) if args[0].untyped_storage().data_ptr() in ptrs else None)
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


class FakeQuant:
    """The fake-quantized Linear modules of a model, with their activation observers (running min and max)."""

    def __init__(self, model: nn.Module, config: QatConfig, example: tuple[torch.Tensor, ...] | None = None) -> None:
        """`example`: model inputs, needed to find the input-fed products when `keep_input_products`."""
        self.config = config
        skip = input_fed_linears(model, example) if config.keep_input_products and example is not None else set()
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if config.products is not None:
            wanted = {module_of_node(p) for p in config.products}
            skip |= {n for n in linears if n not in wanted}
        self.names = [n for n in linears if n not in skip]
        self.skipped = sorted(skip)
        self.ranges: dict[str, list[float]] = {}

    def state(self) -> dict:
        return {"ranges": {k: list(v) for k, v in self.ranges.items()}}

    def load(self, state: dict) -> None:
        self.ranges = {k: [float(a), float(b)] for k, (a, b) in state["ranges"].items()}

    def _forward(self, name: str, mod: nn.Linear):
        cfg, ranges = self.config, self.ranges

        def forward(x: torch.Tensor) -> torch.Tensor:
            if mod.training:  # observe: the range this product's input reaches over the training batches
                lo, hi = float(x.detach().min()), float(x.detach().max())
                r = ranges.get(name)
                ranges[name] = [lo, hi] if r is None else [min(r[0], lo), max(r[1], hi)]
            r = ranges.get(name)
            if r is not None:
                x = activation_fake_quant(x, r[0], r[1], cfg.activation == "symmetric")
            return F.linear(x, weight_fake_quant(mod.weight), mod.bias)

        return forward

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Within the block, `model`'s quantized Linear modules (same names as the model this was built on: the
        trained model or its moving average) compute with fake-quantized weights and activations."""
        mods = dict(model.named_modules())
        for n in self.names:
            mods[n].forward = self._forward(n, mods[n])
        try:
            yield
        finally:
            for n in self.names:
                del mods[n].forward
