"""Compression passes, Olive-style: each a small class built with the `TargetProfile` it compiles for, with a
declared pydantic config and one method `run(model: Artifact, config, out: Path) -> Artifact` that returns a new
artifact and never changes its input.

    prune.PruneToBudget        torch -> torch   structured pruning (heads, FFN) to the size / latency budgets
    export.ExportOnnx          torch -> onnx    FP32 ONNX at the target's opset: the target's reference model
    quantize.QuantizeInt8      onnx  -> onnx    onnxruntime static QDQ INT8 of the plan's INT8 nodes
    numerics.ApplyNumericRules onnx  -> onnx    FP16 (emulated) and INT16 QDQ nodes as the chip runs them
    fallback.AccuracyAwareFallback onnx -> onnx reverts the most sensitive quantized nodes until within tolerance
    roofline.RooflinePass      onnx  -> onnx    attaches a roofline latency ESTIMATE (file untouched)
    verify.VerifyArtifact      onnx  -> onnx    checks the chip's rules in the graph and the error vs FP32
"""

from retrain.compress.passes.base import Artifact, Pass
from retrain.compress.passes.export import ExportConfig, ExportOnnx
from retrain.compress.passes.fallback import AccuracyAwareFallback, FallbackConfig
from retrain.compress.passes.numerics import ApplyNumericRules, NumericsConfig
from retrain.compress.passes.prune import PruneConfig, PruneToBudget
from retrain.compress.passes.quantize import QuantizeConfig, QuantizeInt8, calibration_mix
from retrain.compress.passes.roofline import RooflineConfig, RooflineEstimate, RooflinePass
from retrain.compress.passes.verify import VerifyArtifact, VerifyConfig, check_rules, node_precisions

__all__ = ["AccuracyAwareFallback", "ApplyNumericRules", "Artifact", "ExportConfig", "ExportOnnx", "FallbackConfig",
           "NumericsConfig", "Pass", "PruneConfig", "PruneToBudget", "QuantizeConfig", "QuantizeInt8",
           "RooflineConfig", "RooflineEstimate", "RooflinePass", "VerifyArtifact", "VerifyConfig",
           "calibration_mix", "check_rules", "node_precisions"]
