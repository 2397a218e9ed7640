"""Compression benchmark: size and onnxruntime latency of teacher FP32, student FP32 and student INT8, vs the targets.

    python -m bench.compression --registry artifacts/registry          # teacher, student-fp32, student (promoted/latest)
    python -m bench.compression --teacher A --student-fp32 B --student-int8 C   # model directories or .onnx files
    python -m bench.compression --quick                                # builds tiny models with the recipes first

Latency: warm sessions (onnxruntime CPU, graph optimisation on, fixed intra-op threads), median wall time of many
runs at batch 1 and batch 256 on featurized synthetic frames. Targets (DESIGN.md): the student artifact >= 16x
smaller than the teacher, batch-1 latency >= 8x lower. Prints a table, then as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort

from ingest.synth import synthetic_frames
from retrain.compress.workflow import median_run_ms
from shadow.models import session
from shadow.featurize import featurize
from shadow.spec import model_file, read_spec

log = logging.getLogger(__name__)

SIZE_TARGET = 16.0
LATENCY_TARGET = 8.0


def measure(path: Path, threads: list[int], runs_b1: int, runs_b256: int) -> dict:
    """Size, weights and latencies of one model (a directory with spec.json or a .onnx file) at each thread count."""
    onnx_path = model_file(path)
    try:
        spec = read_spec(onnx_path)
        params, precision, flops = spec.parameters, spec.precision, spec.flops_per_frame
    except FileNotFoundError:
        params, precision, flops = 0, "?", 0
    frames = featurize(synthetic_frames(256, agents=30, seed=1), with_targets=False).inputs()
    b1 = {k: v[:1] for k, v in frames.items()}
    row: dict = {"path": str(onnx_path), "bytes": onnx_path.stat().st_size, "parameters": params,
                 "precision": precision, "flops_per_frame": flops, "b1_ms": {}, "b256_ms": {}}
    for t in threads:
        sess = session(onnx_path, t)
        row["b1_ms"][t] = median_run_ms(sess, b1, runs_b1, max(20, runs_b1 // 10))
        row["b256_ms"][t] = median_run_ms(sess, frames, runs_b256, 3)
    # A deployment runs a model at the thread count that serves it best: that is the headline figure.
    row["latency_b1_ms"] = min(row["b1_ms"].values())
    row["latency_b256_ms"] = min(row["b256_ms"].values())
    return row


def build_quick(root: Path) -> tuple[Path, Path, Path]:
    """Tiny teacher and student made by the real recipes on synthetic drives (seconds; for smoke runs only)."""
    from ingest.lake import write_drive
    from ingest.synth import synthetic_drive
    from retrain.models.architectures import PlannerConfig
    from retrain.recipes.student import StudentConfig
    from retrain.recipes.student import run as run_student
    from retrain.recipes.teacher import TeacherConfig
    from retrain.recipes.teacher import run as run_teacher

    drives = root / "drives"
    for i in range(4):
        write_drive(drives, synthetic_drive(f"d{i}", f"v{i % 2}", 300, seed=i))
    run_teacher(TeacherConfig(drives_dir=drives, out_dir=root / "teacher",
                              model=PlannerConfig(width=64, depth=2, heads=4, head_dim=16, ffn=256),
                              optim={"steps": 30, "batch_size": 64, "warmup_steps": 5}))
    run_student(StudentConfig(drives_dir=drives, teacher=root / "teacher", out_dir=root / "student",
                              model=PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32),
                              optim={"steps": 20, "batch_size": 64, "warmup_steps": 5},
                              prune={"importance_batches": 2, "finetune": {"steps": 5, "warmup_steps": 1}},
                              quant={"calibration_frames": 128}))
    return root / "teacher", root / "student" / "fp32", root / "student" / "int8"


def from_registry(root: Path, teacher: str, student: str) -> tuple[Path, Path, Path]:
    from retrain.cycle.registry import Registry

    reg = Registry(root)
    name, _, version = student.partition(":")
    s8 = reg.get(name, version or None)
    return (reg.model_path(*_ref(teacher)), reg.model_path(f"{s8.name}-fp32", s8.version),
            reg.model_path(s8.name, s8.version))


def _ref(s: str) -> tuple[str, str | None]:
    name, _, version = s.partition(":")
    return name, version or None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, help="take the models from this registry")
    ap.add_argument("--teacher-ref", default="teacher", help="registry name[:version] of the teacher")
    ap.add_argument("--student-ref", default="student", help="registry name[:version] of the INT8 student")
    ap.add_argument("--teacher", type=Path, help="teacher model directory or .onnx")
    ap.add_argument("--student-fp32", type=Path, help="FP32 student model directory or .onnx")
    ap.add_argument("--student-int8", type=Path, help="INT8 student model directory or .onnx")
    ap.add_argument("--quick", action="store_true", help="build tiny models with the recipes first (smoke run)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="onnxruntime intra-op thread counts to time; each model is reported at its fastest")
    ap.add_argument("--runs", type=int, default=500, help="timed runs at batch 1 (batch 256: runs / 10)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="bench-compression-")
        paths = build_quick(Path(tmp.name))
    elif args.registry:
        paths = from_registry(args.registry, args.teacher_ref, args.student_ref)
    elif args.teacher and args.student_fp32 and args.student_int8:
        paths = (args.teacher, args.student_fp32, args.student_int8)
    else:
        ap.error("give --registry, or --teacher/--student-fp32/--student-int8, or --quick")
    try:
        rows = {name: measure(p, args.threads, args.runs, max(10, args.runs // 10))
                for name, p in zip(("teacher_fp32", "student_fp32", "student_int8"), paths)}
    finally:
        if tmp is not None:
            tmp.cleanup()
    t, s8 = rows["teacher_fp32"], rows["student_int8"]
    result = {
        "bench": "compression", "quick": args.quick, "threads": args.threads, "onnxruntime": ort.__version__,
        "machine": platform.processor() or platform.machine(), "models": rows,
        "size_ratio": t["bytes"] / s8["bytes"], "latency_ratio_b1": t["latency_b1_ms"] / s8["latency_b1_ms"],
        "latency_ratio_b256": t["latency_b256_ms"] / s8["latency_b256_ms"],
        "int8_vs_fp32_student_b1": rows["student_fp32"]["latency_b1_ms"] / s8["latency_b1_ms"],
        "targets": {"size_ratio": SIZE_TARGET, "latency_ratio_b1": LATENCY_TARGET},
    }
    result["meets_size"] = result["size_ratio"] >= SIZE_TARGET
    result["meets_latency"] = result["latency_ratio_b1"] >= LATENCY_TARGET
    for t in args.threads:
        result[f"latency_ratio_b1_threads{t}"] = rows["teacher_fp32"]["b1_ms"][t] / s8["b1_ms"][t]
    cols = "".join(f" {f'b1 ms/{t}t':>10} {f'b256 ms/{t}t':>12}" for t in args.threads)
    print(f"{'model':<14} {'precision':<9} {'weights':>10} {'MFLOP':>6} {'bytes':>11}{cols} {'best b1':>8} "
          f"{'frames/s':>9} {'GFLOP/s':>8}")
    for name, r in rows.items():
        cells = "".join(f" {r['b1_ms'][t]:>10.3f} {r['b256_ms'][t]:>12.2f}" for t in args.threads)
        fps = 256e3 / r["latency_b256_ms"]
        print(f"{name:<14} {r['precision']:<9} {r['parameters']:>10,d} {r['flops_per_frame'] / 1e6:>6.1f} "
              f"{r['bytes']:>11,d}{cells} {r['latency_b1_ms']:>8.3f} {fps:>9.0f} {fps * r['flops_per_frame'] / 1e9:>8.1f}")
    print(f"size ratio teacher/student-int8: {result['size_ratio']:.1f}x (target >= {SIZE_TARGET:.0f}x) "
          f"{'OK' if result['meets_size'] else 'MISSED'}")
    print(f"batch-1 latency ratio: {result['latency_ratio_b1']:.1f}x (target >= {LATENCY_TARGET:.0f}x) "
          f"{'OK' if result['meets_latency'] else 'MISSED'} (each model at its fastest thread count; at equal threads: "
          + ", ".join(f"{t}t {result[f'latency_ratio_b1_threads{t}']:.1f}x" for t in args.threads)
          + f"); batch-256 ratio {result['latency_ratio_b256']:.1f}x")
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
