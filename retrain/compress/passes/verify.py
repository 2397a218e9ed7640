"""Verification pass: the artifact obeys its chip's numeric rules (read from the ONNX graph) and agrees with the
FP32 reference within tolerance on held-out frames (both run with onnxruntime on this CPU).

Rule check, from the graph alone:
- the precision each compute node actually runs in is read from how its operands arrive: through a
  DequantizeLinear of int8/uint8 data (INT8), of int16 data (INT16), through Cast to float16 and back or from a
  float16 weight (FP16, emulated), else FP32; a node whose operands arrive in different precisions is "mixed";
- that precision must be one the chip lists for the node's kind (e.g. Ascend: no INT8 around non-MatMul nodes) and
  the one the plan gave it;
- INT8 weights: zero points all 0 when the chip wants symmetric weights, one scale per output channel on the right
  axis when it wants per-channel; INT8 activations: int8 (not uint8) when the chip wants signed, zero point 0 when
  it wants symmetric, one scale per tensor;
- INT16: int16 data, zero points 0 (symmetric).

Numerical check: trajectories and maneuver logits against the FP32 reference on the verification frames: largest
and mean absolute trajectory error (m / rad), mean displacement (ADE, m) and maneuver agreement.

Host check: the artifact as onnxruntime runs it on this host against its integer reference
(`retrain.compress.reference`: exact integer products, independent of onnxruntime) on `reference_frames` frames.
A runtime whose integer kernels do not compute the artifact's semantics here (a saturating INT8 kernel) shows up as
metres; agreement is float rounding (FP16 nodes: a few FP16 roundings), millimetres. The integer kernel that ran
(`shadow.numerics`) is recorded with the result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from pydantic import BaseModel, ConfigDict, Field

from retrain.models.evaluate import displacement, predict
from shadow.models import session
from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.reference import IntegerReference
from retrain.compress.targets import TargetProfile
from shadow.featurize import Features
from shadow.numerics import numerics_record

log = logging.getLogger(__name__)


def _dtype_of(t: str, inits: dict, prods: dict) -> int | None:
    """Element type of a Q/DQ tensor: an initializer's type, or the zero point type of the QuantizeLinear making it."""
    if t in inits:
        return inits[t].data_type
    p = prods.get(t)
    if p is not None and p.op_type == "QuantizeLinear" and len(p.input) > 2 and p.input[2] in inits:
        return inits[p.input[2]].data_type
    return None


def operand_precision(t: str, inits: dict, prods: dict) -> str:
    """How a float operand reaches its consumer: int8, int16, int32 (bias), fp16 (emulated) or fp32."""
    if t in inits:
        return "fp16" if inits[t].data_type == TensorProto.FLOAT16 else "fp32"
    p = prods.get(t)
    if p is None:
        return "fp32"
    if p.op_type == "DequantizeLinear":
        return G.INT_TYPE_PRECISION.get(_dtype_of(p.input[0], inits, prods), "fp32")
    if p.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in p.attribute):
        src = p.input[0]
        if src in inits and inits[src].data_type == TensorProto.FLOAT16:
            return "fp16"
        q = prods.get(src)
        if q is not None and q.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16
                                                         for a in q.attribute):
            return "fp16"
    return "fp32"


def node_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """Precision each compute node runs in, read from the graph (see the module docstring)."""
    inits, prods = G.initializers(model), G.producers(model)
    floats = G.float_tensors(model)
    out: dict[str, str] = {}
    for node, kind in G.compute_nodes(model):
        seen = set()
        for i, t in enumerate(node.input):
            if not t or t not in floats:
                continue  # shape / index operands (int64)
            if node.op_type in ("Gemm", "Conv") and i == 2:
                continue  # bias: int32 beside INT8, float beside the rest
            seen.add(operand_precision(t, inits, prods))
        out[node.name] = seen.pop() if len(seen) == 1 else ("mixed:" + "+".join(sorted(seen)) if seen else "fp32")
    return out


def _dq_checks(model: onnx.ModelProto, target: TargetProfile) -> list[str]:
    """Zero points, scale shapes and element types of the DequantizeLinear nodes feeding compute nodes."""
    inits, prods, cons = G.initializers(model), G.producers(model), G.consumers(model)
    num = target.numerics
    problems: list[str] = []
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        dtype = _dtype_of(dq.input[0], inits, prods)
        prec = G.INT_TYPE_PRECISION.get(dtype)
        if prec == "int32":
            continue  # a bias
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
        scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        is_weight = dq.input[0] in inits
        for user in cons.get(dq.output[0], []):
            where = f"{user.name} <- {dq.name}"
            if prec == "int16":
                if zp is not None and np.any(zp != 0):
                    problems.append(f"{where}: INT16 zero point is not 0")
                continue
            if is_weight:
                if num.weight_symmetric and zp is not None and np.any(zp != 0):
                    problems.append(f"{where}: INT8 weight zero points are not all 0")
                if user.op_type in ("MatMul", "Gemm", "Conv") and dq.output[0] == user.input[1]:
                    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                    w_shape = tuple(inits[dq.input[0]].dims)
                    channels = w_shape[G.weight_axis(user)]
                    per_channel = scale is not None and scale.ndim == 1 and scale.size == channels > 1
                    if num.weight_per_channel and (not per_channel or axis != G.weight_axis(user)):
                        problems.append(f"{where}: weight scales are not per output channel (axis "
                                        f"{G.weight_axis(user)}, {channels} channels)")
                    if not num.weight_per_channel and scale is not None and scale.size != 1:
                        problems.append(f"{where}: weight scales are per channel, the chip wants per tensor")
            else:
                if num.activation_signed and dtype != TensorProto.INT8:
                    problems.append(f"{where}: activations are not int8")
                if not num.activation_signed and dtype != TensorProto.UINT8:
                    problems.append(f"{where}: activations are not uint8")
                if num.activation_symmetric and zp is not None and np.any(zp != 0):
                    problems.append(f"{where}: activation zero point is not 0")
                if scale is not None and scale.size != 1:
                    problems.append(f"{where}: activation scale is not per tensor")
    return problems


def check_rules(model: onnx.ModelProto, target: TargetProfile, plan: dict[str, str] | None = None) -> list[str]:
    """Every way the graph breaks the chip's numeric rules (or the plan), as readable lines; empty when it obeys."""
    kinds = G.kinds_of(model)
    problems = []
    for name, prec in node_precisions(model).items():
        allowed = target.ladder(kinds[name])
        if prec not in allowed:
            problems.append(f"{name} ({kinds[name]}) runs in {prec}; {target.chip} allows {allowed}")
        elif plan is not None and name in plan and plan[name] != prec:
            problems.append(f"{name} runs in {prec} but the plan says {plan[name]}")
    return problems + _dq_checks(model, target)


def divergence(model: Path, reference: Path, feats: Features, threads: int = 2) -> dict[str, float]:
    """Outputs of `model` against the FP32 `reference` on `feats` (onnxruntime, this CPU)."""
    got_t, got_m = predict(session(model, threads), feats)
    ref_t, ref_m = predict(session(reference, threads), feats)
    ade, fde = displacement(got_t, ref_t)
    err = np.abs(got_t - ref_t)
    return {"frames": len(feats), "traj_max_abs": float(err.max(initial=0.0)), "traj_mean_abs": float(err.mean()),
            "ade_m": float(ade.mean()), "fde_m": float(fde.mean()),
            "logits_max_abs": float(np.abs(got_m - ref_m).max(initial=0.0)),
            "maneuver_agreement": float((got_m.argmax(1) == ref_m.argmax(1)).mean())}


class VerifyConfig(BaseModel):
    """Verification tolerances."""

    model_config = ConfigDict(extra="forbid")

    tolerance_ade_m: float = Field(0.25, gt=0, description="largest mean displacement vs FP32 (ADE, m)")
    tolerance_traj_max_abs: float = Field(3.0, gt=0, description="largest |trajectory - FP32| of any frame, "
                                          "waypoint and coordinate (m or rad)")
    min_maneuver_agreement: float = Field(0.9, ge=0, le=1, description="share of frames with the FP32 maneuver")
    reference_frames: int = Field(32, ge=0, description="verification frames also run through the artifact's "
                                  "integer reference (0: skip the host check)")
    reference_tolerance_ade_m: float = Field(0.02, gt=0, description="largest mean displacement between "
                                             "onnxruntime on this host and the integer reference (m); measured "
                                             "0.5-3 mm for artifacts with FP16/INT16 nodes, 1e-5 m for INT8+FP32 "
                                             "ones, metres for a saturating INT8 kernel")
    threads: int = Field(2, ge=1, description="onnxruntime threads")


def host_check(model: Path, feats: Features, config: VerifyConfig) -> dict | None:
    """onnxruntime on this host against the integer reference on `feats`: ADE and largest differences (m), or None
    without frames."""
    if len(feats) == 0:
        return None
    inputs = feats.inputs()
    got = predict(session(model, config.threads), feats)
    want = IntegerReference(model)(inputs)
    ade, _ = displacement(got[0], want[0])
    return {"frames": len(feats), "ade_m": float(ade.mean()),
            "traj_max_abs": float(np.abs(got[0] - want[0]).max(initial=0.0)),
            "logits_max_abs": float(np.abs(got[1] - want[1]).max(initial=0.0))}


class VerifyArtifact(Pass[VerifyConfig]):
    """Checks an ONNX artifact; attaches `verification` to its metrics. The file is not touched."""

    name: ClassVar[str] = "verify"
    config_class: ClassVar[type[BaseModel]] = VerifyConfig

    def __init__(self, target: TargetProfile, frames: Features) -> None:
        super().__init__(target)
        if len(frames) == 0:
            raise ValueError("verification needs held-out frames")
        self.frames = frames

    def run(self, model: Artifact, config: VerifyConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        reference = Path(model.reference or model.path)
        rules = check_rules(G.load(model.path), self.target, model.plan or None)
        div = divergence(model.path, reference, self.frames, config.threads)
        numeric_ok = (div["ade_m"] <= config.tolerance_ade_m and div["traj_max_abs"] <= config.tolerance_traj_max_abs
                      and div["maneuver_agreement"] >= config.min_maneuver_agreement)
        host = host_check(model.path, self.frames.take(slice(0, config.reference_frames)), config)
        host_ok = host is None or host["ade_m"] <= config.reference_tolerance_ade_m
        result = {"rules_ok": not rules, "violations": rules, "numeric_ok": numeric_ok, "vs_fp32": div,
                  "host_ok": host_ok, "vs_integer_reference": host, "numerics": numerics_record(),
                  "passed": numeric_ok and host_ok and not rules, "measured_on": "this CPU, onnxruntime"}
        log.log(logging.INFO if result["passed"] else logging.WARNING, "%s verify: rules %s, ADE %.4f m, max %.4f",
                self.target.chip, "ok" if not rules else f"{len(rules)} violations", div["ade_m"],
                div["traj_max_abs"])
        return self.derive(model, config, metrics={**model.metrics, "verification": result},
                           notes=[f"verified: rules {'ok' if not rules else 'VIOLATED'}, numerics "
                                  f"{'ok' if numeric_ok else 'OUT OF TOLERANCE'} on {len(self.frames)} frames"])
