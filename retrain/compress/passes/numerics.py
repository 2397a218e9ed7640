"""The chip's numeric rules for the nodes that are not INT8: FP16 and INT16, emulated so this CPU can verify them.

After `QuantizeInt8` the plan's INT8 nodes carry QDQ pairs and every other node still computes in FP32. This pass
makes each node compute what the chip computes:

- "fp16" (TensorRT mixed precision, Ascend's Vector unit): EMULATED. Every float input is rounded to float16 and
  back (Cast to FLOAT16, Cast to FLOAT) and float weights are stored as float16 with one Cast; the arithmetic then
  runs in FP32 on already-FP16 values, i.e. FP16 storage with FP32 accumulation, as tensor cores accumulate.
- "int16" (Horizon BPU): INT16 QDQ, symmetric (zero point 0): activations per tensor with the scale max|x| / 32767
  from their range over the calibration frames, weights of products per output channel, other float constants
  per tensor. Native QuantizeLinear with int16 needs opset 21 (the J6 profile exports at 21); below that the
  `com.microsoft` contrib Q/DQ are used. Biases of INT16 products stay FP32: they are added to the 32-bit
  accumulator, as on the chip.
- "fp32": nothing to do.

The result is an ONNX graph that onnxruntime runs on this CPU and whose precision per node `VerifyArtifact` reads
back from the graph. Its CPU latency says nothing about the chip (the emulation adds nodes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.targets import TargetProfile, op_kind
from shadow.featurize import Features
from shadow.spec import MODEL_FILE, read_spec, write_spec

log = logging.getLogger(__name__)

INT16_MAX = 32767.0
_TINY = 1e-12


class NumericsConfig(BaseModel):
    """Numeric-rules pass options."""

    model_config = ConfigDict(extra="forbid")

    range_batch: int = Field(256, ge=1, description="frames per batch when measuring INT16 activation ranges")
    threads: int = Field(2, ge=1, description="onnxruntime threads for range measurement")


def _scale(amax: np.ndarray | float) -> np.ndarray:
    return (np.maximum(np.asarray(amax, np.float64), _TINY) / INT16_MAX).astype(np.float32)


class _Builder:
    """Rewrites one graph: inserts emulation nodes before their first consumer, shared by later consumers."""

    def __init__(self, model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> None:
        self.model, self.ranges = model, ranges
        self.inits = G.initializers(model)
        self.floats = G.float_tensors(model)
        self.domain = "" if G.opset(model) >= 21 else "com.microsoft"
        self.made: dict[tuple[str, str], str] = {}
        self.new_inits: list[onnx.TensorProto] = []

    def _init(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def fp16(self, t: str, emit: list) -> str:
        key = (t, "fp16")
        if key not in self.made:
            if t in self.inits:  # weights stored as float16, widened once for the FP32 arithmetic
                half = self._init(f"{t}__fp16", numpy_helper.to_array(self.inits[t]).astype(np.float16))
                emit.append(helper.make_node("Cast", [half], [f"{t}__fp16_f32"], to=TensorProto.FLOAT,
                                             name=f"{t}__fp16_cast"))
                self.made[key] = f"{t}__fp16_f32"
            else:
                emit.append(helper.make_node("Cast", [t], [f"{t}__h"], to=TensorProto.FLOAT16, name=f"{t}__to_fp16"))
                emit.append(helper.make_node("Cast", [f"{t}__h"], [f"{t}__fp16"], to=TensorProto.FLOAT,
                                             name=f"{t}__from_fp16"))
                self.made[key] = f"{t}__fp16"
        return self.made[key]

    def int16(self, t: str, axis: int | None, emit: list) -> str:
        key = (t, "int16")
        if key in self.made:
            return self.made[key]
        zp_of = lambda shape: np.zeros(shape, np.int16)  # noqa: E731  symmetric: zero points are 0
        if t in self.inits:
            w = numpy_helper.to_array(self.inits[t]).astype(np.float64)
            if axis is not None and w.ndim >= 2:
                amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
                scale = _scale(amax)
                shape = [1] * w.ndim
                shape[axis] = -1
                q = np.clip(np.round(w / scale.reshape(shape)), -INT16_MAX, INT16_MAX).astype(np.int16)
                zp, attrs = zp_of(scale.shape), {"axis": axis}
            else:
                scale = _scale(np.abs(w).max(initial=0.0))
                q = np.clip(np.round(w / scale), -INT16_MAX, INT16_MAX).astype(np.int16)
                zp, attrs = zp_of(()), {}
            qn = self._init(f"{t}__i16", q)
            sn, zn = self._init(f"{t}__i16_scale", scale), self._init(f"{t}__i16_zp", zp)
            emit.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [f"{t}__i16_dq"], name=f"{t}__i16_dq",
                                         domain=self.domain, **attrs))
        else:
            if t not in self.ranges:
                raise ValueError(f"no calibrated range for {t}: cannot place it in INT16")
            lo, hi = self.ranges[t]
            sn = self._init(f"{t}__i16_scale", _scale(max(abs(lo), abs(hi))))
            zn = self._init(f"{t}__i16_zp", zp_of(()))
            emit.append(helper.make_node("QuantizeLinear", [t, sn, zn], [f"{t}__i16_q"], name=f"{t}__i16_q",
                                         domain=self.domain))
            emit.append(helper.make_node("DequantizeLinear", [f"{t}__i16_q", sn, zn], [f"{t}__i16_dq"],
                                         name=f"{t}__i16_dq", domain=self.domain))
        self.made[key] = f"{t}__i16_dq"
        return self.made[key]


def int16_activation_inputs(model: onnx.ModelProto, plan: dict[str, str]) -> list[str]:
    """Activation tensors that INT16 nodes read (they need calibrated ranges)."""
    inits, floats = G.initializers(model), G.float_tensors(model)
    return sorted({t for n in model.graph.node if plan.get(n.name) == "int16"
                   for t in n.input if t and t in floats and t not in inits})


def apply_rules(model: onnx.ModelProto, plan: dict[str, str], ranges: dict[str, tuple[float, float]]
                ) -> onnx.ModelProto:
    """A copy of `model` with FP16 emulation and INT16 QDQ around the nodes the plan puts there."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    b = _Builder(m, ranges)
    nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        prec = plan.get(node.name)
        if prec in ("fp16", "int16"):
            kind = op_kind(node.op_type)
            for i, t in enumerate(node.input):
                if not t or t not in b.floats:
                    continue
                if prec == "int16" and node.op_type in ("Gemm", "Conv") and i == 2:
                    continue  # bias joins the 32-bit accumulator
                if prec == "fp16":
                    node.input[i] = b.fp16(t, nodes)
                else:
                    axis = G.weight_axis(node) if kind == "matmul" and i == G.weight_index(node) else None
                    node.input[i] = b.int16(t, axis, nodes)
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(b.new_inits)
    if b.domain == "com.microsoft" and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {t for n in m.graph.node for t in n.input} | {o.name for o in m.graph.output}
    keep = [i for i in m.graph.initializer if i.name in used]  # weights now stored in another precision
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


class ApplyNumericRules(Pass[NumericsConfig]):
    """QDQ (or FP32) ONNX with a plan -> ONNX whose FP16 / INT16 nodes compute as the chip would (emulated)."""

    name: ClassVar[str] = "numeric_rules"
    config_class: ClassVar[type[BaseModel]] = NumericsConfig

    def __init__(self, target: TargetProfile, calibration: Features) -> None:
        super().__init__(target)
        self.calibration = calibration
        self._ranges: dict[str, dict[str, tuple[float, float]]] = {}

    def ranges(self, reference: Path, config: NumericsConfig) -> dict[str, tuple[float, float]]:
        """Calibrated (min, max) of every float activation of the FP32 reference, measured once per reference
        (the QDQ graphs keep the reference's tensor names)."""
        key = str(reference)
        if key not in self._ranges:
            ref = G.load(reference)
            inits = G.initializers(ref)
            names = sorted(t for t in G.float_tensors(ref) if t not in inits)
            self._ranges[key] = G.tensor_ranges(reference, self.calibration, names, config.range_batch,
                                                config.threads)
        return self._ranges[key]

    def run(self, model: Artifact, config: NumericsConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        if not model.plan:
            raise ValueError(f"{model.path} has no precision plan; quantize it first")
        reference = Path(model.reference or model.path)
        src = G.load(model.path)
        need = int16_activation_inputs(src, model.plan)
        ranges = self.ranges(reference, config) if need else {}
        m = apply_rules(src, model.plan, ranges)
        out = Path(out)
        dest = G.save(m, out / MODEL_FILE)
        spec = (model.spec or read_spec(model.path)).model_copy(deep=True)
        mix = {}
        for p in model.plan.values():
            mix[p] = mix.get(p, 0) + 1
        if "int8" not in mix and "fp16" in mix:
            spec.precision = "fp16"  # the spec's precision names the weights' widest use; INT8 wins when present
        spec.extra = {**spec.extra, "made_by": self.name, "precision_mix": mix,
                      "emulation": "FP16 nodes emulated by Cast pairs; INT16 as QDQ" if
                      {"fp16", "int16"} & set(mix) else "none"}
        write_spec(spec, dest)
        n16 = sum(p == "fp16" for p in model.plan.values())
        n_i16 = sum(p == "int16" for p in model.plan.values())
        return self.derive(model, config, path=dest, spec=read_spec(dest),
                           notes=[f"{n16} nodes FP16 (emulated: Cast to float16 and back), {n_i16} nodes INT16 QDQ"])
