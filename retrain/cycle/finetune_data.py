"""The fine-tune's data: its identity key, the teacher's targets (cached), the augmentation bank, the val score and
the epoch-wise draws of training rows. Used by `retrain.cycle.finetune`; `config` is its
`FinetuneConfig` (threads, teacher_batch, seed, augment).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
import numpy as np
from pydantic import BaseModel
from torch import nn

from ingest.lake import write_bytes_atomic
from retrain.cycle.dataset import Snapshot
from retrain.models.augment import bank
from retrain.models.evaluate import predict
from retrain.models.training import torch_predict
from shadow.featurize import Features
from shadow.metrics import MetricsConfig, pair_metrics
from shadow.models import session
from shadow.spec import model_file, sha256_file

log = logging.getLogger(__name__)

BANK_STREAM = 0xA06  # the bank's random stream: np.random.default_rng([seed, BANK_STREAM])


def finetune_key(config: BaseModel, snapshot: Snapshot, teacher: Path, start: Path) -> str:
    blob = json.dumps({"config": config.model_dump(mode="json"), "snapshot": snapshot.content_sha256,
                       "teacher": sha256_file(model_file(teacher)), "start": sha256_file(start)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def teacher_targets(teacher: Path, feats: Features, rows: np.ndarray, config: BaseModel, cache: Path,
                     key: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Teacher trajectory (n, T, 3) and logits (n, 6) for `rows`, cached under `cache` for this run's key."""
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return z["traj"], z["logits"], float(z["seconds"])
    t0 = time.perf_counter()
    traj, logits = predict(session(teacher, config.threads), feats.take(rows), config.teacher_batch)
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), traj=traj, logits=logits, seconds=np.array(seconds))
    write_bytes_atomic(cache, buf.getvalue())
    return traj, logits, seconds


def augment_bank(teacher: Path, mined: dict[str, np.ndarray], config: BaseModel) -> tuple[dict, float]:
    """The bank of perturbed copies of the train mined frames (`retrain.models.augment.bank`) with the teacher's outputs
    on them ("t_traj", "t_logits"), labelled in `teacher_batch` batches. Its random stream is its own, derived from
    the seed alone, so a resumed run rebuilds the same bank and the training stream is untouched. Not stored: at
    ~1.6 kB a frame it is tens of MB, and rebuilding it takes seconds."""
    t0 = time.perf_counter()
    pert = bank(mined, config.augment, np.random.default_rng([config.seed, BANK_STREAM]))
    sess = session(teacher, config.threads)
    trajs, logits = [], []
    for a in range(0, next(iter(pert.values())).shape[0], config.teacher_batch):
        t, m = sess.run(["trajectory", "maneuver_logits"], {k: v[a:a + config.teacher_batch] for k, v in pert.items()})
        trajs.append(t)
        logits.append(m)
    seconds = time.perf_counter() - t0
    log.info("augmentation bank: %d perturbed frames labelled in %.1f s", sum(t.shape[0] for t in trajs), seconds)
    return {**pert, "t_traj": np.concatenate(trajs), "t_logits": np.concatenate(logits)}, seconds


def val_score(model: nn.Module, feats: Features, t_traj: np.ndarray, t_logits: np.ndarray,
              drives: np.ndarray | None = None) -> float:
    """Shadow divergence score (no TTC term) of the model against the teacher's outputs on these frames: the mean,
    or with `drives` (the drive of every frame) the median over drives of each drive's mean, which one window of
    one drive cannot swing (a val set has a handful of drives)."""
    if len(feats) == 0:
        return float("nan")
    s = torch_predict(model, feats, 2048)
    score = pair_metrics((t_traj, t_logits), s, MetricsConfig())["score"]
    if drives is None:
        return float(score.mean())
    _, inv = np.unique(drives, return_inverse=True)
    return float(np.median(np.bincount(inv, weights=score) / np.bincount(inv)))


def batch_split(config: BaseModel, n: int, n_mined: int) -> tuple[int, int]:
    """(mined frames, of them perturbed copies) in a batch of `config.batch_size`, with n train frames of which
    n_mined are mined (`replay_ratio` ordinary frames per mined one, `augment.share` of the mined perturbed)."""
    k = config.batch_size if n == n_mined else max(1, int(round(config.batch_size / (1.0 + config.replay_ratio))))
    return k, int(round(config.augment.share * k))


class Pool:
    """Epoch-wise shuffled draws from a set of row positions; its state lives in the checkpoint."""

    def __init__(self, n: int) -> None:
        self.n, self.perm, self.pos = n, np.zeros(0, np.int64), 0

    def draw(self, k: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        while k > 0 and self.n:
            if self.pos >= self.perm.shape[0]:
                self.perm, self.pos = rng.permutation(self.n), 0
            take = self.perm[self.pos:self.pos + k]
            self.pos += take.shape[0]
            k -= take.shape[0]
            out.append(take)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def state(self) -> dict:
        return {"perm": self.perm.copy(), "pos": self.pos}

    def load(self, s: dict) -> None:
        self.perm, self.pos = np.asarray(s["perm"], np.int64), int(s["pos"])
