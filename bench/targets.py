"""Target benchmark: this CPU's roofline figures (measured), then the student compressed for every chip and driven
in closed loop against the expert.

    python -m bench.targets --measure-cpu                      # figures for deploy/targets/cpu.toml
    python -m bench.targets --student S.pt --teacher T/ --drives fleet/ [--out DIR] [--episodes 3]

Measured here: CPU peak rates and bandwidth, artifact bytes, CPU batch-1 latencies (onnxruntime), errors vs FP32,
closed-loop metrics. Estimated: on-chip latencies (roofline from the profiles' datasheet figures). The last line
printed is one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ingest.contract import ENUMS
from retrain.cycle.closed_loop import EXPERT, ClosedLoopConfig, OnnxPlanner, evaluate
from retrain.compress.workflow import CompressConfig, compress_all, format_results
from retrain.models.evaluate import split_drives
from retrain.compress.targets import load_targets
from ingest.lake import list_drive_files
from shadow.featurize import featurize_drive_files
from shadow.models import session

log = logging.getLogger(__name__)


def _session(model, threads: int) -> ort.InferenceSession:
    return session(model.SerializeToString(), threads)


def _best_s(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _matmul_model(a_type: int, b: np.ndarray, op: str, out_type: int, n: int):
    g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", a_type, [n, n])],
                          [helper.make_tensor_value_info("y", out_type, [n, n])], [numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def measure_cpu_figures(threads: int = 2, n: int = 1024) -> dict:
    """Peak FP32 and INT8 (u8 x s8) matrix-multiply rates, copy bandwidth and per-node dispatch cost, this CPU."""
    rng = np.random.default_rng(0)
    a32 = rng.random((n, n), np.float32)
    s = _session(_matmul_model(TensorProto.FLOAT, rng.random((n, n), np.float32), "MatMul", TensorProto.FLOAT, n),
                 threads)
    s.run(None, {"a": a32})
    fp32 = 2 * n ** 3 / _best_s(lambda: s.run(None, {"a": a32}))
    a8 = rng.integers(0, 255, (n, n)).astype(np.uint8)
    s = _session(_matmul_model(TensorProto.UINT8, rng.integers(-127, 127, (n, n)).astype(np.int8), "MatMulInteger",
                               TensorProto.INT32, n), threads)
    s.run(None, {"a": a8})
    int8 = 2 * n ** 3 / _best_s(lambda: s.run(None, {"a": a8}))
    x = np.ones(64 * 2 ** 20, np.float32)
    y = np.empty_like(x)
    bw = 2 * x.nbytes / _best_s(lambda: np.copyto(y, x))
    chain = 200  # tiny Adds: their time is the runtime's per-node cost
    nodes = [helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"]) for i in range(chain)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info(f"t{chain}", TensorProto.FLOAT, [1, 16])],
                          [numpy_helper.from_array(np.ones((1, 16), np.float32), "one")])
    # no graph optimisation: keep the 200 nodes
    s = session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), 1,
                optimization="disable")
    inp = {"t0": np.zeros((1, 16), np.float32)}
    for _ in range(50):
        s.run(None, inp)
    per_node = _best_s(lambda: [s.run(None, inp) for _ in range(100)]) / 100 / chain
    return {"fp32_tflops": fp32 / 1e12, "int8_tops": int8 / 1e12, "copy_gbps": bw / 1e9,
            "per_node_us": per_node * 1e6, "threads": threads, "n": n}


def run(student: Path, teacher: Path, drives: Path, out: Path, episodes: int, seed: int, max_steps: int) -> dict:
    """Compress `student` for every target on `drives` (split like the recipes), then drive it in closed loop."""
    train, held = split_drives(list_drive_files(drives), 0.2, seed)
    train_f, held_f = featurize_drive_files(train, stride=2), featurize_drive_files(held)
    # Stand-in for mined frames: the degraded-condition frames of the training drives (night, rain, glare).
    day = ENUMS["lighting"][1].index("day")
    clear = ENUMS["weather"][1].index("clear")
    mined = train_f.take(np.flatnonzero((train_f.lighting != day) | (train_f.weather != clear)))
    targets = list(load_targets().values())
    t0 = time.perf_counter()
    results = compress_all(targets, student, train_f, held_f, out, CompressConfig(), teacher=teacher, mined=mined)
    compress_s = time.perf_counter() - t0
    print(format_results(results))
    fp32 = Path(results[0].fp32_artifact)
    cpu_art = next(Path(r.artifact) for r in results if r.chip == "cpu")
    cl_cfg = ClosedLoopConfig(episodes=episodes, seed=seed, max_steps=max_steps)
    t0 = time.perf_counter()
    loop = evaluate({"expert": EXPERT, "student-fp32": OnnxPlanner(fp32, "student-fp32"),
                     "student-cpu-int8": OnnxPlanner(cpu_art, "student-cpu-int8")}, cl_cfg)
    loop_s = time.perf_counter() - t0
    head = f"{'policy':<18} {'scenario':<13} {'coll':>4} {'minTTC s':>8} {'comfort':>7} {'dist m':>7} {'v m/s':>6}"
    print(head)
    for r in loop:
        print(f"{r['policy']:<18} {r['scenario']:<13} {r['collisions']:>4d} {r['min_ttc_s']:>8.2f} "
              f"{r['comfortable_rate']:>7.2f} {r['mean_distance_m']:>7.1f} {r['mean_speed_mps']:>6.2f}")
    return {"compress": [r.model_dump() for r in results], "compress_seconds": compress_s,
            "closed_loop": loop, "closed_loop_seconds": loop_s, "frames": {"calibration_pool": len(train_f),
                                                                          "mined": len(mined), "held": len(held_f)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-cpu", action="store_true", help="measure this CPU's roofline figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student", type=Path, help="student checkpoint (.pt)")
    ap.add_argument("--teacher", type=Path, help="teacher model directory or .onnx (guides pruning)")
    ap.add_argument("--drives", type=Path, help="drives directory")
    ap.add_argument("--out", type=Path, default=Path("artifacts/targets"))
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report: dict = {}
    if args.measure_cpu:
        report["cpu"] = measure_cpu_figures(args.threads)
        c = report["cpu"]
        print(f"int8 {c['int8_tops']:.3f} TOPS, fp32 {c['fp32_tflops']:.3f} TFLOPS, copy {c['copy_gbps']:.1f} GB/s, "
              f"{c['per_node_us']:.2f} us per node ({args.threads} threads; measured)")
    if args.student:
        if not (args.teacher and args.drives):
            ap.error("--student needs --teacher and --drives")
        report["run"] = run(args.student, args.teacher, args.drives, args.out, args.episodes, args.seed,
                            args.max_steps)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
