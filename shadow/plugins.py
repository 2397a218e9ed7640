"""Featurizer plug-ins: bring your own model inputs, registered by name through the entry-point group
`flywheel.featurizers`.

A featurizer turns contract frames into the float32 tensors a planner eats. It is registered as an entry point whose
object is a `Featurizer` (or a zero-argument callable returning one):

    [project.entry-points."flywheel.featurizers"]
    my-feat = "my_package.features:FEATURIZER"

A model's spec names its featurizer (`ModelSpec.featurizer`, the registered name) and version
(`featurizer_version`); the replay refuses a model whose featurizer is not registered, whose version differs from
the registered one, or whose graph inputs are not the featurizer's. The heads are shared by every planner: a
trajectory (N, 8, 3) [m, m, rad] at 0.5 s and maneuver logits (N, 6); the targets (the logged future) are the
project's (`shadow.featurize`), whatever the featurizer.

The project's own featurizer is registered as `flywheel` (`feat-v1`, `shadow.featurize`) and the second reference
featurizer as `mixer` (`shadow.featurize_mixer`); both are also known without the package's metadata installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib.metadata import entry_points

import numpy as np

from ingest.contract import Frames
from shadow import featurize as fz
from shadow import featurize_mixer as fm

log = logging.getLogger(__name__)

FEATURIZER_GROUP = "flywheel.featurizers"
BUILTIN_FEATURIZER = "flywheel"


class PluginError(ValueError):
    """A plug-in that is not registered, fails to load, or does not keep its contract; the message names it."""


@dataclass(frozen=True)
class Featurizer:
    """A registered featurizer.

    `inputs`: (ONNX input name, per-frame shape) in the order the planner's forward takes them. `history`: frames
    before the current one that `featurize` reads (the replay gives at most `shadow.featurize.HISTORY - 1`).
    `featurize(frames, segments)` -> {input name: float32 array (N, *shape)}, for every frame of `frames`, where
    `segments` (N,) int says which frames form one contiguous run of one drive (history never crosses runs).
    """

    name: str
    version: str
    inputs: tuple[tuple[str, tuple[int, ...]], ...]
    history: int
    featurize: Callable[[Frames, np.ndarray], dict[str, np.ndarray]]
    description: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.inputs)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.inputs)

    def __call__(self, frames: Frames, segments: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The inputs of every frame, checked against the declared names, shapes and dtype."""
        seg = np.zeros(frames.num_frames, np.int64) if segments is None else np.asarray(segments, np.int64)
        out = self.featurize(frames, seg)
        n = frames.num_frames
        if set(out) != set(self.input_names):
            raise PluginError(f"featurizer {self.name}: returned {sorted(out)}, declared {list(self.input_names)}")
        for name, shape in self.inputs:
            a = out[name]
            if a.shape != (n, *shape) or a.dtype != np.float32:
                raise PluginError(f"featurizer {self.name}: {name} is {a.dtype}{a.shape}, declared float32"
                                  f"{(n, *shape)}")
        return {k: np.ascontiguousarray(out[k]) for k in self.input_names}


def _builtin(frames: Frames, segments: np.ndarray) -> dict[str, np.ndarray]:
    return fz.featurize(frames, segments=segments, with_targets=False).inputs()


FLYWHEEL = Featurizer(BUILTIN_FEATURIZER, fz.FEATURIZER_VERSION,
                      tuple((n, fz.INPUT_SHAPES[n]) for n in fz.INPUT_NAMES), fz.HISTORY - 1, _builtin,
                      "the project's featurizer (shadow.featurize): ego history, 16 nearest agents, lane context")


MIXER = Featurizer("mixer", fm.VERSION, fm.INPUTS, fm.HISTORY, fm.featurize,
                   "second reference featurizer (shadow.featurize_mixer): strided ego motion, 24 nearest actors, "
                   "ego state")


def _builtins() -> dict[str, Featurizer]:
    return {BUILTIN_FEATURIZER: FLYWHEEL, MIXER.name: MIXER}


def _load(ep) -> Featurizer:
    try:
        obj = ep.load()
        obj = obj() if callable(obj) and not isinstance(obj, Featurizer) else obj
    except Exception as exc:  # a third-party module: any failure is the plug-in's, reported with its name
        raise PluginError(f"featurizer plug-in {ep.name} ({ep.value}) failed to load: {exc}") from exc
    if not isinstance(obj, Featurizer):
        raise PluginError(f"featurizer plug-in {ep.name} ({ep.value}) is a {type(obj).__name__}, not a "
                          "shadow.plugins.Featurizer")
    if obj.name != ep.name:
        raise PluginError(f"featurizer plug-in {ep.name} calls itself {obj.name!r}")
    return obj


@lru_cache(maxsize=None)
def featurizers() -> dict[str, Featurizer]:
    """Every registered featurizer by name: the built-in ones, then the entry points of `flywheel.featurizers`."""
    out = _builtins()
    for ep in entry_points(group=FEATURIZER_GROUP):
        if ep.name in out and ep.value.startswith("shadow."):
            continue  # the project's own entry points name the built-in objects
        out[ep.name] = _load(ep)
    return out


def featurizer(name: str, version: str | None = None) -> Featurizer:
    """The registered featurizer `name`; with `version`, it must be that version. Raises PluginError."""
    known = featurizers()
    if name not in known:
        raise PluginError(f"featurizer {name!r} is not registered (entry-point group {FEATURIZER_GROUP}); "
                          f"registered: {sorted(known)}")
    f = known[name]
    if version is not None and version != f.version:
        raise PluginError(f"featurizer {name} computes {f.version}, the model wants {version}")
    return f


class FeatureCache:
    """Inputs of one batch of frames per featurizer, computed once however many models share a featurizer."""

    def __init__(self, frames: Frames, segments: np.ndarray, builtin: fz.Features | None = None) -> None:
        self.frames = frames
        self.segments = segments
        self._by_name: dict[str, dict[str, np.ndarray]] = {}
        if builtin is not None:
            self._by_name[BUILTIN_FEATURIZER] = builtin.inputs()

    def inputs(self, f: Featurizer) -> dict[str, np.ndarray]:
        if f.name not in self._by_name:
            self._by_name[f.name] = f(self.frames, self.segments)
        return self._by_name[f.name]


def add_inputs(feats: fz.Features, frames: Frames, names: list[str] | tuple[str, ...],
               segments: np.ndarray | None = None) -> fz.Features:
    """`feats` (of `frames`, every frame) with the inputs of the featurizers `names` in `feats.extra` as well."""
    extra = dict(feats.extra or {})
    for name in names:
        if name != BUILTIN_FEATURIZER:
            extra[name] = featurizer(name)(frames, segments)
    feats.extra = extra or None
    return feats


def featurize_files(paths, featurizers: list[str] | tuple[str, ...] = (), with_targets: bool = True,
                    stride: int = 1) -> fz.Features:
    """`shadow.featurize.featurize_drive_files` with the inputs of the plug-in featurizers `featurizers` too."""
    return fz.featurize_drive_files(paths, with_targets, stride,
                                    add=lambda feats, frames: add_inputs(feats, frames, featurizers))


def featurizer_for_inputs(names) -> Featurizer:
    """The registered featurizer whose input names are exactly `names` (an ONNX graph's inputs)."""
    names = set(names)
    for f in featurizers().values():
        if set(f.input_names) == names:
            return f
    raise PluginError(f"no registered featurizer gives the inputs {sorted(names)}; registered: "
                      f"{ {k: list(f.input_names) for k, f in featurizers().items()} }")


@dataclass
class PluginFeatures(fz.Features):
    """Features whose `inputs()` are those of the featurizer `default` (kept in `extra`): code written for
    `Features.inputs()` (calibration readers, verification) feeds a plug-in planner its own inputs unchanged."""

    default: str = BUILTIN_FEATURIZER

    def inputs(self, featurizer: str | None = None) -> dict[str, np.ndarray]:
        return super().inputs(featurizer or self.default)


def as_inputs_of(feats: fz.Features, name: str) -> fz.Features:
    """`feats` (holding featurizer `name`'s inputs when it is a plug-in) seen as that featurizer's features."""
    if name == BUILTIN_FEATURIZER:
        return feats
    if not feats.extra or name not in feats.extra:
        raise PluginError(f"these features hold no inputs of featurizer {name!r}; add them with add_inputs")
    return PluginFeatures(**{f.name: getattr(feats, f.name) for f in fields(fz.Features)}, default=name)
