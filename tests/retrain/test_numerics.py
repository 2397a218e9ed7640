"""Chip-faithful numerics on any host: onnxruntime, with the integer kernel `shadow.numerics` picks here, computes
what every chip artifact means, checked against an independent integer reference (numpy, exact int64 products).

On a host whose fused INT8 kernels saturate (x86 without VNNI) a session with those kernels is metres off the
reference; these tests fail there unless the emulated kernel is picked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ingest.synth import synthetic_frames
from retrain.compress.passes import (AccuracyAwareFallback, Artifact, ExportConfig, ExportOnnx, FallbackConfig,
                                     VerifyArtifact, VerifyConfig)
from retrain.compress.passes import graph as G
from retrain.compress.passes.verify import node_precisions
from retrain.compress.reference import IntegerReference, runtime_vs_reference
from retrain.compress.targets import load_targets
from retrain.models.architectures import Planner, PlannerConfig
from retrain.models.evaluate import displacement
from retrain.models.training import save_checkpoint
from shadow.featurize import featurize
from shadow.models import session
from shadow.numerics import probe_inputs, probe_model, int8_kernel, int8_probe, numerics_record

TINY = PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)
REFERENCE_STUDENT = Path(__file__).resolve().parents[2] / "retrain" / "reference" / "student-v0"
# largest mean displacement runtime vs reference: float rounding (FP16 nodes: a few FP16 roundings) is far below
TOL_ADE_M = 0.005


@pytest.fixture(scope="module")
def frames():
    f = featurize(synthetic_frames(384, agents=12, seed=3), with_targets=False)
    return f.take(slice(0, 256)), f.take(slice(256, 384))


def _plans(target, fp32_art) -> list[dict[str, str]]:
    """The chip's default plan, and one with its first two INT8 products one step up the ladder (FP16 / INT16 /
    FP32), so every precision a chip uses is in some artifact."""
    m = G.load(fp32_art.path)
    default = G.default_plan(m, target)
    kinds = G.kinds_of(m)
    up = dict(default)
    for name in [n for n, p in default.items() if p == "int8"][:2]:
        up[name] = target.fallback(kinds[name], "int8")
    return [default, up]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, frames):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("numerics")
    ck = save_checkpoint(Planner(TINY).eval(), root / "student.pt")
    cal, val = frames
    out = []
    for chip, target in load_targets(chips=["orin", "ascend310", "journey6", "cpu"]).items():
        fp32 = ExportOnnx(target).run(Artifact.from_file(ck, chip), ExportConfig(), root / chip / "fp32")
        for i, plan in enumerate(_plans(target, fp32)):
            cfg = FallbackConfig(enabled=False, quantize={"plan": plan})
            art = AccuracyAwareFallback(target, cal, val).run(fp32, cfg, root / chip / f"plan{i}")
            out.append((chip, i, art))
    return out


def test_probe_picks_an_exact_kernel_and_says_so():
    probe = int8_probe()
    kernel = int8_kernel("auto")
    assert kernel == ("native" if probe["uint8"] and probe["int8"] else "emulated")
    rec = numerics_record()
    assert rec["int8_kernel"] == kernel and rec["probe_exact"] == {"uint8": probe["uint8"], "int8": probe["int8"]}
    assert rec["onnxruntime"] and isinstance(rec["host_features"], list)
    assert numerics_record("emulated")["int8_kernel"] == "emulated"


def test_the_environment_can_force_the_emulation(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_INT8_KERNEL", "emulated")  # a VNNI host run as an AVX2 host runs
    assert int8_kernel("auto") == "emulated" and int8_kernel("native") == "native"
    assert numerics_record()["why"] == "$FLYWHEEL_INT8_KERNEL"
    monkeypatch.setenv("FLYWHEEL_INT8_KERNEL", "fast")
    with pytest.raises(ValueError, match="FLYWHEEL_INT8_KERNEL"):
        int8_kernel("auto")


@pytest.mark.parametrize("signed", [False, True])
def test_reference_and_emulated_kernel_are_exact_where_16_bit_pair_sums_saturate(signed):
    x, exact = probe_inputs(signed)
    assert np.abs(exact).max() > 32767 * 2  # the probe's sums are beyond what a saturating kernel can return
    ref = IntegerReference(onnx.load_from_string(probe_model(signed)))
    assert ref.products == 1
    np.testing.assert_array_equal(ref({"x": x}, ("y",))[0], exact.astype(np.float32))
    got = session(probe_model(signed), 1, int8_kernel="emulated").run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, exact.astype(np.float32))
    auto = session(probe_model(signed), 1).run(None, {"x": x})[0]
    np.testing.assert_array_equal(auto, exact.astype(np.float32))


def test_every_chip_artifact_computes_its_integer_semantics_on_this_host(artifacts, frames):
    _, val = frames
    inputs = val.inputs()
    seen = set()
    for chip, i, art in artifacts:
        precisions = node_precisions(G.load(art.path))
        seen |= set(precisions.values())
        integer = sum(p in ("int8", "int16") for n, p in precisions.items() if n in art.plan and
                      G.kinds_of(G.load(art.path))[n] == "matmul")
        ref = IntegerReference(art.path)
        assert ref.products == integer > 0, (chip, i)  # every integer product really is done in integers
        want = ref(inputs)
        for kernel in ("auto", "emulated"):
            got = session(art.path, 2, verify=False, int8_kernel=kernel).run(["trajectory", "maneuver_logits"],
                                                                             inputs)
            ade, _ = displacement(got[0], want[0])
            assert ade.mean() <= TOL_ADE_M, (chip, i, kernel, float(ade.mean()))
            assert np.abs(got[1] - want[1]).max() <= 0.05, (chip, i, kernel)
    assert {"int8", "int16", "fp16", "fp32"} <= seen  # INT8 per channel, INT16, FP16 emulation, FP32 all checked


def test_fused_kernel_agrees_with_reference_only_where_the_probe_says_it_is_exact(artifacts, frames):
    """The decision itself: the native kernel is used only if exact; where it is, it matches the reference."""
    _, val = frames
    chip, _, art = next(a for a in artifacts if a[0] == "cpu" and a[1] == 0)
    want = IntegerReference(art.path)(val.inputs())
    native = session(art.path, 2, verify=False, int8_kernel="native").run(["trajectory"], val.inputs())[0]
    ade = float(displacement(native, want[0])[0].mean())
    if int8_kernel() == "native":
        assert ade <= TOL_ADE_M
    else:  # this host's fused kernels saturate: the product must not use them
        assert int8_probe()["max_error"] > 0


def test_shipped_student_v0_computes_its_integer_semantics(frames):
    _, val = frames
    r = runtime_vs_reference(REFERENCE_STUDENT, val.inputs(), threads=2)
    assert r["integer_products"] >= 8
    # an activation next to a rounding boundary may land one INT8 step apart (float ops before it differ in the last
    # bit): centimetres on a frame at most, nothing on average; a saturating kernel is metres off on average
    assert r["ade_m"] <= TOL_ADE_M and r["traj_max_abs"] <= 0.1, r


def test_verification_records_the_kernel_and_the_host_check(artifacts, frames, tmp_path):
    _, val = frames
    targets = load_targets()
    for chip, i, art in artifacts[:2] + artifacts[-2:]:
        ver = VerifyArtifact(targets[chip], val).run(art, VerifyConfig(), tmp_path / chip / str(i)).metrics[
            "verification"]
        assert ver["numerics"]["int8_kernel"] == int8_kernel()
        assert ver["vs_integer_reference"]["frames"] == VerifyConfig().reference_frames
        assert ver["host_ok"] and ver["vs_integer_reference"]["ade_m"] <= TOL_ADE_M, (chip, ver)
