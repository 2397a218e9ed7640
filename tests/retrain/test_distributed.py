"""Distributed fine-tuning: the fine-tune under torchrun with 2 processes (DDP, gloo on CPU) against one process on
the same snapshot, a 2-process run resuming a single process's state, and the batch slicing's refusal.

Tolerance: each process computes the loss on its half of every batch and DDP averages the gradients, so a step is
the single-process step up to float summation order (and to the QAT observers' ranges within the step, which are
synchronised after it). Over a short run this stays far below any difference that matters: the held-out figures
(every evaluation's val scores and objective) agree within 0.5% relative (measured: 0.05% at most) and the best
step is the same.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from retrain.cycle.finetune import FinetuneConfig, finetune, read_result
from retrain.cycle.finetune_launch import command
from retrain.models.distributed import DistributedError, setup as dist_setup
from tests.retrain.test_finetune import Killed, setup  # noqa: F401  (the fixture)

# through the float phase into QAT (at step 4: start_fraction 0.5), an evaluation every 2 steps
CFG = FinetuneConfig(steps=8, batch_size=32, eval_every=2, checkpoint_every=2, warmup_steps=2, threads=1)
RTOL = 0.005  # measured here: 0.05% at most


def _figures(result) -> list[tuple]:
    return [(h["step"], h["val_mined_score"], h["val_ordinary_score"], h["objective"]) for h in result.history]


def _torchrun(setup, out, cfg_file, nproc=2) -> None:  # noqa: F811
    cmd = command(setup["start"], setup["teacher"], setup["snapshot"].path, out, cfg_file, nproc)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])  # the main process prints the result, once
    assert printed["numerics"]["processes"] == nproc


def _close(a, b) -> None:
    fa, fb = _figures(a), _figures(b)
    assert [f[0] for f in fa] == [f[0] for f in fb]
    np.testing.assert_allclose(np.array([f[1:] for f in fa], float), np.array([f[1:] for f in fb], float),
                               rtol=RTOL)
    assert a.best_step == b.best_step and a.steps_run == b.steps_run


def test_two_processes_give_the_single_process_figures(setup, tmp_path) -> None:  # noqa: F811
    one = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path / "one")
    assert one.numerics["processes"] == 1 and one.numerics["device"] == "cpu"
    cfg_file = tmp_path / "finetune.json"
    cfg_file.write_text(CFG.model_dump_json())
    _torchrun(setup, tmp_path / "two", cfg_file)
    two = read_result(tmp_path / "two" / "result.json")
    assert two.numerics["processes"] == 2 and two.qat_started_at == one.qat_started_at
    _close(one, two)


def test_two_processes_resume_a_single_process_state(setup, tmp_path) -> None:  # noqa: F811
    full = finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path / "full")
    with pytest.raises(Killed):
        finetune(setup["start"], setup["teacher"], setup["snapshot"], CFG, tmp_path / "cut",
                 progress=lambda s, n, i: (_ for _ in ()).throw(Killed()) if s == 4 else None)
    assert (tmp_path / "cut" / "state.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    cfg_file = tmp_path / "finetune.json"
    cfg_file.write_text(CFG.model_dump_json())
    # through the command: `flywheel finetune --nproc 2` runs the same torchrun
    done = subprocess.run([sys.executable, "-m", "flywheel", "finetune", "--snapshot", str(setup["snapshot"].path),
                           "--start", str(setup["start"]), "--teacher", str(setup["teacher"]),
                           "--out", str(tmp_path / "cut"), "--config", str(cfg_file), "--nproc", "2"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = read_result(tmp_path / "cut" / "result.json")
    assert json.loads(done.stdout.strip().splitlines()[-1]) == json.loads(resumed.model_dump_json())
    assert resumed.resumed_from_step == 4
    _close(full, resumed)


def test_a_batch_that_does_not_split_is_refused(monkeypatch) -> None:
    ctx = dist_setup()
    ctx.world, ctx.rank = 3, 1  # the slicing alone, no process group
    with pytest.raises(DistributedError, match="does not split evenly"):
        ctx.shard({"x": np.zeros((32, 2))})
    ctx.world = 4
    assert ctx.shard({"x": np.arange(32)})["x"].tolist() == list(range(8, 16))


def test_cuda_without_a_gpu_is_refused() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(DistributedError, match="no CUDA device"):
        dist_setup("cuda")
