"""Matrix-multiply FLOPs per frame of an ONNX planner, counted from the graph (not estimated from the architecture).

    graph_flops("retrain/reference/teacher")   # {"total": 1.17e8, "MatMul": ..., "Gemm": ...}

Every MatMul, Gemm and integer matrix product (MatMulInteger, QLinearMatMul, MatMulIntegerToFloat) at batch 1, with
shapes from ONNX shape inference, 2 FLOPs per multiply-add. Elementwise work (bias, GELU, LayerNorm, softmax) is not
counted: the figure is what a matrix-multiply rate should be compared with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from shadow.spec import model_file


def graph_flops(path: Path) -> dict[str, float]:
    """MatMul-like FLOPs per frame of an ONNX planner (batch 1): {"total": ..., per op type ...}."""
    model = onnx.load(str(model_file(path)))
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
                d.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    out: dict[str, float] = {"total": 0.0}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat"):
            continue
        a_name, b_name = (node.input[0], node.input[3]) if node.op_type == "QLinearMatMul" else node.input[:2]
        a, b = shapes.get(a_name), shapes.get(b_name)
        # reshapes to -1 leave the batch axis unknown (0) after inference: it is 1 here
        a = [d or 1 for d in a[:-1]] + a[-1:] if a else a
        b = [d or 1 for d in b[:-2]] + b[-2:] if b else b
        if not a or not b or 0 in a or 0 in b:
            raise RuntimeError(f"{path}: no static shape for {node.name} ({a_name}: {a}, {b_name}: {b})")
        if node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            mm, kk = (a[1], a[0]) if trans_a else (a[0], a[1])
            trans_b = any(at.name == "transB" and at.i for at in node.attribute)
            nn = b[0] if trans_b else b[1]
            f = 2.0 * mm * kk * nn
        else:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])) if len(a) > 2 or len(b) > 2 else ()
            f = 2.0 * float(np.prod(batch)) * (a[-2] if len(a) > 1 else 1) * a[-1] * b[-1]
        out["total"] += f
        out[node.op_type] = out.get(node.op_type, 0.0) + f
    return out
