"""Model specs: what an ONNX planner file is, what it eats and what it returns, stored as `spec.json` beside it.

A model directory holds `model.onnx` and `spec.json` (the registry uses the same layout per version). The spec
names the featurizer version the model was trained with, its input and output tensors (batch axis "batch"), the
meaning of each output head, and the sha256 of the .onnx file so a runner refuses a file that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import write_text_atomic
from ingest.versions import check_version
from shadow import featurize as fz

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
MODEL_FILE = "model.onnx"
SPEC_FORMAT_VERSION = 1


class TensorSpec(BaseModel):
    """One graph input or output. `shape` uses the string "batch" for the dynamic leading axis."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="ONNX tensor name")
    dtype: Literal["float32", "int64", "bool"] = Field("float32", description="element type")
    shape: list[int | str] = Field(description='dimensions, "batch" for the dynamic one')
    role: str = Field("", description="for outputs: trajectory | maneuver_logits; for inputs: the feature group")
    units: str = Field("", description="units and layout in words")


class ModelSpec(BaseModel):
    """Everything needed to run a planner ONNX file correctly and to tell which one it is."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(SPEC_FORMAT_VERSION, description="version of this spec format")
    name: str = Field(description="model name, e.g. teacher, student")
    version: str = Field(description="model version, e.g. v0")
    featurizer: str = Field("flywheel", description="registered featurizer plug-in the inputs come from (entry "
                            "point of flywheel.featurizers, shadow.plugins)")
    featurizer_version: str = Field(fz.FEATURIZER_VERSION, description="version of that featurizer")
    planner: str = Field("", description="registered planner plug-in that builds the model's torch module (entry "
                         "point of flywheel.planners, retrain.models.plugins); empty: the project's Planner")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="numeric precision of the weights")
    inputs: list[TensorSpec] = Field(default_factory=lambda: default_inputs(), description="graph inputs")
    outputs: list[TensorSpec] = Field(default_factory=lambda: default_outputs(), description="graph outputs")
    horizon: int = Field(fz.HORIZON, description="trajectory waypoints T")
    horizon_dt_s: float = Field(fz.HORIZON_DT_S, description="time between waypoints, s")
    sha256: str = Field("", description="sha256 of the .onnx file, hex")
    size_bytes: int = Field(0, description="size of the .onnx file")
    parameters: int = Field(0, description="number of weights (before quantization)")
    flops_per_frame: int = Field(0, description="FLOPs (2 per multiply-accumulate) of one frame's forward pass; "
                                 "0 when unknown")
    architecture: dict = Field(default_factory=dict, description="PlannerConfig of the model, when built here")
    extra: dict = Field(default_factory=dict, description="free-form facts: recipe, metrics, quantization options")

    def output(self, role: str) -> TensorSpec:
        for o in self.outputs:
            if o.role == role:
                return o
        raise KeyError(f"{self.name}:{self.version} has no {role} output")


def default_inputs() -> list[TensorSpec]:
    return [
        TensorSpec(name="ego_hist", shape=["batch", fz.HISTORY, fz.EGO_FEATURES], role="ego_history",
                   units="ego frame, normalised; see shadow.featurize"),
        TensorSpec(name="agents", shape=["batch", fz.MAX_AGENTS, fz.AGENT_FEATURES], role="agents",
                   units="ego frame, normalised; see shadow.featurize"),
        TensorSpec(name="agent_mask", shape=["batch", fz.MAX_AGENTS], role="agent_mask", units="1 valid, 0 padding"),
        TensorSpec(name="lane", shape=["batch", fz.LANE_FEATURES], role="lane", units="normalised"),
    ]


def default_outputs() -> list[TensorSpec]:
    return [
        TensorSpec(name="trajectory", shape=["batch", fz.HORIZON, 3], role="trajectory",
                   units="x, y in m and yaw in rad, current ego frame (x forward, y left), t = dt..T*dt"),
        TensorSpec(name="maneuver_logits", shape=["batch", fz.NUM_MANEUVERS], role="maneuver_logits",
                   units="unnormalised scores of the Maneuver enum values 0..5"),
    ]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def spec_path(model_path: Path) -> Path:
    """Where the spec of a model lives: `spec.json` in the .onnx file's directory (or in the directory given)."""
    p = Path(model_path)
    return p / SPEC_FILE if p.is_dir() else p.parent / SPEC_FILE


def write_spec(spec: ModelSpec, model_path: Path) -> Path:
    """Fill in the file's hash and size, then write spec.json beside it atomically; returns the spec path."""
    model_path = Path(model_path)
    spec.sha256 = sha256_file(model_path)
    spec.size_bytes = model_path.stat().st_size
    out = spec_path(model_path)
    write_text_atomic(out, spec.model_dump_json(indent=2))
    return out


def read_spec(model_path: Path, verify: bool = True) -> ModelSpec:
    """Load the spec of a model (a .onnx path or its directory); with `verify`, check the file's sha256."""
    path = spec_path(model_path)
    raw = json.loads(path.read_text())
    # checked before the fields: another version may have other ones (a spec without the key predates versions: 1)
    check_version(path, "model spec", raw.get("format_version", 1) if isinstance(raw, dict) else None,
                  SPEC_FORMAT_VERSION)
    spec = ModelSpec.model_validate(raw)
    if verify:
        onnx_file = model_file(model_path)
        actual = sha256_file(onnx_file)
        if actual != spec.sha256:
            raise ValueError(f"{onnx_file}: sha256 {actual} does not match its spec ({spec.sha256})")
    return spec


def model_file(model_path: Path) -> Path:
    p = Path(model_path)
    return p / MODEL_FILE if p.is_dir() else p
