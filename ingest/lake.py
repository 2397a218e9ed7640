"""The storage contract: every path template and on-disk schema of the project, each format with a version.

Lake layout (hive-partitioned Parquet, one directory per table; the partition keys of each table in `TABLES`):

    <lake>/frames/date=<YYYY-MM-DD>/<topic>-p<partition:05d>-<first offset:020d>-<last offset:020d>.parquet
    <lake>/decisions/model=<model id>/date=<YYYY-MM-DD>/<same name as the frames it was computed from>
    <lake>/divergences/pair=<pair id>/date=<YYYY-MM-DD>/<same>
    <lake>/scenarios/pair=<pair id>/date=<YYYY-MM-DD>/<same>
    <lake>/noise_floor/model=<model id>/date=<YYYY-MM-DD>/<same>

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
    <drives>/<vehicle_id>/<drive_id>.truth.parquet     simulated drives only: the simulator's truth, TRUTH_SCHEMA
"""

from __future__ import annotations

import json
import os
import re
import time
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.contract import AGENT_TYPE, FRAME_SCHEMA, SCHEMA_VERSION, ChunkRejected, Frames, arrow_to_frames

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

SHADOW_SCHEMA_VERSION = 1
DIVERGENCE_HORIZONS_S = (1, 2, 4)
"""Horizons (s) of the per-frame divergence metrics: columns ade_1s, fde_1s, ahe_1s, fhe_1s, miss_1s, ..."""


def _f(name: str, t: pa.DataType, nullable: bool = False, doc: str | None = None) -> pa.Field:
    return pa.field(name, t, nullable=nullable, metadata={"doc": doc} if doc else None)


def _enum(name: str) -> pa.Field:
    return _f(name, pa.dictionary(pa.int8(), pa.string()))


def _shadow_schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"flywheel.table": table, "flywheel.schema_version": str(SHADOW_SCHEMA_VERSION)})


_FRAME_KEY = [_f("drive_id", pa.string()), _f("vehicle_id", pa.string()), _f("seq", pa.int64()),
              _f("timestamp", pa.timestamp("ns", tz="UTC"))]
_LINEAGE = [_f("kafka_partition", pa.int32(), doc="Kafka partition of the source frame"),
            _f("kafka_offset", pa.int64(), doc="Kafka offset of the chunk the source frame came in"),
            _f("replay_id", pa.string(), doc="the replay run that wrote the row"),
            _f("schema_version", pa.int16())]
_PAIR = [_f("teacher_name", pa.string()), _f("teacher_version", pa.string()),
         _f("student_name", pa.string()), _f("student_version", pa.string())]
_CONDITIONS = [_enum("road_type"), _enum("lighting"), _enum("weather"),
               _f("tags", pa.list_(pa.field("item", pa.string(), nullable=False)))]
_F32_LIST = pa.list_(pa.field("item", pa.float32(), nullable=False))


def _horizon_fields() -> list[pa.Field]:
    out = []
    for h in DIVERGENCE_HORIZONS_S:
        out += [_f(f"ade_{h}s", pa.float32(), doc=f"mean L2 between teacher and student waypoints up to {h} s [m]"),
                _f(f"fde_{h}s", pa.float32(), doc=f"L2 at {h} s [m]"),
                _f(f"ahe_{h}s", pa.float32(), doc=f"mean absolute heading difference up to {h} s [rad]"),
                _f(f"fhe_{h}s", pa.float32(), doc=f"absolute heading difference at {h} s [rad]"),
                _f(f"miss_{h}s", pa.bool_(), doc=f"largest L2 up to {h} s above the miss threshold")]
    return out


DECISIONS_SCHEMA = _shadow_schema("decisions", [
    *_FRAME_KEY,
    _f("model_name", pa.string()), _f("model_version", pa.string()), _f("featurizer_version", pa.string()),
    _f("traj_x", _F32_LIST, doc="planned waypoints, ego frame x forward [m], spaced by the featurizer's horizon dt"),
    _f("traj_y", _F32_LIST, doc="ego frame y left [m]"),
    _f("traj_yaw", _F32_LIST, doc="heading change [rad]"),
    _enum("maneuver"),
    _f("maneuver_probs", _F32_LIST, doc="softmax of the maneuver head, in Maneuver enum order"),
    *_LINEAGE,
])

DIVERGENCES_SCHEMA = _shadow_schema("divergences", [
    *_FRAME_KEY, *_PAIR, *_CONDITIONS, *_horizon_fields(),
    _enum("maneuver_teacher"), _enum("maneuver_student"),
    _f("maneuver_disagree", pa.bool_()),
    _f("maneuver_jsd", pa.float32(), doc="Jensen-Shannon divergence of the maneuver distributions [bits, 0..1]"),
    _f("ttc_teacher", pa.float32(), nullable=True, doc="time to collision of the teacher's plan with the logged "
       "agents [s]; null when none within the horizon"),
    _f("ttc_student", pa.float32(), nullable=True, doc="the same for the student's plan"),
    _f("teacher_ade_driver", pa.float32(), nullable=True, doc="teacher vs the logged future, over the horizon [m]; "
       "null when the drive ends too soon"),
    _f("teacher_fde_driver", pa.float32(), nullable=True),
    _f("student_ade_driver", pa.float32(), nullable=True),
    _f("student_fde_driver", pa.float32(), nullable=True),
    _f("score", pa.float32(), doc="combined divergence score (see shadow.metrics)"),
    *_LINEAGE,
])

SCENARIOS_SCHEMA = _shadow_schema("scenarios", [
    _f("drive_id", pa.string()), _f("vehicle_id", pa.string()),
    _f("window_start_seq", pa.int64()), _f("window_end_seq", pa.int64()),
    _f("start_time", pa.timestamp("ns", tz="UTC")), _f("end_time", pa.timestamp("ns", tz="UTC")),
    *_PAIR, *_CONDITIONS,
    _f("frames", pa.int32()),
    _f("mean_ade_4s", pa.float32()), _f("max_fde_4s", pa.float32()), _f("miss_rate_4s", pa.float32()),
    _f("disagree_rate", pa.float32()), _f("mean_jsd", pa.float32()),
    _f("min_ttc_teacher", pa.float32(), nullable=True), _f("min_ttc_student", pa.float32(), nullable=True),
    _f("mean_score", pa.float32()), _f("max_score", pa.float32()),
    _f("passed", pa.bool_()),
    _f("failed_criteria", pa.list_(pa.field("item", pa.string(), nullable=False)),
       doc="names of the criteria the window failed; empty when passed"),
    _f("criteria_version", pa.string(), doc="content hash of the criteria file"),
    *_LINEAGE,
])

NOISE_FLOOR_SCHEMA = _shadow_schema("noise_floor", [
    *_FRAME_KEY,
    _f("model_name", pa.string()), _f("model_version", pa.string()),
    _f("runtime_a", pa.string(), doc="onnxruntime configuration of the reference run"),
    _f("runtime_b", pa.string(), doc="the second configuration"),
    *_horizon_fields(),
    _f("maneuver_jsd", pa.float32()), _f("score", pa.float32()),
    *_LINEAGE,
])

TABLES: dict[str, TableSpec] = {
    "frames": TableSpec("frames", FRAMES_LAKE_SCHEMA, SCHEMA_VERSION),
    "decisions": TableSpec("decisions", DECISIONS_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
    "divergences": TableSpec("divergences", DIVERGENCES_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "scenarios": TableSpec("scenarios", SCENARIOS_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "noise_floor": TableSpec("noise_floor", NOISE_FLOOR_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
}

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
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
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.name.startswith(".") or entry.name == except_name:
            continue
        f = parse_file(Path(entry.path))
        if f is not None and f.topic == topic and f.partition == partition and f.first <= last and f.last >= first:
            out.append(f)
    return sorted(out)


def all_files(lake: Path, table: str) -> list[LakeFile]:
    """Every data file of the table, live or superseded (hidden temporary files excluded)."""
    root = table_dir(lake, table)
    if not root.exists():
        return []
    found = (parse_file(p) for p in root.rglob("*.parquet") if not p.name.startswith("."))
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
                         metadata: dict[str, str] | None = None,
                         before_rename: Callable[[], None] | None = None) -> Path:
    """Write `table` to `path` so that no reader ever sees a partial file: hidden temp name, fsync, rename, fsync dir.

    `metadata` is merged into the schema's key-value metadata (footer). An existing file at `path` is replaced.
    `before_rename` runs once the temporary file is durable, just before it becomes visible; if it raises, the
    temporary file is removed and nothing is published.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
    # writer's host and pid in the name: a restarted process can tell its dead predecessor's leftovers at once
    tmp = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, row_group_size=row_group_size, compression=PARQUET_COMPRESSION,
                           use_dictionary=dictionary_columns(table.schema))
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _writer_dead(tmp: Path) -> bool:
    """True when the temp file's writer was a process on this host that no longer runs."""
    parts = tmp.name.split(".")
    if len(parts) < 5 or parts[-4] != _HOST or not parts[-3].isdigit():
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

DRIVE_FINAL_KEY = "flywheel.drive_final"
"""Footer of a frames file holding the rows of a drive's final chunk (the vehicle's `final` flag): {drive_id: last
seq of the drive}. Readers know a drive has ended without waiting for it to go quiet. Absent when no drive ended."""


# ------------------------------------------------------------------------------ simulator truth (evaluation only)

TRUTH_SUFFIX = ".truth.parquet"
TRUTH_FORMAT_VERSION = 1
_DICT = pa.dictionary(pa.int8(), pa.string())
# the true agents carry what perception reports, less the confidence
TRUTH_AGENT_TYPE = pa.struct([f for f in AGENT_TYPE if f.name != "confidence"])


def _items(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", t, nullable=False))


TRUTH_SCHEMA = pa.schema([
    pa.field("drive_id", pa.string(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("scene", pa.int32(), nullable=False),
    pa.field("condition", _DICT, nullable=False),
    pa.field("source_seq", pa.int64(), nullable=False),
    pa.field("ego_x", pa.float64(), nullable=False),
    pa.field("ego_y", pa.float64(), nullable=False),
    pa.field("ego_heading", pa.float32(), nullable=False),
    pa.field("ego_speed", pa.float32(), nullable=False),
    pa.field("ego_crashed_next", pa.bool_(), nullable=False),
    pa.field("agents", _items(TRUTH_AGENT_TYPE), nullable=False),
    pa.field("false_positive_ids", _items(pa.uint32()), nullable=False),
], metadata={"flywheel.format": "truth", "flywheel.format_version": str(TRUTH_FORMAT_VERSION)})


def truth_path(drive_file: Path) -> Path:
    """The simulator's truth file beside a `.drive.parquet` file (see ingest.fleet.truth)."""
    drive_file = Path(drive_file)
    return drive_file.with_name(drive_file.name[: -len(DRIVE_SUFFIX)] + TRUTH_SUFFIX)
