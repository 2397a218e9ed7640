"""Targeted fine-tuning: distil the teacher into the current student on mined windows, without forgetting the rest,
and without giving the compression back.

    result = finetune(start_checkpoint, teacher_dir, snapshot, FinetuneConfig(), out_dir, progress=print)

Data (a `retrain.cycle.dataset` snapshot): every batch mixes mined frames of the train drives with ordinary ones
(the replay sample, `replay_ratio` per mined frame), so what the student does well elsewhere is rehearsed. Targets
are the teacher's outputs (cached): its trajectory and, at a temperature, its maneuver distribution
(`retrain.models.training.distill_loss`); optionally its features and attention maps (`features`). No behaviour
cloning by default (`distill.hard_weight` 0): the gates judge divergence from the teacher.

The candidate keeps the student's architecture by default: it must be at least as compressed as the current student
on every chip. `regrow` grows a pruned student back to its unpruned size first (new units start silent); then
`prune_back` prunes it to the start's heads and FFN widths again, by importance on the distillation loss, with
`prune_back_steps` of recovery distillation.

Quantization-aware phase (`qat`, `retrain.models.qat`): training runs in float until `qat.start_fraction` of the
planned steps, or until early stopping would end the float phase; then the best float state is restored and training
goes on with fake INT8 weight products following the chips' rules, so the quantized student recovers instead of
falling back to FP16. From then on evaluations are made with fake quantization and only quantized states compete
for the kept state.

`augment` replaces a share of each batch's mined frames by teacher-labelled copies carrying the fleet's perception
noise (`retrain.models.augment`); `ema_decay` keeps (and evaluates) a moving average of the weights; `decay_toward`
"start" decays the matrices toward the start model's (L2-SP). Early stopping on the val drives: every `eval_every`
steps, shadow's divergence score against the teacher (`shadow.metrics.pair_metrics`, no TTC term) on val mined and
ordinary frames (`objective`: by default the median over val drives), as mined + `regression_weight` x ordinary; the
best state wins; `patience` evaluations without improvement end a phase.

Numerics: FP32 by default on every host (`autocast` "off"): the result does not depend on the CPU. "bf16" is
refused without native BF16 (`shadow.numerics.native_bf16`); "auto" uses it only where native; recorded. Resumable:
every `checkpoint_every` steps the whole state (weights, optimiser, data order and random state, QAT ranges, best
state, history) is saved atomically to `<out>/state.pt`; a rerun continues from it and ends with the weights an
uninterrupted run ends with; a state of another config, snapshot, teacher or start model is refused. The prune-back
recovery is short and is redone whole after an interruption.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ingest.lake import write_bytes_atomic, write_text_atomic
from ingest.versions import UnknownVersion, check_version
from retrain.cycle.dataset import Snapshot
from retrain.cycle.finetune_data import Pool, augment_bank, batch_split, finetune_key, teacher_targets, val_score
from retrain.models.architectures import Importance, Planner, grow, prune_to, tensors
from retrain.models import distributed
from retrain.models.augment import AugmentConfig, perturb
from retrain.models.feature_distill import FeatureDistillConfig, FeatureDistiller
from retrain.models.onnx_import import planner_from_onnx
from retrain.models.qat import FakeQuant, QatConfig
from retrain.models.training import DistillConfig, OptimConfig, distill_loss, load_checkpoint, lr_at, save_checkpoint
from shadow.featurize import INPUT_NAMES
from shadow.models import session
from shadow.numerics import host_features, native_bf16

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
STATE_FILE = "state.pt"
RESULT_FILE, CHECKPOINT_FILE = "result.json", "checkpoint.pt"
STATE_FORMAT_VERSION, RESULT_FORMAT_VERSION = 2, 1  # of state.pt (2: QAT phase and ranges, feature maps), result


class FinetuneError(RuntimeError):
    """A fine-tune that cannot run: no mined training frames, a foreign resume state, an unusable start model."""


class FinetuneConfig(BaseModel):
    """Targeted distillation fine-tune; defaults are the reference cycle's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(10000, ge=0, description="optimiser steps at most (0: the start model unchanged)")
    batch_size: int = Field(128, ge=2, description="frames per step, mined and ordinary together")
    replay_ratio: float = Field(1.0, ge=0, description="ordinary (replay) frames per mined frame in every batch")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW; warm-up, then cosine to 5%)")
    regrow: bool = Field(False, description="grow a pruned student back to its architecture's unpruned heads and "
                         "FFN width before fine-tuning (new units start silent); with `prune_back` it is pruned to "
                         "the start's size again before it is kept. Off by default: on the reference bench regrowing "
                         "gained nothing measurable (where mined -39.2% vs -38.8%, FP32) and the candidate must stay "
                         "as compressed as the current student")
    prune_back: bool = Field(True, description="after a regrow, prune the candidate back to the start's heads and "
                             "FFN widths (importance on the distillation loss), then recover by distillation")
    prune_back_steps: int = Field(300, ge=0, description="recovery distillation steps after pruning back")
    qat: QatConfig = Field(default_factory=QatConfig, description="quantization-aware phase (fake INT8)")
    features: FeatureDistillConfig = Field(default_factory=FeatureDistillConfig, description="intermediate "
                                           "feature and attention-map distillation (off by default: on the "
                                           "reference fleet weights 1.0 and 0.1 did not lower the held-out "
                                           "divergence, -30.3% vs -32.8% where mined at 0.1)")
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(share=1.0), description="perturbed "
                                   "copies of mined frames (perception noise) labelled by the teacher, from a bank "
                                   "(`retrain.models.augment`); every mined frame a copy: reference fleet, held out, "
                                   "FP32, mined -34.0%, ordinary -2.2% (share 0.5: -24.0%, +12.3%)")
    ema_decay: float | None = Field(0.99, gt=0, lt=1, description="keep an exponential moving average of the "
                                    "weights (this decay per step); evaluations and the kept state are the "
                                    "average's. None: the raw weights")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay of the matrices")
    decay_toward: Literal["zero", "start"] = Field("zero", description="what the matrices decay toward: zero "
                                                   "(AdamW), or the start model's weights (L2-SP: the fine-tune "
                                                   "keeps what the student knew where its data is silent)")
    warmup_steps: int = Field(30, ge=0, description="linear warm-up steps")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(hard_weight=0.0),
                                   description="loss: teacher trajectory and T^2 KL on maneuver logits (soft "
                                   "targets, temperature); hard_weight > 0 adds behaviour cloning")
    eval_every: int = Field(100, ge=1, description="steps between early-stopping evaluations on the val drives")
    patience: int = Field(20, ge=1, description="evaluations without improvement before a phase ends")
    min_improvement: float = Field(0.0, ge=0, lt=1, description="relative objective decrease counted as one")
    regression_weight: float = Field(1.0, ge=0, description="weight of the val ordinary score in the objective")
    objective: Literal["mean", "drive_median"] = Field("drive_median", description="val scores: mean over frames, "
                                                       "or median over val drives of each drive's mean (robust: "
                                                       "on the demo's 5 val drives one window went 0.37 -> 2.38 "
                                                       "while the other four drives improved)")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable state saves")
    progress_every: int = Field(10, ge=1, description="steps between progress callbacks")
    seed: int = Field(0, description="seeds the data order")
    threads: int = Field(2, ge=1, description="torch and onnxruntime intra-op threads (fixed: reproducible)")
    teacher_batch: int = Field(1024, ge=1, description="frames per teacher inference batch")
    autocast: Literal["off", "bf16", "auto"] = Field("off", description="BF16 autocast of the forward pass: off "
                                                     "(FP32, the same result on every host), bf16 (refused "
                                                     "without native BF16), auto (only where native)")


class FinetuneResult(BaseModel):
    """What a fine-tune did and measured (objective: val mined + regression_weight x val ordinary score)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(RESULT_FORMAT_VERSION, description="version of this record's format")
    checkpoint: str = Field(description="the fine-tuned model (best state), a retrain.models.training checkpoint")
    key: str = Field(description="hash of config, snapshot, teacher and start model")
    planned_steps: int
    steps_run: int
    best_step: int
    stopped_early: bool
    resumed_from_step: int = Field(description="0 for a fresh run")
    initial: dict = Field(description="val scores of the start model")
    best: dict = Field(description="val scores of the kept state")
    history: list[dict] = Field(description="every evaluation: step, scores, lr, train loss, phase")
    frames: dict[str, int] = Field(description="train mined / train ordinary / val mined / val ordinary frames")
    teacher_label_seconds: float = Field(description="teacher inference on the snapshot's frames and on the "
                                         "augmentation bank (its perturbation included)")
    seconds: float
    qat_started_at: int | None = Field(None, description="step the quantization-aware phase began (None: never)")
    qat_skipped: list[str] = Field(default_factory=list, description="products kept in float (raw-input layers)")
    prune_back: dict | None = Field(None, description="heads and FFN widths after pruning back, recovery scores")
    numerics: dict = Field(default_factory=dict, description="autocast dtype used and the host's CPU features")
    train_steps_per_s: float | None = Field(None, description="optimiser steps per second of this run (measured)")

def read_result(path: Path) -> FinetuneResult:
    """A fine-tune's result.json, its format version checked (one without the key predates versions: 1)."""
    raw = json.loads(Path(path).read_text())
    try:
        check_version(path, "fine-tune result", raw.get("format_version", 1), RESULT_FORMAT_VERSION)
    except UnknownVersion as exc:
        raise FinetuneError(str(exc)) from None
    return FinetuneResult.model_validate(raw)


def check_state(path: Path, blob: dict) -> None:
    """Refuse a fine-tune state (state.pt, loaded) of another format version (none: it predates versions, 1)."""
    try:
        check_version(path, "fine-tune state", blob.get("format_version", 1), STATE_FORMAT_VERSION)
    except UnknownVersion as exc:
        raise FinetuneError(str(exc)) from None


def save_state(path: Path, blob: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format_version": STATE_FORMAT_VERSION, **blob}, buf)
    write_bytes_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------------ fine-tune


def autocast_dtype(setting: str) -> torch.dtype | None:
    """The autocast dtype a setting means on this host (None: FP32); "bf16" without native BF16 is refused."""
    if setting == "off" or (setting == "auto" and not native_bf16()):
        return None
    if not native_bf16():
        raise FinetuneError("autocast 'bf16' asked for, but this CPU has no native BF16 (avx512_bf16 / amx_bf16): "
                            "torch would emulate it, tens of times slower; use 'off' or 'auto'")
    return torch.bfloat16


class _Run:
    """The training state of one fine-tune and its step; `finetune` drives it."""

    def __init__(self, config: FinetuneConfig, model: Planner, data: dict, n_mined: int, pert_bank: dict | None,
                 teacher_sess, distiller: FeatureDistiller | None, qat: FakeQuant | None, ctx) -> None:
        self.config, self.model, self.data, self.n_mined, self.ctx = config, model, data, n_mined, ctx
        self.pert_bank, self.teacher_sess, self.distiller, self.qat = pert_bank, teacher_sess, distiller, qat
        self.kept = copy.deepcopy(model) if config.ema_decay else model
        decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; biases and norms do not
        rest = [p for p in model.parameters() if p.ndim < 2] + (distiller.learnable() if distiller else [])
        self.anchor = [(p, p.detach().clone()) for p in decay] if config.decay_toward == "start" else []
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0 if self.anchor else config.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=config.lr)
        self.sched = OptimConfig(steps=max(1, config.steps), batch_size=config.batch_size, lr=config.lr,
                                 weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                                 grad_clip=config.grad_clip)
        self.rng = np.random.default_rng(config.seed)
        n = next(iter(data.values())).shape[0]
        self.pools = {"mined": Pool(n_mined), "ordinary": Pool(n - n_mined)}
        self.k_mined, self.n_aug = batch_split(config, n, n_mined)
        self.dtype = autocast_dtype(config.autocast)
        self.quantized = False  # in the QAT phase

    def batch(self) -> dict[str, np.ndarray]:
        cfg, rng = self.config, self.rng
        idx = np.sort(np.concatenate([self.pools["mined"].draw(self.k_mined, rng),
                                      self.n_mined + self.pools["ordinary"].draw(cfg.batch_size - self.k_mined, rng)]))
        batch = {k: v[idx] for k, v in self.data.items()}
        n_aug = self.n_aug
        if n_aug and self.pert_bank is not None:
            # idx is sorted, so the mined rows come first; the first n_aug of them become one of their banked copies
            at_bank = rng.integers(0, cfg.augment.bank_copies, n_aug) * self.n_mined + idx[:n_aug]
            for k, v in self.pert_bank.items():
                batch[k][:n_aug] = v[at_bank]
        elif n_aug:
            pert = perturb({k: batch[k][:n_aug] for k in INPUT_NAMES}, cfg.augment, rng)
            t_out = self.teacher_sess.run(["trajectory", "maneuver_logits"], pert)
            for k in INPUT_NAMES:
                batch[k][:n_aug] = pert[k]
            batch["t_traj"][:n_aug], batch["t_logits"][:n_aug] = t_out
        return batch

    def quantizing(self, model: Planner):
        return self.qat.active(model) if self.quantized and self.qat is not None else contextlib.nullcontext()

    def loss(self, batch: dict[str, np.ndarray], net: torch.nn.Module | None = None) -> torch.Tensor:
        cast = (torch.autocast("cpu", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext())
        capture = self.distiller.capture(self.model) if self.distiller else contextlib.nullcontext()
        with cast, self.quantizing(self.model), capture:
            loss = distill_loss(net or self.model, batch, self.config.distill)  # net: the model's DDP wrapper
            if self.distiller:
                loss = loss + self.distiller.loss(batch)
        return loss.float()

    def step(self, step: int, lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        loss = self.loss(self.ctx.shard(self.batch()), self.ctx.ddp(self.model, self.distiller))  # torchrun: a slice
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for p, p0 in self.anchor:  # decoupled, as AdamW's: p <- p - lr * wd * (p - p0)
                p.sub_(p - p0, alpha=lr * self.config.weight_decay)
        if self.config.ema_decay:
            with torch.no_grad():
                for e, p in zip(self.kept.parameters(), self.model.parameters()):
                    e.lerp_(p, 1.0 - self.config.ema_decay)
        return self.ctx.step_done(loss.item(), self.qat.ranges if self.qat is not None and self.quantized else None)

    def start_qat(self) -> None:
        """Enter the QAT phase: observe the activation ranges on a few training batches first (no update)."""
        self.quantized = True
        with torch.no_grad(), self.quantizing(self.model):
            self.model.train()
            for _ in range(4):
                distill_loss(self.model, self.batch(), self.config.distill)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "pools": {k: p.state() for k, p in self.pools.items()}, "torch_rng": torch.get_rng_state(),
                "ema": self.kept.state_dict() if self.config.ema_decay else None, "quantized": self.quantized,
                "qat": self.qat.state() if self.qat else None,
                "features": self.distiller.state() if self.distiller else None}

    def load(self, blob: dict) -> None:
        self.model.load_state_dict(blob["model"])
        if self.config.ema_decay:
            self.kept.load_state_dict(blob["ema"])
        self.opt.load_state_dict(blob["opt"])
        self.rng.bit_generator.state = blob["rng"]
        for name, s in blob["pools"].items():
            self.pools[name].load(s)
        torch.set_rng_state(blob["torch_rng"])
        self.quantized = blob["quantized"]
        if self.qat and blob["qat"]:
            self.qat.load(blob["qat"])
        if self.distiller and blob["features"]:
            self.distiller.load(blob["features"])


def _prune_back(run: _Run, start: Planner, val: dict, score: Callable) -> tuple[Planner, dict]:
    """Prune the regrown candidate to the start's heads and FFN widths, then recover by distillation."""
    cfg, model = run.config, run.model
    imp = Importance(model)
    model.set_record(True)
    for _ in range(8):
        model.zero_grad()
        with run.quantizing(model):
            distill_loss(model, run.batch(), cfg.distill).backward()
        imp.accumulate(model)
    model.set_record(False)
    heads = [start.config.heads_of(i) for i in range(start.config.depth)]
    ffns = [start.config.ffn_of(i) for i in range(start.config.depth)]
    small = run.ctx.place(prune_to(model, imp, heads, ffns))
    before = score(small)
    run.model = small
    run.kept = small  # no moving average during the short recovery: it would lag behind the pruned weights
    opt = torch.optim.AdamW(small.parameters(), lr=cfg.lr * 0.3, weight_decay=cfg.weight_decay)
    for _ in range(cfg.prune_back_steps):
        small.train()
        loss = run.loss(run.batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(small.parameters(), cfg.grad_clip)
        opt.step()
    after = score(small)
    log.info("pruned back to heads %s, ffn %s: val objective %.4f -> %.4f after %d recovery steps", heads, ffns,
             before["objective"], after["objective"], cfg.prune_back_steps)
    return small.eval(), {"heads": heads, "ffn": ffns, "parameters": small.num_parameters(), "pruned": before,
                          "recovered": after, "steps": cfg.prune_back_steps}


def finetune(start: Path, teacher: Path, snapshot: Snapshot, config: FinetuneConfig, out_dir: Path,
             progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune the checkpoint `start` on `snapshot` by distillation from `teacher` (ONNX); see the module doc.

    `progress(step, total_steps, info)` is called every `progress_every` steps and after each evaluation; an
    exception it raises stops the run (the state saved last is where a rerun continues).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = distributed.setup(threads=config.threads)  # [execution] torch_device; torchrun: DDP over the processes
    autocast_dtype(config.autocast)  # refuse an impossible setting before any work
    key = finetune_key(config, snapshot, teacher, Path(start))
    done = out / RESULT_FILE
    if done.is_file():
        prev = read_result(done)
        if prev.key == key and Path(prev.checkpoint).is_file():
            log.info("fine-tune already finished in %s", out)
            return prev
    feats, meta = snapshot.features()
    split, role = meta["split"], meta["role"]
    rows = {name: np.flatnonzero((split == s) & (role == r)) for name, s, r in
            (("train_mined", "train", "mined"), ("train_ordinary", "train", "ordinary"),
             ("val_mined", "val", "mined"), ("val_ordinary", "val", "ordinary"))}
    if rows["train_mined"].size == 0:
        raise FinetuneError(f"snapshot {snapshot.id} has no mined frames on train drives")
    used = np.concatenate(list(rows.values()))
    t_traj, t_logits, label_s = teacher_targets(teacher, feats, used, config, out / "teacher_targets.npz", key)
    at = {name: slice(a, a + r.size) for name, r, a in
          zip(rows, rows.values(), np.cumsum([0] + [r.size for r in rows.values()])[:-1].tolist())}
    train_idx = np.concatenate([rows["train_mined"], rows["train_ordinary"]])
    data = {**feats.take(train_idx).inputs(), "traj": feats.traj[train_idx], "traj_mask": feats.traj_mask[train_idx],
            "maneuver": feats.maneuver[train_idx],
            "t_traj": np.concatenate([t_traj[at["train_mined"]], t_traj[at["train_ordinary"]]]),
            "t_logits": np.concatenate([t_logits[at["train_mined"]], t_logits[at["train_ordinary"]]])}
    n_mined = rows["train_mined"].size
    val = {k: (feats.take(rows[k]), t_traj[at[k]], t_logits[at[k]],
               meta["drive_id"][rows[k]] if config.objective == "drive_median" else None)
           for k in ("val_mined", "val_ordinary")}

    start_model = load_checkpoint(Path(start))
    model = ctx.place(grow(start_model, start_model.config.heads, start_model.config.ffn, config.seed)
                      if config.regrow else load_checkpoint(Path(start)))
    aug, (_, n_aug) = config.augment, batch_split(config, train_idx.size, n_mined)
    teacher_sess = session(teacher, config.threads) if n_aug and not aug.bank_copies else None
    pert_bank = None
    if n_aug and aug.bank_copies:
        pert_bank, bank_s = augment_bank(teacher, {k: v[:n_mined] for k, v in data.items() if k in INPUT_NAMES},
                                         config)
        label_s += bank_s
    distiller = None
    if config.features.enabled:
        try:
            distiller = FeatureDistiller(model, planner_from_onnx(teacher), config.features)
        except RuntimeError as exc:
            raise FinetuneError(f"feature distillation needs the teacher as a torch Planner: {exc}") from None
    example = tuple(tensors({k: v[:2] for k, v in data.items()}))
    qat = FakeQuant(model, config.qat, example) if config.qat.enabled else None
    run = _Run(config, model, data, n_mined, pert_bank, teacher_sess, distiller, qat, ctx)

    early = any(len(v[0]) for v in val.values())
    if not early:
        log.warning("snapshot %s has no val frames: no early stopping, the last state is kept", snapshot.id)

    def evaluate(step: int, which: Planner | None = None) -> dict:
        m_ = which if which is not None else run.kept
        m_.eval()
        with run.quantizing(m_):
            m = val_score(m_, *val["val_mined"])
            o = val_score(m_, *val["val_ordinary"])
        obj = (m if np.isfinite(m) else 0.0) + config.regression_weight * (o if np.isfinite(o) else 0.0)
        # without val frames every evaluation counts as an improvement: the last state wins
        return {"step": step, "val_mined_score": m, "val_ordinary_score": o, "objective": obj if early else -step,
                "phase": "qat" if run.quantized else "float"}

    def snapshot_of(ev: dict) -> dict:
        return {**ev, "state": {k: v.clone() for k, v in run.kept.state_dict().items()}}

    qat_at = int(round(config.qat.start_fraction * config.steps)) if qat is not None else None
    state_path = out / STATE_FILE
    step, resumed, recent, qat_started = 0, 0, [], None
    if state_path.is_file():
        blob = torch.load(state_path, map_location="cpu", weights_only=False)
        check_state(state_path, blob)
        if blob.get("key") != key:
            raise FinetuneError(f"{state_path} belongs to another fine-tune (config, snapshot, teacher or start "
                                "model differ); remove it or use another directory")
        run.load(blob)
        step = resumed = blob["step"]
        best, history, bad, recent, qat_started = (blob["best"], blob["history"], blob["bad"], blob["recent"],
                                                   blob["qat_started"])
        log.info("fine-tune resumes at step %d of %d", step, config.steps)
    else:
        initial = evaluate(0)
        best, history, bad = snapshot_of(initial), [initial], 0
    first = {k: v.clone() for k, v in (model.state_dict() if not state_path.is_file() or not resumed
                                       else blob["first"]).items()}

    def save(step: int) -> None:
        ctx.main_only(save_state)(state_path, {"key": key, "step": step, **run.state(), "best": best,
                                               "history": history, "bad": bad, "recent": recent,
                                               "qat_started": qat_started, "first": first})

    stopped = False
    t_loop, steps_here = time.perf_counter(), 0
    while step < config.steps and not stopped:
        if qat is not None and not run.quantized and step >= qat_at:
            # the QAT phase starts from the best float state; only quantized states compete from here on
            run.kept.load_state_dict(first)  # the start model, quantized, competes too: the kept state is
            run.start_qat()                     # never worse than it
            ev0 = {**evaluate(0), "note": "start model with fake quantization"}
            history.append(ev0)
            start_q = snapshot_of(ev0)
            run.model.load_state_dict(best["state"])
            run.kept.load_state_dict(best["state"])
            ev = evaluate(best["step"])
            history.append({**ev, "note": "best float state with fake quantization"})
            best = min(start_q, snapshot_of(ev), key=lambda b: b["objective"])
            qat_started, bad = step, 0
        lr = lr_at(step, run.sched)
        loss = run.step(step, lr)
        step += 1
        steps_here += 1
        recent = (recent + [loss])[-20:]
        info = {"loss": float(np.mean(recent)), "lr": lr}
        if step % config.eval_every == 0 or step == config.steps:
            ev = {**evaluate(step), **info}
            history.append(ev)
            if ev["objective"] < best["objective"] * (1.0 - config.min_improvement):
                best, bad = snapshot_of(ev), 0
            else:
                bad += 1
                if bad >= config.patience:
                    if qat is not None and not run.quantized:
                        qat_at = step  # the float phase has plateaued: quantization-aware training starts now
                    else:
                        stopped = True
            info = ev
        if step % config.checkpoint_every == 0 or stopped or step == config.steps:
            save(step)
        if progress and ctx.main and (step % config.progress_every == 0 or "objective" in info or stopped):
            progress(step, config.steps, info)
    rate = steps_here / (time.perf_counter() - t_loop) if steps_here else None

    run.model.load_state_dict(best["state"])
    model = run.model
    pruned = None
    if config.regrow and config.prune_back and best["step"] > 0:
        model, pruned = _prune_back(run, start_model, val, lambda m: evaluate(best["step"], m))
    if best["step"] == 0:  # the start model computes the same without the silent units a regrow added
        model = load_checkpoint(Path(start))
    ckpt = ctx.main_only(save_checkpoint)(model.cpu().eval(), out / CHECKPOINT_FILE,
                           {"finetune_key": key, "snapshot": snapshot.id, "best_step": best["step"],
                            "qat": config.qat.model_dump() if qat_started is not None else None})
    result = FinetuneResult(
        checkpoint=str(ckpt), key=key, planned_steps=config.steps, steps_run=step, best_step=best["step"],
        stopped_early=stopped, resumed_from_step=resumed, initial=history[0],
        best={k: v for k, v in best.items() if k != "state"}, history=history,
        frames={k: int(v.size) for k, v in rows.items()}, teacher_label_seconds=label_s,
        seconds=time.perf_counter() - t_start, qat_started_at=qat_started,
        qat_skipped=qat.skipped if qat else [], prune_back=pruned,
        numerics={"autocast": str(run.dtype).replace("torch.", "") if run.dtype else "fp32",
                  "host": list(host_features()), **ctx.record()}, train_steps_per_s=rate)
    ctx.main_only(write_text_atomic)(done, result.model_dump_json(indent=1))
    log.info("fine-tune: %d steps (best %d, QAT from %s, early stop %s), val objective %.4f -> %.4f", step,
             best["step"], qat_started, stopped, history[0]["objective"], best["objective"])
    return ctx.close(result)
