"""Settings of shadow mode, pydantic only: what both replay drivers compute (`PipelineConfig`, with the onnxruntime
setup `RuntimeConfig`), how the batch replayer walks the lake (`ReplayConfig`), how the streaming worker consumes
(`StreamConfig`), and `[shadow]` of the umbrella settings (`ShadowConfig`). Importing it loads neither onnxruntime
nor a Kafka client: `shadow.models` turns a RuntimeConfig into an onnxruntime session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shadow import featurize as fz
from shadow.log_replay import LogReplayConfig
from shadow.metrics import MetricsConfig


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


# onnxruntime's names of the execution providers this project configures, and the short names it accepts for them
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
                    "openvino": "OpenVINOExecutionProvider"}


class ExecutionConfig(BaseModel):
    """Where models run: the onnxruntime execution providers (in priority order) with their options, whether a
    missing one may fall back, and the torch device of the fine-tune. `[execution]` of the umbrella settings; the
    default is the CPU everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: tuple[str, ...] = Field(("CPUExecutionProvider",), min_length=1, description="onnxruntime "
                                       "execution providers in priority order: onnxruntime names "
                                       "(CUDAExecutionProvider) or short ones (cuda, tensorrt, cpu); nodes a "
                                       "provider cannot run go to the next one, the CPU last")
    provider_options: dict[str, dict[str, str]] = Field(default_factory=dict, description="options per provider "
                                                        "(keyed by either name), passed to onnxruntime as given, "
                                                        "e.g. {cuda = {device_id = \"1\"}}")
    allow_fallback: bool = Field(False, description="a requested provider that this onnxruntime lacks (or that "
                                 "fails to start) is skipped with a warning instead of failing with an error")
    torch_device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$", description="torch device of "
                              "the fine-tune: cpu, cuda, cuda:N")

    @field_validator("providers", mode="before")
    @classmethod
    def _names(cls, v):
        names = [v] if isinstance(v, str) else list(v)
        out = []
        for name in names:
            full = PROVIDER_ALIASES.get(str(name).lower(), str(name))
            if not full.endswith("ExecutionProvider"):
                raise ValueError(f"{name!r} is not an execution provider (known short names: "
                                 f"{', '.join(PROVIDER_ALIASES)}; or onnxruntime's name, e.g. CUDAExecutionProvider)")
            if full not in out:
                out.append(full)
        return tuple(out)

    @field_validator("provider_options", mode="before")
    @classmethod
    def _option_names(cls, v):
        return {PROVIDER_ALIASES.get(str(k).lower(), str(k)): {str(a): str(b) for a, b in dict(o).items()}
                for k, o in dict(v or {}).items()}


_execution = [ExecutionConfig()]


def configure_execution(execution: ExecutionConfig) -> None:
    """Set the execution providers (and torch device) of everything this process runs without its own: every
    onnxruntime session (`shadow.models.session`) and the fine-tune. The CLI sets it from [execution]; the
    default is the CPU."""
    _execution[0] = execution


def default_execution() -> ExecutionConfig:
    return _execution[0]


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
    int8_kernel: Literal["auto", "native", "emulated"] = Field(
        "auto", description="integer kernel of quantized models: 'auto' uses onnxruntime's fused INT8 kernels only "
        "where a probe finds them exact on this host (VNNI), else runs the QDQ graph unfused, which equals the "
        "artifact's integer semantics to float rounding on any host (see shadow.numerics); 'native' and "
        "'emulated' force one")
    execution: ExecutionConfig | None = Field(None, description="execution providers; None: the process's default "
                                              "(`configure_execution`, which the CLI sets from "
                                              "[execution])")
    batch_size: int = Field(64, ge=1, le=1 << 20, description="frames per session run; every run but the last "
                            "of a call has exactly this size, so the memory plan is reused. Small on purpose: "
                            "measured here, 32-64 frames (576-1152 token rows) keep a run's activations in the 2 MB "
                            "L2 cache of a core and beat 1024-4096 by 20-30% on the reference teacher")

    def threads(self) -> int:
        return self.intra_op_threads or physical_cores()

    def concurrency(self) -> int:
        return self.workers or max(1, physical_cores() // self.threads())



NOISE_RUNTIME = RuntimeConfig(intra_op_threads=2, workers=1, graph_optimization="disable", memory_pattern=False,
                              allow_spinning=False, batch_size=333)
"""The second configuration of the noise floor: unfused graph, operators split over two threads (another reduction
order than the reference's one thread per batch), one batch at a time, an odd batch size; its threads sleep between
runs (it runs on one frame in 20: spinning would only take the cores from the reference runs)."""


class PipelineConfig(BaseModel):
    """What both the batch replayer and the streaming worker compute, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="onnxruntime setup of both models")
    noise_runtime: RuntimeConfig = Field(NOISE_RUNTIME, description="second setup of the teacher for the noise floor")
    noise_every: int = Field(20, ge=1, description="noise floor on frames whose seq is a multiple of this")
    window_frames: int = Field(50, ge=1, le=10_000,
                               description="scenario window: frames seq // W of a drive (50 = 5 s at 10 Hz)")
    frame_period_s: float = Field(0.1, gt=0, description="logging period of the fleet's frames [s] (10 Hz); sizes "
                                  "the future context a frame needs for its driver metrics")
    criteria: Path | None = Field(None, description="criteria YAML; None = the packaged shadow/criteria_default.yaml")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="divergence metric parameters")
    parity_tolerance_m: float = Field(0.01, ge=0, description="chip parity: the fleet-side emulation of the deployed "
                                      "artifact may be this far from the logged on-board plan at any waypoint [m]")
    log_replay: LogReplayConfig = Field(default_factory=LogReplayConfig, description="log-replay closed loop each "
                                        "model's plan is driven in from every frame (the log_replay table)")

    def history_frames(self) -> int:
        """Frames before a frame its features need (the ego history)."""
        return fz.HISTORY - 1

    def future_frames(self) -> int:
        """Frames after a frame its driver metrics and its log-replay window need (4 s of logged future each)."""
        seconds = max(fz.HORIZON * fz.HORIZON_DT_S, self.log_replay.horizon_s)
        return int(np.ceil(seconds / self.frame_period_s - 1e-9))

    def context_after(self) -> int:
        """Frames after a frame that must be loaded: its future, and the rest of a scenario window it opens."""
        return max(self.future_frames(), self.window_frames - 1)


class ReplayConfig(PipelineConfig):
    """The batch replayer: what it computes (PipelineConfig) and how it walks the lake."""

    group_frames: int = Field(16384, ge=1, description="frames loaded, featurized and run together (several "
                              "units of a partition); larger amortises per-call costs, costs memory")
    drive_end_idle_s: float = Field(120.0, ge=0, description="a drive without a stored final chunk whose newest "
                                    "stored frame arrived this long ago has ended: replay its last frames without "
                                    "waiting for their future")
    topic: str | None = Field(None, description="only frames files of this Kafka topic (None: all)")
    partitions: list[int] | None = Field(None, description="only these Kafka partitions (None: all)")
    files: list[str] | None = Field(None, description="only the units of these frames files (file names; None: "
                                    "all); the other live files still give context. A backfill task's share")
    row_group_rows: int = Field(65536, ge=1024, description="Parquet row group size of the outputs")
    prefetch: bool = Field(True, description="load, featurize and run the models on the next group in a background "
                           "thread while this one is measured and written")
    reuse_teacher: bool = Field(True, description="frames the teacher has stored decisions for (an earlier replay "
                                "with another student) take them instead of running the teacher again: a new "
                                "student replays the history at the cost of the student (and of the noise floor "
                                "where it is not stored yet). Off: the teacher runs on every frame")


class StreamConfig(PipelineConfig):
    """The streaming worker: what it computes (PipelineConfig) and how it consumes."""

    group_id: str | None = Field(None, description="consumer group; None = flywheel-shadow-<pair id>, one per pair")
    poll_ms: int = Field(200, ge=1, description="poll timeout")
    max_poll_records: int = Field(8, ge=1, description="records per poll: bounds the work between polls, which "
                                  "must stay under max_poll_interval_ms")
    session_timeout_ms: int = Field(6000, ge=1000, description="Tansu joins groups in ~3 s only around 6000")
    max_poll_interval_ms: int = Field(10000, ge=1000, description="see session_timeout_ms")
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description="where a new group starts "
                                                             "when the lake holds nothing of the pair either")
    max_age_s: float = Field(5.0, gt=0, description="write a partition's done records this long after the first")
    max_rows: int = Field(50_000, ge=1, description="write once this many computed rows wait")
    drive_end_idle_s: float = Field(120.0, ge=0, description="a drive without a chunk for this long has ended: "
                                    "compute its held-back frames without their future")
    row_group_rows: int = Field(65536, ge=1024, description="Parquet row group size of the outputs")


class BackfillConfig(BaseModel):
    """`flywheel shadow backfill`: the batch replay as Ray tasks, on a local Ray or on a cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="Ray cluster to run on (\"ray://head:10001\", or \"auto\" on a "
                                "node of the cluster); None: a local Ray started in this process and shut down "
                                "after the backfill. Workers of a cluster need this package installed and the "
                                "lake at the same path or URI")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None: all); not for a cluster")
    task_cpus: float = Field(1.0, gt=0, description="CPUs each actor reserves; its onnxruntime runs one batch at a "
                             "time on this many intra-op threads (rounded up)")
    files_per_task: int = Field(8, ge=1, description="frames files of one share of the work (consecutive files of "
                                "one Kafka partition), the unit an actor replays at a time")
    actors: int | None = Field(None, ge=1, description="Ray actors replaying shares, each loading the models once "
                               "(None: as many as the cluster's CPUs / task_cpus, at most one per share)")


class ShadowConfig(BaseModel):
    """Settings of `flywheel shadow` (nested as [shadow] in flywheel.settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lake_dir: Path = Field(Path("data/lake"), description="root of the Parquet lake")
    teacher: Path | None = Field(None, description="teacher model directory or .onnx (with spec.json beside it)")
    student: Path | None = Field(None, description="student model directory or .onnx")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="batch replay")
    stream: StreamConfig = Field(default_factory=StreamConfig, description="streaming worker")
    backfill: BackfillConfig = Field(default_factory=BackfillConfig, description="backfill on Ray")
