"""The fine-tune as a program, for torchrun: one process per device, DDP between them (`retrain.models.distributed`).

    torchrun --standalone --nproc-per-node 2 -m retrain.cycle.finetune_launch \\
        --start-model student/checkpoint.pt --teacher models/teacher --snapshot snapshots/<id> --out work/finetune \\
        [--config finetune.json] [--device cpu|cuda]

or `flywheel finetune ... --nproc 2`, which starts exactly that (`launch`). Each process runs
`retrain.cycle.finetune.finetune` with the same arguments; the main one writes the state, checkpoint and result
into `--out`, so a killed run resumes from its last state, with any process count. The result is printed as JSON
by the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from retrain.cycle.dataset import load_snapshot
from retrain.cycle.finetune import FinetuneConfig, finetune
from shadow.config import configure_execution, default_execution


def command(start: Path, teacher: Path, snapshot: Path, out: Path, config: Path | None, nproc: int,
            device: str | None = None) -> list[str]:
    """The torchrun command line of a fine-tune over `nproc` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "retrain.cycle.finetune_launch", "--start-model", str(start), "--teacher", str(teacher),
           "--snapshot", str(snapshot), "--out", str(out)]
    if config is not None:
        cmd += ["--config", str(config)]
    if device:
        cmd += ["--device", device]
    return cmd


def launch(start: Path, teacher: Path, snapshot: Path, out: Path, config: Path | None = None, nproc: int = 2,
           device: str | None = None, **popen) -> subprocess.CompletedProcess:
    """Run the fine-tune under torchrun with `nproc` processes on this machine and wait for it."""
    return subprocess.run(command(start, teacher, snapshot, out, config, nproc, device), check=False, **popen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start-model", dest="start", type=Path, required=True, help="student checkpoint to start from")
    ap.add_argument("--teacher", type=Path, required=True, help="teacher model dir (ONNX + spec)")
    ap.add_argument("--snapshot", type=Path, required=True, help="dataset snapshot directory")
    ap.add_argument("--out", type=Path, required=True, help="work directory: state, checkpoint, result")
    ap.add_argument("--config", type=Path, help="FinetuneConfig as JSON (default: the defaults)")
    ap.add_argument("--device", help="torch device: cpu, cuda (each process on cuda:<LOCAL_RANK>); default cpu")
    args = ap.parse_args(argv)
    config = FinetuneConfig.model_validate_json(args.config.read_text()) if args.config else FinetuneConfig()
    if args.device:  # the fine-tune's device is [execution] torch_device; here the command line gives it
        configure_execution(default_execution().model_copy(update={"torch_device": args.device}))
    result = finetune(args.start, args.teacher, load_snapshot(args.snapshot), config, args.out)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank of this process
        print(json.dumps(result.model_dump(mode="json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
