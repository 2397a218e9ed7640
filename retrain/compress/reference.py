"""An integer reference of a chip artifact, independent of onnxruntime: what the artifact means, computed in numpy.

    run = IntegerReference(Path("compress/orin/fallback/model.onnx"))
    traj, logits = run(features.inputs())                 # (N, T, 3), (N, 6) float32

A chip artifact is a QDQ ONNX graph (see `retrain.compress.passes.quantize` and `numerics`): INT8 / INT16 operands
arrive at products through DequantizeLinear, FP16 nodes read Cast-to-float16-and-back values, the rest is FP32. Its
meaning is the chip's: integer operands multiplied and accumulated exactly (32-bit accumulators do not overflow at
these depths), then scaled. The reference rewrites every product whose two operands both come from a
DequantizeLinear into one `IntegerProduct`: (q_a - zp_a) @ (q_b - zp_b) in int64, exact, times s_a * s_b in float64
(per output channel for per-channel weights), plus the bias of a Gemm. Everything else is executed by `onnx.reference`
(the ONNX specification's numpy evaluator): quantization (round half to even, saturation), Cast to float16 (round to
nearest even), normalisation, softmax. onnxruntime is not involved, so comparing a session's outputs with it tells
whether the runtime computes the artifact's integer semantics on this host (`shadow.numerics`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from shadow.spec import model_file

DOMAIN = "flywheel.reference"
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class IntegerProduct(OpRun):
    """(q_a - zp_a) @ op(q_b - zp_b) exactly in int64, then * s_a * s_b (+ bias): MatMul (trans_b 0) or Gemm."""

    op_domain = DOMAIN

    def _run(self, qa, sa, za, qb, sb, zb, bias=None, trans_b=0, axis_b=1):  # noqa: D102 (onnx.reference API)
        a = qa.astype(np.int64) - np.asarray(za, np.int64)
        b = qb.astype(np.int64)
        zb = np.asarray(zb, np.int64)
        sb = np.asarray(sb, np.float64)
        if zb.ndim == 1 and b.ndim == 2:  # per-channel zero points and scales along axis_b
            shape = [1, 1]
            shape[axis_b] = -1
            b = b - zb.reshape(shape)
        else:
            b = b - zb
        if trans_b:
            b = np.swapaxes(b, -1, -2)
        acc = np.matmul(a, b)  # int64: exact
        # per-channel scales index the output channel, the last axis of the product either way
        y = acc.astype(np.float64) * np.float64(sa) * sb
        if bias is not None:
            y = y + bias.astype(np.float64)
        return (y.astype(np.float32),)


class MsQuantizeLinear(OpRun):
    """com.microsoft QuantizeLinear (int8/uint8/int16/uint16 by the zero point's type), per tensor or per axis."""

    op_domain = "com.microsoft"

    def _run(self, x, scale, zero_point=None, axis=1):  # noqa: D102
        dtype = zero_point.dtype if zero_point is not None else np.uint8
        info = np.iinfo(dtype)
        s, z = _per_axis(np.asarray(scale), x.ndim, axis), _per_axis(
            np.asarray(zero_point if zero_point is not None else 0), x.ndim, axis)
        q = np.rint(x.astype(np.float64) / s) + z  # rint: round half to even, as ONNX specifies
        return (np.clip(q, info.min, info.max).astype(dtype),)


class MsDequantizeLinear(OpRun):
    """com.microsoft DequantizeLinear."""

    op_domain = "com.microsoft"

    def _run(self, x, scale, zero_point=None, axis=1):  # noqa: D102
        s = _per_axis(np.asarray(scale), x.ndim, axis)
        z = _per_axis(np.asarray(zero_point if zero_point is not None else 0), x.ndim, axis)
        return (((x.astype(np.float64) - z) * s).astype(np.float32),)


def _per_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 1 and v.size > 1:
        shape = [1] * ndim
        shape[axis] = -1
        return v.reshape(shape)
    return v


def integerize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose MatMul/Gemm nodes fed by two DequantizeLinear outputs are IntegerProduct nodes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    prods = {o: n for n in m.graph.node for o in n.output}
    nodes = []
    for node in m.graph.node:
        dqs = [prods.get(t) for t in node.input[:2]]
        if (node.op_type in ("MatMul", "Gemm") and all(d is not None and d.op_type == "DequantizeLinear"
                                                       and d.domain in QDQ_DOMAINS for d in dqs)
                and not _attr(node, "transA", 0) and float(_attr(node, "alpha", 1.0)) == 1.0
                and float(_attr(node, "beta", 1.0)) == 1.0):
            a, b = dqs
            inputs = [a.input[0], a.input[1], a.input[2] if len(a.input) > 2 else "",
                      b.input[0], b.input[1], b.input[2] if len(b.input) > 2 else ""]
            if node.op_type == "Gemm" and len(node.input) > 2:
                inputs.append(node.input[2])
            nodes.append(helper.make_node("IntegerProduct", inputs, list(node.output), name=node.name,
                                          domain=DOMAIN, trans_b=int(_attr(node, "transB", 0)),
                                          axis_b=int(_attr(b, "axis", 1))))
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    for o in m.opset_import:
        # onnx.reference implements Q/DQ from opset 19; from 17 to 19 nothing changed for int8/uint8 Q/DQ nor for
        # the other operators of these graphs (only float8 types and attributes with unchanged defaults were added)
        if o.domain in ("", "ai.onnx") and o.version < 19:
            o.version = 19
    return m


class IntegerReference:
    """Evaluates a chip artifact with exact integer products; call with model inputs by name -> (traj, logits)."""

    def __init__(self, model: Path | onnx.ModelProto) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model_file(Path(model))))
        self.model = integerize(proto)
        self.products = sum(n.op_type == "IntegerProduct" for n in self.model.graph.node)
        self.evaluator = ReferenceEvaluator(self.model, new_ops=[IntegerProduct, MsQuantizeLinear,
                                                                 MsDequantizeLinear])
        self.outputs = [o.name for o in proto.graph.output]

    def __call__(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ("trajectory", "maneuver_logits")
                 ) -> list[np.ndarray]:
        return self.evaluator.run(list(outputs), inputs)


def runtime_vs_reference(model: Path, inputs: dict[str, np.ndarray], threads: int = 1) -> dict:
    """onnxruntime on this host against the integer reference on `inputs`: mean displacement of the trajectories
    (m) and the largest differences of both heads, with the kernel onnxruntime used here:
    {"frames", "integer_products", "ade_m", "traj_max_abs", "logits_max_abs", "int8_kernel"}."""
    from shadow.models import session
    from shadow.numerics import int8_kernel

    ref = IntegerReference(Path(model))
    got = session(Path(model), threads, verify=False).run(["trajectory", "maneuver_logits"], inputs)
    want = ref(inputs)
    ade = np.hypot(got[0][..., 0] - want[0][..., 0], got[0][..., 1] - want[0][..., 1]).mean()
    return {"frames": int(next(iter(inputs.values())).shape[0]), "integer_products": ref.products,
            "ade_m": float(ade), "traj_max_abs": float(np.abs(got[0] - want[0]).max(initial=0.0)),
            "logits_max_abs": float(np.abs(got[1] - want[1]).max(initial=0.0)), "int8_kernel": int8_kernel()}
