"""Roofline latency ESTIMATE of a planned ONNX graph on a target chip, from its datasheet figures.

Nothing here is measured. For every node of the FP32 graph, at batch 1 (shapes by ONNX shape inference):

- FLOPs: 2*M*K*N for MatMul/Gemm (one multiply-add = 2 operations), 5 per element for Softmax, 8 per element for
  normalisations and transcendental elementwise operators (Erf, Exp, ...), 1 per element for other elementwise
  operators; data movement (Transpose, Concat, ...) has none, and views (Reshape, Unsqueeze, ...) cost nothing.
- bytes: every operand and result crosses DRAM once per node, at the node's precision (results of products and
  data movement at the chip's activation precision, its default elementwise precision). No reuse across nodes:
  pessimistic for a model that fits in on-chip memory.
- time of a node = max(FLOPs / peak of its precision, bytes / memory bandwidth); the graph's time is the sum.
- plus `kernel_overhead_us` (an assumption of the profile) per MatMul, Softmax and normalisation node:
  elementwise nodes are assumed fused into them.

`compute_ms` (sum of FLOPs / peak) and `memory_ms` (sum of bytes / bandwidth) are reported on their own: doubling
the bandwidth halves `memory_ms` exactly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar

import onnx
from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.targets import BYTES_PER_ELEMENT, TargetProfile, op_kind

log = logging.getLogger(__name__)

VIEWS = frozenset({"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Identity", "Shape", "Constant", "ConstantOfShape",
                   "Range", "Cast", "QuantizeLinear", "DequantizeLinear"})
HEAVY_ELEMENTWISE = frozenset({"Erf", "Exp", "Tanh", "Sigmoid", "Sqrt", "Pow", "Gelu"})
KERNEL_KINDS = frozenset({"matmul", "softmax", "norm"})


class RooflineEstimate(BaseModel):
    """A roofline latency estimate of one graph on one chip (all times in milliseconds, batch 1)."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field("estimate", description="always 'estimate': computed from datasheet figures, not measured")
    chip: str = Field(description="target chip id")
    estimate_ms: float = Field(description="roofline_ms + overhead_ms")
    roofline_ms: float = Field(description="sum over nodes of max(compute time, memory time)")
    compute_ms: float = Field(description="sum over nodes of FLOPs / peak of the node's precision")
    memory_ms: float = Field(description="sum over nodes of bytes / memory bandwidth")
    overhead_ms: float = Field(description="kernels x kernel_overhead_us (an assumption of the profile)")
    flops: float = Field(description="operations of one inference")
    bytes: float = Field(description="bytes moved to and from DRAM by one inference (no cross-node reuse)")
    kernels: int = Field(description="MatMul, Softmax and normalisation nodes")
    compute_bound_nodes: int = Field(description="nodes whose compute time exceeds their memory time")
    memory_bound_nodes: int = Field(description="nodes whose memory time exceeds their compute time")
    flops_by_precision: dict[str, float] = Field(description="operations per precision")
    figures: dict[str, str] = Field(description="which profile figures were used, with their basis")


def _numel(shape: tuple[int, ...] | None) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _product_flops(node: onnx.NodeProto, shapes: dict) -> float:
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if a is None or out is None:
        raise ValueError(f"no static shape for {node.name}; cannot estimate it")
    if node.op_type == "Gemm":
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    elif node.op_type == "MatMul":
        k = a[-1]
    else:  # Conv: output elements x input channels per group x kernel elements
        w = shapes[node.input[1]]
        k = math.prod(w[1:])
    return 2.0 * _numel(out) * k


def estimate(model: onnx.ModelProto, plan: dict[str, str], target: TargetProfile) -> RooflineEstimate:
    """Roofline estimate of an FP32 graph run with `plan` (node -> precision) on `target`; see the module doc."""
    shapes = G.shapes_at_batch(model, 1)
    act_bytes = BYTES_PER_ELEMENT[target.default_precision("elementwise")]
    bw = target.bandwidth_bytes_per_s
    inits = G.initializers(model)
    compute_s = memory_s = roofline_s = flops_total = bytes_total = 0.0
    kernels = n_compute = n_memory = 0
    by_prec: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type in VIEWS:
            continue
        kind = op_kind(node.op_type)
        ins = [t for t in node.input if t and (t not in inits or inits[t].data_type in G.FLOAT_TYPES)]
        if kind is None:  # data movement: read and write once at the activation precision
            nbytes = act_bytes * (sum(_numel(shapes.get(t)) for t in ins[:1]) + _numel(shapes.get(node.output[0])))
            flops, prec = 0.0, None
        else:
            prec = plan.get(node.name) or target.default_precision(kind)
            eb = BYTES_PER_ELEMENT[prec]
            n_out = _numel(shapes.get(node.output[0]))
            if kind == "matmul":
                flops = _product_flops(node, shapes)
                nbytes = eb * sum(_numel(shapes.get(t)) for t in ins[:2]) + act_bytes * n_out
            else:
                per = 5.0 if kind == "softmax" else 8.0 if (kind == "norm" or node.op_type in HEAVY_ELEMENTWISE) else 1.0
                flops = per * n_out
                nbytes = eb * (sum(_numel(shapes.get(t)) for t in ins) + n_out)
            kernels += kind in KERNEL_KINDS
        t_c = flops / target.peak_ops_per_s(prec) if prec else 0.0
        t_m = nbytes / bw
        compute_s, memory_s, roofline_s = compute_s + t_c, memory_s + t_m, roofline_s + max(t_c, t_m)
        flops_total, bytes_total = flops_total + flops, bytes_total + nbytes
        if prec:
            by_prec[prec] = by_prec.get(prec, 0.0) + flops
        n_compute += t_c > t_m
        n_memory += t_m >= t_c
    rf = target.roofline
    overhead_s = kernels * (rf.kernel_overhead_us.value * 1e-6 if rf.kernel_overhead_us else 0.0)
    figures = {"memory_bandwidth": f"{rf.memory_bandwidth.value} GB/s ({rf.memory_bandwidth.basis})"}
    for p in by_prec:
        fig = getattr(rf.compute, p)
        figures[f"peak_{p}"] = f"{fig.value} T/s ({fig.basis})"
    if rf.kernel_overhead_us:
        figures["kernel_overhead"] = f"{rf.kernel_overhead_us.value} us ({rf.kernel_overhead_us.basis})"
    return RooflineEstimate(chip=target.chip, estimate_ms=(roofline_s + overhead_s) * 1e3, roofline_ms=roofline_s * 1e3,
                            compute_ms=compute_s * 1e3, memory_ms=memory_s * 1e3, overhead_ms=overhead_s * 1e3,
                            flops=flops_total, bytes=bytes_total, kernels=kernels, compute_bound_nodes=n_compute,
                            memory_bound_nodes=n_memory, flops_by_precision=by_prec, figures=figures)


def matmul_shares(model: onnx.ModelProto, plan: dict[str, str], shapes: dict | None = None) -> dict[str, float]:
    """Shares of the graph's product FLOPs (MatMul/Gemm/Conv, batch 1) per precision of the plan, plus
    "integer" (INT8 and INT16 together): how much of the work the chip runs on its integer units. Counted on the
    FP32 graph the plan belongs to; products missing from the plan count as FP32."""
    shapes = shapes if shapes is not None else G.shapes_at_batch(model, 1)
    flops: dict[str, float] = {}
    for node, kind in G.compute_nodes(model):
        if kind == "matmul":
            p = plan.get(node.name, "fp32")
            flops[p] = flops.get(p, 0.0) + _product_flops(node, shapes)
    total = sum(flops.values()) or 1.0
    out = {p: f / total for p, f in flops.items()}
    out["integer"] = out.get("int8", 0.0) + out.get("int16", 0.0)
    out.setdefault("int8", 0.0)
    return out


def weight_bytes(model: onnx.ModelProto, plan: dict[str, str], target: TargetProfile) -> int:
    """Bytes of the float weights when stored at the precision of the nodes that use them (an estimate of the
    artifact's weight payload; a weight shared by nodes of different precisions counts at the widest)."""
    inits = G.initializers(model)
    width: dict[str, int] = {}
    for node, kind in G.compute_nodes(model):
        eb = BYTES_PER_ELEMENT[plan.get(node.name) or target.default_precision(kind)]
        for t in node.input:
            if t in inits and inits[t].data_type in G.FLOAT_TYPES:
                width[t] = max(width.get(t, 0), eb)
    return int(sum(_numel(tuple(inits[t].dims)) * eb for t, eb in width.items()))


class RooflineConfig(BaseModel):
    """Roofline pass options."""

    model_config = ConfigDict(extra="forbid")

    metric_key: str = Field("latency_estimate", description="key of the estimate in the artifact's metrics")


class RooflinePass(Pass[RooflineConfig]):
    """Attaches a roofline latency estimate (labelled 'estimate') to an ONNX artifact; the file is not touched."""

    name: ClassVar[str] = "roofline"
    config_class: ClassVar[type[BaseModel]] = RooflineConfig

    def __init__(self, target: TargetProfile) -> None:
        super().__init__(target)

    def run(self, model: Artifact, config: RooflineConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        reference = model.reference or model.path
        fp32 = G.load(reference)
        plan = model.plan or G.default_plan(fp32, self.target)
        est = estimate(fp32, plan, self.target)
        log.info("%s: roofline estimate %.4f ms (compute %.4f, memory %.4f, overhead %.4f)", self.target.chip,
                 est.estimate_ms, est.compute_ms, est.memory_ms, est.overhead_ms)
        return self.derive(model, config, metrics={**model.metrics, config.metric_key: est.model_dump()},
                           notes=[f"roofline latency estimate {est.estimate_ms:.4f} ms on {self.target.name} "
                                  "(estimate from datasheet figures, not measured)"])
