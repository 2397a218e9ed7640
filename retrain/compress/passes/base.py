"""What passes hand each other: `Artifact` records, and the `Pass` base class.

Olive-style: a pass is a small class built with the frozen `TargetProfile` it compiles for (and the data it needs),
with a declared pydantic config and one method, `run(model, config, out) -> Artifact`, that writes into `out` and
returns a NEW artifact. It never changes its input: neither the record (frozen) nor the file it points at.

An artifact is a model file (`.onnx`, or a torch checkpoint `.pt` of retrain.models.training.save_checkpoint) with what is
known about it: its spec, the node precision plan, the FP32 model it must agree with, the artifact it came from
and the pass (and config) that made it, and the metrics passes attached (estimates labelled as such).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.targets import TargetProfile
from shadow.spec import ModelSpec, read_spec, sha256_file

log = logging.getLogger(__name__)


class Artifact(BaseModel):
    """One model produced along a compression pipeline (immutable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["torch", "onnx"] = Field(description="torch: checkpoint (.pt); onnx: ONNX file with spec.json")
    path: Path = Field(description="the model file")
    sha256: str = Field(description="sha256 of the file when the artifact was made")
    target: str = Field(description="chip id of the TargetProfile it was made for")
    made_by: str = Field(description="the pass that made it (or 'source')")
    config: dict[str, Any] = Field(default_factory=dict, description="that pass's config, as plain data")
    parent: "Artifact | None" = Field(None, description="the artifact this one was made from")
    spec: ModelSpec | None = Field(None, description="model spec for ONNX artifacts")
    plan: dict[str, str] = Field(default_factory=dict, description="ONNX node name -> precision (int8, int16, fp16, "
                                 "fp32) of every compute node, for artifacts built from a plan")
    reference: Path | None = Field(None, description="the FP32 ONNX model this artifact must agree with")
    metrics: dict[str, Any] = Field(default_factory=dict, description="what passes measured or estimated; keys "
                                    "ending in _estimate are roofline estimates, never measurements")
    notes: list[str] = Field(default_factory=list, description="what was done, in words")

    @classmethod
    def from_file(cls, path: Path, target: str, **kw: Any) -> "Artifact":
        """A source artifact for an existing model file (spec read beside an .onnx when there is one)."""
        path = Path(path)
        kind = "onnx" if path.suffix == ".onnx" else "torch"
        spec = None
        if kind == "onnx":
            try:
                spec = read_spec(path)
            except FileNotFoundError:
                spec = None
        return cls(kind=kind, path=path, sha256=sha256_file(path), target=target, made_by=kw.pop("made_by", "source"),
                   spec=spec, **kw)

    def lineage(self) -> list[str]:
        """Pass names from the source to this artifact."""
        chain, a = [], self
        while a is not None:
            chain.append(a.made_by)
            a = a.parent
        return chain[::-1]

    def find(self, made_by: str) -> "Artifact | None":
        """The nearest ancestor (or self) made by the pass `made_by`."""
        a = self
        while a is not None:
            if a.made_by == made_by:
                return a
            a = a.parent
        return None

    def unchanged(self) -> bool:
        """Whether the file still has the hash recorded when the artifact was made."""
        return self.path.is_file() and sha256_file(self.path) == self.sha256

    def precision_mix(self) -> dict[str, int]:
        """Compute nodes per precision in the plan."""
        mix: dict[str, int] = {}
        for p in self.plan.values():
            mix[p] = mix.get(p, 0) + 1
        return dict(sorted(mix.items()))


C = TypeVar("C", bound=BaseModel)


class Pass(Generic[C]):
    """Base of every pass: built with the target it compiles for, configured per run by `config_class`."""

    name: ClassVar[str] = "pass"
    config_class: ClassVar[type[BaseModel]]
    accepts: ClassVar[tuple[str, ...]] = ("onnx",)

    def __init__(self, target: TargetProfile) -> None:
        if not isinstance(target, TargetProfile):
            raise TypeError(f"{type(self).__name__} needs a TargetProfile, got {type(target).__name__}")
        self.target = target

    def check_input(self, model: Artifact, config: BaseModel) -> None:
        """Refuse an artifact of the wrong kind, for another chip, a changed file or a config of another class."""
        if model.kind not in self.accepts:
            raise ValueError(f"{self.name} takes {self.accepts} artifacts, got {model.kind} ({model.path})")
        if model.target != self.target.chip:
            raise ValueError(f"{self.name} for {self.target.chip} got an artifact made for {model.target}")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        if not model.unchanged():
            raise ValueError(f"{model.path} changed after its artifact was recorded (sha256 differs)")

    def derive(self, model: Artifact, config: BaseModel, **fields: Any) -> Artifact:
        """A new artifact made by this pass from `model` (fields not given are carried over)."""
        path = Path(fields.pop("path", model.path))
        base = {"kind": model.kind, "spec": model.spec, "plan": dict(model.plan), "reference": model.reference,
                "metrics": dict(model.metrics), "notes": []}
        base.update(fields)
        return Artifact(path=path, sha256=sha256_file(path), target=self.target.chip, made_by=self.name,
                        config=config.model_dump(mode="json"), parent=model, **base)

    def run(self, model: Artifact, config: C, out: Path) -> Artifact:  # pragma: no cover - interface
        raise NotImplementedError
