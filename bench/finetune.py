"""Fine-tune step rate against the machine's measured GEMM rate, on the training FLOPs of the model.

    python -m bench.finetune                    # the shipped student v0, batches 128, 256 and 1024
    python -m bench.finetune --batch 256 --steps 40 --threads 2
    python -m bench.finetune --quick            # fewer steps (smoke run)
    python -m bench.finetune --device cuda      # on a GPU ([execution] torch_device of the fine-tune)

In one run it measures:
- this machine's GEMM rate in torch at the fine-tune's thread count: FP32, and BF16 only where the CPU has it
  natively (`shadow.numerics.native_bf16`: AVX-512 BF16 or AMX); elsewhere torch would emulate BF16 in software,
  tens of times slower, and the figure would describe the emulation, so it is reported as skipped;
- the fine-tune's optimiser steps per second (`retrain.cycle.finetune`'s step: distillation loss, backward, clipping,
  AdamW, moving average), per batch size, FP32 and, where native, BF16 autocast; with fake quantization (the QAT
  phase) too;
- training FLOPs per step = 3 x forward FLOPs of a frame (`Planner.flops_per_frame`: every weight product and
  attention's two products, 2 per multiply-add) x batch: forward, and backward at twice the forward;
- the ratio: training FLOP/s achieved / GEMM FLOP/s measured in the same run (same precision).
Prints a table; the LAST line is one JSON object with every figure and the host's CPU features.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from ingest.contract import frames_to_arrow
from ingest.synth import EPOCH_NS, synthetic_frames
from retrain.models.architectures import Planner, tensors
from retrain.models.distributed import place
from retrain.models.qat import FakeQuant, QatConfig
from retrain.models.reference import reference_dir
from retrain.models.training import DistillConfig, distill_loss, load_checkpoint
from shadow.featurize import Features, featurize
from shadow.numerics import host_features, native_bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous there: the clock waits for them
        torch.cuda.synchronize(device)


def gemm_rate(dtype: torch.dtype, threads: int, seconds: float = 1.0, device: str = "cpu") -> float:
    """Best GFLOP/s of a (2048 x 512) @ (512 x 512) product, the fine-tune's shapes at batch ~128 x 18 tokens."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    a, b = torch.randn(2048, 512).to(dev, dtype), torch.randn(512, 512).to(dev, dtype)
    flops = 2 * 2048 * 512 * 512
    best, t_end = float("inf"), time.perf_counter() + seconds
    with torch.no_grad():
        torch.mm(a, b)
        while time.perf_counter() < t_end:
            _sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def batches(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` featurized synthetic frames with random teacher targets: the fine-tune's batch layout."""
    parts, i = [], 0
    while sum(len(p) for p in parts) < n:
        f = synthetic_frames(400, agents=16, waypoints=8, seed=seed + i, start_ns=EPOCH_NS + i * 10**12)
        parts.append(featurize(frames_to_arrow(f, f"bench-{i}", "veh", 0)))
        i += 1
    feats = Features.concat(parts).take(slice(0, n))
    rng = np.random.default_rng(seed)
    return {**feats.inputs(), "traj": feats.traj, "traj_mask": feats.traj_mask, "maneuver": feats.maneuver,
            "t_traj": rng.standard_normal(feats.traj.shape).astype(np.float32),
            "t_logits": rng.standard_normal((n, 6)).astype(np.float32)}


def step_rate(model: Planner, data: dict, batch: int, steps: int, dtype: torch.dtype | None, qat: bool,
              threads: int, device: str = "cpu") -> float:
    """Optimiser steps per second of the fine-tune's step on `batch` frames (after 3 warm-up steps), the model on
    `device` as the fine-tune places it (`retrain.models.distributed.place`: batches go there from host memory)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = place(copy.deepcopy(model), dev).train()
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fq = FakeQuant(model, QatConfig(), tuple(tensors({k: v[:2] for k, v in data.items()}))) if qat else None
    n = next(iter(data.values())).shape[0]
    rng = np.random.default_rng(0)
    cfg = DistillConfig(hard_weight=0.0)
    t0 = 0.0
    for i in range(steps + 3):
        if i == 3:
            _sync(dev)
            t0 = time.perf_counter()
        idx = np.sort(rng.choice(n, batch, replace=False))
        b = {k: v[idx] for k, v in data.items()}
        cast = torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.enable_grad()
        with cast, (fq.active(model) if fq else torch.enable_grad()):
            loss = distill_loss(model, b, cfg).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.01)
    _sync(dev)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[128, 256, 1024], help="batch sizes")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the fine-tune's default: 2)")
    ap.add_argument("--quick", action="store_true", help="5 steps, batches 128 and 256")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N (the fine-tune's "
                    "[execution] torch_device); on a GPU the GEMM reference is measured there too")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 5, [128, 256]
    model = load_checkpoint(reference_dir() / "student-v0" / "checkpoint.pt")
    data = batches(max(args.batch) * 2)
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    bf16 = native_bf16() or on_gpu  # GPUs the fine-tune targets compute BF16 natively
    gemm = {"fp32": gemm_rate(torch.float32, args.threads, device=args.device)}
    if bf16:
        gemm["bf16"] = gemm_rate(torch.bfloat16, args.threads, device=args.device)
    flops_step = {b: 3 * model.flops_per_frame() * b for b in args.batch}
    rows = []
    for b in args.batch:
        for mode, dtype, qat in (("fp32", None, False), ("fp32+qat", None, True),
                                 *((("bf16", torch.bfloat16, False),) if bf16 else ())):
            rate = step_rate(model, data, b, args.steps, dtype, qat, args.threads, args.device)
            achieved = rate * flops_step[b] / 1e9
            ref = gemm["bf16" if dtype is not None else "fp32"]
            rows.append({"batch": b, "mode": mode, "steps_per_s": rate, "frames_per_s": rate * b,
                         "train_gflops_per_s": achieved, "gemm_gflops_per_s": ref,
                         "fraction_of_gemm_rate": achieved / ref})
    print(f"device {args.device}; host: {' '.join(host_features())}; native BF16: {bf16}; torch threads {args.threads}")
    print("GEMM rate (torch, best): " + ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in gemm.items())
          + ("" if bf16 else "; BF16 not measured: emulated on this CPU"))
    print(f"student v0: {model.num_parameters():,} parameters, {model.flops_per_frame() / 1e6:.2f} MFLOP forward per "
          "frame, training = 3x forward")
    print(f"{'batch':>6} {'mode':<9} {'steps/s':>8} {'frames/s':>9} {'GFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['mode']:<9} {r['steps_per_s']:>8.1f} {r['frames_per_s']:>9,.0f} "
              f"{r['train_gflops_per_s']:>8.1f} {r['fraction_of_gemm_rate']:>8.1%}")
    out = {"bench": "finetune", "device": args.device,
           "gpu": torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else None,
           "host": {"cpu_features": list(host_features()), "native_bf16": bf16},
           "threads": args.threads, "gemm_gflops_per_s": gemm, "bf16": "measured" if bf16 else "skipped: emulated",
           "model_parameters": model.num_parameters(), "forward_flops_per_frame": model.flops_per_frame(),
           "runs": rows,
           "fraction_of_gemm_rate": max(r["fraction_of_gemm_rate"] for r in rows if r["mode"] == "fp32")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
