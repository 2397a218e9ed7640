"""Targeted fine-tuning on a real snapshot of a tiny lake: distillation from a real teacher (onnxruntime), early
stopping on val drives, and a run killed mid-way that resumes from its checkpoint to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrain.models.augment import AugmentConfig, bank, perturb
from retrain.cycle.dataset import DatasetConfig, create_snapshot
from retrain.cycle.finetune import FinetuneConfig, FinetuneError, finetune
from retrain.models.feature_distill import FeatureDistillConfig
from retrain.models.onnx_import import planner_from_onnx
from retrain.cycle.mining import MiningConfig, mine
from retrain.cycle.registry import Registry
from retrain.models.training import load_checkpoint, torch_predict
from tests.retrain.test_cycle import tiny_world

CFG = FinetuneConfig(steps=10, batch_size=32, eval_every=3, checkpoint_every=3, warmup_steps=2, progress_every=1)
# perturbed mined frames from a bank labelled by the teacher before training, and a moving average of the weights
CFG_AUG = CFG.model_copy(update={"augment": AugmentConfig(share=0.5, bank_copies=2), "ema_decay": 0.9})
# the same, labelled by the teacher on the fly every step
CFG_FLY = CFG.model_copy(update={"augment": AugmentConfig(share=0.5, bank_copies=0), "ema_decay": 0.9})


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    world = tiny_world(tmp_path_factory.getbasetemp() / "flywheel-world")
    reg = Registry(world["registry"])
    mined = mine(world["lake"], MiningConfig(pair="teacher-v1__student-v0", max_windows=14, max_per_drive=2,
                                             noise_margin=1.0))
    snap = create_snapshot(world["lake"], mined, DatasetConfig(), tmp_path_factory.mktemp("snaps"))
    return {"teacher": reg.version_dir("teacher", "v1"), "start": world["root"] / "student" / "checkpoint.pt",
            "snapshot": snap, "fp32": reg.version_dir("student-fp32", "v0")}


def _state(path):
    return load_checkpoint(path).state_dict()


def test_finetune_learns_and_records(setup, tmp_path):
    seen = []
    res = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path,
                   progress=lambda s, n, info: seen.append((s, n, dict(info))))
    assert res.steps_run <= 10 and res.resumed_from_step == 0 and res.frames["train_mined"] > 0
    assert res.frames["train_ordinary"] > 0 and res.frames["val_mined"] > 0
    assert [h["step"] for h in res.history][:2] == [0, 3]
    # the kept state is never worse on val than the start, judged alike: in the QAT phase both fake-quantized
    assert res.qat_started_at == 5 and res.best["phase"] == "qat"
    assert res.best["objective"] <= _start_objective(res)
    assert [s for s, *_ in seen][:3] == [1, 2, 3] and all(n == 10 for _, n, _ in seen)
    assert "objective" in seen[2][2] and seen[0][2]["loss"] > 0
    # a second call finds the finished run
    again = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path)
    assert again.model_dump() == res.model_dump()


@pytest.mark.parametrize("cfg", [CFG, CFG_AUG, CFG_FLY], ids=["plain", "augment-bank-ema", "augment-fly-ema"])
def test_killed_finetune_resumes_to_the_same_weights(setup, tmp_path, cfg):
    full = finetune(setup["start"], setup["teacher"], setup["snapshot"], cfg, tmp_path / "full")

    def kill(step, total, info):
        if step == 7:
            raise Killed()

    with pytest.raises(Killed):
        finetune(setup["start"], setup["teacher"], setup["snapshot"], cfg, tmp_path / "cut", progress=kill)
    assert (tmp_path / "cut" / "state.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    resumed = finetune(setup["start"], setup["teacher"], setup["snapshot"], cfg, tmp_path / "cut")
    assert resumed.resumed_from_step == 6  # the last state saved before the kill at step 7
    assert resumed.history == full.history and resumed.best_step == full.best_step
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_state_is_refused(setup, tmp_path):
    with pytest.raises(Killed):
        finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path,
                 progress=lambda s, n, i: (_ for _ in ()).throw(Killed()) if s == 4 else None)
    other = CFG.model_copy(update={"lr": 1e-3})
    with pytest.raises(FinetuneError, match="another fine-tune"):
        finetune(setup["start"], setup["teacher"], setup["snapshot"], other, tmp_path)


def test_zero_steps_keeps_the_start_model(setup, tmp_path):
    res = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG.model_copy(update={"steps": 0}), tmp_path)
    a, b = _state(setup["start"]), _state(res.checkpoint)
    assert res.steps_run == 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_planner_rebuilt_from_fp32_onnx(setup):
    from retrain.models.evaluate import predict
    from shadow.models import session

    model = planner_from_onnx(setup["fp32"])
    feats, _ = setup["snapshot"].features()
    feats = feats.take(slice(0, 64))
    a, b = predict(session(setup["fp32"]), feats), torch_predict(model, feats)
    assert abs(a[0] - b[0]).max() < 1e-3 and abs(a[1] - b[1]).max() < 1e-3


def test_regrow_restores_the_unpruned_size_and_computes_the_same(setup):
    from retrain.models.architectures import grow

    start = load_checkpoint(setup["start"])
    cfg = start.config
    grown = grow(start, cfg.heads, cfg.ffn, seed=1).eval()
    assert [layer.attn.heads for layer in grown.layers] == [cfg.heads] * cfg.depth
    assert [layer.fc1.out_features for layer in grown.layers] == [cfg.ffn] * cfg.depth
    feats, _ = setup["snapshot"].features()
    feats = feats.take(slice(0, 64))
    a, b = torch_predict(start, feats), torch_predict(grown, feats)
    assert abs(a[0] - b[0]).max() < 1e-4 and abs(a[1] - b[1]).max() < 1e-4


def _start_objective(res) -> float:
    """The start model's val objective judged as the kept state is: fake-quantized once the QAT phase began."""
    return next((h for h in res.history if h.get("note", "").startswith("start model")), res.initial)["objective"]


def test_candidate_keeps_the_start_architecture_and_a_regrown_one_is_pruned_back(setup, tmp_path):
    start = load_checkpoint(setup["start"]).config
    plain = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path / "plain")
    assert load_checkpoint(plain.checkpoint).config == start and plain.prune_back is None
    regrow = CFG.model_copy(update={"regrow": True, "prune_back_steps": 4})
    back = finetune(setup["start"], setup["teacher"], setup["snapshot"], regrow, tmp_path / "back")
    cand = load_checkpoint(back.checkpoint).config
    heads = [start.heads_of(i) for i in range(start.depth)]
    ffn = [start.ffn_of(i) for i in range(start.depth)]
    assert cand.layer_heads == heads and cand.layer_ffn == ffn
    if back.best_step > 0:
        assert back.prune_back["heads"] == heads and back.prune_back["steps"] == 4
        assert back.prune_back["recovered"]["objective"] > 0
    grown = finetune(setup["start"], setup["teacher"], setup["snapshot"],
                     regrow.model_copy(update={"prune_back": False}), tmp_path / "grown")
    if grown.best_step > 0:
        g = load_checkpoint(grown.checkpoint).config
        assert g.layer_heads == [start.heads] * start.depth and g.layer_ffn == [start.ffn] * start.depth


def test_finetune_with_feature_distillation(setup, tmp_path):
    cfg = CFG.model_copy(update={"features": FeatureDistillConfig(hidden_weight=0.1, attention_weight=0.1)})
    res = finetune(setup["start"], setup["teacher"], setup["snapshot"], cfg, tmp_path)
    assert res.steps_run == 10 and res.best["objective"] <= _start_objective(res)
    assert load_checkpoint(res.checkpoint).config == load_checkpoint(setup["start"]).config  # the maps are not kept


def test_augmented_finetune_never_ends_worse_than_its_start(setup, tmp_path):
    res = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG_AUG, tmp_path)
    assert res.best["objective"] <= _start_objective(res) and res.steps_run > 0


def test_augmentation_bank_is_copy_major_and_deterministic():
    x = _agents()
    cfg = AugmentConfig(share=0.5, bank_copies=3, stop_prob=0.0)
    a, b = bank(x, cfg, np.random.default_rng([0, 1])), bank(x, cfg, np.random.default_rng([0, 1]))
    assert all(np.array_equal(a[k], b[k]) for k in x)
    assert a["agents"].shape == (3 * 64, *x["agents"].shape[1:])
    # row c * n + i is a perturbed copy of frame i: the ego and lane are left as logged
    assert np.array_equal(a["ego_hist"][64:128], x["ego_hist"]) and np.array_equal(a["lane"][128:], x["lane"])
    assert not np.array_equal(a["agents"][:64], a["agents"][64:128])
    assert bank(x, cfg.model_copy(update={"bank_copies": 0}), np.random.default_rng(0))["agents"].shape[0] == 0


def _agents(n=64, seed=0):
    rng = np.random.default_rng(seed)
    k = 16
    count = rng.integers(0, k + 1, n)
    mask = (np.arange(k)[None] < count[:, None]).astype(np.float32)
    agents = rng.standard_normal((n, k, 16)).astype(np.float32) * mask[..., None]
    agents[..., 9] = np.hypot(agents[..., 0], agents[..., 1]) * mask
    order = np.argsort(np.where(mask > 0, agents[..., 9], np.inf), axis=1, kind="stable")
    agents = np.take_along_axis(agents, order[..., None], axis=1)
    return {"ego_hist": rng.standard_normal((n, 10, 9)).astype(np.float32), "agents": agents, "agent_mask": mask,
            "lane": rng.standard_normal((n, 17)).astype(np.float32)}


def test_perturb_keeps_the_featurizer_layout():
    x = _agents()
    before = {k: v.copy() for k, v in x.items()}
    y = perturb(x, AugmentConfig(share=1.0, drop_prob=0.5, stop_prob=0.0), np.random.default_rng(1))
    assert all(np.array_equal(x[k], before[k]) for k in x)  # inputs untouched
    assert np.array_equal(y["ego_hist"], x["ego_hist"]) and np.array_equal(y["lane"], x["lane"])
    assert y["agents"].dtype == np.float32 and y["agents"].shape == x["agents"].shape
    m = y["agent_mask"]
    assert (m.sum(1) <= x["agent_mask"].sum(1)).all() and m.sum() < x["agent_mask"].sum()  # agents only missed
    assert (np.diff(m, axis=1) <= 0).all()  # real agents first, padding last
    assert (y["agents"][m == 0] == 0).all()
    real = m > 0
    assert np.allclose(y["agents"][..., 9][real], np.hypot(y["agents"][..., 0], y["agents"][..., 1])[real])
    assert (np.diff(np.where(real, y["agents"][..., 9], np.inf), axis=1)[real[:, 1:]] >= 0).all()  # nearest first
    # a heading error rotates (cos, sin): without drops the norms stay those of the logged tokens
    z = perturb(x, AugmentConfig(share=1.0, drop_prob=0.0), np.random.default_rng(2))
    norm = (lambda a: np.sort(np.hypot(a[..., 4], a[..., 5]), axis=1))  # noqa: E731
    assert np.array_equal(z["agent_mask"], x["agent_mask"]) and np.allclose(norm(z["agents"]), norm(x["agents"]),
                                                                             atol=1e-5)


def test_perturb_without_noise_is_the_identity():
    x = _agents()
    cfg = AugmentConfig(share=1.0, position_noise_m=0, velocity_noise_mps=0, heading_noise_rad=0, drop_prob=0,
                        stop_prob=0)
    y = perturb(x, cfg, np.random.default_rng(0))
    assert all(np.allclose(y[k], x[k]) for k in x)


def test_decay_toward_the_start_keeps_the_candidate_near_the_student(setup, tmp_path):
    # L2-SP: under the same strong decay the matrices stay near the start model's instead of shrinking toward zero
    start = _state(setup["start"])
    mats = [k for k, v in start.items() if v.ndim >= 2]
    cfg = CFG.model_copy(update={"weight_decay": 20.0, "lr": 2e-3, "ema_decay": None,
                                 "qat": CFG.qat.model_copy(update={"enabled": False})})

    def trained(decay_toward: str) -> dict:  # the raw weights of the last saved state (step 9), not the kept best
        finetune(setup["start"], setup["teacher"], setup["snapshot"], cfg.model_copy(update={"decay_toward":
                 decay_toward}), tmp_path / decay_toward)
        return torch.load(tmp_path / decay_toward / "state.pt", weights_only=False)["model"]

    def drift(state: dict) -> float:
        return sum(float((state[k] - start[k]).norm()) for k in mats)

    def size(state: dict) -> float:
        return sum(float(state[k].norm()) for k in mats)

    near, shrunk = trained("start"), trained("zero")
    assert drift(near) < 0.5 * drift(shrunk)  # nearer the student it started from
    assert size(shrunk) < 0.9 * size(start) < size(near)  # AdamW's decay shrank the weights (9 steps of 4%)
    with pytest.raises(ValueError, match="decay_toward"):
        FinetuneConfig(decay_toward="one")


def test_stopped_copies_hold_the_ego_still_where_it_is():
    # a copy whose ego is stopped: its whole history at the current position, heading unchanged, no speed,
    # acceleration or yaw rate; timing and validity as logged, the lane as logged, the agents perturbed as usual
    x = _agents(n=400)
    y = perturb(x, AugmentConfig(share=1.0, stop_prob=0.5), np.random.default_rng(3))
    stopped = (y["ego_hist"][..., 4] == 0).all(axis=1) & (y["ego_hist"][..., 0:2] == 0).all(axis=(1, 2))
    assert 150 < stopped.sum() < 250  # about half
    e = y["ego_hist"][stopped]
    assert (e[..., 2] == 1).all() and (e[..., 3] == 0).all() and (e[..., 4:7] == 0).all()
    assert np.array_equal(e[..., 7:], x["ego_hist"][stopped][..., 7:])
    assert np.array_equal(y["ego_hist"][~stopped], x["ego_hist"][~stopped]) and np.array_equal(y["lane"], x["lane"])
    none = perturb(x, AugmentConfig(share=1.0, stop_prob=0.0), np.random.default_rng(3))
    assert np.array_equal(none["ego_hist"], x["ego_hist"])


def test_plan_comfort_excess_against_a_hand_computation():
    from retrain.models.training import plan_comfort_excess

    steady = torch.zeros(2, 8, 3)
    steady[..., 0] = torch.arange(1, 9) * 2.5  # 5 m/s straight ahead at 0.5 s waypoints
    assert float(plan_comfort_excess(steady)) == pytest.approx(0.0, abs=1e-3)
    # speeds 5, 5, 5, 10, 10, 10, 2, 2 m/s: one step of +10 m/s^2, one of -16 m/s^2, jerks to match
    v = np.array([5, 5, 5, 10, 10, 10, 2, 2], np.float64)
    x = np.cumsum(v * 0.5)
    a = np.diff(v) / 0.5
    j = np.diff(a) / 0.5
    want = (np.maximum(a - 2.40, 0) + np.maximum(-4.05 - a, 0)).mean() + np.maximum(np.abs(j) - 4.13, 0).mean()
    plan = torch.zeros(1, 8, 3)
    plan[0, :, 1] = torch.tensor(x, dtype=torch.float32)  # along y: the direction does not matter
    assert float(plan_comfort_excess(plan)) == pytest.approx(want, rel=1e-3)


def test_comfort_weight_makes_the_candidates_plans_smoother(setup, tmp_path):
    from retrain.models.training import DistillConfig, plan_comfort_excess

    cfg = CFG.model_copy(update={"steps": 30, "lr": 3e-3, "ema_decay": None, "eval_every": 100,
                                 "qat": CFG.qat.model_copy(update={"enabled": False})})
    feats, meta = setup["snapshot"].features()

    def excess(weight: float) -> float:
        c = cfg.model_copy(update={"distill": DistillConfig(hard_weight=0.0, comfort_weight=weight)})
        state = finetune(setup["start"], setup["teacher"], setup["snapshot"], c, tmp_path / str(weight))
        # the last trained weights (the kept best may be step 0), run over every frame of the snapshot
        model = load_checkpoint(setup["start"])
        model.load_state_dict(torch.load(tmp_path / str(weight) / "state.pt", weights_only=False)["model"])
        assert state.steps_run == 30
        return float(plan_comfort_excess(torch.from_numpy(torch_predict(model.eval(), feats)[0])))

    plain, smooth = excess(0.0), excess(5.0)
    assert smooth < 0.7 * plain
