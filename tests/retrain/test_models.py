"""Planner, recipes, ONNX export, INT8 quantization, pruning, registry and evaluation, on tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ingest.contract import frames_to_arrow
from ingest.lake import list_drive_files, write_drive
from ingest.synth import synthetic_frames
from retrain.models import evaluate as ev
from retrain.models.architectures import Importance, Planner, PlannerConfig, export_onnx, prune, tensors
from retrain.cycle.registry import Registry
from retrain.recipes.student import QuantConfig, StudentConfig, quantize
from retrain.recipes.student import run as run_student
from retrain.models.training import OptimConfig, fit, load_checkpoint, torch_predict
from retrain.recipes.teacher import TeacherConfig
from retrain.recipes.teacher import run as run_teacher
from shadow.featurize import featurize, featurize_drive_files
from shadow.spec import ModelSpec, read_spec, write_spec

TINY_TEACHER = PlannerConfig(width=32, depth=2, heads=2, head_dim=16, ffn=64)
TINY_STUDENT = PlannerConfig(width=16, depth=2, heads=2, head_dim=8, ffn=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def drives(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drives")
    for i in range(5):
        f = synthetic_frames(200, agents=8 + 3 * i, seed=i)
        f.cols["lighting"][:] = [1, 2, 1, 3, 1][i]
        f.cols["maneuver"][:] = np.random.default_rng(i).integers(1, 6, 200)
        write_drive(root, pa.Table.from_batches([frames_to_arrow(f, f"d{i}", f"v{i % 2}", 0)]))
    return root


def teacher_config(drives: Path, out: Path, seed: int = 0, **kw) -> TeacherConfig:
    # One thread: tiny matrices gain nothing from two, and a shared machine punishes oversubscription.
    return TeacherConfig(drives_dir=drives, out_dir=out, seed=seed, model=TINY_TEACHER, threads=1,
                         optim=OptimConfig(steps=40, batch_size=64, warmup_steps=5, lr=2e-3), **kw)


@pytest.fixture(scope="module")
def teacher(drives, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    result = run_teacher(teacher_config(drives, root / "teacher", registry=root / "registry"))
    return result, root


@pytest.fixture(scope="module")
def student(drives, teacher):
    _, root = teacher
    return run_student(StudentConfig(
        drives_dir=drives, teacher=root / "teacher", out_dir=root / "student", model=TINY_STUDENT,
        optim=OptimConfig(steps=40, batch_size=64, warmup_steps=5, lr=2e-3),
        prune={"importance_batches": 2, "finetune": {"steps": 10, "warmup_steps": 2}},
        quant={"calibration_frames": 256}, registry=root / "registry", threads=1))


def test_forward_shapes_and_masking():
    torch.manual_seed(0)
    model = Planner(TINY_TEACHER).eval()
    f = featurize(synthetic_frames(12, agents=5, seed=3), with_targets=False)
    traj, logits = model(*tensors(f.inputs()))
    assert traj.shape == (12, 8, 3) and logits.shape == (12, 6)
    # what sits in a padded agent slot must not matter
    x = f.inputs()
    x["agents"][:, 10:] = 123.0
    traj2, logits2 = model(*tensors(x))
    torch.testing.assert_close(traj2, traj, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=0)


def test_teacher_recipe(teacher):
    result, root = teacher
    assert result.parameters > 0 and result.onnx_bytes > 0 and result.train_frames > 0
    assert result.onnx_max_abs_diff < 1e-4, "onnxruntime and torch disagree"
    assert np.isfinite([result.heldout["ade_m"], result.heldout["fde_m"]]).all()
    spec = read_spec(root / "teacher")
    assert spec.featurizer_version == "feat-v1" and spec.precision == "fp32"
    assert spec.flops_per_frame == load_checkpoint(root / "teacher" / "checkpoint.pt").flops_per_frame() > 0
    assert [o.role for o in spec.outputs] == ["trajectory", "maneuver_logits"]
    entry = Registry(root / "registry").get("teacher")
    assert entry.sha256 == spec.sha256 and entry.dataset_sha256 == result.dataset_sha256
    assert len(result.heldout_drive_files) == 1  # 5 drives * 0.2


def test_teacher_reproducible_from_seed(drives, teacher, tmp_path):
    result, root = teacher
    again = run_teacher(teacher_config(drives, tmp_path / "again"))
    a, b = load_checkpoint(root / "teacher" / "checkpoint.pt"), load_checkpoint(tmp_path / "again" / "checkpoint.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert again.heldout == result.heldout and again.final_loss == result.final_loss


def test_training_reduces_loss(drives):
    torch.manual_seed(0)
    feats = featurize_drive_files(list_drive_files(drives)[:2])
    data = {**feats.inputs(), "y": feats.traj}

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(*tensors(b))[0], torch.from_numpy(b["y"]))

    model = Planner(TINY_TEACHER)
    before = float(loss_fn(model.eval(), data))
    fit(model, data, loss_fn, OptimConfig(steps=60, batch_size=64, warmup_steps=5, lr=3e-3), seed=0, log_every=0)
    assert float(loss_fn(model, data)) < 0.5 * before


def test_onnx_matches_torch(tmp_path):
    torch.manual_seed(1)
    model = Planner(TINY_TEACHER).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    feats = featurize(synthetic_frames(300, agents=20, seed=2), with_targets=False)
    got = ev.predict(ev.session(path), feats, batch_size=97)  # odd batch: the batch axis is dynamic
    want = torch_predict(model, feats)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_int8_close_to_fp32(teacher, drives, tmp_path):
    _, root = teacher
    feats = featurize_drive_files(list_drive_files(drives))
    spec = quantize(root / "teacher", tmp_path / "int8", feats.take(slice(0, 512)), QuantConfig())
    assert spec.precision == "int8"
    fp = ev.predict(ev.session(root / "teacher"), feats)
    q = ev.predict(ev.session(tmp_path / "int8"), feats)
    rel = np.abs(q[0] - fp[0]).mean() / np.abs(fp[0]).mean()
    assert rel < 0.05, f"INT8 trajectories differ from FP32 by {rel:.1%}"
    assert (q[1].argmax(1) == fp[1].argmax(1)).mean() > 0.9


def test_prune_keep_all_is_identity():
    torch.manual_seed(2)
    model = Planner(TINY_TEACHER).eval()
    imp = Importance(model)
    imp.heads = [torch.rand(h.shape) for h in imp.heads]
    imp.ffn = [torch.rand(f.shape) for f in imp.ffn]
    same = prune(model, imp, 1.0, 1.0).eval()
    x = tensors(featurize(synthetic_frames(16, seed=4), with_targets=False).inputs())
    torch.testing.assert_close(same(*x), model(*x))


def test_prune_removes_dead_units_exactly():
    """Heads and channels that contribute nothing get zero importance, are removed, and the outputs do not move."""
    torch.manual_seed(3)
    cfg = PlannerConfig(width=32, depth=2, heads=4, head_dim=8, ffn=64)
    model = Planner(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.out.weight[:, 8:24] = 0  # heads 1 and 2 write nothing
            layer.fc2.weight[:, ::2] = 0        # every other FFN channel writes nothing
    feats = featurize(synthetic_frames(64, agents=10, seed=5))
    imp = Importance(model)
    model.set_record(True)
    traj, logits = model(*tensors(feats.inputs()))
    (traj.square().mean() + logits.square().mean()).backward()
    imp.accumulate(model)
    model.set_record(False)
    for h, f in zip(imp.heads, imp.ffn):
        assert h[1] == 0 and h[2] == 0 and (h[[0, 3]] > 0).all()
        assert (f[::2] == 0).all()
    small = prune(model.eval(), imp, 0.5, 0.5).eval()
    assert small.config.layer_heads == [2, 2] and small.config.layer_ffn == [32, 32]
    assert small.num_parameters() < model.num_parameters()
    assert small.flops_per_frame() < model.flops_per_frame()
    assert small.layers[0].attn.qkv.weight.shape == (48, 32) and small.layers[0].fc1.weight.shape == (32, 32)
    x = tensors(feats.inputs())
    with torch.no_grad():
        for a, b in zip(small(*x), model(*x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prune_then_finetune_stays_close(drives):
    torch.manual_seed(4)
    feats = featurize_drive_files(list_drive_files(drives)[:3])
    model = Planner(PlannerConfig(width=32, depth=2, heads=4, head_dim=8, ffn=64))
    data = {**feats.inputs(), "y": feats.traj}

    def fit_gt(m, b):
        return torch.nn.functional.mse_loss(m(*tensors(b))[0], torch.from_numpy(b["y"]))

    fit(model, data, fit_gt, OptimConfig(steps=80, batch_size=64, warmup_steps=5, lr=3e-3), seed=0, log_every=0)
    ref = torch_predict(model, feats)[0]
    imp = Importance(model)
    model.set_record(True)
    loss = fit_gt(model.train(), data)
    loss.backward()
    imp.accumulate(model)
    model.set_record(False)
    small = prune(model.eval(), imp, 0.5, 0.5)
    err_before = np.abs(torch_predict(small, feats)[0] - ref).mean()
    distil = {**feats.inputs(), "y": ref}
    fit(small, distil, fit_gt, OptimConfig(steps=60, batch_size=64, warmup_steps=2, lr=1e-3), seed=1, log_every=0)
    err_after = np.abs(torch_predict(small, feats)[0] - ref).mean()
    assert small.num_parameters() < 0.75 * model.num_parameters()
    assert err_after < err_before and err_after < 0.1 * np.abs(ref).mean()


def test_student_recipe(student, teacher):
    _, root = teacher
    assert student.parameters_pruned < student.parameters_distilled
    assert student.layer_heads == [1, 1] and student.layer_ffn == [16, 16]
    assert read_spec(root / "student" / "int8").precision == "int8"
    assert read_spec(root / "student" / "fp32").precision == "fp32"
    fp32_ade = student.expert_fp32["ade_m"]
    assert abs(student.expert_int8["ade_m"] - fp32_ade) < 0.05 * fp32_ade + 0.05
    groups = {(r["group"], r["value"]) for r in student.heldout_int8}
    assert ("all", "all") in groups and any(g == "lighting" for g, _ in groups)
    reg = Registry(root / "registry")
    lineage = [e.ref for e in reg.lineage("student", "v0")]
    assert lineage == ["student:v0", "student-fp32:v0", "teacher:v1"]


def test_registry_round_trip_and_hashes(teacher, tmp_path):
    _, root = teacher
    reg = Registry(tmp_path / "reg")
    e1 = reg.register("teacher", "v1", root / "teacher", recipe="retrain.recipes.teacher", dataset_sha256="abc",
                      metrics={"ade_m": 1.5})
    assert reg.register("teacher", "v1", root / "teacher").sha256 == e1.sha256  # idempotent
    src = read_spec(root / "teacher")
    assert e1.sha256 == src.sha256 and e1.status == "candidate" and e1.metrics == {"ade_m": 1.5}
    assert read_spec(reg.version_dir("teacher", "v1")).version == "v1"
    reg.register("teacher", "v2", root / "teacher" / "model.onnx", parents=["teacher:v1"])
    with pytest.raises(KeyError):
        reg.register("teacher", "v3", root / "teacher", parents=["teacher:v9"])
    assert reg.get("teacher").version == "v2"  # nothing promoted: the latest
    reg.promote("teacher", "v1")
    reg.promote("teacher", "v2")
    statuses = {e.version: e.status for e in reg.list("teacher")}
    assert statuses == {"v1": "retired", "v2": "promoted"}
    assert reg.get("teacher").version == "v2"
    assert reg.reject("teacher", "v1", "worse at night").note == "worse at night"
    assert [e.ref for e in reg.lineage("teacher", "v2")] == ["teacher:v2", "teacher:v1"]
    # a tampered file is caught, and no temporary files are left behind
    model = reg.model_path("teacher", "v2")
    model.write_bytes(model.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        reg.get("teacher", "v2")
    assert not list((tmp_path / "reg").rglob("*.tmp"))
    index = json.loads((tmp_path / "reg" / "index.json").read_text())
    assert set(index["models"]["teacher"]) == {"v1", "v2"}


def test_registry_refuses_a_different_file_under_an_existing_version(teacher, student, tmp_path):
    _, root = teacher
    reg = Registry(tmp_path / "reg")
    reg.register("m", "v1", root / "teacher")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("m", "v1", root / "student" / "fp32")
    with pytest.raises(ValueError):
        reg.register("m", "../x", root / "teacher")


def test_spec_round_trip_and_tamper(tmp_path):
    model = Planner(TINY_STUDENT)
    path = export_onnx(model, tmp_path / "model.onnx")
    write_spec(ModelSpec(name="s", version="v9", parameters=model.num_parameters()), path)
    spec = read_spec(tmp_path)
    assert spec.name == "s" and spec.size_bytes == path.stat().st_size and spec.output("trajectory").shape[1:] == [8, 3]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="sha256"):
        read_spec(path)


def test_split_is_by_drive_and_deterministic(drives):
    paths = list_drive_files(drives)
    train, held = ev.split_drives(paths, 0.4, seed=7)
    assert ev.split_drives(list(reversed(paths)), 0.4, seed=7) == (train, held)
    assert len(held) == 2 and not set(train) & set(held) and set(train) | set(held) == set(paths)


def test_compare_records_per_condition(drives):
    feats = featurize_drive_files(list_drive_files(drives))
    ref = (feats.traj, np.eye(6, dtype=np.float32)[feats.maneuver])
    off = (feats.traj + np.array([3.0, 4.0, 0.0], np.float32), ref[1])
    records = ev.compare(off, ref, feats)
    overall = records[0]
    assert overall["group"] == "all" and overall["ade_m"] == pytest.approx(5.0, abs=1e-4)
    assert overall["fde_m"] == pytest.approx(5.0, abs=1e-4) and overall["maneuver_agreement"] == 1.0
    lighting = {r["value"]: r["frames"] for r in records if r["group"] == "lighting"}
    assert lighting == {"day": 600, "night": 200, "glare": 200}
    assert "night" in ev.format_table(records)
