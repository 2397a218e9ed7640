"""What the lake already holds: stored seq ranges per drive (file footers) and where each Kafka partition resumes.

Every frames file carries the footer `DRIVE_SEQ_KEY` = {drive_id: [[lo, hi], ...]}: the sorted disjoint seq ranges
of each drive's rows in it. The sink rebuilds its dedup state and resume offsets from these footers alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from ingest.lake import DRIVE_FINAL_KEY, DRIVE_SEQ_KEY, live_files
from ingest.objstore import read_schema, read_table
from ingest.tables import read_footer

log = logging.getLogger(__name__)


class SeqRanges:
    """Sorted disjoint closed ranges of sequence numbers: what is stored of one drive.

    Usually one range (drives arrive in order); more only after a gap that a later chunk fills.
    """

    __slots__ = ("ranges",)

    def __init__(self, ranges=()) -> None:
        self.ranges: list[list[int]] = []
        for lo, hi in ranges:
            self.add(int(lo), int(hi))

    def add(self, lo: int, hi: int) -> None:
        merged = [lo, hi]
        keep = []
        for r in self.ranges:
            if r[1] + 1 < merged[0] or merged[1] + 1 < r[0]:
                keep.append(r)
            else:
                merged = [min(r[0], merged[0]), max(r[1], merged[1])]
        keep.append(merged)
        keep.sort()
        self.ranges = keep

    def missing(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi] not yet covered, in order."""
        out = []
        cur = lo
        for a, b in self.ranges:
            if b < cur:
                continue
            if a > hi:
                break
            if a > cur:
                out.append((cur, a - 1))
            cur = max(cur, b + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
        return out

    @property
    def max(self) -> int:
        return self.ranges[-1][1] if self.ranges else -1

    def to_json(self) -> list[list[int]]:
        return [list(r) for r in self.ranges]


def encode_drive_seq(seqs: dict[str, SeqRanges]) -> str:
    return json.dumps({d: r.to_json() for d, r in seqs.items()}, sort_keys=True, separators=(",", ":"))


def read_drive_seq(path: Path, metadata: dict[bytes, bytes] | None = None) -> dict[str, SeqRanges] | None:
    """drive_id -> stored seq ranges of a frames file, from its footer only; None when the footer lacks the key.
    `metadata`: the file's key-value metadata when the caller has read it already."""
    if metadata is None:
        metadata = read_schema(path).metadata or {}
    raw = metadata.get(DRIVE_SEQ_KEY.encode())
    if raw is None:
        return None
    return {d: SeqRanges(ranges) for d, ranges in json.loads(raw).items()}


def encode_drive_final(finals: dict[str, int]) -> str:
    return json.dumps(finals, sort_keys=True, separators=(",", ":"))


def read_drive_final(path: Path, metadata: dict[bytes, bytes] | None = None) -> dict[str, int]:
    """drive_id -> last seq of each drive whose final chunk a frames file holds (footer `DRIVE_FINAL_KEY`); {} if
    none. `metadata`: the file's key-value metadata when the caller has read it already."""
    if metadata is None:
        metadata = read_schema(path).metadata or {}
    raw = metadata.get(DRIVE_FINAL_KEY.encode())
    if raw is None:
        return {}
    return {str(d): int(s) for d, s in json.loads(raw).items()}


def merge_drive_final(into: dict[str, int], more: dict[str, int]) -> None:
    """Union of finals: a drive re-chunked on a resend ends at the same seq, the larger is kept if not."""
    for d, s in more.items():
        into[d] = max(into.get(d, s), s)


def scan_drive_seq(path: Path) -> dict[str, SeqRanges]:
    """The same from the file's drive_id and seq columns (for files written without the footer)."""
    t = read_table(path, columns=["drive_id", "seq"])
    out: dict[str, SeqRanges] = {}
    for drive in t["drive_id"].unique().to_pylist():
        seq = np.sort(t.filter(pc.equal(t["drive_id"], drive))["seq"].to_numpy())
        breaks = np.flatnonzero(np.diff(seq) != 1)
        starts = np.concatenate([[seq[0]], seq[breaks + 1]])
        ends = np.concatenate([seq[breaks], [seq[-1]]])
        out[drive] = SeqRanges(zip(starts.tolist(), ends.tolist()))
    return out


@dataclass
class PartitionPosition:
    """What the lake says about one Kafka partition: where to resume and which seqs of each drive it holds."""

    next_offset: int = 0  # last offset in a live file + 1; 0 when the lake holds nothing of the partition
    drive_seq: dict[str, SeqRanges] = field(default_factory=dict)
    files: int = 0


def lake_positions(lake: Path, topic: str, partitions: set[int], table: str = "frames") -> dict[int, PartitionPosition]:
    """Resume offset and stored seq ranges of each partition, from the footers of the table's live files."""
    for attempt in range(3):
        out = {p: PartitionPosition() for p in partitions}
        try:
            for f in live_files(lake, table, topic):
                pos = out.get(f.partition)
                if pos is None:
                    continue
                pos.next_offset = max(pos.next_offset, f.last + 1)
                pos.files += 1
                seqs = read_drive_seq(f.path, read_footer(f.path, table))
                if seqs is None:
                    log.warning("%s has no %s footer; reading its drive_id and seq columns", f.path, DRIVE_SEQ_KEY)
                    seqs = scan_drive_seq(f.path)
                for drive, ranges in seqs.items():
                    known = pos.drive_seq.setdefault(drive, SeqRanges())
                    for lo, hi in ranges.ranges:
                        known.add(lo, hi)
            return out
        except FileNotFoundError:
            # a compaction removed a file between listing and reading; its merged file is there now: list again
            if attempt == 2:
                raise
    return {}  # not reached: the last attempt re-raises
