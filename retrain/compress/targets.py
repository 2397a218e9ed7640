"""Target chip profiles: what a chip computes in which precision, its budgets and its datasheet figures.

A profile is a TOML file `deploy/targets/<chip>.toml` loaded into a frozen `TargetProfile`. The shipped profiles are
package data of `retrain.compress` (`retrain/compress/profiles/`, which `deploy/targets` links to), read through
importlib.resources, so an installed wheel has them:

    from retrain.compress.targets import load_target, load_targets
    orin = load_target("orin")                  # deploy/targets/orin.toml
    every = load_targets()                      # {chip: TargetProfile} for every file in deploy/targets/

What a profile says:

- `precisions`: for each operator kind (weight and activation products, softmax, normalisation, other elementwise
  arithmetic) the precisions the chip's toolchain runs it in, best first. The first is what a node of that kind
  gets; the later ones are where the accuracy-aware fallback may move it. Data movement (reshape, transpose,
  concat, gather, ...) carries whatever precision reaches it and is not listed.
- `numerics`: how INT8 is encoded (per-channel or per-tensor symmetric weights; signed symmetric or unsigned
  asymmetric activations), and whether activation x activation products (attention) are quantized.
- `budget`: batch-1 latency and artifact size a deployment must stay within.
- `roofline`: peak dense compute per precision and DRAM bandwidth, each a `Figure` naming its public source and
  whether it is a datasheet value, an announced one, measured here, or an assumption. Estimates built from them
  are labelled `estimate` everywhere.

A profile that is missing a key, has an unknown one or a value out of range raises `TargetError` naming the file
and the key (e.g. `roofline.memory_bandwidth.value`).
"""

from __future__ import annotations

import logging
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

PROFILES = "profiles"  # the shipped profiles: package data of retrain.compress (deploy/targets links to it)


def targets_dir() -> Path:
    """The directory of the shipped target profiles, read through importlib.resources (a wheel carries them)."""
    return Path(str(resources.files("retrain.compress") / PROFILES))


TARGETS_DIR = targets_dir()

Precision = Literal["int8", "int16", "fp16", "fp32"]
OpKind = Literal["matmul", "softmax", "norm", "elementwise"]
OP_KINDS: tuple[str, ...] = ("matmul", "softmax", "norm", "elementwise")
INTEGER_PRECISIONS = frozenset({"int8", "int16"})
BYTES_PER_ELEMENT: dict[str, int] = {"int8": 1, "int16": 2, "fp16": 2, "fp32": 4}

# ONNX operator types by kind. Anything not listed here and not in DATA_MOVEMENT is refused by the passes: an
# operator nobody classified cannot be placed on a chip.
OP_TYPES_OF_KIND: dict[str, frozenset[str]] = {
    "matmul": frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"}),
    "softmax": frozenset({"Softmax", "LogSoftmax"}),
    "norm": frozenset({"LayerNormalization", "BatchNormalization", "InstanceNormalization",
                       "SimplifiedLayerNormalization"}),
    "elementwise": frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Gelu", "Tanh", "Sigmoid", "Relu", "Exp", "Sqrt",
                              "Pow", "Neg", "Abs", "Max", "Min", "Clip", "Where", "ReduceMean", "ReduceSum"}),
}
# Pure data movement: exact in any precision, so no precision rule applies to it.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Split", "Concat", "Slice", "Gather", "Unsqueeze", "Squeeze",
                           "Flatten", "Pad", "Identity", "Expand", "Shape", "Constant", "ConstantOfShape", "Range",
                           "Cast", "QuantizeLinear", "DequantizeLinear"})
_KIND_OF_OP = {op: kind for kind, ops in OP_TYPES_OF_KIND.items() for op in ops}


class TargetError(ValueError):
    """A target profile that cannot be used; the message names the file and the offending key."""


def op_kind(op_type: str) -> str | None:
    """The kind of an ONNX operator type ("matmul", ...), None for data movement; raises for unknown types."""
    if op_type in _KIND_OF_OP:
        return _KIND_OF_OP[op_type]
    if op_type in DATA_MOVEMENT:
        return None
    raise TargetError(f"operator type {op_type!r} has no kind: add it to retrain.compress.targets.OP_TYPES_OF_KIND "
                      "or DATA_MOVEMENT")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Figure(_Frozen):
    """One number from outside this code, with where it comes from."""

    value: float = Field(gt=0, description="the figure, in the unit its field names")
    basis: Literal["datasheet", "announced", "measured", "assumed"] = Field(
        description="datasheet: vendor datasheet or product brief; announced: vendor launch figure without a "
                    "datasheet; measured: measured on this machine (bench/targets.py); assumed: our assumption")
    source: str = Field(min_length=3, description="the public document (or measurement) the value comes from")


class OpPrecisions(_Frozen):
    """Precisions a chip runs each operator kind in, best (fastest) first; the first is the default."""

    matmul: list[Precision] = Field(min_length=1, description="MatMul / Gemm / Conv")
    softmax: list[Precision] = Field(min_length=1, description="Softmax")
    norm: list[Precision] = Field(min_length=1, description="LayerNormalization and other normalisations")
    elementwise: list[Precision] = Field(min_length=1, description="Add, Mul, Div, Erf (GELU), ...")

    @field_validator("matmul", "softmax", "norm", "elementwise")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"precisions listed twice: {v}")
        return v


class NumericRules(_Frozen):
    """How INT8 is encoded on the chip."""

    weight_per_channel: bool = Field(description="one weight scale per output channel (else one per tensor)")
    weight_symmetric: bool = Field(description="weight zero points are 0")
    activation_signed: bool = Field(description="activations are int8 (else uint8)")
    activation_symmetric: bool = Field(description="activation zero points are 0 (else calibrated, asymmetric)")
    quantize_activation_products: bool = Field(
        False, description="also quantize activation x activation MatMuls (attention scores and context)")
    fp16_emulated: bool = Field(True, description="FP16 nodes are emulated on this CPU (Cast to float16 and back "
                                "around their inputs, FP16-stored weights); always true here, recorded for reports")


class Budget(_Frozen):
    """What a deployment on this chip must stay within."""

    latency_ms: float = Field(gt=0, description="planner latency budget, batch 1, milliseconds")
    size_bytes: int = Field(gt=0, description="artifact size budget, bytes")


class ComputePeaks(_Frozen):
    """Peak dense compute per precision: TOPS for integers, TFLOPS for floats (10^12 operations per second)."""

    int8: Figure | None = Field(None, description="dense INT8 TOPS")
    int16: Figure | None = Field(None, description="dense INT16 TOPS")
    fp16: Figure | None = Field(None, description="dense FP16 TFLOPS")
    fp32: Figure | None = Field(None, description="dense FP32 TFLOPS")


class Roofline(_Frozen):
    """Datasheet figures for a roofline latency estimate."""

    compute: ComputePeaks = Field(description="peak dense compute per precision")
    memory_bandwidth: Figure = Field(description="DRAM bandwidth, GB/s (10^9 bytes per second)")
    kernel_overhead_us: Figure | None = Field(
        None, description="fixed cost per launched kernel (MatMul, Softmax, normalisation; elementwise operators "
                          "are assumed fused into them), microseconds; not a datasheet figure")


class TargetProfile(_Frozen):
    """One deployment target: a chip, the vendor toolchain that compiles for it, its numeric rules and figures."""

    chip: str = Field(pattern=r"^[a-z0-9_]+$", description="short id, the TOML file's stem: orin, ascend310, ...")
    name: str = Field(min_length=1, description="product name and variant the figures are for")
    toolchain: str = Field(min_length=1, description="vendor toolchain the artifact stands for")
    onnx_opset: int = Field(17, ge=13, le=21, description="ONNX opset of the artifacts (21 for native INT16 QDQ)")
    precisions: OpPrecisions = Field(description="supported precisions per operator kind, best first")
    numerics: NumericRules = Field(description="INT8 encoding rules")
    budget: Budget = Field(description="latency and size budgets")
    roofline: Roofline = Field(description="figures for the roofline estimate")
    notes: list[str] = Field(default_factory=list, description="caveats of this profile, in words")

    @model_validator(mode="after")
    def _peaks_for_precisions(self) -> "TargetProfile":
        for kind in OP_KINDS:
            for p in getattr(self.precisions, kind):
                if getattr(self.roofline.compute, p) is None:
                    raise ValueError(f"precisions.{kind} lists {p} but roofline.compute.{p} is missing")
        return self

    def ladder(self, kind: str) -> list[str]:
        """Precisions of an operator kind, default first, then the fallbacks in order."""
        return list(getattr(self.precisions, kind))

    def default_precision(self, kind: str) -> str:
        return self.ladder(kind)[0]

    def fallback(self, kind: str, current: str) -> str | None:
        """The next precision after `current` for `kind` (a higher one), None at the end of the ladder."""
        ladder = self.ladder(kind)
        i = ladder.index(current) if current in ladder else -1
        return ladder[i + 1] if 0 <= i < len(ladder) - 1 else None

    def peak_ops_per_s(self, precision: str) -> float:
        fig = getattr(self.roofline.compute, precision)
        if fig is None:
            raise TargetError(f"{self.chip}: no peak compute figure for {precision}")
        return fig.value * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.roofline.memory_bandwidth.value * 1e9


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def parse_target(doc: dict, origin: str = "<dict>") -> TargetProfile:
    """A profile from an already parsed TOML document; errors name `origin` and every bad key."""
    try:
        return TargetProfile.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = _key_path(err["loc"])
            kind = err["type"]
            if kind == "missing":
                problems.append(f"missing key '{key}'")
            elif kind == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"key '{key}': {err['msg']}")
        raise TargetError(f"{origin}: " + "; ".join(problems)) from None


def load_target(chip_or_path: str | Path, targets_dir: Path | None = None) -> TargetProfile:
    """Load `deploy/targets/<chip>.toml` (or a .toml path) into a frozen `TargetProfile`."""
    p = Path(chip_or_path)
    if p.suffix != ".toml":
        p = Path(targets_dir or TARGETS_DIR) / f"{chip_or_path}.toml"
    if not p.is_file():
        raise TargetError(f"no target profile {p}")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{p}: not valid TOML: {exc}") from None
    profile = parse_target(doc, str(p))
    if profile.chip != p.stem:
        raise TargetError(f"{p}: key 'chip' is {profile.chip!r} but the file is named {p.stem}.toml")
    return profile


def load_targets(targets_dir: Path | None = None, chips: list[str] | None = None) -> dict[str, TargetProfile]:
    """Every profile in `targets_dir` (default deploy/targets/), or the named ones, by chip id."""
    d = Path(targets_dir or TARGETS_DIR)
    names = chips if chips is not None else sorted(p.stem for p in d.glob("*.toml"))
    return {n: load_target(n, d) for n in names}


def known_targets(targets_dir: Path | None = None) -> list[str]:
    """Chip ids of the profiles in `targets_dir` (default: the shipped ones)."""
    return sorted(p.stem for p in Path(targets_dir or TARGETS_DIR).glob("*.toml"))
