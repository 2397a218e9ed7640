"""ONNX export pass: torch checkpoint in, FP32 ONNX (the target's reference model) out.

The planner is exported with `retrain.models.architectures.export_onnx` (dynamic batch, readable node names), then
prepared the way onnxruntime's quantizer advises (`quant_pre_process`: shape inference and graph optimisation),
then converted to the target's ONNX opset (21 where native INT16 QuantizeLinear is needed). This FP32 graph is
the reference every later artifact of the target is compared with, and its node names are the keys of plans.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import ClassVar

import onnx
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict, Field

from retrain.models.architectures import export_onnx
from retrain.compress.passes import graph as G
from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.targets import TargetProfile
from retrain.models.training import load_checkpoint
from shadow.spec import MODEL_FILE, ModelSpec, read_spec, write_spec

log = logging.getLogger(__name__)


class ExportConfig(BaseModel):
    """ONNX export options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("student", description="model name in the spec")
    version: str = Field("v0", description="model version in the spec")
    preprocess: bool = Field(True, description="run onnxruntime's quantization pre-processing (shape inference, "
                             "graph optimisation) on the export")


class ExportOnnx(Pass[ExportConfig]):
    """torch checkpoint -> FP32 ONNX with spec, at the target's opset."""

    name: ClassVar[str] = "export_onnx"
    config_class: ClassVar[type[BaseModel]] = ExportConfig
    accepts: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self, target: TargetProfile) -> None:
        super().__init__(target)

    def run(self, model: Artifact, config: ExportConfig, out: Path) -> Artifact:
        self.check_input(model, config)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        planner = load_checkpoint(model.path)
        dest = out / MODEL_FILE
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            raw = export_onnx(planner, Path(tmp) / "raw.onnx")
            if config.preprocess:
                quant_pre_process(str(raw), str(Path(tmp) / "pre.onnx"))
                raw = Path(tmp) / "pre.onnx"
            m = G.load(raw)
            if G.opset(m) != self.target.onnx_opset:
                m = onnx.version_converter.convert_version(m, self.target.onnx_opset)
            G.save(m, dest)
        spec = ModelSpec(name=config.name, version=config.version, precision="fp32",
                         parameters=planner.num_parameters(), architecture=planner.config.model_dump(),
                         extra={"target": self.target.chip, "opset": self.target.onnx_opset,
                                "made_by": self.name, "checkpoint_sha256": model.sha256})
        write_spec(spec, dest)
        log.info("%s: exported %d parameters to %s (opset %d)", self.target.chip, planner.num_parameters(), dest,
                 self.target.onnx_opset)
        return self.derive(model, config, kind="onnx", path=dest, spec=read_spec(dest), plan={}, reference=dest,
                           notes=[f"FP32 ONNX, opset {self.target.onnx_opset}, pre-processed={config.preprocess}"])
