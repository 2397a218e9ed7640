"""Dataset snapshots: the frames a fine-tune learns from and is judged on, immutable and versioned.

    snap = create_snapshot("data/lake", mining_result, DatasetConfig(), "data/snapshots")
    snap = load_snapshot("data/snapshots/<id>")            # checks the content hash
    feats, meta = snap.features()                          # every row featurized once; meta: split, role, item

Layout: `<snapshots>/<id>/frames.parquet` + `<id>/manifest.json`, written into a hidden temporary directory, fsynced
and renamed, so a reader sees a whole snapshot or none. The id is the first 16 hex digits of the sha256 of
frames.parquet (rows, split and role columns included): the same mined data gives the same snapshot (with the same
pyarrow), and a snapshot is never rewritten.

Rows: FRAME_SCHEMA columns of the frames, sorted by (drive_id, seq), unique per (drive_id, seq), plus

- `split` (string): train | val | test, BY DRIVE: every drive is in exactly one split, so no model is trained and
  judged on the same drive. Drives with mined windows and drives without are split separately (each in the
  configured shares, ranked by a seeded hash of the drive id), so every split gets mined windows;
- `role` (string): mined (inside a mined window), ordinary (inside a sampled ordinary window: the replay sample
  on train drives, the regression set on val and test drives), or context (history before and planning horizon
  after those windows, only there so that their frames featurize and score as in the fleet);
- `item` (int32): index of the mined window (manifest `items`) a mined row belongs to, else -1.

The manifest records the rule (query or score rule, threshold, noise floor), counts per split, role, condition and
scenario type, the split's drives, the source model versions and the content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.contract import FRAME_SCHEMA, SCHEMA_VERSION, arrow_to_frames
from ingest.lake import (DRIVE_SEQ_KEY, file_name, fsync_dir, live_files, partition_dir, write_json_atomic,
                         write_parquet_atomic)
from ingest.tables import FRAMES_LAKE_SCHEMA, read_footer, upgrade_frame_rows
from ingest.versions import UnknownVersion, check_version
from ingest.lake_index import SeqRanges, encode_drive_seq, read_drive_seq, scan_drive_seq
from retrain.cycle.mining import MinedItem, MiningResult, condition_of
from shadow.featurize import Features, featurize, segments_of
from shadow.plugins import add_inputs
from shadow.spec import sha256_file

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT_VERSION = 1
FRAMES_FILE = "frames.parquet"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val", "test")
ROLES = ("mined", "ordinary", "context")
SNAPSHOT_COLUMNS = [pa.field("split", pa.string(), nullable=False), pa.field("role", pa.string(), nullable=False),
                    pa.field("item", pa.int32(), nullable=False)]
SNAPSHOT_SCHEMA = pa.schema([*FRAME_SCHEMA, *SNAPSHOT_COLUMNS],
                            metadata={"flywheel.table": "snapshot",
                                      "flywheel.format_version": str(SNAPSHOT_FORMAT_VERSION)})


class SnapshotError(ValueError):
    """A snapshot that cannot be made or read: no frames for the mined windows, a changed file, a bad manifest."""


class DatasetConfig(BaseModel):
    """How mined windows become a snapshot: the split by drive and the ordinary frames that go with them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="seeds the drive split and the ordinary-window draw")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share of drives for early stopping (val)")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of drives held out for judging (test)")
    ordinary_window_frames: int = Field(50, ge=1, description="ordinary frames are drawn as windows of this many "
                                        "frames (seq // W of a drive, as shadow's scenario windows)")
    replay_per_mined: float = Field(1.0, ge=0, description="ordinary train frames (the replay sample that keeps "
                                    "the fine-tune from forgetting) per mined train frame")
    val_ordinary_per_mined: float = Field(1.0, ge=0, description="ordinary val frames per mined val frame")
    regression_max_frames: int = Field(20_000, ge=0, description="ordinary test frames (the regression set) at most")
    history_frames: int = Field(9, ge=0, description="context frames before an ordinary window (ego history)")
    horizon_frames: int = Field(40, ge=0, description="context frames after an ordinary window (planning horizon)")

    @model_validator(mode="after")
    def _shares(self) -> "DatasetConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} leaves "
                             "no drive to train on")
        return self


# ------------------------------------------------------------------------------------------------- lake access


def lake_drive_index(lake: Path) -> dict[str, tuple[SeqRanges, list[Path]]]:
    """Per drive of the lake's live frames files: its stored seqs and the files holding them (from footers)."""
    out: dict[str, tuple[SeqRanges, list[Path]]] = {}
    for f in live_files(Path(lake), "frames"):
        seqs = read_drive_seq(f.path, read_footer(f.path, "frames"))
        if seqs is None:
            seqs = scan_drive_seq(f.path)
        for d, r in seqs.items():
            known, files = out.setdefault(d, (SeqRanges(), []))
            for lo, hi in r.ranges:
                known.add(lo, hi)
            files.append(f.path)
    return out


def read_lake_frames(lake: Path, want: dict[str, list[tuple[int, int]]],
                     index: dict[str, tuple[SeqRanges, list[Path]]] | None = None) -> pa.Table:
    """FRAME_SCHEMA rows of the lake within the given seq ranges per drive, sorted by (drive_id, seq), unique."""
    index = index if index is not None else lake_drive_index(lake)
    files: dict[Path, set[str]] = {}
    for d in want:
        for p in index.get(d, (None, []))[1]:
            files.setdefault(p, set()).add(d)
    parts = []
    for p, drives in sorted(files.items()):
        have = set(pq.read_schema(p).names)  # a frames file of schema version 1 lacks the deployed model's columns
        t = pq.read_table(p, columns=[n for n in FRAME_SCHEMA.names if n in have],
                          filters=[("drive_id", "in", sorted(drives))])
        t = upgrade_frame_rows(t, FRAME_SCHEMA)
        if t.num_rows == 0:
            continue
        keep = np.zeros(t.num_rows, bool)
        drive = t["drive_id"].to_numpy(zero_copy_only=False)
        seq = t["seq"].to_numpy()
        for d in drives:
            m = drive == d
            for lo, hi in want[d]:
                keep |= m & (seq >= lo) & (seq <= hi)
        parts.append(t.filter(pa.array(keep)))
    if not parts:
        return FRAME_SCHEMA.empty_table()
    t = pa.concat_tables(parts).cast(FRAME_SCHEMA)
    order = pc.sort_indices(t, [("drive_id", "ascending"), ("seq", "ascending")])
    t = t.take(order)
    drive, seq = t["drive_id"].to_numpy(zero_copy_only=False), t["seq"].to_numpy()
    dup = np.zeros(t.num_rows, bool)
    dup[1:] = (drive[1:] == drive[:-1]) & (seq[1:] == seq[:-1])  # exactly once in a healthy lake; be safe
    return t.filter(pa.array(~dup)) if dup.any() else t


def write_frames_lake(lake: Path, table: pa.Table, topic: str = "flywheel.frames", partitions: int = 1,
                      ingest_ms: int | None = None) -> list[Path]:
    """Write FRAME_SCHEMA rows of whole or partial drives into `lake` as the sink would: one frames file per drive
    (one Kafka record), drive i in partition i % `partitions`, offsets counted per partition, DRIVE_SEQ_KEY footer.

    `ingest_ms` is the record timestamp (default: the drive's first frame time). For building lakes from drive files
    (benchmarks, tests) and the verification lakes of a cycle; extra columns of `table` are dropped.
    """
    t = table.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA)
    order = pc.sort_indices(t, [("drive_id", "ascending"), ("seq", "ascending")])
    t = t.take(order)
    drives = t["drive_id"].to_numpy(zero_copy_only=False)
    names, starts = np.unique(drives, return_index=True)
    bounds = np.append(np.sort(starts), t.num_rows)
    nxt = [0] * partitions
    paths = []
    for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        rows = t.slice(a, b - a)
        d = str(drives[a])
        p = i % partitions
        off = nxt[p]
        nxt[p] += 1
        ms = int(ingest_ms if ingest_ms is not None else rows["timestamp"][0].value // 1_000_000)
        n = rows.num_rows
        extra = [pa.array(np.full(n, SCHEMA_VERSION, np.int16)),
                 pa.array(np.full(n, ms, np.int64)).view(pa.timestamp("ms", tz="UTC")),
                 pa.array(np.full(n, p, np.int32)), pa.array(np.full(n, off, np.int64))]
        lake_rows = pa.Table.from_arrays([*rows.columns, *extra], schema=FRAMES_LAKE_SCHEMA)
        seq = rows["seq"].to_numpy()
        r = SeqRanges()
        for run in np.split(seq, np.flatnonzero(np.diff(seq) != 1) + 1):
            r.add(int(run[0]), int(run[-1]))
        date = time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))
        path = partition_dir(Path(lake), "frames", date) / file_name(topic, p, off, off)
        paths.append(write_parquet_atomic(lake_rows, path, metadata={DRIVE_SEQ_KEY: encode_drive_seq({d: r})}))
    return paths


# ------------------------------------------------------------------------------------------------------- split


def _rank(drive: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{drive}".encode()).hexdigest()


def split_drives(drives: list[str], mined: set[str], cfg: DatasetConfig) -> dict[str, str]:
    """drive -> train | val | test. Drives with mined windows and the others are split separately, each ranked by
    a seeded hash: the first `test_fraction` of a group are test, the next `val_fraction` val, the rest train. A
    group of three or more drives gives each split at least one drive when its fraction is positive."""
    out: dict[str, str] = {}
    for group in (sorted(d for d in drives if d in mined), sorted(d for d in drives if d not in mined)):
        ranked = sorted(group, key=lambda d: _rank(d, cfg.seed))
        n = len(ranked)
        n_test = int(round(cfg.test_fraction * n))
        n_val = int(round(cfg.val_fraction * n))
        if n >= 3:
            n_test = max(n_test, 1)
            n_val = max(n_val, 1) if cfg.val_fraction > 0 else 0
        n_test = min(n_test, max(0, n - 1))
        n_val = min(n_val, max(0, n - 1 - n_test))
        for i, d in enumerate(ranked):
            out[d] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _ordinary_windows(drive: str, stored: SeqRanges, mined: list[MinedItem], w: int) -> list[tuple[int, int]]:
    """Windows seq // w of a drive's stored seqs that overlap no mined window."""
    out = []
    for lo, hi in stored.ranges:
        for k in range(lo // w, hi // w + 1):
            a, b = max(lo, k * w), min(hi, k * w + w - 1)
            if not any(a <= m.end_seq and b >= m.start_seq for m in mined):
                out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------------- snapshot


@dataclass
class Snapshot:
    """A snapshot on disk: its directory, manifest and (read on demand) rows."""

    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["snapshot_id"]

    @property
    def content_sha256(self) -> str:
        return self.manifest["content_sha256"]

    def table(self) -> pa.Table:
        t = pq.read_table(self.path / FRAMES_FILE)
        found = (t.schema.metadata or {}).get(b"flywheel.format_version")
        try:
            check_version(self.path / FRAMES_FILE, "snapshot frames", found and found.decode(),
                          SNAPSHOT_FORMAT_VERSION)
        except UnknownVersion as exc:
            raise SnapshotError(str(exc)) from None
        return t

    def drives(self, split: str) -> list[str]:
        return list(self.manifest["split"]["drives"][split])

    def features(self, featurizers: tuple[str, ...] | list[str] = ()) -> tuple[Features, dict[str, np.ndarray]]:
        """Every row featurized once (history and targets never cross drives or seq gaps) and per-row meta:
        split, role (object arrays), item (int32), drive_id (object), seq (int64). `featurizers`: plug-in
        featurizers (`shadow.plugins`) whose inputs are added to the features' `extra` as well."""
        t = self.table()
        feats = featurize(t.select(FRAME_SCHEMA.names), with_targets=True)
        if featurizers:
            frames = arrow_to_frames(t.select(FRAME_SCHEMA.names))
            feats = add_inputs(feats, frames, tuple(featurizers), segments_of(t))
        meta = {"split": t["split"].to_numpy(zero_copy_only=False), "role": t["role"].to_numpy(zero_copy_only=False),
                "item": t["item"].to_numpy(), "drive_id": t["drive_id"].to_numpy(zero_copy_only=False),
                "seq": t["seq"].to_numpy()}
        return feats, meta


def _counts(t: pa.Table, items: list[MinedItem], split_of: dict[str, str]) -> dict:
    split = t["split"].to_numpy(zero_copy_only=False)
    role = t["role"].to_numpy(zero_copy_only=False)
    cond = np.array([condition_of(li, we) for li, we in zip(t["lighting"].cast(pa.string()).to_pylist(),
                                                             t["weather"].cast(pa.string()).to_pylist())], object)
    frames = {s: {r: int(((split == s) & (role == r)).sum()) for r in ROLES} for s in SPLITS}
    by_cond: dict[str, dict[str, int]] = {}
    for r in ("mined", "ordinary"):
        for c in np.unique(cond[role == r]).tolist():
            by_cond.setdefault(r, {})[c] = int(((role == r) & (cond == c)).sum())
    windows: dict[str, dict] = {s: {"windows": 0, "by_condition": {}, "by_road_type": {}, "by_stratum": {}}
                                for s in SPLITS}
    for it in items:
        w = windows[split_of[it.drive_id]]
        w["windows"] += 1
        for key, val in (("by_condition", it.condition), ("by_road_type", it.road_type),
                         ("by_stratum", f"{it.condition}/{it.road_type}")):
            w[key][val] = w[key].get(val, 0) + 1
    return {"frames": frames, "frames_by_condition": by_cond, "mined_windows": windows,
            "drives": {s: sum(v == s for v in split_of.values()) for s in SPLITS}}


def create_snapshot(lake: Path, mined: MiningResult, config: DatasetConfig, snapshots_dir: Path,
                    sources: dict | None = None) -> Snapshot:
    """Read the mined windows (with context) and a seeded draw of ordinary windows from the lake, split by drive,
    and write them as an immutable snapshot (see the module docstring). `sources` (model versions, lake path) go
    into the manifest as they are. An existing snapshot with the same content is returned unchanged."""
    lake = Path(lake)
    if not mined.items:
        raise SnapshotError("no mined windows: nothing to snapshot")
    index = lake_drive_index(lake)
    missing = sorted({i.drive_id for i in mined.items} - set(index))
    if missing:
        raise SnapshotError(f"mined windows of drives the lake has no frames of: {missing[:5]}")
    split_of = split_drives(sorted(index), {i.drive_id for i in mined.items}, config)
    by_drive: dict[str, list[MinedItem]] = {}
    for it in mined.items:
        by_drive.setdefault(it.drive_id, []).append(it)
    mined_frames = {s: sum(i.frames for i in mined.items if split_of[i.drive_id] == s) for s in SPLITS}
    budget = {"train": config.replay_per_mined * mined_frames["train"],
              "val": config.val_ordinary_per_mined * mined_frames["val"], "test": config.regression_max_frames}
    rng = np.random.default_rng(config.seed)
    ordinary: dict[str, list[tuple[int, int]]] = {}
    for s in SPLITS:
        cands = [(d, a, b) for d in sorted(index) if split_of[d] == s
                 for a, b in _ordinary_windows(d, index[d][0], by_drive.get(d, []), config.ordinary_window_frames)]
        taken = 0
        for k in rng.permutation(len(cands)):
            if taken >= budget[s]:
                break
            d, a, b = cands[int(k)]
            ordinary.setdefault(d, []).append((a, b))
            taken += b - a + 1
    want: dict[str, list[tuple[int, int]]] = {}
    for d, its in by_drive.items():
        want.setdefault(d, []).extend((i.context_start, i.context_end) for i in its)
    for d, wins in ordinary.items():
        want.setdefault(d, []).extend((max(0, a - config.history_frames), b + config.horizon_frames) for a, b in wins)
    t = read_lake_frames(lake, want, index)
    drive, seq = t["drive_id"].to_numpy(zero_copy_only=False), t["seq"].to_numpy()
    role = np.full(t.num_rows, "context", object)
    item = np.full(t.num_rows, -1, np.int32)
    for d, wins in ordinary.items():
        m = drive == d
        for a, b in wins:
            role[m & (seq >= a) & (seq <= b)] = "ordinary"
    for k, it in enumerate(mined.items):
        sel = (drive == it.drive_id) & (seq >= it.start_seq) & (seq <= it.end_seq)
        role[sel] = "mined"
        item[sel] = k
    split = np.array([split_of[d] for d in drive.tolist()], object)
    table = pa.Table.from_arrays([*t.columns, pa.array(split, pa.string()), pa.array(role, pa.string()),
                                  pa.array(item, pa.int32())], schema=SNAPSHOT_SCHEMA)
    root = Path(snapshots_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".snapshot.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        # the id is the hash of the file's bytes: written first, named after
        write_parquet_atomic(table, tmp / FRAMES_FILE)
        digest = sha256_file(tmp / FRAMES_FILE)
        snap_id = digest[:16]
        final = root / snap_id
        if (final / MANIFEST_FILE).is_file():
            log.info("snapshot %s exists; reusing it (snapshots are immutable)", snap_id)
            return load_snapshot(final)
        manifest = {
            "format_version": SNAPSHOT_FORMAT_VERSION, "snapshot_id": snap_id, "content_sha256": digest,
            "created_at": time.time(), "rows": table.num_rows,
            "rule": {k: v for k, v in mined.to_dict().items() if k != "items"},
            "config": config.model_dump(mode="json"), "sources": {"lake": str(lake), **(sources or {})},
            "split": {"by": "drive", "seed": config.seed,
                      "drives": {s: sorted(d for d, v in split_of.items() if v == s) for s in SPLITS}},
            "counts": _counts(table, mined.items, split_of),
            "items": [{**mined.to_dict()["items"][k], "split": split_of[it.drive_id]}
                      for k, it in enumerate(mined.items)],
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():  # else a concurrent writer of the same content won: fine
                raise
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("snapshot %s: %d rows, %s", snap_id, table.num_rows, manifest["counts"]["frames"])
    return load_snapshot(final, verify=False)


def load_snapshot(path: Path, verify: bool = True) -> Snapshot:
    """Open a snapshot directory; with `verify`, recompute its content hash and refuse a changed one."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no {MANIFEST_FILE}; not a snapshot") from None
    try:
        check_version(path / MANIFEST_FILE, "snapshot", manifest.get("format_version"), SNAPSHOT_FORMAT_VERSION)
    except UnknownVersion as exc:
        raise SnapshotError(str(exc)) from None
    snap = Snapshot(path, manifest)
    if verify:
        digest = sha256_file(path / FRAMES_FILE)
        if digest != manifest["content_sha256"]:
            raise SnapshotError(f"{path}: content sha256 {digest[:16]} differs from the manifest's "
                                f"{manifest['content_sha256'][:16]}: the snapshot was changed")
    return snap


def compress_frames(snapshot: Snapshot, seed: int = 0, featurizers: tuple[str, ...] | list[str] = ()
                    ) -> tuple[Features, Features, Features]:
    """Frames for `retrain.compress.workflow` from a snapshot: (calibration = train ordinary frames, validation = val mined
    and ordinary frames in a seeded order, mined = train mined frames). Train frames stand in for a split that is
    empty; test frames are never used (they judge the result). `featurizers`: plug-in featurizers whose inputs the
    frames carry too (a plug-in student's, `retrain.cycle.compress_plugin`)."""
    feats, meta = snapshot.features(featurizers)
    split, role = meta["split"], meta["role"]
    train_mined = np.flatnonzero((split == "train") & (role == "mined"))
    train_ord = np.flatnonzero((split == "train") & (role == "ordinary"))
    val = np.flatnonzero((split == "val") & (role != "context"))
    if val.size < 2:
        log.warning("snapshot %s: fewer than 2 val frames; validating compression on train frames", snapshot.id)
        val = np.concatenate([train_ord, train_mined])
    val = val[np.random.default_rng(seed).permutation(val.size)]
    calib = train_ord if train_ord.size else train_mined
    return feats.take(calib), feats.take(val), feats.take(train_mined)
