"""The storage contract: every path template of the lake and the drive directory, the atomic writers and lake rows.

Lake layout (hive-partitioned Parquet, one directory per table; schemas, versions and partition keys in
`ingest.tables.TABLES`):

    <lake>/frames/date=<YYYY-MM-DD>/<topic>-p<partition:05d>-<first offset:020d>-<last offset:020d>.parquet
    <lake>/decisions/model=<model id>/date=<YYYY-MM-DD>/<same name as the frames it was computed from>
    <lake>/divergences/pair=<pair id>/date=<YYYY-MM-DD>/<same>
    <lake>/scenarios/pair=<pair id>/date=<YYYY-MM-DD>/<same>
    <lake>/noise_floor/model=<model id>/date=<YYYY-MM-DD>/<same>
    <lake>/log_replay/model=<model id>/date=<YYYY-MM-DD>/<same>
    <lake>/onboard/pair=<pair id>/date=<YYYY-MM-DD>/<same>

Shadow tables name their files from the Kafka offsets of the frames they were computed from, so which frames a
model or pair has replayed is simply which offsets its live files cover: a replay writes only what is not covered
yet, a new student version (a new pair id) replays the history, and a crash leaves no state to repair.

A file's name is derived from the Kafka offsets it holds, so re-writing the same offsets overwrites instead of
duplicating. Files are written under a hidden temporary name, fsynced and renamed; readers never see a partial file.
Compaction writes one file covering a run of smaller ones and then removes them: a reader resolving the table with
`live_files` drops every file whose offset range another file of the same partition covers, so it sees either the
small files or the merged one, never both.

Vehicle-side drive directory (what the agent uploads and the fleet simulator writes):

    <drives>/<vehicle_id>/<drive_id>.drive.parquet     frames of one drive, FRAME_SCHEMA, seq 0..n-1
    <drives>/<vehicle_id>/<drive_id>.uploaded.json     written only after the server acknowledged the last frame
    <drives>/<vehicle_id>/<drive_id>.truth.parquet     simulated drives only: the simulator's truth (`sim.truth`)
"""

from __future__ import annotations

import json
import os
import re
import time
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.contract import FRAME_SCHEMA, ChunkRejected, Frames, arrow_to_frames, frames_to_arrow
from ingest.dirswap import dir_lock
from ingest.objstore import is_remote, list_files, parquet_bytes, put_bytes
from ingest.tables import FRAMES_LAKE_SCHEMA, TABLES, upgrade_frame_rows
from ingest.versions import check_version

DRIVE_FORMAT_VERSION = 1
DRIVE_SUFFIX = ".drive.parquet"
UPLOADED_SUFFIX = ".uploaded.json"
PARQUET_COMPRESSION = "zstd"


HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
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


def partition_dir(lake: Path, table: str, date: str, **keys: str) -> Path:
    """<lake>/<table>/<key>=<value>/.../date=<date>, keys in the order of the table's partitioning."""
    spec = TABLES[table]
    values = {**keys, "date": date}
    if set(values) != set(spec.partitioning):
        raise ValueError(f"{table} is partitioned by {spec.partitioning}, got {sorted(values)}")
    path = table_dir(lake, table)
    for key in spec.partitioning:
        value = str(values[key])
        if not _ID_RE.match(value):
            raise ValueError(f"partition value {key}={value!r} must match {_ID_RE.pattern}")
        path = path / f"{key}={value}"
    return path


def model_id(name: str, version: str) -> str:
    """Directory-safe id of a model version: `<name>-<version>`."""
    out = f"{name}-{version}"
    if not _ID_RE.match(out):
        raise ValueError(f"model name and version must be letters, digits, '.', '_' or '-': {out!r}")
    return out


def pair_id(teacher: str, student: str) -> str:
    """Id of a (teacher model id, student model id) pair: `<teacher>__<student>`."""
    return f"{teacher}__{student}"


def split_pair_id(pair: str) -> tuple[str, str]:
    """(teacher model id, student model id) of a pair id; ValueError for a string that is not one."""
    teacher, sep, student = pair.partition("__")
    if not sep or not teacher or not student:
        raise ValueError(f"{pair!r} is not a pair id (<teacher model id>__<student model id>)")
    return teacher, student


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    return f"{topic}-p{partition:05d}-{first:020d}-{last:020d}.parquet"


def parse_file(path: Path) -> LakeFile | None:
    m = _FILE_RE.match(path.name)
    if m is None:
        return None
    return LakeFile(m["topic"], int(m["partition"]), int(m["first"]), int(m["last"]), path)


def overlapping_files(directory: Path, topic: str, partition: int, first: int, last: int,
                      except_name: str | None = None) -> list[LakeFile]:
    """Data files of one partition directory holding any Kafka offset of [first, last] (temporary files and
    `except_name` excluded). A record's ingest date is fixed, so two files sharing an offset share a directory."""
    out = []
    try:
        entries = ([(e.path.name, e.path) for e in list_files(directory, recursive=False)] if is_remote(directory)
                   else [(e.name, Path(e.path)) for e in os.scandir(directory)])
    except FileNotFoundError:
        return out
    for name, entry_path in entries:
        if name.startswith(".") or name == except_name:
            continue
        f = parse_file(entry_path)
        if f is not None and f.topic == topic and f.partition == partition and f.first <= last and f.last >= first:
            out.append(f)
    return sorted(out)


def all_files(lake: Path, table: str) -> list[LakeFile]:
    """Every data file of the table, live or superseded (hidden temporary files excluded)."""
    root = table_dir(lake, table)
    if is_remote(root):
        found = (parse_file(e.path) for e in list_files(root) if not e.path.name.startswith("."))
        return sorted(f for f in found if f is not None)
    if not root.exists():
        return []
    found = (parse_file(p) for p in root.rglob("*.parquet") if not p.name.startswith("."))
    return sorted(f for f in found if f is not None)


def live_files(lake: Path, table: str, topic: str | None = None, partition: int | None = None) -> list[LakeFile]:
    """The files a reader should read: per (directory, topic, partition), drop any file covered by another one."""
    return live_of([f for f in all_files(lake, table)
                    if (topic is None or f.topic == topic) and (partition is None or f.partition == partition)])


def live_of(files: list[LakeFile]) -> list[LakeFile]:
    """The live files of one listing: per (directory, topic, partition), drop any file covered by another one."""
    groups: dict[tuple, list[LakeFile]] = {}
    for f in files:
        groups.setdefault((f.path.parent, f.topic, f.partition), []).append(f)
    live: list[LakeFile] = []
    for group in groups.values():
        # widest first among equal starts; a file is live only if it reaches past everything kept before it
        group.sort(key=lambda f: (f.first, -f.last, f.path.name))
        reach = -1
        for f in group:
            if f.last > reach:
                live.append(f)
                reach = f.last
    return sorted(live)


def superseded_files(lake: Path, table: str) -> list[LakeFile]:
    """Files another file of the SAME listing covers. One listing, not two: a directory walk is no snapshot, and a
    file a writer renamed in between two walks would be absent from the first (so not live) yet present in the
    second, and deleted as superseded (the race that lost a sink's file during back-to-back compactions)."""
    files = all_files(lake, table)
    live = set(live_of(files))
    return [f for f in files if f not in live]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (fsync of the directory)."""
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


def statistics_columns(schema: pa.Schema) -> list[str]:
    """The top-level scalar columns: the only ones whose min/max statistics let readers skip row groups (seq, times,
    ids, conditions). Statistics of the values inside lists (agents, waypoints) prune nothing and cost the sink
    about an eighth of its Parquet write time (measured on frames)."""
    return [f.name for f in schema if not pa.types.is_nested(f.type)]


def write_parquet_atomic(table: pa.Table, path: Path, row_group_size: int = 1 << 17,
                         metadata: dict[str, str] | None = None,
                         before_rename: Callable[[], None] | None = None,
                         compression: str = PARQUET_COMPRESSION) -> Path:
    """Write `table` to `path` so that no reader ever sees a partial file: hidden temp name, fsync, rename, fsync dir;
    on object storage (`ingest.objstore`) one PUT under the final name, `before_rename` just before it.

    `metadata` is merged into the schema's key-value metadata (footer). An existing file at `path` is replaced.
    `before_rename` runs once the temporary file is durable, just before it becomes visible; if it raises, the
    temporary file is removed and nothing is published. `compression`: a Parquet codec (zstd, lz4, snappy, none).
    """
    path = Path(path)
    table = _with_metadata(table, metadata)
    if is_remote(path):
        # object storage has no rename: the file is PUT once under its final name (ingest.objstore)
        data = parquet_bytes(table, row_group_size=row_group_size, compression=compression,
                             use_dictionary=dictionary_columns(table.schema),
                             write_statistics=statistics_columns(table.schema))
        if before_rename is not None:
            before_rename()
        return put_bytes(path, data)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> Path:
        return _write_atomic(path, lambda fh: _parquet(table, fh, row_group_size, compression), before_rename)

    if parse_file(path) is None:
        return write()
    # a lake file: no compaction may replace the directory's version between the temporary file and the rename
    with dir_lock(path.parent, exclusive=False):
        return write()


def _with_metadata(table: pa.Table, metadata: dict[str, str] | None) -> pa.Table:
    """`table` with `metadata` merged into its schema's key-value metadata (the Parquet footer)."""
    extra = {k.encode(): v.encode() for k, v in (metadata or {}).items()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}) if extra else table


def _parquet(table: pa.Table, fh, row_group_size: int, compression: str) -> None:
    pq.write_table(table, fh, row_group_size=row_group_size, compression=compression,
                   use_dictionary=dictionary_columns(table.schema), write_statistics=statistics_columns(table.schema))


def _write_atomic(path: Path, write: Callable, before_rename: Callable[[], None] | None = None) -> Path:
    """`write(fh)` into a hidden temporary file beside `path`, fsync, `before_rename()`, rename, fsync the directory."""
    tmp = _durable_temp(path, write)
    try:
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _durable_temp(path: Path, write: Callable) -> Path:
    """`write(fh)` into a hidden temporary file beside `path`, fsynced; removed again if anything fails. The writer's
    host and pid are in its name: a restarted process can tell its dead predecessor's leftovers at once."""
    tmp = path.parent / f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that no reader ever sees a partial file: temp name, fsync, rename, fsync dir."""
    path = Path(path)
    if is_remote(path):
        return put_bytes(path, data)  # one PUT: whole or absent
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, lambda fh: fh.write(data))


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, doc, indent: int | None = 1, sort_keys: bool = True, default=str) -> Path:
    """`doc` as JSON, written atomically (`write_bytes_atomic`)."""
    return write_text_atomic(path, json.dumps(doc, indent=indent, sort_keys=sort_keys, default=default))


def _writer_dead(tmp: Path) -> bool:
    """True when the temp file's writer was a process on this host that no longer runs."""
    parts = tmp.name.split(".")
    if len(parts) < 5 or parts[-4] != HOST or not parts[-3].isdigit():
        return False
    try:
        os.kill(int(parts[-3]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(lake: Path, table: str, min_age_s: float = 600.0) -> int:
    """Delete temporary files left by writers that died before their rename; returns how many.

    A temp file goes when its writer was a process on this host that is gone, or when it is older than `min_age_s`
    (a writer on another host sharing the lake); a live writer's file is never touched.
    """
    root = table_dir(lake, table)
    if is_remote(root):
        return 0  # nothing temporary is ever written to object storage
    now = time.time()
    removed = 0
    for p in root.rglob(".*.tmp") if root.exists() else ():
        try:
            if _writer_dead(p) or now - p.stat().st_mtime >= min_age_s:
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
    return write_parquet_atomic(*_drive_file(drives, table))


def _drive_file(drives: Path, table: pa.Table) -> tuple[pa.Table, Path]:
    """A drive's rows checked and cast, with its footer, and its path: what `write_drive` stores."""
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
    return _with_metadata(table, meta), drive_path(drives, vehicle_ids[0], drive_ids[0])


class DriveBatch:
    """Drives made durable, then visible together: `write` (any thread) stores a drive as `write_drive` does (footer,
    row groups, codec) under a hidden temporary name and fsyncs it; `commit_all` renames them and fsyncs each
    directory once (n + directories fsyncs instead of 2n); `abort` removes them. Local drive directories only."""

    def __init__(self) -> None:
        self._done: list[tuple[Path, Path]] = []  # (temporary, final path)
        self._lock = threading.Lock()

    def write(self, drives: Path, table: pa.Table) -> Path:
        table, path = _drive_file(drives, table)
        if is_remote(path):
            raise ValueError(f"{path}: a DriveBatch writes local drive directories only")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _durable_temp(path, lambda fh: _parquet(table, fh, 1 << 17, PARQUET_COMPRESSION))
        with self._lock:
            self._done.append((tmp, path))
        return path

    @staticmethod
    def commit_all(batches: list["DriveBatch"]) -> None:
        """Commit batches in order (a later one's drive replaces an earlier one's), one fsync per directory."""
        done = []
        for b in batches:
            with b._lock:
                done, b._done = done + b._done, []
        for tmp, path in done:
            os.replace(tmp, path)
        for directory in sorted({path.parent for _, path in done}):
            fsync_dir(directory)

    def abort(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)


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
    check_version(path, "drive file", meta.get("flywheel.format_version"), DRIVE_FORMAT_VERSION)
    seq = table["seq"].to_numpy()
    if not np.array_equal(seq, np.arange(len(seq))):
        raise ValueError(f"{path}: seq is not 0..n-1")
    try:
        # a drive file written before frame schema version 2 lacks the deployed model's columns: "" (unknown)
        frames = arrow_to_frames(upgrade_frame_rows(table, FRAME_SCHEMA))
    except ChunkRejected as exc:
        raise ValueError(f"{path}: {exc}") from None
    return Drive(meta["flywheel.drive_id"], meta["flywheel.vehicle_id"], frames, Path(path))


def mark_uploaded(drive_file: Path, info: dict) -> None:
    write_json_atomic(uploaded_marker(drive_file), info, indent=None)


def is_uploaded(drive_file: Path) -> bool:
    return uploaded_marker(drive_file).exists()


# ------------------------------------------------------------------------------ which frames a lake file holds

DRIVE_SEQ_KEY = "flywheel.drive_seq"
"""Footer of every frames file: {drive_id: [[lo, hi], ...]}, the sorted disjoint seq ranges of the drive's rows."""

DRIVE_FINAL_KEY = "flywheel.drive_final"
"""Footer of a frames file holding the rows of a drive's final chunk (the vehicle's `final` flag): {drive_id: last
seq of the drive}. Readers know a drive has ended without waiting for it to go quiet. Absent when no drive ended."""


# ------------------------------------------------------------------------------------------------------ lake rows

_MS_PER_DAY = 86_400_000


def ingest_date(timestamp_ms: int) -> str:
    """UTC date (YYYY-MM-DD) of a Kafka record timestamp in milliseconds: the hive partition of its rows."""
    return datetime.fromtimestamp(timestamp_ms // _MS_PER_DAY * 86_400, tz=timezone.utc).date().isoformat()


def to_lake_batch(frames: Frames, drive_id: str, vehicle_id: str, first_seq: int, schema_version: int,
                  ingest_ms: int, partition: int, offset: int) -> pa.RecordBatch:
    """Frames of one chunk as rows of FRAMES_LAKE_SCHEMA; `ingest_ms` is the Kafka record timestamp in ms."""
    return lake_batch(frames_to_arrow(frames, drive_id, vehicle_id, first_seq), schema_version, ingest_ms, partition,
                      offset)


def lake_batch(frames: pa.RecordBatch, schema_version: int, ingest_ms: int, partition: int,
               offset: int) -> pa.RecordBatch:
    """FRAME_SCHEMA rows (as the frames topic carries them, `ingest.bus`) as rows of FRAMES_LAKE_SCHEMA: the lake
    columns appended; `ingest_ms` is the Kafka record timestamp in ms, `offset` the record's Kafka offset."""
    n = frames.num_rows
    lake_cols = [
        pa.array(np.full(n, schema_version, np.int16)),
        pa.array(np.full(n, ingest_ms, np.int64)).view(pa.timestamp("ms", tz="UTC")),
        pa.array(np.full(n, partition, np.int32)),
        pa.array(np.full(n, offset, np.int64)),
    ]
    # from_arrays with an explicit schema fails on any type drift instead of inferring a new schema
    return pa.RecordBatch.from_arrays([*frames.columns, *lake_cols], schema=FRAMES_LAKE_SCHEMA)
