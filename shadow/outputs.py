"""Where shadow outputs go and what they already cover: offset coverage per model or pair, and the unit writer.

Shadow files are named from the Kafka offsets of the frames they were computed from (`ingest.lake`), so which frames
a pair has replayed is which offsets its live `divergences` files cover, and which frames a model has decisions for
is which offsets its live `decisions` files cover. A unit of work (offsets [lo, hi] of one topic partition) is written
table by table, each file only for the offsets its own table and key do not hold yet (a teacher shared by several
pairs gets one decision row per frame, not one per pair), and the pair's `divergences` file LAST: it is the
commit marker. A crash before it leaves the unit uncovered; the rerun recomputes it and writes the same names again.

Footer of every divergences file (with `ingest.lake.DRIVE_SEQ_KEY`, the seq ranges of each drive it holds):
`flywheel.shadow.context_offset`, the smallest Kafka offset a streaming worker must re-read from to have the ego
history of every drive that may continue after the file (see shadow.stream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.lake import DRIVE_SEQ_KEY, file_name, live_files, partition_dir, write_parquet_atomic
from ingest.lake_index import SeqRanges, encode_drive_seq
from shadow.pipeline import offsets_in

log = logging.getLogger(__name__)

CONTEXT_OFFSET_KEY = "flywheel.shadow.context_offset"
# Write order within a unit: the pair's divergences file last, it marks the unit as replayed.
TABLE_ORDER = ("decisions", "noise_floor", "scenarios", "divergences")


def key_live_files(lake: Path, table: str, key: str, value: str, topic: str | None = None,
                   partition: int | None = None):
    """Live files of one model's or pair's subtree of a table (`ingest.lake.live_files`' rule on that subtree)."""
    # live_files lists <root>/<table> recursively; pointing it at <lake>/<table> with the key directory as the
    # "table" applies exactly the lake's liveness rule to that one key
    return live_files(Path(lake) / table, f"{key}={value}", topic, partition)


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


def read_context_offset(path: Path) -> int | None:
    raw = (pq.read_schema(path).metadata or {}).get(CONTEXT_OFFSET_KEY.encode())
    return int(raw) if raw is not None else None


@dataclass
class Output:
    """One table's rows of a unit, for one model (key="model") or pair (key="pair")."""

    table: str
    key: str
    value: str
    rows: pa.Table


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
               footer: dict[str, str] | None = None, row_group_size: int = 1 << 17) -> WriteResult:
    """Write the rows of offsets [lo, hi] of one partition, table by table in TABLE_ORDER.

    Each output is written only for the sub-ranges of [lo, hi] not yet covered by its own table/key; the rows of a
    sub-range are those whose kafka_offset lies in it. A `divergences` output is written even with no rows (its
    file marks the offsets as replayed by the pair); empty files of the other tables are skipped.
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
                path = partition_dir(coverage.lake, table, date, **{out.key: out.value}) / file_name(
                    topic, partition, a, b)
                write_parquet_atomic(rows, path, row_group_size=row_group_size, metadata=meta)
                coverage.add(table, out.key, out.value, topic, partition, a, b)
                result.files.append(path)
                result.rows[table] = result.rows.get(table, 0) + rows.num_rows
    return result
