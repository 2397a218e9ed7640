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

# The log-replay closed loop's per-window record (`shadow.log_replay`), in order: name, Arrow type, description.
# Nullable: the two times that are null when nothing happened.
LOG_REPLAY_FIELDS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("score", pa.float32(), "combined score: NAVSIM's form, in [0, 1]"),
    ("no_at_fault_collision", pa.float32(), "1 unless the ego caused a collision"),
    ("drivable_area_compliance", pa.float32(), "1 unless a corner left the logged lanes' outer edges"),
    ("ttc_within_bound", pa.float32(), "1 unless a time to collision fell below ttc_bound_s"),
    ("ego_progress", pa.float32(), "progress along the logged path over the logged driver's, in [0, 1]"),
    ("comfort", pa.float32(), "1 when every comfort signal stayed within its limit"),
    ("collision", pa.bool_(), "any contact with a logged agent, at fault or not"),
    ("at_fault_collision_s", pa.float32(), "time of the first at-fault contact [s]; null if none"),
    ("min_ttc_s", pa.float32(), "smallest time to collision found within ttc_bound_s [s]; null if none"),
    ("max_drivable_violation_m", pa.float32(), "farthest a corner came beyond the outer lane edges [m]"),
    ("lane_known", pa.bool_(), "whether the logged frames carried lane context"),
    ("progress_m", pa.float32(), "ego's progress along the logged path [m]"),
    ("logged_progress_m", pa.float32(), "logged driver's progress over the same time [m]"),
    ("min_lon_accel_mps2", pa.float32(), "strongest braking [m/s^2]"),
    ("max_lon_accel_mps2", pa.float32(), "strongest acceleration [m/s^2]"),
    ("max_abs_lat_accel_mps2", pa.float32(), "largest lateral acceleration [m/s^2]"),
    ("max_abs_lon_jerk_mps3", pa.float32(), "largest longitudinal jerk [m/s^3]"),
    ("max_abs_jerk_mps3", pa.float32(), "largest jerk magnitude [m/s^3]"),
    ("max_abs_yaw_rate_radps", pa.float32(), "largest yaw rate [rad/s]"),
    ("max_abs_yaw_accel_radps2", pa.float32(), "largest yaw acceleration [rad/s^2]"),
    ("horizon_s", pa.float32(), "how much of the horizon the log covered and was scored [s]"),
)
_LOG_REPLAY_NULLABLE = ("at_fault_collision_s", "min_ttc_s")

LOG_REPLAY_SCHEMA = _shadow_schema("log_replay", [
    *_FRAME_KEY,
    _f("model_name", pa.string()), _f("model_version", pa.string()), *_CONDITIONS,
    *[_f(n, t, nullable=n in _LOG_REPLAY_NULLABLE, doc=d) for n, t, d in LOG_REPLAY_FIELDS],
    *_LINEAGE,
])
"""Per frame and model: the model's plan driven from that frame in the log-replay closed loop (`shadow.log_replay`)."""

TABLES: dict[str, TableSpec] = {
    "frames": TableSpec("frames", FRAMES_LAKE_SCHEMA, SCHEMA_VERSION, older=(1,)),
    "decisions": TableSpec("decisions", DECISIONS_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
    "divergences": TableSpec("divergences", DIVERGENCES_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "scenarios": TableSpec("scenarios", SCENARIOS_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "noise_floor": TableSpec("noise_floor", NOISE_FLOOR_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
    "onboard": TableSpec("onboard", ONBOARD_SCHEMA, SHADOW_SCHEMA_VERSION, ("pair", "date")),
    "log_replay": TableSpec("log_replay", LOG_REPLAY_SCHEMA, SHADOW_SCHEMA_VERSION, ("model", "date")),
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
