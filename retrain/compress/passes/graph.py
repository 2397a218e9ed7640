"""ONNX graph helpers shared by the passes: operator kinds, precision plans, tensor ranges, shapes at batch 1.

A *plan* maps the name of every compute node of an FP32 planner graph (MatMul, Softmax, LayerNormalization, Add,
...: see `retrain.compress.targets.OP_TYPES_OF_KIND`) to the precision it runs in on the chip: "int8", "int16", "fp16" or
"fp32". Data movement nodes (Reshape, Transpose, ...) are exact in any precision and have no entry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from retrain.compress.targets import INTEGER_PRECISIONS, TargetProfile, op_kind
from shadow.featurize import Features
from shadow.models import session

log = logging.getLogger(__name__)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
INT_TYPE_PRECISION = {TensorProto.INT8: "int8", TensorProto.UINT8: "int8", TensorProto.INT16: "int16",
                      TensorProto.UINT16: "int16", TensorProto.INT32: "int32"}


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            if t:
                out.setdefault(t, []).append(n)
    return out


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def weight_index(node: onnx.NodeProto) -> int | None:
    """Input index of a product's weight operand: B of MatMul/Gemm, W of Conv."""
    return 1 if node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") else None


def weight_axis(node: onnx.NodeProto) -> int:
    """Axis of a product's weight that indexes output channels (the per-channel quantization axis).

    MatMul B is (K, N): axis 1. Gemm B is (N, K) with transB=1, else (K, N). Conv W is (M, C/g, kH, kW): axis 0.
    """
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0


def is_weight_product(node: onnx.NodeProto, inits: dict) -> bool:
    """A MatMul/Gemm/Conv whose weight operand is an initializer (not activation x activation)."""
    i = weight_index(node)
    return i is not None and len(node.input) > i and node.input[i] in inits


def compute_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, kind) of every compute node, in graph order; Q/DQ/Cast and data movement are skipped."""
    out = []
    for n in model.graph.node:
        kind = op_kind(n.op_type)
        if kind is not None:
            out.append((n, kind))
    return out


SHAPE_ONLY_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Unsqueeze", "Squeeze", "Identity"})


def input_products(model: onnx.ModelProto) -> set[str]:
    """Weight products whose activation operand is a graph input, directly or through shape-only operators (the
    embeddings' first layers, which read raw features: metres, m/s, flags, one per-tensor INT8 scale for all)."""
    inits, prods = initializers(model), producers(model)
    inputs = {i.name for i in model.graph.input} - set(inits)
    out = set()
    for node, kind in compute_nodes(model):
        if kind != "matmul" or not is_weight_product(node, inits):
            continue
        t = node.input[0]
        while t in prods and prods[t].op_type in SHAPE_ONLY_OPS:
            t = prods[t].input[0]
        if t in inputs:
            out.add(node.name)
    return out


def default_plan(model: onnx.ModelProto, target: TargetProfile, keep_float: tuple[str, ...] = (),
                 keep_inputs: bool = False) -> dict[str, str]:
    """Every compute node at the chip's default precision for its kind.

    Weight products get the first precision of the matmul ladder (INT8 on every chip here). Activation x activation
    products (attention) get it only when the chip's rules quantize them; otherwise the first non-INT8 precision of
    the ladder. Nodes whose name starts with a `keep_float` prefix start at the highest precision the chip allows.
    With `keep_inputs`, the products fed by raw inputs (`input_products`) start one step up the ladder (FP16 on
    Orin and Ascend, INT16 on Journey 6, FP32 on the CPU).
    """
    inits = initializers(model)
    raw = input_products(model) if keep_inputs else set()
    plan: dict[str, str] = {}
    for node, kind in compute_nodes(model):
        ladder = target.ladder(kind)
        if keep_float and node.name.startswith(keep_float):
            plan[node.name] = ladder[-1]
        elif node.name in raw:
            plan[node.name] = target.fallback(kind, ladder[0]) or ladder[0]
        elif kind == "matmul" and not is_weight_product(node, inits) and not target.numerics.quantize_activation_products:
            plan[node.name] = next((p for p in ladder if p != "int8"), ladder[-1])
        else:
            plan[node.name] = ladder[0]
    if len(plan) != len({n.name for n, _ in compute_nodes(model)}):
        raise ValueError("compute nodes must have unique names for a precision plan")
    return plan


def quantized_nodes(plan: dict[str, str], target: TargetProfile, kinds: dict[str, str]) -> list[str]:
    """Nodes of the plan in an integer precision that the chip could run in a higher one (fallback candidates)."""
    return [n for n, p in plan.items() if p in INTEGER_PRECISIONS and target.fallback(kinds[n], p) is not None]


def kinds_of(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: k for n, k in compute_nodes(model)}


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32/float16 tensors of a model (shape inference fills in the intermediate ones)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {i.name for i in inferred.graph.initializer if i.data_type in FLOAT_TYPES}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.tensor_type.elem_type in FLOAT_TYPES:
            out.add(vi.name)
    return out


def tensor_ranges(model_path: Path, feats: Features, names: list[str], batch: int = 256,
                  threads: int = 2) -> dict[str, tuple[float, float]]:
    """(min, max) of each named intermediate tensor of an FP32 model over the frames of `feats`.

    The graph is extended so the tensors become outputs, then run with onnxruntime batch by batch.
    """
    model = load(model_path)
    inits = initializers(model)
    have = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in inits]
    for n in wanted:
        if n not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    # no graph optimisation: every tensor stays observable
    sess = session(model.SerializeToString(), threads, optimization="disable")
    lo = {n: np.inf for n in wanted}
    hi = {n: -np.inf for n in wanted}
    inputs = feats.inputs()
    for s in range(0, len(feats), batch):
        outs = sess.run(wanted, {k: v[s:s + batch] for k, v in inputs.items()})
        for n, v in zip(wanted, outs):
            if v.size:
                lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    for n in wanted:
        if not np.isfinite(lo[n]):
            lo[n] = hi[n] = 0.0
    for n in names:
        if n in inits:
            w = numpy_helper.to_array(inits[n]).astype(np.float64)
            lo[n], hi[n] = (float(w.min()), float(w.max())) if w.size else (0.0, 0.0)
    return {n: (lo[n], hi[n]) for n in names}


def shapes_at_batch(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor with the dynamic batch axis set to `batch` (shape inference)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param or not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = batch
    for vi in list(m.graph.value_info):
        m.graph.value_info.remove(vi)
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
        elif vi.type.tensor_type.HasField("shape") and len(dims) == 0:
            shapes[vi.name] = ()
    for i in inferred.graph.initializer:
        shapes[i.name] = tuple(i.dims)
    return shapes


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Check and write a model atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path
