"""The current student on each chip: what a candidate's compression is held against.

    base = chip_baselines(reg, parent, checkpoint, targets, frames, compress_config, teacher_dir, work / "baseline")
    base["orin"].figures()   # {"bytes", "latency_ms_estimate", "int8_matmul_share", "integer_matmul_share", "ref"}

For chip C and the current student `name:version`, the registry's `name-C:version` is that student's artifact for C
(a cycle registers every chip's artifact of the candidate it promotes, the verified chip's as `name:version`, and
the baselines it had to build). When it is
missing (the first cycle after a student recipe, which registers one generic INT8 artifact), the current student's
checkpoint is compressed for C by the same passes and configuration as the candidate, with the same calibration and
validation frames, and registered as `name-C:version`, so the next cycle finds it.

The figures come from the artifact's spec (`extra.compression`, written when it was made); they are recomputed from
the graph when the spec lacks them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from retrain.compress.targets import TargetProfile
from retrain.compress.workflow import CompressConfig, TargetResult, compress_for_target
from retrain.cycle.registry import ModelEntry, Registry
from shadow.featurize import Features
from shadow.spec import MODEL_FILE, read_spec, write_spec

log = logging.getLogger(__name__)


class ChipBaseline(BaseModel):
    """The current student's artifact for one chip and its compression figures."""

    model_config = ConfigDict(extra="forbid")

    chip: str
    ref: str = Field(description="registry entry name:version of the artifact")
    path: str = Field(description="directory holding model.onnx and spec.json")
    source: str = Field(description="'registry' (found) or 'compressed' (made by this cycle from the checkpoint)")
    bytes: int = Field(description="artifact file size (measured)")
    latency_ms_estimate: float = Field(description="roofline ESTIMATE on the chip, batch 1 (ms)")
    int8_matmul_share: float = Field(description="share of product FLOPs at INT8")
    integer_matmul_share: float = Field(description="share of product FLOPs at INT8 or INT16")

    def figures(self) -> dict:
        return {"ref": self.ref, "source": self.source, "bytes": self.bytes,
                "latency_ms_estimate": self.latency_ms_estimate, "int8_matmul_share": self.int8_matmul_share,
                "integer_matmul_share": self.integer_matmul_share}


def compression_figures(t: TargetResult) -> dict:
    """What a chip artifact's spec keeps about its compression (`extra.compression`)."""
    return {"bytes": t.bytes, "latency_ms_estimate": t.latency_ms_estimate, "int8_matmul_share": t.int8_matmul_share,
            "integer_matmul_share": t.integer_matmul_share}


def _from_registry(reg: Registry, entry: ModelEntry, chip: str) -> ChipBaseline | None:
    found = [e for e in reg.list(f"{entry.name}-{chip}") if e.version == entry.version]
    # a cycle registers the verified chip's artifact under the plain name (`name:version`, extra.chip = chip)
    if not found and read_spec(reg.version_dir(entry.name, entry.version), verify=False).extra.get("chip") == chip:
        found = [entry]
    if not found:
        return None
    e = found[0]
    d = reg.version_dir(e.name, e.version)
    comp = read_spec(d, verify=False).extra.get("compression")
    if not comp:
        log.warning("%s has no compression figures in its spec; it is rebuilt as the baseline", e.ref)
        return None
    return ChipBaseline(chip=chip, ref=e.ref, path=str(d), source="registry", **comp)


def chip_baselines(reg: Registry, parent: ModelEntry, checkpoint: Path, targets: dict[str, TargetProfile],
                   calibration: Features, validation: Features, mined: Features | None, config: CompressConfig,
                   teacher: Path, out_dir: Path, register: bool, compress_one=compress_for_target,
                   progress=None) -> dict[str, ChipBaseline]:
    """The current student's artifact on every target chip: from the registry, else compressed from `checkpoint`
    by `compress_one` (the transformer's or a plug-in's per-chip pipeline) and registered as
    `<name>-<chip>:<version>` when `register`."""
    out: dict[str, ChipBaseline] = {}
    cfg = config.model_copy(update={"export": config.export.model_copy(
        update={"name": parent.name, "version": parent.version})})
    for i, (chip, target) in enumerate(targets.items()):
        base = _from_registry(reg, parent, chip)
        if base is None:
            done = Path(out_dir) / chip / "result.json"
            t = (TargetResult.model_validate_json(done.read_text()) if done.is_file() else
                 compress_one(checkpoint, target, calibration, validation, out_dir, cfg, teacher, mined))
            src = Path(t.artifact).parent
            dest = Path(out_dir) / f"{chip}-artifact"
            if not (dest / MODEL_FILE).is_file():
                tmp = Path(out_dir) / f".{chip}-artifact.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                shutil.copyfile(src / MODEL_FILE, tmp / MODEL_FILE)
                spec = read_spec(src / MODEL_FILE)
                spec.extra = {**spec.extra, "chip": chip, "compression": compression_figures(t),
                              "baseline_of": parent.ref}
                write_spec(spec, tmp / MODEL_FILE)
                tmp.replace(dest)
            ref = f"{parent.name}-{chip}:{parent.version}"
            path = dest
            if register:
                try:
                    e = reg.register(f"{parent.name}-{chip}", parent.version, dest, parents=[parent.ref],
                                     recipe="retrain.cycle.baseline", metrics=compression_figures(t))
                    reg.promote(e.name, e.version, f"{parent.ref} compressed for {chip} (baseline of a cycle)")
                    path = reg.version_dir(e.name, e.version)
                except ValueError as exc:  # an entry of that name without figures: keep it, use this one here
                    log.warning("baseline for %s not registered: %s", chip, exc)
            base = ChipBaseline(chip=chip, ref=ref, path=str(path), source="compressed", **compression_figures(t))
        out[chip] = base
        log.info("current student on %s: %s (%s), %d bytes, INT8 share %.3f", chip, base.ref, base.source,
                 base.bytes, base.int8_matmul_share)
        if progress:
            progress(i + 1, len(targets), {"chip": chip, "baseline": base.ref})
    return out


def int8_products(baselines: Iterable[ChipBaseline]) -> list[str] | None:
    """The weight products (ONNX node names) the current student computes in INT8 on at least one chip, sorted: what
    the fine-tune's quantization-aware phase fake-quantizes (`QatConfig.products`). None when an artifact does not
    say (`extra.int8_nodes`): then every product is."""
    found: set[str] = set()
    for b in baselines:
        nodes = read_spec(Path(b.path), verify=False).extra.get("int8_nodes")
        if not isinstance(nodes, list):
            return None
        found.update(str(n) for n in nodes)
    return sorted(found)
