"""Integer numerics on this host: whether onnxruntime's fused INT8 kernels compute a quantized artifact exactly here,
and which CPU features the host has.

A quantized artifact (QDQ ONNX: QuantizeLinear/DequantizeLinear around its products) means: integer operands,
integer products accumulated exactly (32-bit accumulators on every chip targeted), then the artifact's scales.
onnxruntime on x86 fuses the pattern into integer GEMM kernels (MatMulIntegerToFloat, QLinearMatMul). Those are
exact where the CPU multiplies 8-bit operands into 32-bit sums directly (AVX-512 VNNI, AVX-VNNI, AMX), but on CPUs
without VNNI (AVX2, AVX-512 without VNNI) its U8S8 kernels use VPMADDUBSW, whose 16-bit pair sums saturate: two
products of 255 x 127 already exceed 32,767. The result then depends on the host, not on the artifact (measured: the
shipped INT8 student 46% further from the teacher on an AVX2 host than on a VNNI host).

The fleet side must compute what the chip computes, so every session this project opens picks one of two kernels:

- "native": the fused integer kernels, where the probe below found them exact on this host (fast);
- "emulated": QDQ fusion off (`session.disable_quant_qdq`): onnxruntime dequantizes the integer operands to float
  and runs float products, which hold the integer products exactly and sum them in float, so the result equals the
  integer semantics to float rounding, on any host.

`int8_kernel("auto")` runs a probe once per process: a tiny QDQ product whose operands saturate a 16-bit pair sum
(activations 255 or -128, weights 127 / -127 / -128), for UINT8 and INT8 activations, compared with the exact
integer result. Exact on both: native; otherwise emulated. `numerics_record()` is what replays, verifications and
benchmarks store with their results. $FLYWHEEL_INT8_KERNEL ("native" or "emulated") overrides what "auto" picks, in
this process and the processes it starts: to run a VNNI host as an AVX2 host runs (the emulation), for timing.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Int8Kernel = Literal["auto", "native", "emulated"]
DISABLE_QDQ_FUSION = "session.disable_quant_qdq"
# CPU flags (Linux /proc/cpuinfo names) that decide integer and BF16 kernels; recorded with results.
FEATURE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8", "amx_bf16")
INT8_KERNEL_ENV = "FLYWHEEL_INT8_KERNEL"  # overrides "auto" (see the module docstring)
PROBE_DEPTH = 64  # inner dimension of the probe product: 32 saturating pairs


@functools.lru_cache(maxsize=1)
def host_features() -> tuple[str, ...]:
    """The FEATURE_FLAGS this host's CPU reports (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in FEATURE_FLAGS if f in flags)


def native_bf16() -> bool:
    """Whether the CPU has BF16 arithmetic (AVX-512 BF16 or AMX BF16); without it torch emulates BF16, slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & set(host_features()))


def probe_model(signed: bool) -> bytes:
    """x (B, K) float -> QuantizeLinear -> DequantizeLinear -> MatMul with a DequantizeLinear'd INT8 weight (K, 4),
    per-channel symmetric, as the quantize pass writes artifacts."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((PROBE_DEPTH, 4), 127, np.int8)
    w[:, 1] = -127
    w[::2, 2] = -128
    w[1::2, 3] = 0
    zp_dtype = np.int8 if signed else np.uint8
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, zp_dtype), "xz"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    graph = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [None, PROBE_DEPTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def probe_inputs(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Probe activations (8, K) and the exact integer products (8, 4) int64."""
    rng = np.random.default_rng(0)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = rng.integers(lo, hi + 1, (8, PROBE_DEPTH)).astype(np.float32)
    x[0] = hi  # every pair sum of this row saturates 16 bits on VPMADDUBSW
    x[1] = lo
    w = np.full((PROBE_DEPTH, 4), 127, np.int64)
    w[:, 1] = -127
    w[::2, 2] = -128
    w[1::2, 3] = 0
    return x, x.astype(np.int64) @ w


@functools.lru_cache(maxsize=1)
def int8_probe() -> dict:
    """Run the probe with onnxruntime's default (fused) kernels: {"uint8": exact?, "int8": exact?, "max_error"}."""
    import onnxruntime as ort

    out: dict = {"max_error": 0.0}
    for name, signed in (("uint8", False), ("int8", True)):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(probe_model(signed), opts, providers=["CPUExecutionProvider"])
        x, exact = probe_inputs(signed)
        y = sess.run(None, {"x": x})[0]
        err = float(np.abs(y.astype(np.float64) - exact).max())
        out[name] = err == 0.0
        out["max_error"] = max(out["max_error"], err)
    return out


def int8_kernel(requested: Int8Kernel = "auto") -> Literal["native", "emulated"]:
    """The integer kernel a session uses: `requested` unless "auto", which is "native" only where the probe found
    the fused kernels exact for both activation types."""
    if requested != "auto":
        return requested
    forced = os.environ.get(INT8_KERNEL_ENV, "")
    if forced:
        if forced not in ("native", "emulated"):
            raise ValueError(f"${INT8_KERNEL_ENV} must be 'native' or 'emulated', not {forced!r}")
        return forced  # type: ignore[return-value]
    probe = int8_probe()
    return "native" if probe["uint8"] and probe["int8"] else "emulated"


def apply_int8_kernel(options, requested: Int8Kernel = "auto") -> str:
    """Configure onnxruntime SessionOptions for the chosen integer kernel; returns the kernel ("native" or
    "emulated"). Harmless for float models: they have no QDQ pattern to fuse."""
    kernel = int8_kernel(requested)
    if kernel == "emulated":
        options.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
    return kernel


def numerics_record(requested: Int8Kernel = "auto") -> dict:
    """What to store with a replay, a verification or a benchmark: the kernel that ran and why, and the host."""
    import onnxruntime as ort

    probe = int8_probe()
    kernel = int8_kernel(requested)
    why = ("requested" if requested != "auto" else
           f"${INT8_KERNEL_ENV}" if os.environ.get(INT8_KERNEL_ENV) else
           "fused integer kernels exact on this host (probe)" if kernel == "native" else
           "fused integer kernels not exact on this host (probe); QDQ fusion off")
    return {"int8_kernel": kernel, "requested": requested, "why": why,
            "probe_exact": {"uint8": probe["uint8"], "int8": probe["int8"]},
            "host_features": list(host_features()), "onnxruntime": ort.__version__}
