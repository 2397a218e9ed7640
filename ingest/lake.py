"""The storage contract: every path template and on-disk schema of the project, each format with a version.

Lake layout (hive-partitioned Parquet, one directory per table):

    <lake>/<table>/date=<YYYY-MM-DD>/<topic>-p<partition:05d>-<first offset:020d>-<last offset:020d>.parquet

A file's name is derived from the Kafka offsets it holds, so re-writing the same offsets overwrites instead of
duplicating. Files are written under a hidden temporary name, fsynced and renamed; readers never see a partial file.
Compaction writes one file covering a run of smaller ones and then removes them: a reader resolving the table with
`live_files` drops every file whose offset range another file of the same partition covers, so it sees either the
small files or the merged one, never both.

Vehicle-side drive directory (what the agent uploads and the fleet simulator writes):

    <drives>/<vehicle_id>/<drive_id>.drive.parquet     frames of one drive, FRAME_SCHEMA, seq 0..n-1
    <drives>/<vehicle_id>/<drive_id>.uploaded.json     written only after the server acknowledged the last frame
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.contract import FRAME_SCHEMA, SCHEMA_VERSION, ChunkRejected, Frames, arrow_to_frames

log = logging.getLogger(__name__)
DRIVE_FORMAT_VERSION = 1
DRIVE_SUFFIX = ".drive.parquet"
UPLOADED_SUFFIX = ".uploaded.json"
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class TableSpec:
    """A lake table: its fixed Arrow schema (never inferred per batch), version and hive partition keys."""

    name: str
    schema: pa.Schema
    version: int
    partitioning: tuple[str, ...] = ("date",)


# Lake columns added by the sink to every frame row: where it came from in Kafka and when it arrived.
FRAMES_LAKE_SCHEMA = pa.schema(
    [*FRAME_SCHEMA, pa.field("schema_version", pa.int16(), nullable=False),
     pa.field("ingest_time", pa.timestamp("ms", tz="UTC"), nullable=False),
     pa.field("kafka_partition", pa.int32(), nullable=False),
     pa.field("kafka_offset", pa.int64(), nullable=False)],
    metadata={"flywheel.table": "frames", "flywheel.schema_version": str(SCHEMA_VERSION)},
)

TABLES: dict[str, TableSpec] = {
    "frames": TableSpec("frames", FRAMES_LAKE_SCHEMA, SCHEMA_VERSION),
}

_FILE_RE = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)-p(?P<partition>\d{5})-(?P<first>\d{20})-(?P<last>\d{20})\.parquet$")


@dataclass(frozen=True, order=True)
class LakeFile:
    """One data file of a table, identified by the Kafka offsets [first, last] of one topic partition."""

    topic: str
    partition: int
    first: int
    last: int
    path: Path


def table_dir(lake: Path, table: str) -> Path:
    return Path(lake) / table


def partition_dir(lake: Path, table: str, date: str) -> Path:
    return table_dir(lake, table) / f"date={date}"


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    return f"{topic}-p{partition:05d}-{first:020d}-{last:020d}.parquet"


def parse_file(path: Path) -> LakeFile | None:
    m = _FILE_RE.match(path.name)
    if m is None:
        return None
    return LakeFile(m["topic"], int(m["partition"]), int(m["first"]), int(m["last"]), path)


def all_files(lake: Path, table: str) -> list[LakeFile]:
    """Every data file of the table, live or superseded (hidden temporary files excluded)."""
    root = table_dir(lake, table)
    if not root.exists():
        return []
    found = (parse_file(p) for p in root.glob("*=*/*.parquet"))
    return sorted(f for f in found if f is not None)


def live_files(lake: Path, table: str, topic: str | None = None, partition: int | None = None) -> list[LakeFile]:
    """The files a reader should read: per (directory, topic, partition), drop any file covered by another one."""
    groups: dict[tuple, list[LakeFile]] = {}
    for f in all_files(lake, table):
        if (topic is None or f.topic == topic) and (partition is None or f.partition == partition):
            groups.setdefault((f.path.parent, f.topic, f.partition), []).append(f)
    live: list[LakeFile] = []
    for files in groups.values():
        # widest first among equal starts; a file is live only if it reaches past everything kept before it
        files.sort(key=lambda f: (f.first, -f.last, f.path.name))
        reach = -1
        for f in files:
            if f.last > reach:
                live.append(f)
                reach = f.last
    return sorted(live)


def superseded_files(lake: Path, table: str) -> list[LakeFile]:
    live = set(live_files(lake, table))
    return [f for f in all_files(lake, table) if f not in live]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Parquet paths of the string and enum leaves: the only columns worth dictionary-encoding.

    Trying dictionaries on float columns costs 3x the write time and makes files larger (measured on frames).
    """
    out: list[str] = []

    def walk(path: str, t: pa.DataType) -> None:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(f"{path}.list.element", t.value_type)
        elif pa.types.is_struct(t):
            for f in t:
                walk(f"{path}.{f.name}", f.type)
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            out.append(path)

    for f in schema:
        walk(f.name, f.type)
    return out


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int = 1 << 17,
                         metadata: dict[str, str] | None = None) -> Path:
    """Write `table` to `path` so that no reader ever sees a partial file: hidden temp name, fsync, rename, fsync dir.

    `metadata` is merged into the schema's key-value metadata (footer). An existing file at `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, row_group_size=row_group_size, compression=PARQUET_COMPRESSION,
                           use_dictionary=dictionary_columns(table.schema))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(lake: Path, table: str, min_age_s: float = 600.0) -> int:
    """Delete temporary files left by a writer that died before its rename; returns how many.

    Only files older than `min_age_s`: another sink worker or the compactor may be writing a younger one right now.
    """
    root = table_dir(lake, table)
    now = time.time()
    removed = 0
    for p in root.glob("*=*/.*.tmp") if root.exists() else ():
        try:
            if now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # renamed or removed meanwhile
    return removed


# ------------------------------------------------------------------------------------------------------ drive files


def drive_path(drives: Path, vehicle_id: str, drive_id: str) -> Path:
    return Path(drives) / vehicle_id / f"{drive_id}{DRIVE_SUFFIX}"


def uploaded_marker(drive_file: Path) -> Path:
    return drive_file.with_name(drive_file.name[: -len(DRIVE_SUFFIX)] + UPLOADED_SUFFIX)


def list_drive_files(drives: Path) -> list[Path]:
    return sorted(Path(drives).glob(f"*/*{DRIVE_SUFFIX}"))


def write_drive(drives: Path, table: pa.Table) -> Path:
    """Store one drive (FRAME_SCHEMA rows of a single drive, seq 0..n-1) in the drive directory."""
    table = table.cast(FRAME_SCHEMA)
    drive_ids = table["drive_id"].unique().to_pylist()
    vehicle_ids = table["vehicle_id"].unique().to_pylist()
    if len(drive_ids) != 1 or len(vehicle_ids) != 1:
        raise ValueError(f"a drive file holds exactly one drive of one vehicle, got {drive_ids} / {vehicle_ids}")
    seq = table["seq"].to_numpy()
    if not np.array_equal(seq, np.arange(len(seq))):
        raise ValueError("a drive file's seq must run 0..n-1 in order")
    meta = {"flywheel.format": "drive", "flywheel.format_version": str(DRIVE_FORMAT_VERSION),
            "flywheel.drive_id": drive_ids[0], "flywheel.vehicle_id": vehicle_ids[0]}
    return write_parquet_atomic(table, drive_path(drives, vehicle_ids[0], drive_ids[0]), metadata=meta)


@dataclass
class Drive:
    drive_id: str
    vehicle_id: str
    frames: Frames
    path: Path


def read_drive(path: Path) -> Drive:
    """Load and check a drive file: version, one drive, contiguous seq from 0, and the frame contract."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("flywheel.format") != "drive":
        raise ValueError(f"{path}: not a flywheel drive file")
    if int(meta.get("flywheel.format_version", -1)) != DRIVE_FORMAT_VERSION:
        raise ValueError(f"{path}: drive format version {meta.get('flywheel.format_version')} is not "
                         f"{DRIVE_FORMAT_VERSION}")
    seq = table["seq"].to_numpy()
    if not np.array_equal(seq, np.arange(len(seq))):
        raise ValueError(f"{path}: seq is not 0..n-1")
    try:
        frames = arrow_to_frames(table.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA))
    except ChunkRejected as exc:
        raise ValueError(f"{path}: {exc}") from None
    return Drive(meta["flywheel.drive_id"], meta["flywheel.vehicle_id"], frames, Path(path))


def mark_uploaded(drive_file: Path, info: dict) -> None:
    marker = uploaded_marker(drive_file)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps(info, sort_keys=True))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, marker)


def is_uploaded(drive_file: Path) -> bool:
    return uploaded_marker(drive_file).exists()


# ------------------------------------------------------------------------------ which frames a lake file holds

DRIVE_SEQ_KEY = "flywheel.drive_seq"
"""Footer of every frames file: {drive_id: [[lo, hi], ...]}, the sorted disjoint seq ranges of the drive's rows."""


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


def read_drive_seq(path: Path) -> dict[str, SeqRanges] | None:
    """drive_id -> stored seq ranges of a frames file, from its footer only; None when the footer lacks the key."""
    raw = (pq.read_schema(path).metadata or {}).get(DRIVE_SEQ_KEY.encode())
    if raw is None:
        return None
    return {d: SeqRanges(ranges) for d, ranges in json.loads(raw).items()}


def scan_drive_seq(path: Path) -> dict[str, SeqRanges]:
    """The same from the file's drive_id and seq columns (for files written without the footer)."""
    t = pq.read_table(path, columns=["drive_id", "seq"])
    out: dict[str, SeqRanges] = {}
    for drive in t["drive_id"].unique().to_pylist():
        seq = np.sort(t.filter(pa.compute.equal(t["drive_id"], drive))["seq"].to_numpy())
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
                seqs = read_drive_seq(f.path)
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
