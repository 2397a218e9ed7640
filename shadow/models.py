"""Models at run time: the one onnxruntime session helper of the project (`session`), and the shadow replay's planner
loader (.onnx + spec.json checked, run over featurized frames in batches).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shadow import featurize as fz
from shadow.config import ExecutionConfig, RuntimeConfig, default_execution
from shadow.plugins import Featurizer, PluginError, featurizer
from shadow.numerics import Int8Kernel, apply_int8_kernel, int8_kernel
from shadow.spec import ModelSpec, model_file, read_spec

log = logging.getLogger(__name__)

_OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
               "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
               "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
               "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session_options(runtime: RuntimeConfig) -> ort.SessionOptions:
    """onnxruntime options of a RuntimeConfig."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[runtime.graph_optimization]
    opts.intra_op_num_threads = runtime.threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if runtime.execution_mode == "sequential"
                           else ort.ExecutionMode.ORT_PARALLEL)
    opts.enable_cpu_mem_arena = runtime.cpu_arena
    opts.enable_mem_pattern = runtime.memory_pattern
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if runtime.allow_spinning else "0")
    return opts


def runtime_label(runtime: RuntimeConfig) -> str:
    """Short description of a RuntimeConfig, stored with noise-floor rows (runtime_a / runtime_b)."""
    return (f"ort{ort.__version__}/opt={runtime.graph_optimization}/threads={runtime.threads()}x"
            f"{runtime.concurrency()}/{runtime.execution_mode}/batch={runtime.batch_size}/"
            f"int8={int8_kernel(runtime.int8_kernel)}")


class ProviderUnavailable(RuntimeError):
    """A configured execution provider that this onnxruntime lacks or that failed to start, fallback not allowed."""


def resolve_providers(execution: ExecutionConfig | None = None) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) to open a session with: the configured providers this onnxruntime has, in order.

    A requested provider that is missing raises ProviderUnavailable naming it and what is available, unless
    `allow_fallback`, which skips it with a warning (and the CPU runs what nothing else took)."""
    execution = execution or default_execution()
    available = ort.get_available_providers()
    out, missing = [], []
    for name in execution.providers:
        if name in available:
            out.append((name, dict(execution.provider_options.get(name, {}))))
        else:
            missing.append(name)
    if missing and not execution.allow_fallback:
        raise ProviderUnavailable(
            f"execution provider(s) {', '.join(missing)} requested but not in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)}); install the onnxruntime build that has them (e.g. "
            "onnxruntime-gpu for CUDA/TensorRT) or set execution.allow_fallback = true to run without them")
    if missing:
        log.warning("execution provider(s) %s not available (have %s); falling back", ", ".join(missing),
                    ", ".join(available))
    if not any(n == "CPUExecutionProvider" for n, _ in out):
        out.append(("CPUExecutionProvider", {}))  # nodes no accelerator takes, and the fallback
    return out


def execution_record(sess: ort.InferenceSession, execution: ExecutionConfig | None = None) -> dict:
    """What to store with a replay or a verification: the providers that ran the session (onnxruntime's own
    account, in priority order), what was requested, and whether a fallback happened."""
    execution = execution or default_execution()
    ran = list(sess.get_providers())
    return {"providers": ran, "requested": list(execution.providers),
            "fallback": any(p not in ran for p in execution.providers), "onnxruntime": ort.__version__,
            "available": list(ort.get_available_providers())}


def _open(model, options: ort.SessionOptions, execution: ExecutionConfig | None) -> ort.InferenceSession:
    execution = execution or default_execution()
    providers = resolve_providers(execution)
    sess = ort.InferenceSession(model, options, providers=[n for n, _ in providers],
                                provider_options=[o for _, o in providers])
    # a provider present in this build may still fail to start (no driver, no device): onnxruntime then drops it
    # with a warning of its own, so compare with what it reports
    dropped = [n for n, _ in providers if n not in sess.get_providers()]
    if dropped and not execution.allow_fallback:
        raise ProviderUnavailable(f"execution provider(s) {', '.join(dropped)} failed to start (onnxruntime runs "
                                  f"the session on {', '.join(sess.get_providers())}); see onnxruntime's log, or "
                                  "set execution.allow_fallback = true")
    if dropped:
        log.warning("execution provider(s) %s failed to start; running on %s", ", ".join(dropped),
                    ", ".join(sess.get_providers()))
    return sess


def session(model: Path | str | bytes, threads: int | None = None, optimization: str = "all",
            options: ort.SessionOptions | None = None, verify: bool = True,
            int8_kernel: Int8Kernel = "auto", execution: ExecutionConfig | None = None) -> ort.InferenceSession:
    """The one way this project opens an onnxruntime session, on the configured execution providers
    (`execution`, else the process default of `shadow.config.configure_execution`: the CPU unless configured).

    `model`: a model directory or .onnx file (with `verify`, the sha256 in its spec.json is checked when there is
    one), or a serialized graph. `options` as given, else graph optimisation `optimization` ("disable", "basic",
    "extended", "all") and, with `threads`, that many intra-op threads and one inter-op thread. Quantized graphs
    run with the integer kernel `shadow.numerics` finds exact on this host (`int8_kernel` "auto"), so a quantized
    artifact computes its integer semantics on every host. Raises ProviderUnavailable for a configured provider
    that is missing or fails to start, unless the configuration allows the fallback.
    """
    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPT_LEVELS[optimization]
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
    apply_int8_kernel(options, int8_kernel)
    if isinstance(model, bytes):
        return _open(model, options, execution)
    path = model_file(Path(model))
    if verify:
        try:
            read_spec(path, verify=True)
        except FileNotFoundError:
            log.debug("%s has no spec.json; running it unchecked", path)
    return _open(str(path), options, execution)


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
        self.execution = execution_record(session, runtime.execution)
        self.featurizer: Featurizer = featurizer(spec.featurizer, spec.featurizer_version)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def predict(self, inputs: dict[str, np.ndarray], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run over all frames -> (trajectory (N, T, 3) float32 [m, m, rad], maneuver logits (N, 6) float32).

        `inputs` maps the input names of the model's featurizer (`self.featurizer`) to float32 arrays with a
        common first axis N. Batches of
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


def _check(spec: ModelSpec, path: Path, sess: ort.InferenceSession) -> None:
    try:
        feat = featurizer(spec.featurizer, spec.featurizer_version)
    except PluginError as exc:
        raise ModelError(f"{path}: model {spec.name}:{spec.version}: {exc}") from None
    if spec.horizon != fz.HORIZON or abs(spec.horizon_dt_s - fz.HORIZON_DT_S) > 1e-9:
        raise ModelError(f"{path}: horizon {spec.horizon} x {spec.horizon_dt_s} s, the replay's heads are "
                         f"{fz.HORIZON} x {fz.HORIZON_DT_S} s")
    graph_inputs = {i.name for i in sess.get_inputs()}
    if graph_inputs != set(feat.input_names):
        raise ModelError(f"{path}: graph inputs {sorted(graph_inputs)}, featurizer {feat.name} gives "
                         f"{sorted(feat.input_names)}")
    graph_outputs = {o.name for o in sess.get_outputs()}
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
    sess = session(onnx_path, options=session_options(runtime), verify=False, int8_kernel=runtime.int8_kernel,
                   execution=runtime.execution)
    _check(spec, onnx_path, sess)
    log.info("loaded %s:%s (%s, %s) with %s on %s", spec.name, spec.version, spec.precision, onnx_path,
             runtime_label(runtime), ",".join(sess.get_providers()))
    return LoadedModel(onnx_path, spec, sess, runtime)

