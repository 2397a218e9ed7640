"""Quantization-aware fine-tuning (retrain.models.qat) on a tiny planner: fake quantization follows the chips' rules,
and a student fine-tuned with it loses less to real INT8 post-training quantization (onnxruntime QDQ, the chip's
default plan, no fallback) than the same student fine-tuned as long in float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrain.compress.passes import Artifact, ExportConfig, ExportOnnx, QuantizeConfig, QuantizeInt8
from retrain.compress.targets import load_targets
from retrain.models.architectures import Planner, PlannerConfig, tensors
from retrain.models.evaluate import displacement, predict
from retrain.models.qat import (FakeQuant, QatConfig, activation_fake_quant, input_fed_linears, module_of_node,
                                weight_fake_quant)
from retrain.models.training import DistillConfig, distill_loss, save_checkpoint, torch_predict
from shadow.featurize import Features
from shadow.models import session


def test_weight_fake_quant_is_symmetric_per_channel_int8():
    w = torch.tensor([[0.5, -1.0, 0.25], [100.0, 3.0, -50.0]])
    q = weight_fake_quant(w)
    for row, qrow in zip(w, q):
        step = row.abs().max() / 127
        grid = qrow / step
        assert torch.allclose(grid, grid.round(), atol=1e-4) and grid.abs().max() <= 127
    assert torch.equal(q[0].abs().argmax(), w[0].abs().argmax())


def test_activation_fake_quant_keeps_zero_exact_and_clips():
    x = torch.tensor([-3.0, 0.0, 0.01, 1.0, 7.0])
    sym = activation_fake_quant(x, -2.0, 4.0, symmetric=True)
    assert sym[1] == 0 and sym[0] == pytest.approx(-3.0, abs=4 / 127) and sym[-1] <= 4.0 + 1e-6
    asym = activation_fake_quant(x, 0.5, 4.0, symmetric=False)  # the range is widened to hold zero
    assert asym[1] == 0 and asym[0] == 0 and asym[-1] == pytest.approx(4.0, abs=4 / 255)


def _frames(n_drives: int, seed: int) -> Features:
    from ingest.contract import frames_to_arrow
    from ingest.synth import EPOCH_NS, synthetic_frames
    from shadow.featurize import featurize

    parts = []
    for i in range(n_drives):
        f = synthetic_frames(120, agents=12, waypoints=8, seed=seed * 100 + i, start_ns=EPOCH_NS + i * 10**12)
        parts.append(featurize(frames_to_arrow(f, f"q{seed}-{i}", "veh", 0)))
    return Features.concat(parts)


TINY = PlannerConfig(width=32, depth=1, heads=2, head_dim=16, ffn=64)


def _train(model: Planner, data: dict, steps: int, seed: int, qat: FakeQuant | None = None, lr: float = 2e-3) -> None:
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = next(iter(data.values())).shape[0]
    for _ in range(steps):
        idx = np.sort(rng.choice(n, 64, replace=False))
        model.train()
        with qat.active(model) if qat else torch.enable_grad():
            loss = distill_loss(model, {k: v[idx] for k, v in data.items()}, DistillConfig(hard_weight=0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_qat_student_beats_post_training_quantization(tmp_path):
    """A tiny student distilled in float, then 600 more steps either in float (then post-training quantization) or
    with fake quantization: the QAT one's INT8 artifact is closer to the teacher, with the same INT8 nodes."""
    torch.manual_seed(0)
    train, held = _frames(6, 1), _frames(2, 20)
    teacher = Planner(PlannerConfig(width=64, depth=2, heads=2, head_dim=16, ffn=128)).eval()  # a fixed function
    t_traj, t_logits = torch_predict(teacher, train)
    h_traj, _ = torch_predict(teacher, held)
    data = {**train.inputs(), "traj": train.traj, "traj_mask": train.traj_mask, "maneuver": train.maneuver,
            "t_traj": t_traj, "t_logits": t_logits}
    student = Planner(TINY)
    _train(student, data, 800, 0)
    ptq, qat_model = student, Planner(TINY)
    qat_model.load_state_dict(student.state_dict())
    example = tuple(tensors({k: v[:2] for k, v in data.items()}))
    fq = FakeQuant(qat_model, QatConfig(), example)
    assert sorted(fq.skipped) == ["agent_embed.0", "ego_embed.0", "lane_embed.0"]  # raw inputs stay float
    assert input_fed_linears(qat_model, example) == set(fq.skipped)
    _train(ptq, data, 600, 1, lr=1e-3)  # the same extra steps, in float
    _train(qat_model, data, 600, 1, fq, lr=1e-3)
    target = load_targets(chips=["orin"])["orin"]
    errors, mixes = {}, {}
    for name, model in (("ptq", ptq), ("qat", qat_model)):
        art = Artifact.from_file(save_checkpoint(model, tmp_path / f"{name}.pt"), "orin")
        fp32 = ExportOnnx(target).run(art, ExportConfig(name=name, version="t"), tmp_path / name / "fp32")
        q = QuantizeInt8(target, train).run(fp32, QuantizeConfig(), tmp_path / name / "int8")
        traj, _ = predict(session(q.path, 1), held)
        errors[name] = float(displacement(traj, h_traj)[0].mean())
        mixes[name] = q.plan
    assert mixes["qat"] == mixes["ptq"]  # the same INT8 nodes: QAT buys accuracy, not precision
    # measured here: 0.456 m against 0.517 m (another seed: 0.366 against 0.385)
    assert errors["qat"] < errors["ptq"], errors
    assert q.spec.precision == "int8" and q.path.stat().st_size < target.budget.size_bytes


def test_qat_follows_the_products_the_current_student_runs_in_int8(tmp_path):
    """Every weight product of an exported planner maps back to its Linear module (`module_of_node`); with
    `products` only those are fake-quantized (forward changes there), the rest compute in float."""
    import onnx

    torch.manual_seed(0)
    model = Planner(TINY).eval()
    art = Artifact.from_file(save_checkpoint(model, tmp_path / "m.pt"), "orin")
    fp32 = ExportOnnx(load_targets(chips=["orin"])["orin"]).run(art, ExportConfig(name="m", version="t"),
                                                                 tmp_path / "fp32")
    graph = onnx.load(str(fp32.path)).graph
    weights = {i.name for i in graph.initializer}
    products = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {module_of_node(p) for p in products} == linears
    assert module_of_node("/traj_head/traj_head.2/Gemm") == "traj_head.2"
    assert module_of_node("/layers.0/attn/qkv/MatMul") == "layers.0.attn.qkv"
    frames = _frames(1, 3).take(slice(0, 16))
    example = tuple(tensors(frames.inputs()))
    chosen = [p for p in products if module_of_node(p).startswith("layers.")]
    fq = FakeQuant(model, QatConfig(products=chosen), example)
    assert set(fq.names) == {module_of_node(p) for p in chosen} and set(fq.skipped) == linears - set(fq.names)
    model.train()
    with torch.no_grad(), fq.active(model):
        model(*example)  # observe the ranges
    model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.detach().clone()))
             for n, m in model.named_modules() if n in linears]
    with torch.no_grad():
        model(*example)
        plain = dict(seen)
        with fq.active(model):
            model(*example)
    for h in hooks:
        h.remove()
    first = "layers.0.attn.qkv"  # its input is the same in both passes: only the fake quantization differs
    assert not torch.equal(seen[first], plain[first])
    assert torch.equal(seen["ego_embed.0"], plain["ego_embed.0"])  # before any quantized product: untouched
    assert all(n not in fq.names for n in ("traj_head.2", "maneuver_head", "ego_embed.2"))
    assert FakeQuant(model, QatConfig(products=[]), example).names == []


def test_feature_and_attention_distillation_terms():
    from retrain.models.feature_distill import FeatureDistillConfig, FeatureDistiller, layer_map

    assert layer_map(2, 4) == [1, 3] and layer_map(1, 3) == [2] and layer_map(3, 3) == [0, 1, 2]
    torch.manual_seed(0)
    frames = _frames(1, 5).take(slice(0, 32))
    student = Planner(TINY)
    teacher = Planner(PlannerConfig(width=64, depth=2, heads=4, head_dim=16, ffn=128)).eval()
    t_traj, t_logits = torch_predict(teacher, frames)
    batch = {**frames.inputs(), "traj": frames.traj, "traj_mask": frames.traj_mask, "maneuver": frames.maneuver,
             "t_traj": t_traj, "t_logits": t_logits}
    fd = FeatureDistiller(student, teacher, FeatureDistillConfig(hidden_weight=1.0, attention_weight=1.0))
    with fd.capture(student):
        base = distill_loss(student, batch, DistillConfig(hard_weight=0.0))
    extra = fd.loss(batch)
    assert extra.item() > 0
    (base + extra).backward()
    assert student.layers[0].attn.qkv.weight.grad.abs().sum() > 0  # the attention term reaches the student
    assert fd.proj[0].weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    assert student.layers[0].attn.map is None and not student.layers[0].attn.keep_map  # hooks are gone
    off = FeatureDistiller(student, teacher, FeatureDistillConfig(hidden_weight=0.0, attention_weight=1.0))
    with off.capture(student):
        distill_loss(student, batch, DistillConfig(hard_weight=0.0))
    assert 0 < off.loss(batch).item() < extra.item()
