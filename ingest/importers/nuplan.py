"""nuPlan log databases (SQLite, the published `.db` layout of nuplan-devkit) -> drives.

Tables and columns used: `log` (logfile, vehicle_name), `ego_pose` (timestamp [µs], x, y, qw, qx, qy, qz, vx, vy,
acceleration_x, angular_rate_z: velocity, acceleration and yaw rate in the ego's body frame), `lidar_pc` (token,
timestamp [µs]), `lidar_box` (lidar_pc_token, track_token, x, y, vx, vy, yaw, length, width, confidence: global
frame), `track` (token, category_token) and `category` (token, name). One database is one drive, resampled from
the ego poses (about 100 Hz) and the boxes of each lidar sweep (20 Hz) to the contract's rate. The database is
opened read-only and immutable (nothing written beside it either); a file that is not SQLite, lacks a table or
column, or holds text where a number belongs raises `ImportFailed`; a NULL number is NaN, an invalid state that the
resampling drops and counts.

The rows come through Apache Arrow's ADBC SQLite driver (`adbc-driver-sqlite`) as Arrow columns: Python's `sqlite3`
makes a Python object of every value, which was 70-80% of the import's time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import adbc_driver_manager
import adbc_driver_sqlite.dbapi
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.importers.common import AgentObs, EgoTrack, ImportFailed, ImportOptions, Progress, SourceDrive, safe_id

CATEGORY_TO_CLASS = {"vehicle": 1, "bicycle": 4, "pedestrian": 5, "traffic_cone": 0, "barrier": 0,
                     "czone_sign": 0, "generic_object": 0}
# every column numeric (the track's rowid stands for its token, the class is mapped in SQL), each named for the
# table column it comes from (what an error names); the ego poses are sorted after the fetch (EgoTrack's cleaning
# sorts by time, stably: of two poses with the same stamp the first stored is kept)
EGO_COLUMNS = tuple(f"ego_pose.{c}" for c in ("timestamp", "x", "y", "qw", "qx", "qy", "qz", "vx", "vy",
                                               "acceleration_x", "angular_rate_z"))
# a box's class comes from its track (TRACK_SQL: one value per track, not per box); a box whose track has no
# category is dropped after the fetch, as the join with `category` would drop it
BOX_COLUMNS = ("lidar_pc.timestamp", "track.rowid", *(f"lidar_box.{c}" for c in ("x", "y", "vx", "vy", "yaw",
                                                                                   "length", "width", "confidence")))
_CLASS_SQL = "CASE category.name " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in CATEGORY_TO_CLASS.items()) + \
    " ELSE 0 END"


def _select(columns: tuple[str, ...], rest: str) -> str:
    return "SELECT " + ", ".join(f'{c} AS "{c}"' for c in columns) + " " + rest


EGO_SQL = _select(EGO_COLUMNS, "FROM ego_pose")
BOX_SQL = _select(BOX_COLUMNS, "FROM lidar_box JOIN lidar_pc ON lidar_box.lidar_pc_token = lidar_pc.token "
                  "JOIN track ON lidar_box.track_token = track.token")
TRACK_SQL = (f'SELECT track.rowid AS "track.rowid", {_CLASS_SQL} AS "category.name" '
             "FROM track JOIN category ON track.category_token = category.token")
ONE_BATCH_ROWS = 1 << 30
"""Rows per Arrow batch of a query: the driver infers each column's type from the first batch (a column NULL in all
its rows so far is int64; a REAL after that is an error), so every row is in the first: a NULL becomes NaN, integers
and reals mix, text makes a text column (refused by `_numeric`). Below the driver's limit (INT_MAX - 1)."""


class _NotNumeric(ValueError):
    pass


def _numeric(con: adbc_driver_manager.dbapi.Connection, sql: str) -> np.ndarray:
    """The rows of a query of numeric columns as float64 (width, R), one Arrow table fetched at once; NULL -> NaN.
    `_NotNumeric` names a column that holds text or bytes (with one such value)."""
    cur = con.cursor()
    try:
        cur.adbc_statement.set_options(**{adbc_driver_sqlite.StatementOptions.BATCH_ROWS.value: str(ONE_BATCH_ROWS)})
        cur.execute(sql)
        table = cur.fetch_arrow_table()
    finally:
        cur.close()
    out = np.empty((table.num_columns, table.num_rows), np.float64)
    for i, (name, col) in enumerate(zip(table.column_names, table.columns)):
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise _not_numeric(name, col)
        out[i] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    return out


def _not_numeric(name: str, col: pa.ChunkedArray) -> _NotNumeric:
    """The error of a column with text or bytes in it, with the first value that is not a number: the driver made
    the column text from the first text value on, its numbers as text ('3.000000e-01') too."""
    values = pc.drop_null(col).to_pylist()
    kind = "text" if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else "bytes"
    bad = next((v for v in values if not _parses(v)), None) if kind == "text" else values[0]
    return _NotNumeric(f"column {name} holds {kind}" + (f" ({repr(bad)[:40]})" if bad is not None else "") +
                       ", not a number")


def _parses(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """The drive of one nuPlan log database (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(path, "the file", "no such file")
    # a URI filename (the path %-escaped): read-only, and immutable, so that SQLite takes no lock and writes no
    # journal beside the file
    uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
    where = "the file"
    try:
        con = adbc_driver_sqlite.dbapi.connect(uri)
        try:
            where = "table log"
            cur = con.cursor()
            try:
                cur.execute("SELECT logfile, vehicle_name FROM log")
                log_row = cur.fetchone()
            finally:
                cur.close()
            where = "table ego_pose"
            e = _numeric(con, EGO_SQL)
            where = "tables lidar_box, lidar_pc, track"
            b = _numeric(con, BOX_SQL)
            where = "tables track, category"
            tracks = _numeric(con, TRACK_SQL)
        finally:
            con.close()
    except _NotNumeric as exc:
        raise ImportFailed(path, where, str(exc)) from None
    except (adbc_driver_manager.Error, OSError) as exc:  # OSError: the Arrow stream of a query that failed midway
        raise ImportFailed(path, where, f"not a nuPlan log database ({type(exc).__name__}: {_first_line(exc)})") \
            from None
    if not e.shape[1]:
        raise ImportFailed(path, "table ego_pose", "no ego pose")
    logfile, vehicle = (log_row or (path.stem, None))
    qw, qx, qy, qz = e[3], e[4], e[5], e[6]
    heading = np.arctan2(2.0 * (qw * qz + qx * qy), 1.0 - 2.0 * (qy * qy + qz * qz))
    ego = EgoTrack(e[0].astype(np.int64) * 1000, e[1], e[2], heading, np.hypot(e[7], e[8]), e[9], e[10])
    agents = AgentObs.empty()
    order = np.argsort(tracks[0], kind="stable")
    track_ids, track_cls = tracks[0, order], tracks[1, order]
    at = np.searchsorted(track_ids, b[1])
    known = at < track_ids.shape[0]
    known[known] = track_ids[at[known]] == b[1, known]  # the boxes whose track has a category (as a join would)
    if not known.all():
        b, at = b[:, known], at[known]
    if b.shape[1]:
        agents = AgentObs(b[0].astype(np.int64) * 1000, b[1].astype(np.int64), track_cls[at].astype(np.int32),
                          *b[2:10])
    if progress is not None:
        progress(path.stat().st_size)
    yield SourceDrive(record=f"log {logfile}", drive_id=safe_id(f"nuplan-{logfile or path.stem}"),
                      vehicle_id=opts.vehicle_id or safe_id(vehicle or "nuplan"), ego=ego, agents=agents)


def _first_line(exc: BaseException) -> str:
    """The driver's message without the query it appends on the lines after."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
