"""Targeted fine-tuning of a plug-in planner (`retrain.models.plugins`): the user's torch module, built by its entry
point and loaded with its state dict, is distilled from the teacher on a snapshot's mined windows.

    result = finetune_plugin(student_dir, teacher_dir, snapshot, FinetuneConfig(), out_dir, stored=lake)

What it shares with `retrain.cycle.finetune` (the transformer's fine-tune): the config (`FinetuneConfig`: steps,
batch size, replay ratio, learning rate and schedule, distillation loss, early stopping: eval_every, patience,
min_improvement, regression_weight; seed and threads) and the result record (`FinetuneResult`). Batches mix mined and
ordinary train frames at `replay_ratio`; every `eval_every` steps the module is scored against the teacher with
shadow's divergence score (`shadow.metrics.pair_metrics`, no TTC term) on val mined and val ordinary frames, and the
best state is kept. What it leaves out, because it needs the transformer's insides: regrow / prune-back, the
quantization-aware phase, feature and attention-map distillation, augmentation (perturbations are of the feat-v1
layout) and EMA; the result says so in `numerics.skipped`.

Teacher targets: its stored outputs where the lake has them (`decisions` of the teacher's model id, `stored`), the
teacher run live (onnxruntime, its own featurizer's inputs) for the other frames. The candidate is written as a
plug-in model directory `<out>/model/` (model.onnx, spec.json, state_dict.pt); `checkpoint` in the result is its
state_dict.pt.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ingest.lake import write_text_atomic
from retrain.cycle.dataset import Snapshot
from retrain.cycle.finetune import FinetuneConfig, FinetuneError, FinetuneResult
from retrain.models.evaluate import predict
from retrain.models.plugins import STATE_FILE, distill_loss, export, load_module, predict as module_predict
from retrain.models.training import OptimConfig, lr_at
from shadow.catalog import Catalog
from shadow.metrics import MetricsConfig, pair_metrics
from shadow.models import session
from shadow.numerics import host_features
from shadow.spec import read_spec

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
SKIPPED = ["regrow", "prune_back", "qat", "features", "augment", "ema_decay"]


def stored_teacher(lake: Path, model: str, drive_id: np.ndarray, seq: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's stored decisions (lake `decisions`, model id `model`) of the rows (drive_id, seq): found (N,)
    bool, trajectory (N, 8, 3) and logits (N, 6) (log of the stored probabilities: the same softmax and arg-max)."""
    n = drive_id.shape[0]
    traj, logits, found = np.zeros((n, 8, 3), np.float32), np.zeros((n, 6), np.float32), np.zeros(n, bool)
    with Catalog(lake) as cat:
        t = cat.arrow("SELECT drive_id, seq, traj_x, traj_y, traj_yaw, maneuver_probs FROM decisions "
                      "WHERE model = $m AND drive_id IN (SELECT unnest($d))",
                      {"m": model, "d": sorted(set(drive_id.tolist()))})
    if not t.num_rows:
        return found, traj, logits
    row = {(d, int(s)): i for i, (d, s) in enumerate(zip(drive_id.tolist(), seq.tolist()))}
    at = np.array([row.get((d, int(s)), -1) for d, s in zip(t["drive_id"].to_pylist(), t["seq"].to_pylist())])
    ok = at >= 0
    idx = at[ok]
    for k, name in enumerate(("traj_x", "traj_y", "traj_yaw")):
        traj[idx, :, k] = np.asarray(t[name].to_pylist(), np.float32).reshape(-1, 8)[ok]
    probs = np.asarray(t["maneuver_probs"].to_pylist(), np.float32).reshape(-1, 6)[ok]
    logits[idx] = np.log(np.maximum(probs, 1e-12))
    found[idx] = True
    return found, traj, logits


def finetune_plugin(start: Path, teacher: Path, snapshot: Snapshot, config: FinetuneConfig, out_dir: Path,
                    progress: Progress | None = None, stored: Path | None = None) -> FinetuneResult:
    """Fine-tune the plug-in model directory `start`, or its state file (beside its model.onnx and spec.json, as
    `export` writes them; see the module docstring); returns the result record."""
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    plugin, module = load_module(start)
    spec = read_spec(Path(start).parent if Path(start).is_file() else start, verify=False)
    feats, meta = snapshot.features([plugin.featurizer])
    inputs = feats.inputs(plugin.featurizer)
    t0 = time.perf_counter()
    t_traj, t_logits = np.zeros((len(feats), 8, 3), np.float32), np.zeros((len(feats), 6), np.float32)
    have = np.zeros(len(feats), bool)
    if stored is not None:
        t_spec = read_spec(teacher, verify=False)
        have, t_traj, t_logits = stored_teacher(Path(stored), f"{t_spec.name}-{t_spec.version}", meta["drive_id"],
                                                meta["seq"])
    todo = np.flatnonzero(~have)
    if todo.size:
        live = predict(session(teacher, config.threads), feats.take(todo), config.teacher_batch)
        t_traj[todo], t_logits[todo] = live
    label_s = time.perf_counter() - t0
    split, role = meta["split"], meta["role"]
    rows = {f"{s}_{r}": np.flatnonzero((split == s) & (role == r)) for s in ("train", "val")
            for r in ("mined", "ordinary")}
    if not rows["train_mined"].size:
        raise FinetuneError("the snapshot has no mined training frames")
    data = {**inputs, "t_traj": t_traj, "t_logits": t_logits}
    loss_fn = distill_loss(plugin, config.distill)
    optim = OptimConfig(steps=max(config.steps, 1), batch_size=config.batch_size, lr=config.lr,
                        weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                        grad_clip=config.grad_clip)
    rng = np.random.default_rng(config.seed)
    n_mined = max(1, int(round(config.batch_size / (1 + config.replay_ratio))))
    n_ord = config.batch_size - n_mined if rows["train_ordinary"].size else 0

    def evaluate(step: int) -> dict:
        out = {"step": step}
        for r in ("mined", "ordinary"):
            idx = rows[f"val_{r}"]
            if idx.size:
                s = module_predict(plugin, module, {k: v[idx] for k, v in inputs.items()}, 2048)
                out[f"val_{r}"] = float(pair_metrics((t_traj[idx], t_logits[idx]), s, MetricsConfig())["score"]
                                        .mean())
        out["objective"] = out.get("val_mined", 0.0) + config.regression_weight * out.get("val_ordinary", 0.0)
        return out

    initial = best = evaluate(0)
    best_state = copy.deepcopy(module.state_dict())
    history, waited, steps_run = [initial], 0, 0
    decay = [p for p in module.parameters() if p.ndim >= 2]
    rest = [p for p in module.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    t_train = time.perf_counter()
    for step in range(config.steps):
        idx = np.concatenate([rng.choice(rows["train_mined"], n_mined),
                              rng.choice(rows["train_ordinary"], n_ord) if n_ord else np.zeros(0, np.int64)])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, optim)
        module.train()
        loss = loss_fn(module, {k: v[idx] for k, v in data.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
        opt.step()
        steps_run = step + 1
        if progress is not None and steps_run % config.progress_every == 0:
            progress(steps_run, config.steps, {"loss": float(loss.item())})
        if steps_run % config.eval_every == 0 or steps_run == config.steps:
            ev = {**evaluate(steps_run), "train_loss": float(loss.item()), "lr": lr_at(step, optim)}
            history.append(ev)
            if ev["objective"] < best["objective"] * (1 - config.min_improvement):
                best, best_state, waited = ev, copy.deepcopy(module.state_dict()), 0
            else:
                waited += 1
                if waited >= config.patience:
                    break
    train_s = time.perf_counter() - t_train
    module.load_state_dict(best_state)
    extra = {"recipe": "retrain.cycle.finetune_plugin", "parent_sha256": spec.sha256, "snapshot": snapshot.id}
    out_spec = export(plugin, module, out_dir / "model", spec.name, f"{spec.version}-ft", extra)
    result = FinetuneResult(
        checkpoint=str(out_dir / "model" / STATE_FILE), key=f"{spec.sha256}:{snapshot.id}:{config.seed}",
        planned_steps=config.steps, steps_run=steps_run, best_step=int(best["step"]),
        stopped_early=steps_run < config.steps, resumed_from_step=0, initial=initial, best=best, history=history,
        frames={k: int(v.size) for k, v in rows.items()}, teacher_label_seconds=label_s,
        seconds=time.perf_counter() - t_start,
        numerics={"autocast": "off", "host": host_features(), "planner": plugin.name, "skipped": SKIPPED,
                  "teacher_stored_frames": int(have.sum()), "candidate_sha256": out_spec.sha256},
        train_steps_per_s=steps_run / train_s if train_s > 0 and steps_run else None)
    write_text_atomic(out_dir / "result.json", json.dumps(result.model_dump(mode="json"), indent=1))
    log.info("fine-tuned %s (%s): objective %.4f -> %.4f in %d steps", spec.name, plugin.name, initial["objective"],
             best["objective"], steps_run)
    return result
