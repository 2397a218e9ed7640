"""The second reference planner (MLP-Mixer plug-in, its own featurizer) through the retraining steps on tiny sizes:
shadow replay against the transformer teacher, mining, a snapshot, fine-tuning from the teacher's stored outputs,
compression for every chip with its pruning hooks, and the same pipeline skipping pruning, with a message, for a
plug-in that offers none."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retrain.compress.targets import load_targets
from retrain.compress.workflow import CompressConfig
from retrain.cycle.compress_plugin import compress_plugin_for_target, is_plugin_model
from retrain.cycle.dataset import DatasetConfig, compress_frames, create_snapshot
from retrain.cycle.finetune import FinetuneConfig
from retrain.cycle.finetune_plugin import finetune_plugin
from retrain.cycle.mining import MiningConfig, mine
from retrain.models import plugins as rp
from retrain.models.mixer import MixerConfig
from shadow.batch.replay import replay
from shadow.config import ReplayConfig
from shadow.models import load_model
from shadow.spec import read_spec
from tests.shadow.test_replay import TEACHER_CFG, make_model, small_lake

TINY = MixerConfig(width=16, depth=1, token_hidden=8, channel_hidden=32)
CHIPS = ("orin", "ascend310", "journey6", "cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-cycle")
    lake = root / "lake"
    small_lake(lake, {"d0": 230, "d1": 170, "d2": 150, "d3": 140, "d4": 120, "d5": 110})
    teacher = make_model(root / "models", "teacher", "v1", 0, TEACHER_CFG)
    torch.manual_seed(1)
    student = root / "models" / "mixer"
    rp.export(rp.MIXER, rp.MIXER.build(TINY.model_dump()), student, "student-mixer", "v0")
    replay(lake, teacher, student, ReplayConfig(group_frames=256))
    mined = mine(lake, MiningConfig(require_noise_floor=False, min_score=0.0, min_window_frames=5))
    snap = create_snapshot(lake, mined, DatasetConfig(val_fraction=0.2, test_fraction=0.2), root / "snapshots")
    return {"root": root, "lake": lake, "teacher": teacher, "student": student, "snapshot": snap}


def test_finetune_from_the_plugins_module_and_the_teachers_stored_outputs(world, tmp_path):
    cfg = FinetuneConfig(steps=30, batch_size=32, eval_every=10, warmup_steps=5, lr=1e-3)
    res = finetune_plugin(world["student"], world["teacher"], world["snapshot"], cfg, tmp_path / "ft",
                          stored=world["lake"])
    assert res.numerics["planner"] == "mixer" and res.numerics["teacher_stored_frames"] > 0
    assert res.steps_run >= 10 and res.best["objective"] <= res.initial["objective"]
    assert res.frames["train_mined"] > 0 and "qat" in res.numerics["skipped"]
    cand = tmp_path / "ft" / "model"
    assert is_plugin_model(cand) and Path(res.checkpoint) == cand / rp.STATE_FILE
    model = load_model(cand)  # the replay can run the candidate: featurizer and inputs checked
    assert model.spec.version == "v0-ft" and model.featurizer.name == "mixer"


def test_compressed_for_every_chip_with_its_pruning_hooks(world, tmp_path):
    calib, val, mined = compress_frames(world["snapshot"], featurizers=["mixer"])
    cfg = CompressConfig(calibration_frames=64, fallback_frames=48, latency_runs=5, latency_warmup=1,
                         prune={"keep_ratios": [1.0, 0.5], "size_budget_bytes": 4_000, "finetune_steps": 5,
                                "batch_size": 16}, fallback={"tolerance": 1e3})
    for chip, target in load_targets(chips=list(CHIPS)).items():
        r = compress_plugin_for_target(world["student"], target, calib, val, tmp_path, cfg, world["teacher"],
                                       mined)
        assert r.verified and r.rules_ok and Path(r.artifact).is_file(), chip
        assert r.prune_keep == 0.5  # 90% of 4,000 bytes: 3,790 at keep 1 does not fit, 3,246 at 0.5 does
        assert r.lineage[0] == "source" and r.lineage[-1] == "verify"
        assert "int8" in r.precision_mix


def test_a_plugin_without_pruning_hooks_is_compressed_unpruned(world, tmp_path, monkeypatch):
    bare = replace(rp.MIXER, pruning=None)
    monkeypatch.setitem(rp.planners(), "mixer", bare)
    calib, val, mined = compress_frames(world["snapshot"], featurizers=["mixer"])
    cfg = CompressConfig(calibration_frames=64, fallback_frames=48, latency_runs=3, latency_warmup=1,
                         fallback={"tolerance": 1e3})
    target = load_targets(chips=["cpu"])["cpu"]
    r = compress_plugin_for_target(world["student"], target, calib, val, tmp_path, cfg, world["teacher"], mined)
    assert r.prune_keep == 1.0 and r.verified and np.isfinite(r.max_abs_error)
    prune = json.loads((tmp_path / "cpu" / "prune.json").read_text())
    assert prune["skipped"] == "structured pruning skipped: planner mixer offers no pruning hooks"


def test_one_cycle_of_the_mixer_through_verification_gate_and_registry(tmp_path_factory):
    """The real cycle (`run_cycle`) with the MLP-Mixer as the current student, on the tiny world of the cycle tests:
    mined, fine-tuned through its plug-in, compressed for every chip, verified by replay and closed loop, gated,
    registered."""
    from retrain.cycle.cycle import run_cycle
    from retrain.cycle.registry import Registry
    from retrain.recipes.mixer import MixerRecipeConfig, run
    from tests.retrain.test_cycle import config, tiny_world

    world = tiny_world(tmp_path_factory.getbasetemp() / "flywheel-world")
    root = tmp_path_factory.mktemp("mixer-cycle")
    reg = Registry(world["registry"])
    teacher = reg.version_dir("teacher", "v1")
    run(MixerRecipeConfig(drives_dir=world["drives"], teacher=teacher, out_dir=root / "mixer-v0", mixer=TINY,
                          optim={"steps": 20, "batch_size": 32, "warmup_steps": 2}))
    if "student-mixer:v0" not in {e.ref for e in reg.list("student-mixer")}:
        reg.register("student-mixer", "v0", root / "mixer-v0", parents=["teacher:v1"], recipe="retrain.recipes.mixer")
        reg.promote("student-mixer", "v0", "mixer v0")
    lake = root / "lake"
    import shutil

    shutil.copytree(world["lake"] / "frames", lake / "frames")
    replay(lake, teacher, reg.version_dir("student-mixer", "v0"), ReplayConfig(drive_end_idle_s=0.0, noise_every=5))
    cfg = config(world, lake=lake, student="student-mixer:v0", snapshots_dir=root / "snapshots",
                 targets=list(CHIPS), candidate_version="v1")
    result = run_cycle(cfg, root / "work")
    assert result.finetune["numerics"]["planner"] == "mixer"
    assert {t["chip"] for t in result.targets} == set(CHIPS)
    assert result.divergence["mined"]["after"]["frames"] > 0 and result.closed_loop["after"]
    assert result.status in ("promoted", "rejected") and result.gate["reasons"] is not None
    cand = reg.get("student-mixer", "v1")
    spec = read_spec(reg.version_dir(cand.name, cand.version))
    assert (spec.featurizer, spec.planner) == ("mixer", "mixer")
    assert Path(spec.extra["checkpoint"]).is_file()  # the next cycle fine-tunes from it
    from retrain.cycle.report import render_report

    html = render_report(result.model_dump(mode="json"), root / "report.html", lake=lake).read_text()
    assert "student-mixer" in html and "<table" in html
