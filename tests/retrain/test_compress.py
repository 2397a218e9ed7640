"""Target profiles and compression passes on a tiny planner: real ONNX graphs, real onnxruntime, real rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from ingest.synth import synthetic_frames
from retrain.models.architectures import Planner, PlannerConfig
from retrain.compress.workflow import CompressConfig, compress_all
from retrain.models.evaluate import predict
from shadow.models import session
from retrain.compress.passes import (AccuracyAwareFallback, ApplyNumericRules, Artifact, ExportConfig, ExportOnnx,
                                     FallbackConfig, NumericsConfig, PruneConfig, PruneToBudget, QuantizeConfig,
                                     QuantizeInt8, RooflineConfig, RooflinePass, VerifyArtifact, VerifyConfig,
                                     check_rules, node_precisions)
from retrain.compress.passes import graph as G
from retrain.compress.passes.roofline import estimate
from retrain.compress.targets import TARGETS_DIR, TargetError, load_target, load_targets, parse_target
from retrain.models.training import save_checkpoint
from shadow.featurize import featurize

TINY = PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)
CHIPS = ("orin", "ascend310", "journey6", "cpu")


@pytest.fixture(scope="module")
def frames():
    f = featurize(synthetic_frames(512, agents=12, seed=1), with_targets=False)
    return f.take(slice(0, 256)), f.take(slice(256, 512))


@pytest.fixture(scope="module")
def built(tmp_path_factory, frames):
    """Per chip: the source checkpoint, the FP32 export and the default-plan artifact (no fallback search)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("compress")
    ck = save_checkpoint(Planner(TINY).eval(), root / "student.pt")
    cal, val = frames
    out = {}
    for chip, target in load_targets(chips=list(CHIPS)).items():
        fp32 = ExportOnnx(target).run(Artifact.from_file(ck, chip), ExportConfig(), root / chip / "fp32")
        art = AccuracyAwareFallback(target, cal, val).run(fp32, FallbackConfig(enabled=False), root / chip / "art")
        out[chip] = (target, fp32, art)
    return root, ck, out


# ------------------------------------------------------------------------------------------------ target profiles


def test_profiles_load_with_sourced_figures():
    targets = load_targets()
    assert set(CHIPS) <= set(targets)
    for t in targets.values():
        assert t.roofline.memory_bandwidth.source and t.roofline.memory_bandwidth.value > 0
        for p in {p for k in ("matmul", "softmax", "norm", "elementwise") for p in t.ladder(k)}:
            assert getattr(t.roofline.compute, p).source
    assert targets["orin"].ladder("matmul") == ["int8", "fp16", "fp32"]
    assert targets["ascend310"].ladder("softmax") == ["fp16"] and targets["ascend310"].fallback("matmul", "int8") == "fp16"
    assert targets["journey6"].fallback("matmul", "int8") == "int16"
    assert targets["cpu"].roofline.memory_bandwidth.basis == "measured"
    assert targets["journey6"].roofline.compute.int8.value == 560


def _doc(chip: str) -> dict:
    return tomllib.loads((TARGETS_DIR / f"{chip}.toml").read_text())


def test_bad_profiles_name_the_key(tmp_path):
    doc = _doc("orin")
    del doc["budget"]["latency_ms"]
    with pytest.raises(TargetError, match=r"missing key 'budget\.latency_ms'"):
        parse_target(doc, "orin.toml")
    doc = _doc("orin")
    doc["numerics"]["zero_points"] = "odd"
    with pytest.raises(TargetError, match=r"unknown key 'numerics\.zero_points'"):
        parse_target(doc, "orin.toml")
    doc = _doc("orin")
    doc["roofline"]["memory_bandwidth"]["value"] = -204.8
    with pytest.raises(TargetError, match=r"roofline\.memory_bandwidth\.value"):
        parse_target(doc, "orin.toml")
    doc = _doc("ascend310")
    doc["precisions"]["norm"] = ["fp32"]  # no FP32 peak in the Ascend profile
    with pytest.raises(TargetError, match="roofline.compute.fp32 is missing"):
        parse_target(doc, "ascend310.toml")
    bad = tmp_path / "orin.toml"
    bad.write_text((TARGETS_DIR / "orin.toml").read_text().replace('chip = "orin"', 'chip = "xavier"'))
    with pytest.raises(TargetError, match="key 'chip'"):
        load_target(bad)
    (tmp_path / "broken.toml").write_text("chip = ")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(tmp_path / "broken.toml")


def test_profiles_are_frozen():
    t = load_target("orin")
    with pytest.raises(Exception):
        t.budget = None


# --------------------------------------------------------------------------------------------- precision rules


def _dq_nodes(model: onnx.ModelProto):
    inits = G.initializers(model)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else None
            yield n, inits.get(n.input[0]), inits.get(n.input[2]) if len(n.input) > 2 else None, zp


@pytest.mark.parametrize("chip", CHIPS)
def test_artifact_obeys_its_chip(built, chip):
    _, _, arts = built
    target, fp32, art = arts[chip]
    m = G.load(art.path)
    assert check_rules(m, target, art.plan) == []
    prec = node_precisions(m)
    kinds = G.kinds_of(m)
    inits = G.initializers(m)
    users = G.consumers(m)
    products = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in
                {d.output[0] for d, w, _, _ in _dq_nodes(m) if w is not None}]
    assert products, "no product got INT8 weights"
    for dq, w, zp_init, zp in _dq_nodes(m):
        if zp_init is not None and zp_init.data_type == TensorProto.INT32:
            continue  # INT8 products' biases are int32
        for user in users[dq.output[0]]:
            if zp_init.data_type in (TensorProto.INT8, TensorProto.UINT8):
                assert kinds[user.name] == "matmul", f"{chip}: INT8 QDQ around {user.op_type}"
    if chip == "orin":  # TensorRT: symmetric per-channel weights, symmetric int8 activations, FP16 elsewhere
        for dq, w, zp_init, zp in _dq_nodes(m):
            if zp_init.data_type == TensorProto.INT32:
                continue
            assert zp_init.data_type == TensorProto.INT8 and not np.any(zp)
            if w is not None:
                user = users[dq.output[0]][0]
                scale = numpy_helper.to_array(inits[dq.input[1]])
                axis = next(a.i for a in dq.attribute if a.name == "axis")
                assert axis == G.weight_axis(user) and scale.size == w.dims[axis] > 1
        assert set(prec.values()) == {"int8", "fp16"}
        assert any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16 for n in m.graph.node)
        assert any(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer)  # FP16-stored weights
    if chip == "ascend310":  # INT8 only on products, FP16 everywhere else, asymmetric int8 activations allowed
        assert {p for n, p in prec.items() if kinds[n] != "matmul"} == {"fp16"}
        acts = [zp_init for dq, w, zp_init, _ in _dq_nodes(m) if w is None]
        assert acts and all(z.data_type == TensorProto.INT8 for z in acts)
    if chip == "journey6":  # INT8 products, INT16 vector operators, native int16 QDQ at opset 21
        assert G.opset(m) == 21
        assert {p for n, p in prec.items() if kinds[n] != "matmul" or n.endswith(("attn/MatMul", "attn/MatMul_1"))} \
            == {"int16"}
        i16 = [(dq, zp) for dq, w, zp_init, zp in _dq_nodes(m) if zp_init.data_type == TensorProto.INT16]
        assert i16 and all(not np.any(zp) and dq.domain == "" for dq, zp in i16)
        assert not any(n.op_type == "Cast" for n in m.graph.node)
    if chip == "cpu":  # onnxruntime x86: U8S8, everything else FP32
        acts = [zp_init for dq, w, zp_init, _ in _dq_nodes(m) if w is None]
        assert acts and all(z.data_type == TensorProto.UINT8 for z in acts)
        assert {p for n, p in prec.items() if kinds[n] != "matmul"} == {"fp32"}


def test_rule_check_catches_another_chips_artifact(built):
    _, _, arts = built
    cpu_art, j6_art = G.load(arts["cpu"][2].path), G.load(arts["journey6"][2].path)
    orin, ascend = arts["orin"][0], arts["ascend310"][0]
    assert any("activations are not int8" in v for v in check_rules(cpu_art, orin))
    assert any("int16" in v and "allows" in v for v in check_rules(j6_art, ascend))
    assert any("runs in fp32" in v for v in check_rules(cpu_art, ascend))  # no FP32 on the Ascend AI Core


def test_outputs_within_tolerance_of_fp32(built, frames):
    _, val = frames
    _, _, arts = built
    ref = predict(session(arts["cpu"][1].path), val)[0]
    scale = float(np.abs(ref).mean())
    for chip, (target, fp32, art) in arts.items():
        v = VerifyArtifact(target, val).run(art, VerifyConfig(tolerance_ade_m=0.3 * scale), art.path.parent / "v")
        ver = v.metrics["verification"]
        assert ver["passed"], (chip, ver)
        assert ver["vs_fp32"]["traj_mean_abs"] < 0.1 * scale
        assert ver["vs_fp32"]["maneuver_agreement"] >= 0.9


def test_fp16_emulation_is_real_but_small(built, frames, tmp_path):
    """All-FP16 Orin plan: outputs differ from FP32 (the casts are not optimised away) by FP16 rounding only."""
    cal, val = frames
    _, _, arts = built
    target, fp32, _ = arts["orin"]
    plan = {n: ("fp16") for n in G.default_plan(G.load(fp32.path), target)}
    q = QuantizeInt8(target, cal).run(fp32, QuantizeConfig(plan=plan), tmp_path / "q")
    art = ApplyNumericRules(target, cal).run(q, NumericsConfig(), tmp_path / "r")
    assert set(node_precisions(G.load(art.path)).values()) == {"fp16"}
    got, ref = predict(session(art.path), val)[0], predict(session(fp32.path), val)[0]
    err = np.abs(got - ref)
    assert 0 < err.max() < 2e-3 * max(1.0, np.abs(ref).max()) * 10


# ------------------------------------------------------------------------------------ accuracy-aware fallback


def test_fallback_reverts_only_when_tolerance_is_tight(built, frames, tmp_path):
    cal, val = frames
    _, _, arts = built
    target, fp32, _ = arts["orin"]
    loose = AccuracyAwareFallback(target, cal, val).run(fp32, FallbackConfig(tolerance=1e3), tmp_path / "loose")
    fb = loose.metrics["fallback"]
    assert fb["reverted"] == {} and fb["met"] and len(fb["steps"]) == 1
    tol = fb["initial_error"] / 4
    tight = AccuracyAwareFallback(target, cal, val).run(fp32, FallbackConfig(tolerance=tol), tmp_path / "tight")
    fb = tight.metrics["fallback"]
    assert fb["reverted"] and fb["met"] and fb["final_error"] <= tol < fb["initial_error"]
    assert set(fb["sensitivity"]) == {n for n, p in loose.plan.items() if p == "int8"}
    prec = node_precisions(G.load(tight.path))
    for node in fb["reverted"]:
        assert tight.plan[node] == "fp16" == prec[node]
    assert check_rules(G.load(tight.path), target, tight.plan) == []
    assert [s["error"] for s in fb["steps"]][-1] == fb["final_error"]


def test_fallback_is_bounded_by_the_current_students_compression(built, frames, tmp_path):
    cal, val = frames
    _, _, arts = built
    target, fp32, plain = arts["orin"]
    shares = plain.metrics["fallback"]["matmul_shares"]
    assert 0 < shares["int8"] == shares["integer"] < 1 and shares["int8"] + shares.get("fp16", 0) == pytest.approx(1)
    tol = plain.metrics["fallback"]["initial_error"] / 4  # tight: unbounded, the fallback reverts nodes
    free = AccuracyAwareFallback(target, cal, val).run(fp32, FallbackConfig(tolerance=tol), tmp_path / "free")
    assert free.metrics["fallback"]["reverted"]
    assert free.metrics["fallback"]["matmul_shares"]["int8"] < shares["int8"]
    # held at the default plan's shares (a current student that kept all of them at INT8): nothing is reverted
    held = AccuracyAwareFallback(target, cal, val, floor={"int8": shares["int8"], "integer": shares["integer"]}).run(
        fp32, FallbackConfig(tolerance=tol), tmp_path / "held")
    fb = held.metrics["fallback"]
    assert fb["reverted"] == {} and not fb["met"] and fb["matmul_shares"]["int8"] == pytest.approx(shares["int8"])
    assert set(fb["held_by_floor"]) == {n for n, p in plain.plan.items() if p == "int8"}
    # a floor halfway allows some reverts, never going below it
    half = shares["int8"] - (shares["int8"] - free.metrics["fallback"]["matmul_shares"]["int8"]) / 2
    mid = AccuracyAwareFallback(target, cal, val, floor={"int8": half}).run(fp32, FallbackConfig(tolerance=tol),
                                                                          tmp_path / "mid")
    assert mid.metrics["fallback"]["matmul_shares"]["int8"] >= half - 1e-9


def test_fallback_tolerance_relative_to_the_students_own_divergence(built, frames, tmp_path):
    cal, val = frames
    _, _, arts = built
    target, fp32, _ = arts["orin"]
    initial = AccuracyAwareFallback(target, cal, val).run(
        fp32, FallbackConfig(enabled=False), tmp_path / "plain").metrics["fallback"]["initial_error"]
    traj, logits = predict(session(fp32.path), val)
    shifted = traj.copy()
    shifted[..., 0] += initial  # a teacher exactly `initial` metres (ADE) away from the FP32 student
    cfg = FallbackConfig(tolerance=1e3, relative_tolerance=0.25)
    art = AccuracyAwareFallback(target, cal, val, teacher=(shifted, logits)).run(fp32, cfg, tmp_path / "rel")
    fb = art.metrics["fallback"]
    assert fb["fp32_vs_teacher"] == pytest.approx(initial, rel=1e-4)
    assert fb["tolerance"] == pytest.approx(0.25 * initial, rel=1e-4) and fb["tolerance_absolute"] == 1e3
    assert fb["reverted"] and fb["met"] and fb["final_error"] <= fb["tolerance"]
    with pytest.raises(ValueError, match="teacher outputs"):
        AccuracyAwareFallback(target, cal, val, teacher=(shifted[:1], logits[:1]))


# ----------------------------------------------------------------------------------------------------- roofline


def test_roofline_follows_the_profile_figures(built):
    _, _, arts = built
    target, fp32, art = arts["orin"]
    m = G.load(fp32.path)
    base = estimate(m, art.plan, target)
    doc = target.model_dump(mode="json")
    doc["roofline"]["memory_bandwidth"]["value"] *= 2
    faster_mem = estimate(m, art.plan, parse_target(doc))
    assert faster_mem.memory_ms == pytest.approx(base.memory_ms / 2, rel=1e-9)
    assert faster_mem.compute_ms == pytest.approx(base.compute_ms, rel=1e-9)
    assert faster_mem.roofline_ms < base.roofline_ms
    doc = target.model_dump(mode="json")
    doc["roofline"]["compute"]["int8"]["value"] *= 2
    faster_int8 = estimate(m, art.plan, parse_target(doc))
    int8_part = base.flops_by_precision["int8"] / (target.roofline.compute.int8.value * 1e12) * 1e3
    assert faster_int8.compute_ms == pytest.approx(base.compute_ms - int8_part / 2, rel=1e-9)
    assert base.label == "estimate" and base.overhead_ms == pytest.approx(base.kernels * 5e-3)
    assert estimate(m, {}, target).flops == base.flops  # FLOPs do not depend on precision
    r = RooflinePass(target).run(art, RooflineConfig(), art.path.parent / "rf")
    assert r.metrics["latency_estimate"]["label"] == "estimate" and "estimate" in r.notes[0]


# ------------------------------------------------------------------------------------------ passes and pipeline


def _snapshot(a: Artifact) -> tuple:
    return a.model_dump_json(), a.unchanged(), a.path.read_bytes()


def test_passes_never_mutate_their_input(built, frames, tmp_path):
    cal, val = frames
    root, ck, arts = built
    target, fp32, art = arts["orin"]
    src = Artifact.from_file(ck, "orin")
    runs = [(PruneToBudget(target, cal), src, PruneConfig(size_budget_bytes=5_000, importance_batches=1)),
            (ExportOnnx(target), src, ExportConfig()),
            (QuantizeInt8(target, cal), fp32, QuantizeConfig()),
            (AccuracyAwareFallback(target, cal, val), fp32, FallbackConfig(enabled=False)),
            (RooflinePass(target), art, RooflineConfig()),
            (VerifyArtifact(target, val), art, VerifyConfig())]
    q = None
    for i, (p, inp, cfg) in enumerate(runs):
        before = _snapshot(inp)
        out = p.run(inp, cfg, tmp_path / f"p{i}")
        assert _snapshot(inp) == before, p.name
        assert out is not inp and out.made_by == p.name
        assert out.find(inp.made_by) == inp  # the input is the output's ancestor (fallback: via its sub-passes)
        q = out if p.name == "quantize_int8" else q
    before = _snapshot(q)
    ApplyNumericRules(target, cal).run(q, NumericsConfig(), tmp_path / "rules")
    assert _snapshot(q) == before
    with pytest.raises(Exception):
        art.path = Path("elsewhere")  # frozen record
    with pytest.raises(ValueError, match="made for"):
        RooflinePass(arts["cpu"][0]).run(art, RooflineConfig(), tmp_path / "x")


def test_prune_meets_a_size_budget(built, frames, tmp_path):
    cal, _ = frames
    _, ck, arts = built
    target = arts["cpu"][0]
    src = Artifact.from_file(ck, "cpu")
    loose = PruneToBudget(target, cal).run(src, PruneConfig(importance_batches=1), tmp_path / "loose")
    assert loose.metrics["prune"]["keep"] == 1.0 and loose.metrics["prune"]["budget_met"]
    tight = PruneToBudget(target, cal).run(src, PruneConfig(size_budget_bytes=6_000, importance_batches=1),
                                          tmp_path / "tight")
    pr = tight.metrics["prune"]
    assert pr["keep"] < 1.0 and pr["parameters_after"] < pr["parameters_before"] and pr["budget_met"]
    assert pr["tried"][-1]["weight_bytes_estimate"] <= 0.9 * 6_000 < pr["tried"][0]["weight_bytes_estimate"]


def test_compress_all_records(built, frames, tmp_path):
    cal, val = frames
    _, ck, arts = built
    mined = featurize(synthetic_frames(64, agents=12, seed=9), with_targets=False)
    cfg = CompressConfig(calibration_frames=200, fallback_frames=128, latency_runs=20, latency_warmup=2,
                         prune={"importance_batches": 1}, fallback={"tolerance": 1e3},
                         verify={"tolerance_ade_m": 1.0})  # an untrained planner: records, not accuracy, are tested
    results = compress_all([arts["cpu"][0], arts["orin"][0]], ck, cal, val, tmp_path, cfg, mined=mined)
    cpu, orin = results
    for r in results:
        assert Path(r.artifact).is_file() and r.bytes == Path(r.artifact).stat().st_size
        assert r.verified and r.rules_ok and r.tolerance_met and r.size_budget_met
        assert r.cpu_latency_ms_measured > 0 and r.latency_ms_estimate > 0
        assert r.latency_estimate["label"] == "estimate"
        assert r.lineage == ["source", "prune", "export_onnx", "quantize_int8", "numeric_rules", "fallback",
                             "roofline", "verify"]
        assert (tmp_path / r.chip / "result.json").is_file()
    assert cpu.latency_budget_basis == "measured" and orin.latency_budget_basis == "estimate"
    assert set(orin.precision_mix) == {"int8", "fp16"} and set(cpu.precision_mix) == {"int8", "fp32"}
