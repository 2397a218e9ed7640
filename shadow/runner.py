"""The onnxruntime runner: load a planner (.onnx + spec.json), check it, run it over featurized frames in batches.

    model = load_model("artifacts/teacher", RuntimeConfig())
    traj, logits = model.predict(features.inputs())     # (N, T, 3) [m, m, rad], (N, 6) unnormalised

A `RuntimeConfig` names everything about how onnxruntime executes a model. Two configurations matter to shadow mode:
the reference one (`RuntimeConfig()`, tuned for throughput on this machine: full graph optimisation, small batches
run concurrently, one single-threaded run per physical core) and a deliberately different one (`NOISE_RUNTIME`: no
graph optimisation, one run at a time over two threads, an odd batch size) under which the teacher is run again on a
sample of frames, so the divergence a mere change of runtime causes (the noise floor) is measured, not mined.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from shadow import featurize as fz
from shadow.spec import ModelSpec, model_file, read_spec

log = logging.getLogger(__name__)

_OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
               "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
               "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
               "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once); falls back on the logical count."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            core = Path(f"{base}/core_id").read_text().strip()
            pkg = Path(f"{base}/physical_package_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


class RuntimeConfig(BaseModel):
    """How onnxruntime runs a model. The defaults are the fastest measured on this machine (see bench/shadow.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: int = Field(1, ge=0, le=1024, description="threads of one operator; 0 = the physical cores "
                                  "(SMT siblings share the FMA units, so more threads only add contention)")
    workers: int = Field(0, ge=0, le=1024, description="batches run concurrently on one session from this many "
                         "threads; 0 = physical cores / intra-op threads. Measured here (bench/shadow.py): one "
                         "single-threaded run per core beats one run over all cores by ~40%: no barrier after "
                         "every operator, and no idle core while small operators run")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level (constant folding, fusions, layout changes)")
    execution_mode: Literal["sequential", "parallel"] = Field(
        "sequential", description="operators one after another (each uses every intra-op thread) or in parallel")
    cpu_arena: bool = Field(True, description="reuse freed buffers from an arena instead of malloc per run")
    memory_pattern: bool = Field(True, description="plan buffer offsets once per input shape (fixed batches)")
    allow_spinning: bool = Field(True, description="intra-op threads spin between operators instead of sleeping: "
                                 "faster back-to-back operators, at the price of CPU burnt while idle")
    batch_size: int = Field(64, ge=1, le=1 << 20, description="frames per session run; every run but the last "
                            "of a call has exactly this size, so the memory plan is reused. Small on purpose: "
                            "measured here, 32-64 frames (576-1152 token rows) keep a run's activations in the 2 MB "
                            "L2 cache of a core and beat 1024-4096 by 20-30% on the reference teacher")

    def threads(self) -> int:
        return self.intra_op_threads or physical_cores()

    def concurrency(self) -> int:
        return self.workers or max(1, physical_cores() // self.threads())

    def label(self) -> str:
        """Short description stored with noise-floor rows (runtime_a / runtime_b)."""
        return (f"ort{ort.__version__}/opt={self.graph_optimization}/threads={self.threads()}x"
                f"{self.concurrency()}/{self.execution_mode}/batch={self.batch_size}")

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        opts.intra_op_num_threads = self.threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if self.execution_mode == "sequential"
                               else ort.ExecutionMode.ORT_PARALLEL)
        opts.enable_cpu_mem_arena = self.cpu_arena
        opts.enable_mem_pattern = self.memory_pattern
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return opts


NOISE_RUNTIME = RuntimeConfig(intra_op_threads=2, workers=1, graph_optimization="disable", memory_pattern=False,
                              allow_spinning=False, batch_size=333)
"""The second configuration of the noise floor: unfused graph, operators split over two threads (another reduction
order than the reference's one thread per batch), one batch at a time, an odd batch size; its threads sleep between
runs (it runs on one frame in 20: spinning would only take the cores from the reference runs)."""


class ModelError(ValueError):
    """A model that cannot be run by this code: missing spec, wrong featurizer, unexpected tensors."""


class LoadedModel:
    """A planner ready to run: its spec, its onnxruntime session and the runtime it was opened with."""

    def __init__(self, path: Path, spec: ModelSpec, session: ort.InferenceSession, runtime: RuntimeConfig) -> None:
        self.path = path
        self.spec = spec
        self.session = session
        self.runtime = runtime
        self._traj_name = spec.output("trajectory").name
        self._logits_name = spec.output("maneuver_logits").name
        self._outputs = [self._traj_name, self._logits_name]
        self._pool: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def predict(self, inputs: dict[str, np.ndarray], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run over all frames -> (trajectory (N, T, 3) float32 [m, m, rad], maneuver logits (N, 6) float32).

        `inputs` maps `shadow.featurize.INPUT_NAMES` to float32 arrays with a common first axis N. Batches of
        `batch_size` frames run concurrently on `runtime.concurrency()` threads (onnxruntime releases the GIL).
        """
        n = next(iter(inputs.values())).shape[0]
        bs = batch_size or self.runtime.batch_size
        traj = np.empty((n, fz.HORIZON, 3), np.float32)
        logits = np.empty((n, fz.NUM_MANEUVERS), np.float32)

        def run(start: int) -> None:
            stop = min(n, start + bs)
            # slices of C-contiguous arrays along axis 0 stay contiguous: onnxruntime reads them without a copy
            t, m = self.session.run(self._outputs, {k: v[start:stop] for k, v in inputs.items()})
            traj[start:stop] = t
            logits[start:stop] = m

        starts = range(0, n, bs)
        workers = self.runtime.concurrency()
        if workers == 1 or len(starts) == 1:
            for s in starts:
                run(s)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"ort-{self.spec.name}")
            for f in [self._pool.submit(run, s) for s in starts]:
                f.result()
        return traj, logits

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _check(spec: ModelSpec, path: Path, session: ort.InferenceSession) -> None:
    if spec.featurizer_version != fz.FEATURIZER_VERSION:
        raise ModelError(f"{path}: model {spec.name}:{spec.version} wants featurizer {spec.featurizer_version}, "
                         f"this code computes {fz.FEATURIZER_VERSION}")
    if spec.horizon != fz.HORIZON or abs(spec.horizon_dt_s - fz.HORIZON_DT_S) > 1e-9:
        raise ModelError(f"{path}: horizon {spec.horizon} x {spec.horizon_dt_s} s, the featurizer's targets are "
                         f"{fz.HORIZON} x {fz.HORIZON_DT_S} s")
    graph_inputs = {i.name for i in session.get_inputs()}
    if graph_inputs != set(fz.INPUT_NAMES):
        raise ModelError(f"{path}: graph inputs {sorted(graph_inputs)}, expected {sorted(fz.INPUT_NAMES)}")
    graph_outputs = {o.name for o in session.get_outputs()}
    for role in ("trajectory", "maneuver_logits"):
        try:
            name = spec.output(role).name
        except KeyError as exc:
            raise ModelError(f"{path}: {exc.args[0]}") from None
        if name not in graph_outputs:
            raise ModelError(f"{path}: spec output {name!r} ({role}) is not in the graph ({sorted(graph_outputs)})")


def load_model(path: Path, runtime: RuntimeConfig | None = None, verify: bool = True) -> LoadedModel:
    """Open a model directory (model.onnx + spec.json) or .onnx file with its spec beside it.

    Refuses a file whose sha256 differs from its spec (with `verify`), a featurizer version other than this code's,
    and graphs whose inputs or outputs do not match the spec. Raises ModelError (or FileNotFoundError).
    """
    runtime = runtime or RuntimeConfig()
    onnx_path = model_file(Path(path))
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no model file at {onnx_path}")
    try:
        spec = read_spec(onnx_path, verify=verify)
    except FileNotFoundError:
        raise ModelError(f"{onnx_path}: no spec.json beside it; write one with shadow.spec.write_spec") from None
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    session = ort.InferenceSession(str(onnx_path), runtime.session_options(), providers=["CPUExecutionProvider"])
    _check(spec, onnx_path, session)
    log.info("loaded %s:%s (%s, %s) with %s", spec.name, spec.version, spec.precision, onnx_path, runtime.label())
    return LoadedModel(onnx_path, spec, session, runtime)

