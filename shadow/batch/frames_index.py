"""The frames a batch replay needs, from one Kafka partition's live `frames` files: an index built from footers alone
(which seqs of which drive each file holds, when each drive last got a chunk) and the loader that reads exactly the
rows a group of units needs, its own frames plus their context (ego history before, logged future after).

All chunks of a drive are in one partition (key = drive id), so a partition's files hold every frame's context.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.lake import LakeFile
from ingest.objstore import read_metadata, read_table
from ingest.tables import FRAMES_LAKE_SCHEMA, check_table_version, upgrade_frame_rows
from ingest.lake_index import SeqRanges, merge_drive_final, read_drive_final, read_drive_seq, scan_drive_seq

log = logging.getLogger(__name__)


@dataclass
class FileInfo:
    lake_file: LakeFile
    date: str
    drive_seq: dict[str, SeqRanges]
    rows: int
    max_ingest_s: float
    finals: dict[str, int]  # drive -> its last seq, for drives whose final chunk this file holds


def file_info(f: LakeFile) -> FileInfo:
    md = read_metadata(f.path)
    check_table_version(f.path, "frames", md.metadata)
    finals = read_drive_final(f.path, md.metadata or {})
    seqs = read_drive_seq(f.path, md.metadata or {})
    if seqs is None:
        seqs = scan_drive_seq(f.path)
    ingest = None
    leaves = [md.schema.column(j).path for j in range(md.num_columns)]
    if md.num_row_groups and "ingest_time" in leaves:
        j = leaves.index("ingest_time")
        stats = [md.row_group(i).column(j).statistics for i in range(md.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats):
            ingest = max(s.max for s in stats).timestamp()  # from the footer: no column read
    if ingest is None:
        t = read_table(f.path, columns=["ingest_time"])["ingest_time"]
        ingest = pc.max(t).as_py().timestamp() if len(t) else 0.0
    date = f.path.parent.name.split("=", 1)[-1]
    return FileInfo(f, date, seqs, md.num_rows, ingest, finals)


class PartitionIndex:
    """What one partition's live frames files hold, from their footers: per drive, the seq ranges and where."""

    def __init__(self, files: list[LakeFile]) -> None:
        self.files = [file_info(f) for f in files]
        self.ranges: dict[str, SeqRanges] = {}
        self.where: dict[str, list[tuple[int, int, int]]] = {}  # drive -> (lo, hi, file index)
        self.last_ingest: dict[str, float] = {}
        self.final: dict[str, int] = {}  # drive -> last seq, once its final chunk is stored
        for i, info in enumerate(self.files):
            merge_drive_final(self.final, info.finals)
            for d, r in info.drive_seq.items():
                known = self.ranges.setdefault(d, SeqRanges())
                for lo, hi in r.ranges:
                    known.add(lo, hi)
                    self.where.setdefault(d, []).append((lo, hi, i))
                self.last_ingest[d] = max(self.last_ingest.get(d, 0.0), info.max_ingest_s)

    def ended(self, drive: str, idle_s: float, now: float) -> bool:
        """Whether a drive has ended: its final chunk and every frame before it are stored, or it has been quiet for
        `idle_s` (a vehicle that never sent a final chunk)."""
        last = self.final.get(drive)
        r = self.ranges.get(drive)
        if last is not None and r is not None and r.missing(0, last) == []:
            return True
        return now - self.last_ingest.get(drive, 0.0) >= idle_s

    def files_for(self, drive: str, lo: int, hi: int) -> set[int]:
        return {i for a, b, i in self.where.get(drive, ()) if a <= hi and b >= lo}

    def first_stored(self, drive: str, lo: int, hi: int) -> int | None:
        """Smallest stored seq of `drive` in [lo, hi], None if none."""
        for a, b in self.ranges.get(drive, SeqRanges()).ranges:
            if b >= lo and a <= hi:
                return max(a, lo)
        return None


def read_cached(index: PartitionIndex, i: int, cache: OrderedDict, keep: int = 6) -> pa.Table:
    if i in cache:
        cache.move_to_end(i)
        return cache[i]
    t = read_table(index.files[i].lake_file.path)
    if "decision_model" not in t.column_names:  # a frames file of schema version 1: no deployed model known
        t = upgrade_frame_rows(t, FRAMES_LAKE_SCHEMA)
    cache[i] = t
    while len(cache) > keep:
        cache.popitem(last=False)
    return t


def load_context(index: PartitionIndex, files: list[int], cache: OrderedDict, before: int, after: int
                 ) -> tuple[pa.Table, np.ndarray]:
    """Rows that frames files `files` (indices into index.files) need: their own and, per drive, `before` frames
    before and `after` frames after them, from whichever files hold those. Sorted by (drive_id, seq); with the
    file index each row came from (N,)."""
    need: dict[str, list[int]] = {}
    for i in files:
        for d, r in index.files[i].drive_seq.items():
            lo, hi = r.ranges[0][0] - before, r.max + after
            cur = need.setdefault(d, [lo, hi])
            cur[0], cur[1] = min(cur[0], lo), max(cur[1], hi)
    files: set[int] = set()
    for d, (lo, hi) in need.items():
        files |= index.files_for(d, lo, hi)
    drives = pa.array(list(need), pa.string())
    lo_a = np.array([v[0] for v in need.values()], np.int64)
    hi_a = np.array([v[1] for v in need.values()], np.int64)
    parts, src = [], []
    for i in sorted(files):
        t = read_cached(index, i, cache)
        di = pc.index_in(t["drive_id"], value_set=drives).fill_null(-1).to_numpy(zero_copy_only=False)
        seq = t["seq"].to_numpy()
        d = np.maximum(di, 0)
        mask = (di >= 0) & (seq >= lo_a[d]) & (seq <= hi_a[d])
        if mask.any():
            parts.append(t.filter(pa.array(mask)))
            src.append(np.full(int(mask.sum()), i))
    table = pa.concat_tables(parts)
    src_a = np.concatenate(src)
    order = pc.sort_indices(table, [("drive_id", "ascending"), ("seq", "ascending")]).to_numpy()
    return table.take(pa.array(order)), src_a[order]


