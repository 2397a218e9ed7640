"""Where shadow outputs go and what they already cover: offset coverage per model or pair, and the one unit writer
both replay drivers (batch and stream) use, its tables paired with their rows by name (`OUTPUT_TABLES`).

Shadow files are named from the Kafka offsets of the frames they were computed from (`ingest.lake`), so which frames
a pair has replayed is which offsets its live `divergences` files cover, and which frames a model has decisions for
is which offsets its live `decisions` files cover. A unit of work (offsets [lo, hi] of one topic partition) is written
table by table, each file only for the offsets its own table and key do not hold yet (a teacher shared by several
pairs gets one decision row per frame, not one per pair), and the pair's `divergences` file LAST: it is the
commit marker. A crash before it leaves the unit uncovered; the rerun recomputes it and writes the same names again.

Footers of every divergences file, besides `ingest.lake.DRIVE_SEQ_KEY` (the seq ranges of each drive it holds):
`flywheel.shadow.drive_context` = {drive_id: {first_offset, hist_offset, last_ts_ms, ended}}: the Kafka offset of
the drive's first row in the file and of the first of its last HISTORY - 1 rows, the newest record timestamp of its
rows and whether the drive had ended. From these a streaming worker resuming after the file knows where to re-read
the ego history of every drive that may continue (`resume_context`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.lake import DRIVE_SEQ_KEY, file_name, live_files, partition_dir, write_parquet_atomic
from ingest.lake_index import SeqRanges, encode_drive_seq, read_drive_seq
from ingest.objstore import read_table
from ingest.tables import TABLES, check_table_version, read_footer
from shadow import featurize as fz
from shadow.compute import Known, offsets_in

log = logging.getLogger(__name__)

DRIVE_CONTEXT_KEY = "flywheel.shadow.drive_context"
# Write order within a unit: the pair's divergences file last, it marks the unit as replayed.
TABLE_ORDER = ("decisions", "log_replay", "noise_floor", "scenarios", "onboard", "divergences")


def key_live_files(lake: Path, table: str, key: str, value: str, topic: str | None = None,
                   partition: int | None = None):
    """Live files of one model's or pair's subtree of a table (`ingest.lake.live_files`' rule on that subtree)."""
    # live_files lists <root>/<table> recursively; pointing it at <lake>/<table> with the key directory as the
    # "table" applies exactly the lake's liveness rule to that one key
    return live_files(Path(lake) / table, f"{key}={value}", topic, partition)


def stored_decisions(lake: Path, model: str, topic: str, partition: int, table: pa.Table) -> Known | None:
    """A model's stored outputs for the rows of `table` (frames rows of one partition): from its live `decisions`
    files over the rows' offsets, matched by (drive_id, seq). None when it has none of them."""
    if table.num_rows == 0:
        return None
    offsets = table["kafka_offset"].to_numpy()
    lo, hi = int(offsets.min()), int(offsets.max())
    files = [f for f in key_live_files(lake, "decisions", "model", model, topic, partition)
             if f.first <= hi and f.last >= lo]
    if not files:
        return None
    cols = ["drive_id", "seq", "traj_x", "traj_y", "traj_yaw", "maneuver_probs"]
    parts = [read_table(f.path, columns=cols) for f in files]
    for f, t in zip(files, parts):
        check_table_version(f.path, "decisions", t.schema.metadata)
    dec = pa.concat_tables(parts)
    left = pa.table({"drive_id": table["drive_id"].cast(pa.string()), "seq": table["seq"],
                     "row": pa.array(np.arange(table.num_rows))})
    right = pa.table({"drive_id": dec["drive_id"].cast(pa.string()), "seq": dec["seq"],
                      "drow": pa.array(np.arange(dec.num_rows))})
    joined = left.join(right, keys=["drive_id", "seq"], join_type="inner")
    if joined.num_rows == 0:
        return None
    rows, first = np.unique(joined["row"].to_numpy(), return_index=True)
    drow = joined["drow"].to_numpy()[first]

    def matrix(name: str, width: int) -> np.ndarray | None:
        col = dec[name].combine_chunks()
        if col.null_count or not (np.asarray(col.value_lengths()) == width).all():
            return None  # another horizon or head layout than this code's: recompute instead
        return col.flatten().to_numpy().reshape(-1, width)[drow].astype(np.float32)

    parts = [matrix(n, fz.HORIZON) for n in ("traj_x", "traj_y", "traj_yaw")]
    probs = matrix("maneuver_probs", fz.NUM_MANEUVERS)
    if probs is None or any(p is None for p in parts):
        return None
    logits = np.log(np.maximum(probs, np.finfo(np.float32).tiny))
    return Known(rows, np.stack(parts, axis=-1), logits)


def covered(lake: Path, table: str, key: str, value: str, topic: str, partition: int) -> SeqRanges:
    """Kafka offsets of `topic`/`partition` that the live files of table/key=value hold."""
    out = SeqRanges()
    for f in key_live_files(lake, table, key, value, topic, partition):
        out.add(f.first, f.last)
    return out


def drive_seq_of(t: pa.Table) -> dict[str, SeqRanges]:
    """drive_id -> seq ranges of the rows of a table with drive_id and seq columns."""
    out: dict[str, SeqRanges] = {}
    if t.num_rows == 0:
        return out
    drive = t["drive_id"].to_numpy(zero_copy_only=False)
    seq = t["seq"].to_numpy()
    order = np.lexsort((seq, drive))
    drive, seq = drive[order], seq[order]
    brk = np.flatnonzero((drive[1:] != drive[:-1]) | (seq[1:] != seq[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.append(brk, len(seq)) - 1
    for s, e in zip(starts.tolist(), ends.tolist()):
        out.setdefault(str(drive[s]), SeqRanges()).add(int(seq[s]), int(seq[e]))
    return out


def drive_context(drive: np.ndarray, seq: np.ndarray, offset: np.ndarray, ts_ms: np.ndarray,
                  ended: set[str]) -> str:
    """The DRIVE_CONTEXT_KEY footer (JSON) of a file holding frames (N,) drive_id, seq, Kafka offset and record
    timestamp [ms]; `ended` names the drives known to have ended with these rows."""
    out = {}
    if drive.shape[0]:
        names, code = np.unique(drive, return_inverse=True)
        order = np.lexsort((seq, code))
        code, seq, offset, ts_ms = code[order], seq[order], offset[order], ts_ms[order]
        starts = np.searchsorted(code, np.arange(names.shape[0]))
        ends = np.append(starts[1:], code.shape[0])
        for k, name in enumerate(names.tolist()):
            s, e = int(starts[k]), int(ends[k])
            hist = s + int(np.searchsorted(seq[s:e], seq[e - 1] - (fz.HISTORY - 2)))
            out[name] = {"first_offset": int(offset[s:e].min()), "hist_offset": int(offset[hist:e].min()),
                         "last_ts_ms": int(ts_ms[s:e].max()), "ended": name in ended}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def resume_context(files: list, idle_s: float) -> tuple[dict[str, SeqRanges], int | None]:
    """From the footers of a pair's live divergences files of one partition: the seqs each drive has replayed, and
    the smallest Kafka offset to re-read so that every drive that may continue gets its ego history back (None when
    no drive may). A drive may continue unless it ended, or its newest frame is `idle_s` older than the newest of
    the partition (lake time, not wall time: a worker down for an hour still restores what was in flight)."""
    seen: dict[str, SeqRanges] = {}
    entries: dict[str, list[tuple[SeqRanges, dict]]] = {}
    for f in files:
        meta = read_footer(f.path, "divergences")
        seqs = read_drive_seq(f.path, meta) or {}
        ctx = json.loads(meta.get(DRIVE_CONTEXT_KEY.encode(), b"{}"))
        for d, r in seqs.items():
            for lo, hi in r.ranges:
                seen.setdefault(d, SeqRanges()).add(lo, hi)
            if d in ctx:
                entries.setdefault(d, []).append((r, ctx[d]))
    if not entries:
        return seen, None
    latest = {d: max(e, key=lambda x: x[0].max) for d, e in entries.items()}
    newest = max(c["last_ts_ms"] for _, c in latest.values())
    offsets = []
    for d, (r, c) in latest.items():
        if c["ended"] or c["last_ts_ms"] < newest - idle_s * 1000:
            continue
        need = r.max - (fz.HISTORY - 2)  # the first seq of the history the drive's next frame needs
        if r.ranges[0][0] <= need:
            offsets.append(c["hist_offset"])
        else:  # the history starts in an earlier file: re-read that one from the drive's first row in it
            older = [c2 for r2, c2 in entries[d] if any(lo <= need <= hi for lo, hi in r2.ranges)]
            offsets.append(min([c["first_offset"]] + [c2["first_offset"] for c2 in older]))
    return seen, (min(offsets) if offsets else None)


@dataclass
class FrameInfo:
    """The frames a unit was computed from, for the drive-context footer: (N,) drive_id, seq, Kafka offset and
    record timestamp [ms] each, and the drives known to have ended with them."""

    drive: np.ndarray
    seq: np.ndarray
    offset: np.ndarray
    ts_ms: np.ndarray
    ended: set[str] = field(default_factory=set)

    def context(self, lo: int, hi: int) -> str:
        m = (self.offset >= lo) & (self.offset <= hi)
        return drive_context(self.drive[m], self.seq[m], self.offset[m], self.ts_ms[m], self.ended)


@dataclass
class Output:
    """One table's rows of a unit, for one model (key="model") or pair (key="pair")."""

    table: str
    key: str
    value: str
    rows: pa.Table


# Every table a replay unit writes, under the name both drivers file its rows by: (table, partition key, whose id).
OUTPUT_TABLES: dict[str, tuple[str, str, str]] = {
    "teacher_decisions": ("decisions", "model", "teacher"),
    "student_decisions": ("decisions", "model", "student"),
    "teacher_log_replay": ("log_replay", "model", "teacher"),
    "student_log_replay": ("log_replay", "model", "student"),
    "noise_floor": ("noise_floor", "model", "teacher"),
    "scenarios": ("scenarios", "pair", "pair"),
    "onboard": ("onboard", "pair", "pair"),
    "divergences": ("divergences", "pair", "pair"),
}


def unit_outputs(ids: dict[str, str], rows: dict[str, pa.Table | None]) -> list[Output]:
    """The outputs of one unit, paired with their tables by name (`OUTPUT_TABLES`): `ids` maps "teacher",
    "student" and "pair" to the model and pair ids; a table missing from `rows` (or None) is written empty."""
    out = []
    for name, (table, key, whose) in OUTPUT_TABLES.items():
        t = rows.get(name)
        out.append(Output(table, key, ids[whose], t if t is not None else TABLES[table].schema.empty_table()))
    return out


@dataclass
class WriteResult:
    files: list[Path] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows written


class Coverage:
    """Cached offset coverage per (table, key, value, topic, partition); refreshed from the lake on demand and kept
    up to date with what this process writes (listing the lake for every unit would cost O(files) each)."""

    def __init__(self, lake: Path) -> None:
        self.lake = Path(lake)
        self._cache: dict[tuple, SeqRanges] = {}

    def get(self, table: str, key: str, value: str, topic: str, partition: int) -> SeqRanges:
        k = (table, key, value, topic, partition)
        if k not in self._cache:
            self._cache[k] = covered(self.lake, table, key, value, topic, partition)
        return self._cache[k]

    def refresh(self, topic: str, partition: int) -> None:
        """Forget what is cached for a partition: the next get() lists the lake again (another writer may have
        covered offsets meanwhile)."""
        for k in [k for k in self._cache if k[3] == topic and k[4] == partition]:
            del self._cache[k]

    def add(self, table: str, key: str, value: str, topic: str, partition: int, lo: int, hi: int) -> None:
        self.get(table, key, value, topic, partition).add(lo, hi)


def write_unit(coverage: Coverage, date: str, topic: str, partition: int, lo: int, hi: int, outputs: list[Output],
               frames: FrameInfo, footer: dict[str, str] | None = None, row_group_size: int = 1 << 17) -> WriteResult:
    """Write the rows of offsets [lo, hi] of one partition, table by table in TABLE_ORDER.

    Each output is written only for the sub-ranges of [lo, hi] not yet covered by its own table/key; the rows of a
    sub-range are those whose kafka_offset lies in it. A `divergences` output is written even with no rows (its
    file marks the offsets as replayed by the pair), with the drive-context footer of `frames`; empty files of the
    other tables are skipped.
    """
    result = WriteResult()
    for table in TABLE_ORDER:
        for out in (o for o in outputs if o.table == table):
            have = coverage.get(table, out.key, out.value, topic, partition)
            for a, b in have.missing(lo, hi):
                rows = offsets_in(out.rows, a, b) if out.rows.num_rows else out.rows
                if rows.num_rows == 0 and table != "divergences":
                    continue
                meta = {"flywheel.kafka_topic": topic, "flywheel.kafka_partition": str(partition),
                        "flywheel.first_offset": str(a), "flywheel.last_offset": str(b), **(footer or {})}
                if "seq" in rows.column_names:
                    meta[DRIVE_SEQ_KEY] = encode_drive_seq(drive_seq_of(rows))
                if table == "divergences":
                    meta[DRIVE_CONTEXT_KEY] = frames.context(a, b)
                path = partition_dir(coverage.lake, table, date, **{out.key: out.value}) / file_name(
                    topic, partition, a, b)
                write_parquet_atomic(rows, path, row_group_size=row_group_size, metadata=meta)
                coverage.add(table, out.key, out.value, topic, partition, a, b)
                result.files.append(path)
                result.rows[table] = result.rows.get(table, 0) + rows.num_rows
    return result
