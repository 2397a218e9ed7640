"""The simulator's truth of a drive, kept beside the drive for evaluation; vehicles never upload it.

    <drives>/<vehicle_id>/<drive_id>.truth.parquet     one row per frame of the drive, TRUTH_SCHEMA

Each row holds every true agent within `truth_range_m` of the ego at that frame, the drive segment's condition,
the scene (env episode) the frame belongs to, which frame's state perception reported (`source_seq`, the latency)
and the ids of the spurious agents perception added. Agent ids are those of the drive file: a reported agent with a
true id is a true detection, the others are `false_positive_ids`. The footer carries the format, its version, the
drive's fingerprint (`FleetConfig.drive_hash`, for caching) and per-drive statistics as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.contract import AGENT_TYPE, ENUMS
from ingest.lake import DRIVE_SUFFIX, write_parquet_atomic
from ingest.versions import check_version

TRUTH_SUFFIX = ".truth.parquet"
TRUTH_FORMAT_VERSION = 2  # 2: a fleet in shadow mode adds the expert's decision (EXPERT_DECISION); 1 is still read
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
], metadata={"flywheel.format": "truth", "flywheel.format_version": "1"})  # with_expert_decision makes it 2


# the expert's decision, kept here when the drive logs the deployed student's (sim.onboard): drive column -> truth
EXPERT_DECISION = {"plan_x": "expert_plan_x", "plan_y": "expert_plan_y", "maneuver": "expert_maneuver",
                   "control_steer": "expert_control_steer", "control_accel": "expert_control_accel"}


def with_expert_decision(truth: pa.Table, drive: pa.Table) -> pa.Table:
    """The truth of a drive with the drive's logged (the expert's) decision added as EXPERT_DECISION columns."""
    for src, name in EXPERT_DECISION.items():
        truth = truth.append_column(pa.field(name, drive.schema.field(src).type, nullable=False), drive[src])
    return truth.replace_schema_metadata({**truth.schema.metadata,
                                          b"flywheel.format_version": str(TRUTH_FORMAT_VERSION).encode()})


def truth_path(drive_file: Path) -> Path:
    """The simulator's truth file beside a `.drive.parquet` file."""
    drive_file = Path(drive_file)
    return drive_file.with_name(drive_file.name[: -len(DRIVE_SUFFIX)] + TRUTH_SUFFIX)


def _offsets(counts: np.ndarray) -> pa.Array:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=out[1:])
    return pa.array(out)


def truth_table(drive_id: str, cols: dict[str, np.ndarray], agent_count: np.ndarray, agents: dict[str, np.ndarray],
                condition_names: list[str], fp_count: np.ndarray, fp_ids: np.ndarray,
                metadata: dict[str, str]) -> pa.Table:
    """Assemble TRUTH_SCHEMA rows. cols: per-frame arrays (n,) named like the schema (condition as codes into
    `condition_names`); agents: flat (A,) arrays grouped by frame (`agent_count`); fp_ids (sum fp_count,)."""
    n = agent_count.shape[0]
    classes = ENUMS["agent_class"][1]
    fields = []
    for f in TRUTH_AGENT_TYPE:
        if f.name == "agent_class":
            fields.append(pa.DictionaryArray.from_arrays(pa.array(agents["agent_class"].astype(np.int8)),
                                                         pa.array(classes)))
        else:
            fields.append(pa.array(agents[f.name].astype(f.type.to_pandas_dtype()), f.type))
    arrays = {
        "drive_id": pa.repeat(drive_id, n),
        "seq": pa.array(np.arange(n, dtype=np.int64)),
        "condition": pa.DictionaryArray.from_arrays(pa.array(cols["condition"].astype(np.int8)),
                                                    pa.array(condition_names)),
        "agents": pa.ListArray.from_arrays(_offsets(agent_count),
                                           pa.StructArray.from_arrays(fields, fields=list(TRUTH_AGENT_TYPE))),
        "false_positive_ids": pa.ListArray.from_arrays(_offsets(fp_count), pa.array(fp_ids, pa.uint32())),
    }
    for f in TRUTH_SCHEMA:
        if f.name not in arrays:
            arrays[f.name] = pa.array(np.asarray(cols[f.name]).astype(f.type.to_pandas_dtype()), f.type)
    table = pa.Table.from_arrays([arrays[f.name] for f in TRUTH_SCHEMA], schema=TRUTH_SCHEMA)
    return table.replace_schema_metadata({**TRUTH_SCHEMA.metadata, **{k.encode(): v.encode()
                                                                        for k, v in metadata.items()}})


def write_truth(drive_file: Path, table: pa.Table) -> Path:
    """Store a drive's truth beside its drive file, atomically (metadata in the table's schema goes in the footer)."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return write_parquet_atomic(table, truth_path(drive_file), metadata=meta)


def truth_footer(path: Path) -> dict[str, str]:
    """The footer metadata of a truth file (cheap: reads no data). Raises ValueError if it is not one."""
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    if meta.get("flywheel.format") != "truth":
        raise ValueError(f"{path}: not a flywheel truth file")
    if meta.get("flywheel.format_version") != "1":  # version 1: the same columns, without the expert's decision
        check_version(path, "truth file", meta.get("flywheel.format_version"), TRUTH_FORMAT_VERSION)
    return meta


def read_truth(path: Path) -> pa.Table:
    """Load a truth file after checking its format and version."""
    truth_footer(path)
    return pq.read_table(path)


def drive_stats(meta: dict[str, str]) -> dict:
    """The per-drive statistics stored in a truth footer."""
    return json.loads(meta["flywheel.drive_stats"])
