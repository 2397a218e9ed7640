"""A torch Planner rebuilt from its FP32 ONNX export, for a student (or teacher) registered without a checkpoint.

    model = planner_from_onnx(Path("registry/student-fp32/v0"))
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from retrain.models.architectures import Planner, PlannerConfig
from retrain.models.evaluate import predict
from retrain.models.training import torch_predict
from shadow.featurize import INPUT_SHAPES, Features
from shadow.models import session
from shadow.spec import model_file, read_spec

log = logging.getLogger(__name__)


class PlannerImportError(RuntimeError):
    """An ONNX file a Planner cannot be rebuilt from: no architecture in its spec, not FP32, weights not found, or
    the rebuilt model does not reproduce the graph."""


def planner_from_onnx(path: Path) -> Planner:
    """Rebuild a torch Planner from an FP32 ONNX file exported by `retrain.models.architectures.export_onnx`: the spec's
    architecture plus the weights read from the graph (Gemm/MatMul/Add/LayerNormalization initializers, found by
    the exporter's node names). Checked: both must give the same outputs; PlannerImportError otherwise."""
    onnx_path = model_file(Path(path))
    spec = read_spec(onnx_path)
    if not spec.architecture:
        raise PlannerImportError(f"{onnx_path}: its spec has no architecture; a torch checkpoint is needed")
    if spec.precision != "fp32":
        raise PlannerImportError(f"{onnx_path}: weights are {spec.precision}; only an FP32 export can be read back")
    model = Planner(PlannerConfig.model_validate(spec.architecture))
    graph = onnx.load(str(onnx_path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    found: dict[str, np.ndarray] = {}
    for node in graph.node:
        parts = node.name.strip("/").split("/")[:-1]
        module = ""
        # "/ego_embed/ego_embed.0/Gemm" -> ego_embed.0; "/layers.0/attn/qkv/MatMul" -> layers.0.attn.qkv
        for p in parts:
            module = p if (module and p.startswith(module + ".")) or not module else f"{module}.{p}"
        weights = [i for i in node.input if i in init]
        if node.op_type == "Gemm" and len(weights) == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            found[f"{module}.weight"] = init[weights[0]] if trans_b else init[weights[0]].T
            found[f"{module}.bias"] = init[weights[1]]
        elif node.op_type == "MatMul" and len(weights) == 1:
            found[f"{module}.weight"] = init[weights[0]].T
        elif node.op_type == "Add" and len(weights) == 1 and f"{module}.weight" in found:
            found[f"{module}.bias"] = init[weights[0]]
        elif node.op_type == "LayerNormalization" and len(weights) == 2:
            found[f"{module}.weight"], found[f"{module}.bias"] = init[weights[0]], init[weights[1]]
    state = model.state_dict()
    missing = sorted(set(state) - set(found))
    if missing:
        raise PlannerImportError(f"{onnx_path}: could not find {len(missing)} weights in the graph (e.g. {missing[:3]}); "
                            "a torch checkpoint is needed")
    model.load_state_dict({k: torch.from_numpy(np.array(found[k], np.float32)).reshape(v.shape)
                           for k, v in state.items()})
    rng = np.random.default_rng(0)
    probe = Features(**{k: rng.standard_normal((4, *v.shape[1:])).astype(np.float32)
                        for k, v in _zero_inputs().items()}, lighting=np.zeros(4, np.int32),
                     weather=np.zeros(4, np.int32), road_type=np.zeros(4, np.int32))
    probe.agent_mask = np.ones_like(probe.agent_mask)
    a, b = predict(session(onnx_path, 1), probe), torch_predict(model, probe)
    err = max(float(np.abs(a[0] - b[0]).max()), float(np.abs(a[1] - b[1]).max()))
    if not np.isfinite(err) or err > 1e-3:
        raise PlannerImportError(f"{onnx_path}: weights read back from the graph do not reproduce it (max diff {err:.2e})")
    log.info("rebuilt %s:%s from its FP32 ONNX (max diff %.1e)", spec.name, spec.version, err)
    return model.eval()


def _zero_inputs() -> dict[str, np.ndarray]:
    return {k: np.zeros((1, *s), np.float32) for k, s in INPUT_SHAPES.items()}
