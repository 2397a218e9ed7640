"""INT8 quantization pass: onnxruntime static quantization (QDQ) of the plan's INT8 nodes, calibrated on frames.

Input: an FP32 ONNX artifact (or any artifact of the same target, whose `reference` FP32 graph is quantized). The
nodes planned "int8" (by default: every weight product, see `graph.default_plan`) get QuantizeLinear /
DequantizeLinear pairs on their inputs, following the chip's numeric rules:

- weights INT8, symmetric (zero point 0) when the chip says so, one scale per output channel when it says so;
- activations INT8 symmetric (TensorRT, Horizon) or asymmetric (Ascend AMCT: INT8 with an offset; onnxruntime on
  x86: UINT8 with a zero point, what its U8S8 VNNI kernels take), one scale per tensor, from the ranges the
  calibration frames (ordinary plus mined ones, see `calibration_mix`) reach;
- outputs of products are not quantized: the next operator reads them in its own precision (onnxruntime fuses the
  pattern into MatMulIntegerToFloat on x86).

Everything else is left FP32 here; `ApplyNumericRules` then puts FP16 / INT16 nodes into the graph. Calibration
ranges are cached per FP32 model, so the accuracy-aware fallback re-quantizes without re-calibrating.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.targets import TargetProfile
from shadow.featurize import Features
from shadow.spec import MODEL_FILE, read_spec, write_spec

log = logging.getLogger(__name__)

QUANTIZABLE_OPS = ["MatMul", "Gemm", "Conv"]


def calibration_mix(ordinary: Features, mined: Features | None, frames: int, mined_share: float,
                    seed: int) -> Features:
    """Up to `frames` calibration frames: a `mined_share` of them drawn from the mined (divergent) frames, the rest
    from ordinary ones, without replacement; mined frames make sure the long tail's ranges are covered."""
    rng = np.random.default_rng(seed)
    n_mined = min(len(mined), int(round(frames * mined_share))) if mined is not None and len(mined) else 0
    n_ord = min(len(ordinary), frames - n_mined)
    parts = [ordinary.take(np.sort(rng.choice(len(ordinary), n_ord, replace=False)))]
    if n_mined:
        parts.append(mined.take(np.sort(rng.choice(len(mined), n_mined, replace=False))))
    return Features.concat(parts)  # fields one of the parts lacks (targets) become None


class FeatureCalibration(CalibrationDataReader):
    """Feeds featurized frames to onnxruntime's calibrator, `batch` frames at a time."""

    def __init__(self, feats: Features, batch: int) -> None:
        self.inputs, self.batch, self.pos, self.n = feats.inputs(), batch, 0, len(feats)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.n:
            return None
        out = {k: v[self.pos:self.pos + self.batch] for k, v in self.inputs.items()}
        self.pos += self.batch
        return out

    def rewind(self) -> None:
        self.pos = 0


class QuantizeConfig(BaseModel):
    """Static INT8 quantization options."""

    model_config = ConfigDict(extra="forbid")

    calibration_batch: int = Field(256, ge=1, description="frames per calibration batch")
    method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="range calibration method")
    keep_float: list[str] = Field(default_factory=list, description="node-name prefixes kept out of INT8 from the "
                                  "start (at the highest precision the chip allows)")
    keep_input_products: bool = Field(True, description="the products fed by raw model inputs (the embeddings' "
                                      "first layers, `graph.input_products`) start one step up the chip's ladder: "
                                      "one per-tensor INT8 scale over features of mixed units loses the small ones. "
                                      "They are a few percent of the FLOPs; the student v0 recipe keeps them FP32")
    plan: dict[str, str] | None = Field(None, description="node -> precision to quantize by; default: the "
                                        "artifact's plan, else the chip's default plan")


def _detach_foreign_qdq(model, int8: set[str]):
    """Give nodes outside INT8 back their float inputs.

    onnxruntime quantizes a tensor once and rewires every consumer to the DequantizeLinear output, also consumers
    that were not asked to be quantized (here: the trajectory and maneuver heads share the final norm's output). A
    node the plan keeps out of INT8 must read the unquantized tensor; Q/DQ pairs left without a consumer go.
    """
    prods = G.producers(model)
    for node, _ in G.compute_nodes(model):
        if node.name in int8:
            continue
        for i, t in enumerate(node.input):
            dq = prods.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prods.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    while True:  # drop Q/DQ nodes nobody reads any more
        used = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {t for n in model.graph.node for t in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def _features_hash(feats: Features) -> str:
    h = hashlib.sha256()
    for v in feats.inputs().values():
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def quantize_qdq(source: Path, dest: Path, calibration: Features, batch: int, nodes: list[str], ops: list[str],
                 per_channel: bool, activation_type: QuantType, method: str, weight_symmetric: bool = True,
                 activation_symmetric: bool | None = None, cache: Path | None = None) -> None:
    """onnxruntime static quantization (QDQ, INT8 weights) of `nodes` (of the op types `ops`), calibrated on
    `calibration` in batches of `batch` frames with `method`: the one call of it in the project (this pass and the
    student recipe). Products hand float results to the next operator (MatMulIntegerToFloat on x86). `cache`: where
    the calibrated ranges are kept (onnxruntime's calibration cache)."""
    extra = {"WeightSymmetric": weight_symmetric, "OpTypesToExcludeOutputQuantization": ops}
    if activation_symmetric is not None:
        extra["ActivationSymmetric"] = activation_symmetric
    quantize_static(str(source), str(dest), FeatureCalibration(calibration, batch), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=ops, nodes_to_quantize=nodes, per_channel=per_channel, reduce_range=False,
                    activation_type=activation_type, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method], extra_options=extra,
                    **({"calibration_cache_path": cache} if cache is not None else {}))


class QuantizeInt8(Pass[QuantizeConfig]):
    """FP32 ONNX -> QDQ ONNX with the plan's INT8 nodes quantized by onnxruntime."""

    name: ClassVar[str] = "quantize_int8"
    config_class: ClassVar[type[BaseModel]] = QuantizeConfig

    def __init__(self, target: TargetProfile, calibration: Features, cache_dir: Path | None = None) -> None:
        super().__init__(target)
        if len(calibration) == 0:
            raise ValueError("quantization needs calibration frames")
        self.calibration = calibration
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="calib-")
        self.cache_dir = Path(cache_dir or self._tmp.name)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._data_hash = _features_hash(calibration)

    def run(self, model: Artifact, config: QuantizeConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        reference = Path(model.reference or model.path)
        fp32 = G.load(reference)
        plan = dict(config.plan or model.plan or
                    G.default_plan(fp32, self.target, tuple(config.keep_float), config.keep_input_products))
        int8 = [n for n, p in plan.items() if p == "int8"]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / MODEL_FILE
        num = self.target.numerics
        if int8:
            ref_sha = model.find("export_onnx").sha256 if model.find("export_onnx") else model.sha256
            cache = self.cache_dir / f"calib-{ref_sha[:12]}-{self._data_hash}-{config.method}.json"
            tmp = out / ".ort-quantized.onnx"
            quantize_qdq(reference, tmp, self.calibration, config.calibration_batch, int8, QUANTIZABLE_OPS,
                         per_channel=num.weight_per_channel,
                         activation_type=QuantType.QInt8 if num.activation_signed else QuantType.QUInt8,
                         method=config.method, weight_symmetric=num.weight_symmetric,
                         activation_symmetric=num.activation_symmetric, cache=cache)
            G.save(_detach_foreign_qdq(G.load(tmp), set(int8)), dest)
            tmp.unlink()
        else:
            shutil.copyfile(reference, dest)
        src = model.spec or read_spec(reference)
        spec = src.model_copy(update={"precision": "int8" if int8 else src.precision, "extra": {
            **src.extra, "target": self.target.chip, "made_by": self.name, "int8_nodes": int8,
            "quantization": {"format": "QDQ", "weights": "INT8 " + ("symmetric" if num.weight_symmetric else
                                                                     "asymmetric") +
                             (" per-channel" if num.weight_per_channel else " per-tensor"),
                             "activations": ("INT8" if num.activation_signed else "UINT8") +
                             (" symmetric" if num.activation_symmetric else " asymmetric") + " per-tensor",
                             "calibration": config.method, "calibration_frames": len(self.calibration)}}})
        write_spec(spec, dest)
        log.info("%s: %d nodes quantized to INT8", self.target.chip, len(int8))
        return self.derive(model, config, path=dest, spec=read_spec(dest), plan=plan, reference=reference,
                           notes=[f"{len(int8)} products INT8 (onnxruntime static QDQ, {config.method} on "
                                  f"{len(self.calibration)} frames); other nodes still FP32 until numeric rules"])
