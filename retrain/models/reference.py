"""The shipped reference models (package data of `retrain`, read through importlib.resources, so an installed wheel
has them): `teacher`, `student-v0` (INT8, with its torch checkpoint) and `student-v0-fp32`, each a model directory
(model.onnx + spec.json + result.json). `flywheel models build` regenerates them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REFERENCE = "reference"
MODELS = ("teacher", "student-v0", "student-v0-fp32")


def reference_dir(model: str | None = None) -> Path:
    """The directory of the reference models, or of one of them (`MODELS`)."""
    root = Path(str(resources.files("retrain") / REFERENCE))
    if model is None:
        return root
    if model not in MODELS:
        raise KeyError(f"no reference model {model!r}; shipped: {', '.join(MODELS)}")
    return root / model
