"""Bring your own model: featurizer and planner plug-ins through entry points, the second reference planner (an
MLP-Mixer with its own featurizer) distilled, exported, checked by the replay's loader, and pruned by its hooks."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import numpy as np
import pytest
import torch

from ingest.lake import write_drive
from ingest.synth import synthetic_drive, synthetic_frames
from retrain.cycle.closed_loop import ClosedLoopConfig, Policy, evaluate
from retrain.models import plugins as rp
from retrain.models.architectures import Planner, PlannerConfig, export_onnx
from retrain.models.evaluate import predict
from retrain.models.mixer import MixerConfig, prune_channels
from retrain.models.training import OptimConfig
from retrain.recipes.mixer import MixerRecipeConfig, run
from shadow import plugins as sp
from shadow.models import ModelError, load_model
from shadow.plugins import Featurizer, PluginError, featurize_files
from shadow.spec import ModelSpec, read_spec, write_spec

TINY_MIXER = MixerConfig(width=16, depth=1, token_hidden=8, channel_hidden=32)


def _double_speed(frames, segments):
    return {"speed2": (2 * frames.cols["ego_speed"]).astype(np.float32).reshape(-1, 1)}


THIRD_PARTY = Featurizer("speedy", "sp-1", (("speed2", (1,)),), 0, _double_speed, "a user's featurizer")


def _broken(frames, segments):
    return {"speed2": np.zeros((1, 1), np.float64)}


BROKEN = Featurizer("broken", "b-1", (("speed2", (1,)),), 0, _broken)


@pytest.fixture
def registry(monkeypatch):
    """The registries see the entry points given, as if installed by another package."""

    def use(featurizer_eps=(), planner_eps=()):
        eps = {sp.FEATURIZER_GROUP: list(featurizer_eps), rp.PLANNER_GROUP: list(planner_eps)}
        monkeypatch.setattr(sp, "entry_points", lambda group: eps.get(group, []))
        monkeypatch.setattr(rp, "entry_points", lambda group: eps.get(group, []))
        sp.featurizers.cache_clear()
        rp.planners.cache_clear()

    yield use
    sp.featurizers.cache_clear()
    rp.planners.cache_clear()


def test_registries_hold_the_builtins_and_entry_points(registry):
    registry([EntryPoint("speedy", f"{__name__}:THIRD_PARTY", sp.FEATURIZER_GROUP),
              EntryPoint("broken", f"{__name__}:BROKEN", sp.FEATURIZER_GROUP)],
             [EntryPoint("mixer", "retrain.models.plugins:MIXER", rp.PLANNER_GROUP)])
    assert {"flywheel", "mixer", "speedy"} <= set(sp.featurizers())
    assert {"transformer", "mixer"} <= set(rp.planners())
    frames = synthetic_frames(12, agents=3)
    assert sp.featurizer("speedy", "sp-1")(frames)["speed2"].shape == (12, 1)
    with pytest.raises(PluginError, match="broken: speed2 is float64"):
        sp.featurizer("broken")(frames)
    with pytest.raises(PluginError, match="featurizer 'nope' is not registered.*registered: "):
        sp.featurizer("nope")
    with pytest.raises(PluginError, match="computes sp-1, the model wants sp-2"):
        sp.featurizer("speedy", "sp-2")
    with pytest.raises(PluginError, match="planner 'rnn' is not registered"):
        rp.planner("rnn")


def test_a_plugin_that_fails_to_load_is_named(registry):
    registry([EntryPoint("gone", "no_such_module_anywhere:F", sp.FEATURIZER_GROUP)])
    with pytest.raises(PluginError, match=r"featurizer plug-in gone \(no_such_module_anywhere:F\) failed to load"):
        sp.featurizers()


def test_a_model_whose_featurizer_is_unknown_or_mismatched_is_refused(tmp_path):
    path = export_onnx(Planner(PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)), tmp_path / "m" /
                       "model.onnx")
    write_spec(ModelSpec(name="t", version="v1", featurizer="speedy", featurizer_version="sp-1"), path)
    with pytest.raises(ModelError, match="featurizer 'speedy' is not registered"):
        load_model(path.parent)
    write_spec(ModelSpec(name="t", version="v1", featurizer="mixer", featurizer_version="mix-v1"), path)
    with pytest.raises(ModelError, match="featurizer mixer gives"):
        load_model(path.parent)


def test_mixer_distilled_exported_and_run_by_the_replay_loader(tmp_path):
    drives = tmp_path / "drives"
    for i in range(3):
        write_drive(drives, synthetic_drive(f"d{i}", "veh-1", 80, agents=6, seed=i))
    teacher = export_onnx(Planner(PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)),
                          tmp_path / "teacher" / "model.onnx")
    write_spec(ModelSpec(name="teacher", version="v1"), teacher)
    cfg = MixerRecipeConfig(drives_dir=drives, teacher=teacher.parent, out_dir=tmp_path / "mixer", mixer=TINY_MIXER,
                            optim=OptimConfig(steps=30, batch_size=32, lr=1e-3, warmup_steps=5), holdout_fraction=0.34)
    spec = run(cfg)
    assert (spec.featurizer, spec.featurizer_version, spec.planner) == ("mixer", "mix-v1", "mixer")
    assert [i.name for i in spec.inputs] == ["motion", "actors", "state"] and spec.flops_per_frame > 0
    assert spec.extra["held_out_vs_teacher"]["frames"] == 80
    model = load_model(tmp_path / "mixer")  # the replay's loader: featurizer and graph inputs checked
    feats = featurize_files(sorted(drives.glob("*/*.drive.parquet")), ["mixer"])
    onnx_out = model.predict(feats.inputs("mixer"))
    plugin, module = rp.load_module(tmp_path / "mixer")
    torch_out = rp.predict(plugin, module, feats.inputs("mixer"))
    np.testing.assert_allclose(onnx_out[0], torch_out[0], atol=1e-4)
    np.testing.assert_allclose(predict(model.session, feats)[1], torch_out[1], atol=1e-4)  # inputs by graph names
    assert read_spec(tmp_path / "mixer").sha256 == spec.sha256
    # closed loop in the simulator: the planner is fed by its own featurizer, found from its graph's inputs
    rec = evaluate([Policy("mixer", model=tmp_path / "mixer")],
                   ClosedLoopConfig(scenarios=["highway"], episodes=1, max_steps=15))[0]
    assert rec["policy"] == "mixer" and rec["episodes"] == 1


def test_mixer_pruning_hooks_keep_what_matters():
    torch.manual_seed(0)
    module = rp.MIXER.build(TINY_MIXER.model_dump())
    pruned = prune_channels(module, 0.5)
    assert rp.MIXER.pruning.units(pruned) == 16 and rp.MIXER.pruning.units(module) == 32
    x = tuple(torch.randn(4, *shape) for _, shape in sp.MIXER.inputs)
    with torch.no_grad():
        full, small = module(*x)[0], pruned(*x)[0]
        keep_all = prune_channels(module, 1.0)(*x)[0]
    torch.testing.assert_close(keep_all, full)  # keeping everything changes nothing
    assert small.shape == full.shape
    assert rp.TRANSFORMER.pruning is None  # the transformer's pruning is the compression pass's own
