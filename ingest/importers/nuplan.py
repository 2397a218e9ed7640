"""nuPlan log databases (SQLite, the published `.db` layout of nuplan-devkit) -> drives.

Tables and columns used: `log` (logfile, vehicle_name), `ego_pose` (timestamp [µs], x, y, qw, qx, qy, qz, vx, vy,
acceleration_x, angular_rate_z: velocity, acceleration and yaw rate in the ego's body frame), `lidar_pc` (token,
timestamp [µs]), `lidar_box` (lidar_pc_token, track_token, x, y, vx, vy, yaw, length, width, confidence: global
frame), `track` (token, category_token) and `category` (token, name). One database is one drive, resampled from
the ego poses (about 100 Hz) and the boxes of each lidar sweep (20 Hz) to the contract's rate. The database is
opened read-only; a file that is not SQLite, or lacks a table or column, raises `ImportFailed`.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ingest.importers.common import AgentObs, EgoTrack, ImportFailed, ImportOptions, Progress, SourceDrive, safe_id

CATEGORY_TO_CLASS = {"vehicle": 1, "bicycle": 4, "pedestrian": 5, "traffic_cone": 0, "barrier": 0,
                     "czone_sign": 0, "generic_object": 0}
EGO_SQL = ("SELECT timestamp, x, y, qw, qx, qy, qz, vx, vy, acceleration_x, angular_rate_z FROM ego_pose "
           "ORDER BY timestamp")
# every column numeric (the track's rowid stands for its token, the class is mapped in SQL), so the rows become one
# float64 array at once; a NULL becomes NaN: an invalid state, dropped and counted by the resampling
_CLASS_SQL = "CASE c.name " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in CATEGORY_TO_CLASS.items()) + " ELSE 0 END"
# the class per track, not per box: one value fewer to fetch for each of the boxes (the join keeps the same boxes)
BOX_SQL = ("SELECT lp.timestamp, t.rowid, lb.x, lb.y, lb.vx, lb.vy, lb.yaw, lb.length, lb.width, lb.confidence "
           "FROM lidar_box lb JOIN lidar_pc lp ON lb.lidar_pc_token = lp.token "
           "JOIN track t ON lb.track_token = t.token JOIN category c ON t.category_token = c.token")
TRACK_SQL = f"SELECT t.rowid, {_CLASS_SQL} FROM track t JOIN category c ON t.category_token = c.token"


def _numeric(con: sqlite3.Connection, sql: str, width: int) -> np.ndarray:
    """The rows of a query of numeric columns as float64 (R, width), streamed from the cursor into one array (a
    list of row tuples first costs as much again); a NULL (NaN) or a text value takes the general conversion, as
    before: NaN for NULL, ValueError for text."""
    try:
        return np.fromiter(itertools.chain.from_iterable(con.execute(sql)), np.float64).reshape(-1, width)
    except (TypeError, ValueError):
        return np.array(con.execute(sql).fetchall(), np.float64).reshape(-1, width)


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """The drive of one nuPlan log database (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(path, "the file", "no such file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise ImportFailed(path, "the file", f"cannot open as SQLite ({exc})") from None
    where = "table log"
    try:
        log_row = con.execute("SELECT logfile, vehicle_name FROM log").fetchone()
        where = "table ego_pose"
        e = _numeric(con, EGO_SQL, 11)
        where = "tables lidar_box, lidar_pc, track, category"
        b = _numeric(con, BOX_SQL, 10)
        tracks = _numeric(con, TRACK_SQL, 2)
    except sqlite3.Error as exc:
        raise ImportFailed(path, where, f"not a nuPlan log database ({type(exc).__name__}: {exc})") from None
    finally:
        con.close()
    if not e.size:
        raise ImportFailed(path, "table ego_pose", "no ego pose")
    logfile, vehicle = (log_row or (path.stem, None))
    qw, qx, qy, qz = e[:, 3], e[:, 4], e[:, 5], e[:, 6]
    heading = np.arctan2(2.0 * (qw * qz + qx * qy), 1.0 - 2.0 * (qy * qy + qz * qz))
    ego = EgoTrack(e[:, 0].astype(np.int64) * 1000, e[:, 1], e[:, 2], heading, np.hypot(e[:, 7], e[:, 8]),
                   e[:, 9], e[:, 10])
    agents = AgentObs.empty()
    if b.size:
        track = b[:, 1].astype(np.int64)
        order = np.argsort(tracks[:, 0], kind="stable")
        cls = tracks[order, 1][np.searchsorted(tracks[order, 0], b[:, 1])]  # every box's track is there (the join)
        agents = AgentObs(b[:, 0].astype(np.int64) * 1000, track, cls.astype(np.int32),
                          *(b[:, i] for i in range(2, 10)))
    if progress is not None:
        progress(path.stat().st_size)
    yield SourceDrive(record=f"log {logfile}", drive_id=safe_id(f"nuplan-{logfile or path.stem}"),
                      vehicle_id=opts.vehicle_id or safe_id(vehicle or "nuplan"), ego=ego, agents=agents)
