"""The lake's tables: each one's fixed Arrow schema (never inferred per batch), version and hive partition keys.

`TABLES` names every table of the lake (frames and the shadow tables); `ingest.lake` has the path templates and
writers, `check_table_version` the readers' check of a file's stored version.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from ingest.objstore import read_schema

from ingest.contract import DECISION_MODEL_COLUMNS, FRAME_SCHEMA, SCHEMA_VERSION, ChunkRejected, RejectReason
from ingest.versions import check_version


@dataclass(frozen=True)
class TableSpec:
    """A lake table: its fixed Arrow schema (never inferred per batch), version and hive partition keys."""

    name: str
    schema: pa.Schema
    version: int
    partitioning: tuple[str, ...] = ("date",)
    older: tuple[int, ...] = ()  # older versions its readers still read (upgraded on read, see upgrade_frame_rows)


# Lake columns added by the sink to every frame row: where it came from in Kafka and when it arrived.
FRAMES_LAKE_SCHEMA = pa.schema(
    [*FRAME_SCHEMA, pa.field("schema_version", pa.int16(), nullable=False),
     pa.field("ingest_time", pa.timestamp("ms", tz="UTC"), nullable=False),
     pa.field("kafka_partition", pa.int32(), nullable=False),
     pa.field("kafka_offset", pa.int64(), nullable=False)],
    metadata={"flywheel.table": "frames", "flywheel.schema_version": str(SCHEMA_VERSION)},
)


def upgrade_frame_rows(rows: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table | pa.RecordBatch:
    """Rows stored under frame schema version 1 (drive files, lake files, topic records) as rows of `schema` (the
    current FRAME_SCHEMA or a table built on it): the fields version 2 added filled with "" (no model known).
    Rows that already have every field are only put in `schema`'s order."""
    n = rows.num_rows
    cols = []
    for f in schema:
        if f.name in rows.schema.names:
            cols.append(rows.column(f.name))
        elif f.name in DECISION_MODEL_COLUMNS:
            cols.append(pa.repeat(pa.scalar("", pa.string()), n))
        else:
            raise ChunkRejected(RejectReason.SCHEMA_VERSION, f"rows lack the field {f.name!r}")
    if isinstance(rows, pa.RecordBatch):
        return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(cols, schema)], schema=schema)
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema)], schema=schema)


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

ONBOARD_SCHEMA = _shadow_schema("onboard", [
    *_FRAME_KEY, *_PAIR,
    _f("decision_model", pa.string(), doc="the deployed model the frame names as its on-board decision's"),
    _f("decision_model_version", pa.string()), *_CONDITIONS,
    _f("fleet_ade_4s", pa.float32(), doc="teacher vs the logged on-board plan, mean L2 up to 4 s [m]"),
    _f("fleet_fde_4s", pa.float32(), doc="the same at 4 s [m]"),
    _f("fleet_miss_4s", pa.bool_()),
    _f("fleet_maneuver_disagree", pa.bool_(), doc="teacher's arg-max maneuver is not the logged one"),
    _f("fleet_score", pa.float32(), doc="divergence score of the teacher vs the logged decision (shadow.metrics)"),
    _f("emulation_score", pa.float32(), doc="the same of the teacher vs the fleet-side emulation (divergences.score)"),
    _f("parity_checked", pa.bool_(), doc="the frame names the replayed student's id and version"),
    _f("parity_max_err_m", pa.float32(), nullable=True, doc="largest waypoint distance, emulation vs logged [m]; "
       "null when not checked"),
    _f("parity_maneuver_agree", pa.bool_(), nullable=True),
    _f("parity_ok", pa.bool_(), nullable=True, doc="maneuvers agree and parity_max_err_m within the tolerance"),
    *_LINEAGE,
])

TABLES: dict[str, TableSpec] = {
    "frames": TableSpec("frames", FRAMES_LAKE_SCHEMA, SCHEMA_VERSION, older=(1,)),
    "decisions": TableSpec("decisions", DECISIONS_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
    "divergences": TableSpec("divergences", DIVERGENCES_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "scenarios": TableSpec("scenarios", SCENARIOS_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "noise_floor": TableSpec("noise_floor", NOISE_FLOOR_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
    "onboard": TableSpec("onboard", ONBOARD_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
}


def check_table_version(path, table: str, metadata: dict[bytes, bytes] | None) -> None:
    """Refuse a lake file of `table` whose footer (`metadata`: its schema's key-value metadata) carries another
    schema version than this code's (`TABLES[table].version`) or an older one it still reads, or none; `ingest.lake.UnknownVersion` names both."""
    found = (metadata or {}).get(b"flywheel.schema_version")
    found = found.decode() if found is not None else None
    spec = TABLES[table]
    if found is not None and found.isdigit() and int(found) in spec.older:
        return
    check_version(path, f"lake table {table!r}", found, spec.version)


def read_footer(path, table: str) -> dict[bytes, bytes]:
    """The key-value footer of a lake file of `table`, its schema version checked (`check_table_version`)."""
    metadata = read_schema(path).metadata or {}
    check_table_version(path, table, metadata)
    return metadata
