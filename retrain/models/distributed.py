"""Training on the configured device and across processes: torchrun + DistributedDataParallel.

    ctx = distributed.setup()             # torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process
    model = ctx.place(model)              # on the device; forward takes and returns CPU tensors (as on the CPU)
    loss = loss_fn(ctx.ddp(model), ctx.shard(batch))   # DDP; each process its slice of the step's batch
    mean_loss = ctx.step_done(loss.item())
    ctx.main_only(save)(path, ...)        # one process writes
    return ctx.close(result)

Data parallelism that keeps a run's arithmetic: every process draws the SAME batch indices from the same seeded
stream (the data order lives in the checkpoint as before), takes its contiguous slice of the batch (`shard`,
batch_size divisible by the world size), and DDP averages the gradients, so each optimiser step is the mean of the
per-slice gradients: the single-process step up to float summation order, and to the loss's own normalisation (a
loss averaged per slice, then across slices, equals the batch mean when the slices are equal in size and the loss
is a per-row mean; the distillation loss is). Weights, optimiser state, moving averages and evaluations are then
identical in every process; only the main one (rank 0) writes checkpoints, results and progress.

Backends: gloo on CPU, NCCL on CUDA (one GPU per process, `cuda:<LOCAL_RANK>`). Launch:

    torchrun --standalone --nproc-per-node 2 -m retrain.cycle.finetune_launch ...   (or `flywheel finetune --nproc 2`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shadow.config import default_execution


class DistributedError(RuntimeError):
    """A distributed run that cannot work: a batch that does not split evenly, an unavailable device."""


def _to_param_device(module: nn.Module, args: tuple) -> tuple:
    dev = next(module.parameters()).device
    return tuple(a.to(dev, non_blocking=True) if torch.is_tensor(a) else a for a in args)


def _to_cpu(module: nn.Module, args: tuple, out):
    if isinstance(out, tuple):
        return tuple(o.cpu() if torch.is_tensor(o) else o for o in out)
    return out.cpu() if torch.is_tensor(out) else out


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device`, taking and returning CPU tensors (hooks move inputs to wherever its parameters
    are, outputs back), so the data pipeline, the losses' numpy targets and the evaluation stay device-agnostic and
    the state dict keeps its keys. Unchanged on the CPU: no hook at all."""
    if device.type == "cpu":
        return model
    model.to(device)
    model.register_forward_pre_hook(_to_param_device)
    model.register_forward_hook(_to_cpu)
    return model


@dataclass
class Context:
    """Where this process trains: its rank among `world` processes and its torch device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    _wrapped: dict = field(default_factory=dict, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this process's device (`place`; unchanged on the CPU)."""
        return place(model, self.device)

    def ddp(self, model: nn.Module, extra=None) -> nn.Module:
        """`model` in DistributedDataParallel over the processes (made once per model; the model itself for one
        process). `extra`: an object with `learnable()` parameters outside the model whose gradients must be
        averaged too (a feature distiller's projections): averaged as each one's gradient is accumulated."""
        if self.world == 1:
            return model
        if id(model) not in self._wrapped:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            for p in (extra.learnable() if extra is not None else ()):
                p.register_post_accumulate_grad_hook(self._average_grad)
            self._wrapped[id(model)] = (model, net)  # the model is kept alive with its id
        return self._wrapped[id(model)][1]

    def _average_grad(self, p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad /= self.world

    def shard(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's contiguous slice of every array of a step's batch (first axis, equal slices)."""
        if self.world == 1:
            return batch
        n = next(iter(batch.values())).shape[0]
        if n % self.world:
            raise DistributedError(f"a batch of {n} frames does not split evenly over {self.world} processes; "
                                   "make batch_size a multiple of the process count")
        k = n // self.world
        return {name: v[self.rank * k:(self.rank + 1) * k] for name, v in batch.items()}

    def step_done(self, loss: float, ranges: dict[str, list[float]] | None = None) -> float:
        """After an optimiser step: the batch's loss (the mean of the slices' losses) and, for a QAT phase, the
        activation observers' running ranges (`retrain.models.qat`) made the union over the processes (each saw
        its slice of the batch; one process sees the whole batch)."""
        if self.world == 1:
            return float(loss)
        names = sorted(ranges or {})
        t = torch.tensor([float(loss)], dtype=torch.float64)
        dist.all_reduce(t)
        if names:
            lo = torch.tensor([ranges[n][0] for n in names], dtype=torch.float64)
            hi = torch.tensor([ranges[n][1] for n in names], dtype=torch.float64)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            for n, a, b in zip(names, lo.tolist(), hi.tolist()):
                ranges[n] = [a, b]
        return float(t.item()) / self.world

    def main_only(self, write: Callable) -> Callable:
        """`write(...)` in the main process; elsewhere nothing is written and the call returns its first path
        argument, as the writers do (every process holds the same state: one writes it)."""
        if self.main:
            return write
        return lambda *args, **_: next(Path(a) for a in args if isinstance(a, (str, os.PathLike)))

    def record(self) -> dict:
        """What a result records of where it trained."""
        return {"device": str(self.device), "processes": self.world}

    def close(self, result=None):
        """End of a run: every process waits until the main one has written, then leaves the process group."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return result


def setup(device: str | None = None, threads: int | None = None) -> Context:
    """This process's context. `device`: the torch device (None: [execution] torch_device, see
    `shadow.config.configure_execution`); `threads`: torch's intra-op threads. Under torchrun (WORLD_SIZE > 1) the
    process group is joined: gloo on CPU, NCCL on CUDA with each process on `cuda:<LOCAL_RANK>`."""
    if threads:
        torch.set_num_threads(threads)
    device = device or default_execution().torch_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = torch.device(device)
    if want.type == "cuda" and not torch.cuda.is_available():
        raise DistributedError(f"device {device} requested but torch {torch.__version__} sees no CUDA device "
                               "(execution.torch_device)")
    if world == 1:
        return Context(0, 1, 0, want, None)
    cuda = want.type == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, world, local, dev, "nccl" if cuda else "gloo")


def shutdown(ctx: Context) -> None:
    ctx.close()
