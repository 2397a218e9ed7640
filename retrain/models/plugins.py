"""Planner plug-ins: bring your own torch planner, registered by name through the entry-point group
`flywheel.planners`.

    [project.entry-points."flywheel.planners"]
    my-planner = "my_package.planner:PLANNER"        # a PlannerPlugin, or a zero-argument callable returning one

A plug-in names the featurizer its inputs come from (a registered `shadow.plugins.Featurizer`), builds its
`torch.nn.Module` from a JSON-able config (`build(config)`; `forward(*inputs)` in the featurizer's input order returns
the shared heads: trajectory (B, 8, 3) [m, m, rad] and maneuver logits (B, 6)), says how to get the config back from
a module (`config_of`), and may offer structured-pruning hooks (`pruning`); compression passes that need the
architecture ask for them and are skipped with a message when there are none.

A plug-in model directory holds `model.onnx` and `spec.json` (spec.featurizer / featurizer_version / planner,
spec.architecture = the config) like every model, and `state_dict.pt`: the module's weights, so fine-tuning starts
from exactly the deployed model (`load_module`). Built in: `transformer` (the project's `Planner`) and `mixer`
(`retrain.models.mixer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ingest.lake import write_bytes_atomic
from ingest.versions import check_version
from retrain.models import mixer as mx
from retrain.models.architectures import Planner, PlannerConfig
from retrain.models.training import DistillConfig, OptimConfig, fit, planning_loss
from shadow.plugins import Featurizer, PluginError, featurizer
from shadow.spec import MODEL_FILE, ModelSpec, TensorSpec, default_outputs, read_spec, write_spec

PLANNER_GROUP = "flywheel.planners"
STATE_FILE = "state_dict.pt"
STATE_FORMAT_VERSION = 1
OUTPUT_NAMES = ("trajectory", "maneuver_logits")


@dataclass(frozen=True)
class PruningHooks:
    """Structured pruning of a plug-in's module: `prune(module, keep)` returns a smaller copy keeping about the share
    `keep` (0..1] of its prunable units (chosen by the plug-in), `units(module)` counts them."""

    prune: Callable[[nn.Module, float], nn.Module]
    units: Callable[[nn.Module], int]


@dataclass(frozen=True)
class PlannerPlugin:
    """A registered planner: see the module docstring."""

    name: str
    featurizer: str
    build: Callable[[dict], nn.Module]
    config_of: Callable[[nn.Module], dict]
    flops_per_frame: Callable[[nn.Module], int] | None = None
    pruning: PruningHooks | None = None
    description: str = ""

    def features(self) -> Featurizer:
        return featurizer(self.featurizer)

    def tensors(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The module's inputs from a dict of arrays, in the featurizer's order."""
        return tuple(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in self.features().input_names)


def _transformer_flops(m: nn.Module) -> int:
    return int(m.flops_per_frame())


TRANSFORMER = PlannerPlugin("transformer", "flywheel", lambda cfg: Planner(PlannerConfig.model_validate(cfg)),
                            lambda m: m.config.model_dump(), _transformer_flops, None,
                            "the project's transformer Planner (retrain.models.architectures); its structured "
                            "pruning is the compression pass's own (Taylor importance of heads and FFN channels)")
MIXER = PlannerPlugin("mixer", "mixer", lambda cfg: mx.MixerPlanner(mx.MixerConfig.model_validate(cfg)),
                      lambda m: m.config.model_dump(), mx.flops_per_frame,
                      PruningHooks(mx.prune_channels, mx.prunable_units),
                      "second reference planner: an MLP-Mixer over the mixer featurizer's tokens")


def _load(ep) -> PlannerPlugin:
    try:
        obj = ep.load()
        obj = obj() if callable(obj) and not isinstance(obj, PlannerPlugin) else obj
    except Exception as exc:  # a third-party module: any failure is the plug-in's, reported with its name
        raise PluginError(f"planner plug-in {ep.name} ({ep.value}) failed to load: {exc}") from exc
    if not isinstance(obj, PlannerPlugin) or obj.name != ep.name:
        raise PluginError(f"planner plug-in {ep.name} ({ep.value}) is not a PlannerPlugin named {ep.name!r}")
    return obj


@lru_cache(maxsize=None)
def planners() -> dict[str, PlannerPlugin]:
    """Every registered planner by name: the built-in ones, then the entry points of `flywheel.planners`."""
    out = {TRANSFORMER.name: TRANSFORMER, MIXER.name: MIXER}
    for ep in entry_points(group=PLANNER_GROUP):
        if ep.name in out and ep.value.startswith("retrain."):
            continue
        out[ep.name] = _load(ep)
    return out


def planner(name: str) -> PlannerPlugin:
    known = planners()
    if name not in known:
        raise PluginError(f"planner {name!r} is not registered (entry-point group {PLANNER_GROUP}); registered: "
                          f"{sorted(known)}")
    return known[name]


def planner_of(spec: ModelSpec) -> PlannerPlugin:
    """The plug-in that builds a model's module (spec.planner; the transformer for models built before plug-ins)."""
    return planner(spec.planner or TRANSFORMER.name)


def export(plugin: PlannerPlugin, module: nn.Module, model_dir: Path, name: str, version: str, extra: dict | None = None,
           opset: int = 17) -> ModelSpec:
    """model_dir/model.onnx (dynamic batch axis, the featurizer's input names, the shared output names), spec.json
    naming the plug-in and its featurizer, and state_dict.pt; returns the spec."""
    feat = plugin.features()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = tuple(torch.zeros((2, *shape)) for _, shape in feat.inputs)
    axes = {n: {0: "batch"} for n in (*feat.input_names, *OUTPUT_NAMES)}
    path = model_dir / MODEL_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=opset,
                          input_names=list(feat.input_names), output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          do_constant_folding=True)
    tmp.replace(path)
    save_state(plugin, module, model_dir / STATE_FILE)
    inputs = [TensorSpec(name=n, shape=["batch", *shape], role=n, units=f"see featurizer {feat.name} {feat.version}")
              for n, shape in feat.inputs]
    extra = {"checkpoint": str((model_dir / STATE_FILE).resolve()), **(extra or {})}  # what a cycle fine-tunes
    spec = ModelSpec(name=name, version=version, precision="fp32", featurizer=feat.name,
                     featurizer_version=feat.version, planner=plugin.name, inputs=inputs, outputs=default_outputs(),
                     parameters=sum(p.numel() for p in module.parameters()),
                     flops_per_frame=plugin.flops_per_frame(module) if plugin.flops_per_frame else 0,
                     architecture=plugin.config_of(module), extra=extra)
    write_spec(spec, path)
    return read_spec(path)


def save_state(plugin: PlannerPlugin, module: nn.Module, path: Path) -> Path:
    """The module's state dict with its plug-in and config (atomically)."""
    import io

    buf = io.BytesIO()
    torch.save({"format_version": STATE_FORMAT_VERSION, "planner": plugin.name, "config": plugin.config_of(module),
                "state_dict": module.state_dict()}, buf)
    return write_bytes_atomic(Path(path), buf.getvalue())


def load_state(path: Path) -> tuple[PlannerPlugin, nn.Module]:
    """(plug-in, module with the saved weights) of a state file written by `save_state`."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    check_version(path, "planner state", blob.get("format_version"), STATE_FORMAT_VERSION)
    plugin = planner(blob["planner"])
    module = plugin.build(blob["config"])
    module.load_state_dict(blob["state_dict"])
    return plugin, module.eval()


def state_plugin(path: Path) -> PlannerPlugin | None:
    """The plug-in of a plug-in planner's state file (`save_state`); None for anything else (a transformer
    checkpoint of `retrain.models.training`)."""
    path = Path(path)
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "planner" not in blob or blob.get("planner") == TRANSFORMER.name:
        return None
    return planner(blob["planner"])


def load_module(model_dir: Path) -> tuple[PlannerPlugin, nn.Module]:
    """The torch module of a plug-in model directory (state_dict.pt beside model.onnx), checked against its spec;
    or of a state file given directly."""
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".pt":
        return load_state(model_dir)
    model_dir = model_dir if model_dir.is_dir() else model_dir.parent
    spec = read_spec(model_dir, verify=False)
    if not (model_dir / STATE_FILE).is_file():
        raise PluginError(f"{model_dir}: no {STATE_FILE}; a plug-in model keeps its weights there for fine-tuning")
    plugin, module = load_state(model_dir / STATE_FILE)
    if plugin.name != planner_of(spec).name:
        raise PluginError(f"{model_dir}: {STATE_FILE} is a {plugin.name} planner, the spec says {spec.planner!r}")
    return plugin, module


@torch.no_grad()
def predict(plugin: PlannerPlugin, module: nn.Module, inputs: dict[str, np.ndarray], batch_size: int = 1024
            ) -> tuple[np.ndarray, np.ndarray]:
    """Run a plug-in module over featurized frames -> (trajectory (N, 8, 3), logits (N, 6)) float32."""
    module.eval()
    n = next(iter(inputs.values())).shape[0]
    outs = [module(*plugin.tensors({k: v[s:s + batch_size] for k, v in inputs.items()}))
            for s in range(0, n, batch_size)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def distill_loss(plugin: PlannerPlugin, cfg: DistillConfig) -> Callable[[nn.Module, dict[str, np.ndarray]],
                                                                        torch.Tensor]:
    """The distillation loss of `retrain.models.training.distill_loss` for a plug-in module: soft targets
    `t_traj` (B, 8, 3), `t_logits` (B, 6) from the teacher, plus `hard_weight` x the planning loss against the logged
    future (`traj`, `traj_mask`, `maneuver`) when the batch has it."""

    def loss_fn(module: nn.Module, b: dict[str, np.ndarray]) -> torch.Tensor:
        traj, logits = module(*plugin.tensors(b))
        everywhere = torch.ones(traj.shape[:2], dtype=torch.bool)
        unknown = torch.zeros(traj.shape[0], dtype=torch.int64)
        loss = cfg.traj_weight * planning_loss(traj, logits, torch.from_numpy(b["t_traj"]), everywhere, unknown,
                                               cfg.loss)
        t = cfg.temperature
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits / t, -1),
                                        torch.log_softmax(torch.from_numpy(b["t_logits"]) / t, -1),
                                        log_target=True, reduction="batchmean")
        loss = loss + cfg.kl_weight * t * t * kl
        if cfg.hard_weight and "traj" in b:
            loss = loss + cfg.hard_weight * planning_loss(traj, logits, torch.from_numpy(b["traj"]),
                                                          torch.from_numpy(b["traj_mask"]),
                                                          torch.from_numpy(b["maneuver"]), cfg.loss)
        return loss

    return loss_fn


def distill(plugin: PlannerPlugin, module: nn.Module, data: dict[str, np.ndarray], optim: OptimConfig,
            loss: DistillConfig | None = None, seed: int = 0) -> float:
    """Train a plug-in module in place on `data` (the featurizer's inputs plus t_traj, t_logits and optionally the
    logged targets, arrays with a common first axis) with `retrain.models.training.fit`; returns the final loss."""
    return fit(module, data, distill_loss(plugin, loss or DistillConfig()), optim, seed, log_every=0)
