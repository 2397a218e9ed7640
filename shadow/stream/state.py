"""State of the streaming worker per Kafka partition: drives in flight, records not yet written, computed rows.

A record (one chunk) is *done* when every new frame in it has been computed and every scenario window whose first
frame it holds is complete. Frames are computed once their 4 s future has arrived (or their drive's final chunk, or
the drive has been quiet for `drive_end_idle_s`); a window is complete once its last frame is computed (or its drive
ended). Only a prefix of done records may be written and committed: the files are named from its offsets.

Frames of *context* records (re-read before the resume point, or covered by another writer's files) only serve as
ego history and future; they are never computed or written again, and windows they open are not this worker's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.bus import ChunkRecord
from ingest.lake import lake_batch
from ingest.lake_index import SeqRanges
from ingest.tables import FRAMES_LAKE_SCHEMA
from shadow.outputs import OUTPUT_TABLES


@dataclass
class Record:
    offset: int
    ts_ms: int
    arrived: float
    pending: int = 0  # frames of the record not computed yet
    windows: int = 0  # windows whose first frame is in this record and that are not complete

    @property
    def done(self) -> bool:
        return self.pending == 0 and self.windows == 0


@dataclass
class Window:
    offset: int  # Kafka offset of the window's first frame: its row goes with that record
    parts: list = field(default_factory=list)  # (meta table, metrics dict, conditions dict) per computation


@dataclass
class Drive:
    drive_id: str
    rows: pa.Table  # FRAMES_LAKE_SCHEMA rows kept, sorted by seq: history, pending and future frames
    emitted: np.ndarray  # (len(rows),) bool: computed already (or context)
    last_seen: float = 0.0
    final: bool = False
    closed_below: int = 0  # windows with an index below this are closed (written, or another writer's)
    windows: dict[int, Window] = field(default_factory=dict)

    @property
    def max_seq(self) -> int:
        return int(self.rows["seq"][-1].as_py()) if self.rows.num_rows else -1

    def add(self, batch: pa.RecordBatch, emitted: bool) -> None:
        t = pa.concat_tables([self.rows, pa.Table.from_batches([batch], FRAMES_LAKE_SCHEMA)])
        e = np.concatenate([self.emitted, np.full(batch.num_rows, emitted)])
        seq = t["seq"].to_numpy()
        if seq.shape[0] > 1 and not (np.diff(seq) > 0).all():  # out of order or overlapping: sort, keep the first
            order = np.lexsort((np.arange(seq.shape[0]), seq))
            keep = np.ones(order.shape[0], bool)
            keep[1:] = seq[order][1:] != seq[order][:-1]
            order = order[keep]
            t, e = t.take(pa.array(order)), e[order]
        self.rows, self.emitted = t, e


class PartitionState:
    """One assigned partition: records from the resume point on, drives in flight, computed rows not yet written."""

    def __init__(self, topic: str, partition: int, start: int, covered: SeqRanges, seen: dict[str, SeqRanges],
                 window_frames: int, history: int, future: int) -> None:
        self.topic, self.partition = topic, partition
        self.start = start  # records before it are context only (already written by this pair)
        self.covered = covered  # offsets another writer holds: context only, never written again
        self.seen = seen  # drive -> seqs computed or queued (the lake's and ours): resent chunks are dropped
        self.w, self.history, self.future = window_frames, history, future
        self.records: OrderedDict[int, Record] = OrderedDict()
        self.drives: dict[str, Drive] = {}
        self.out: dict[str, list[pa.Table]] = {k: [] for k in OUTPUT_TABLES}
        self.next_offset = start  # records below it were handled (duplicates of a re-fetch are skipped)

    # ------------------------------------------------------------------------------------------------- records

    def add(self, offset: int, ts_ms: int, chunk: ChunkRecord | None, now: float) -> None:
        """One Kafka record: its decoded `chunk` (`ingest.bus`), or None for a record that fails its checks (the sink
        dead-letters those; here they are simply done)."""
        if offset < self.next_offset and offset >= self.start:
            return  # fetched twice around a seek
        self.next_offset = max(self.next_offset, offset + 1)
        context = offset < self.start or not self.covered.missing(offset, offset)
        rec = None
        if offset >= self.start:
            rec = self.records[offset] = Record(offset, ts_ms, now)
        if chunk is None:
            return
        d = self.drives.get(chunk.drive_id)
        if d is None:
            d = self.drives[chunk.drive_id] = Drive(chunk.drive_id, FRAMES_LAKE_SCHEMA.empty_table(),
                                                    np.zeros(0, bool))
        first, last = chunk.first_seq, chunk.last_seq
        seen = self.seen.setdefault(chunk.drive_id, SeqRanges())
        pieces = [(first, last)] if context else seen.missing(first, last)
        for lo, hi in pieces:
            part = chunk.frames.slice(lo - first, hi - lo + 1)
            d.add(lake_batch(part, chunk.schema_version, ts_ms, self.partition, offset), emitted=context)
            seen.add(lo, hi)
            if rec is not None and not context:
                rec.pending += hi - lo + 1
        if context:
            d.closed_below = max(d.closed_below, last // self.w + 1)
        d.final |= bool(chunk.final)
        d.last_seen = now

    # ------------------------------------------------------------------------------------------------ emission

    def due(self, now: float, idle_s: float) -> list[tuple[Drive, np.ndarray]]:
        """Drives with frames ready to compute and the mask of those frames (over drive.rows)."""
        out = []
        for d in self.drives.values():
            pend = ~d.emitted
            if not pend.any():
                continue
            if d.final or now - d.last_seen >= idle_s:
                ok = pend
            else:
                ok = pend & (d.rows["seq"].to_numpy() <= d.max_seq - self.future)
            if ok.any():
                out.append((d, ok))
        return out

    def keep_outputs(self, tables: dict[str, pa.Table], sel: np.ndarray, subsets: dict[str, np.ndarray],
                     offsets: np.ndarray) -> None:
        """Keep this partition's output rows of a computation and count its frames as computed.

        `tables`, `subsets`: `shadow.compute.Shadow.frame_rows` (by `shadow.outputs.OUTPUT_TABLES` name: one row
        per computed row (n), except the tables in `subsets`, whose rows are the computed rows at those positions);
        `sel` (n,) bool picks this partition's rows; `offsets` (n,) Kafka offsets of the computed rows."""
        for key, t in tables.items():
            keep = t.filter(pa.array(sel[subsets[key]] if key in subsets else sel))
            if keep.num_rows:
                self.out[key].append(keep)
        offs, counts = np.unique(offsets[sel], return_counts=True)
        for o, k in zip(offs.tolist(), counts.tolist()):
            self.records[o].pending -= k

    def open_windows(self, d: Drive, meta: pa.Table, metrics: dict, conds: dict, idx: np.ndarray) -> None:
        """Add computed frames `idx` (positions into meta / metrics) of drive `d` to their windows."""
        seq = meta["seq"].to_numpy()[idx]
        w = seq // self.w
        offs = meta["kafka_offset"].to_numpy()[idx]
        for wi in np.unique(w).tolist():
            if wi < d.closed_below:
                continue
            part = idx[w == wi]
            win = d.windows.get(wi)
            if win is None:
                first = int(np.argmin(seq[w == wi]))
                win = d.windows[wi] = Window(int(offs[w == wi][first]))
                self.records[win.offset].windows += 1
            win.parts.append((meta.take(pa.array(part)), {k: v[part] for k, v in metrics.items()},
                              {k: v[part] for k, v in conds.items()}))

    def complete_windows(self, d: Drive, now: float, idle_s: float) -> list[Window]:
        """Windows of `d` whose frames are all computed and that can get no more frames."""
        ended = d.final or now - d.last_seen >= idle_s
        seq = d.rows["seq"].to_numpy()
        pend = seq[~d.emitted]
        out = []
        for wi in sorted(d.windows):
            last = wi * self.w + self.w - 1
            if (pend <= last).any() or not (ended or d.max_seq >= last):
                continue
            out.append(d.windows.pop(wi))
            self.records[out[-1].offset].windows -= 1
            d.closed_below = max(d.closed_below, wi + 1)
        return out

    def trim(self, now: float, idle_s: float) -> None:
        """Drop frames no pending frame needs as history, and drives that ended with nothing in flight."""
        for name in list(self.drives):
            d = self.drives[name]
            seq = d.rows["seq"].to_numpy()
            pend = ~d.emitted
            if not pend.any() and not d.windows and (d.final or now - d.last_seen >= idle_s):
                del self.drives[name]
                continue
            lo = seq[pend].min() if pend.any() else (seq.max() + 1 if seq.size else 0)
            keep = seq >= lo - self.history
            if not keep.all():
                d.rows, d.emitted = d.rows.filter(pa.array(keep)), d.emitted[keep]

    # ------------------------------------------------------------------------------------------------- writing

    def writable(self) -> tuple[int, int, float, int] | None:
        """(first, last offset, arrival time of the first, rows) of the prefix of done records, or None."""
        first = last = None
        arrived = 0.0
        for o, r in self.records.items():
            if not r.done:
                break
            if first is None:
                first, arrived = o, r.arrived
            last = o
        if first is None:
            return None
        rows = sum(t.num_rows for t in self.out["divergences"])
        return first, last, arrived, rows

    def take(self, first: int, last: int) -> dict[str, pa.Table]:
        """Remove and return the computed rows of offsets [first, last]; forget those records."""
        got = {}
        for key in OUTPUT_TABLES:
            if not self.out[key]:
                got[key] = None
                continue
            t = pa.concat_tables(self.out[key])
            off = t["kafka_offset"]
            mine = pc.and_(pc.greater_equal(off, first), pc.less_equal(off, last))
            got[key] = t.filter(mine)
            rest = t.filter(pc.invert(mine))
            self.out[key] = [rest] if rest.num_rows else []
        for o in [o for o in self.records if o <= last]:
            del self.records[o]
        return got

    def ts_of(self, offset: int) -> int:
        r = self.records.get(offset)
        return r.ts_ms if r is not None else int(time.time() * 1000)
