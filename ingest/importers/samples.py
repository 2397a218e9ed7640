"""Files in each importer's published layout, written from a synthetic scene: for the importer tests and
`bench.importers` (no dataset download anywhere).

`scene()` makes an ego on a gentle curve and agents around it, with missing observations and invalid states
where asked; the writers put it into a ROS 2 MCAP (standard and Autoware messages, message definitions embedded),
a Waymo TFRecord of `Scenario` records (protobuf wire written field by field with the public numbers, proto2 style
unpacked repeated doubles, masked CRC-32C framing), an Argoverse 2 scenario parquet, and a nuPlan SQLite log.
"""

from __future__ import annotations

import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.importers.waymo import masked_crc


@dataclass
class Scene:
    """Source-rate samples: t_s (T,) seconds from 0; ego x, y, heading, speed (T,); agents (A, T) x, y, vx, vy,
    heading, `valid` (A, T) (False: not observed, values garbage), length, width (A,), cls (A,) AgentClass codes."""

    t_s: np.ndarray
    ego: dict[str, np.ndarray]
    agents: dict[str, np.ndarray]


def scene(steps: int = 91, dt: float = 0.1, agents: int = 8, seed: int = 0, missing: float = 0.1) -> Scene:
    """A scene of `steps` samples `dt` apart; each agent observation is missing with probability `missing`."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps) * dt
    speed = 12.0 + 2.0 * np.sin(t / 3.0)
    yaw_rate = 0.03
    heading = 0.3 + yaw_rate * t
    x = 100.0 + np.cumsum(speed * np.cos(heading)) * dt
    y = -50.0 + np.cumsum(speed * np.sin(heading)) * dt
    along = rng.uniform(-30, 60, agents)[:, None] + np.outer(rng.normal(0, 1.0, agents), t)
    across = (rng.integers(-1, 2, agents) * 3.5)[:, None] + np.zeros((agents, steps))
    c, s = np.cos(heading)[None], np.sin(heading)[None]
    ax = x[None] + along * c - across * s
    ay = y[None] + along * s + across * c
    av = speed[None] + rng.normal(0, 1.0, agents)[:, None]
    valid = rng.random((agents, steps)) >= missing
    cls = rng.choice([1, 1, 1, 2, 4, 5], agents).astype(np.int32)
    return Scene(t, {"x": x, "y": y, "heading": heading, "speed": speed, "yaw_rate": np.full(steps, yaw_rate)},
                 {"x": ax, "y": ay, "vx": av * c, "vy": av * s, "heading": np.broadcast_to(heading, ax.shape).copy(),
                  "valid": valid, "length": rng.uniform(4.2, 5.0, agents), "width": rng.uniform(1.7, 2.0, agents),
                  "cls": cls})


# ------------------------------------------------------------------------------------------------- Waymo TFRecord


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _double(field: int, v: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", v)


def _float(field: int, v: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", v)


_WAYMO_TYPE = {0: 4, 1: 1, 2: 1, 3: 1, 4: 3, 5: 2}  # AgentClass -> Track.ObjectType


def waymo_scenario_bytes(sc: Scene, scenario_id: str, ego_track_id: int = 999) -> bytes:
    """A serialised waymo.open_dataset.Scenario of the scene (ego = sdc track, index 0)."""
    out = b"".join(_double(1, float(t)) for t in sc.t_s)  # timestamps_seconds, unpacked as proto2 writes it
    tracks = [(ego_track_id, 1, sc.ego["x"], sc.ego["y"], sc.ego["speed"] * np.cos(sc.ego["heading"]),
               sc.ego["speed"] * np.sin(sc.ego["heading"]), sc.ego["heading"], np.ones(len(sc.t_s), bool), 4.8, 2.0)]
    a = sc.agents
    for i in range(a["x"].shape[0]):
        tracks.append((i + 1, _WAYMO_TYPE[int(a["cls"][i])], a["x"][i], a["y"][i], a["vx"][i], a["vy"][i],
                       a["heading"][i], a["valid"][i], a["length"][i], a["width"][i]))
    for tid, otype, x, y, vx, vy, h, valid, length, width in tracks:
        states = b""
        for j in range(len(sc.t_s)):
            if valid[j]:
                st = (_double(2, x[j]) + _double(3, y[j]) + _double(4, 0.5) + _float(5, length) + _float(6, width)
                      + _float(7, 1.6) + _float(8, h[j]) + _float(9, vx[j]) + _float(10, vy[j]) + _key(11, 0)
                      + _varint(1))
            else:  # the dataset's padding: -1 everywhere, valid false
                st = (_double(2, -1.0) + _double(3, -1.0) + _float(5, -1.0) + _float(6, -1.0) + _float(8, -1.0)
                      + _float(9, -1.0) + _float(10, -1.0) + _key(11, 0) + _varint(0))
            states += _len(3, st)
        out += _len(2, _key(1, 0) + _varint(tid) + _key(2, 0) + _varint(otype) + states)
    out += _len(5, scenario_id.encode()) + _key(6, 0) + _varint(0) + _key(10, 0) + _varint(10)
    out += _len(8, b"\x08\x01")  # a map feature (not declared by the importer): skipped
    return out


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around `data`."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def write_waymo(path: Path, scenes: list[tuple[str, Scene]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(tfrecord(waymo_scenario_bytes(sc, sid)) for sid, sc in scenes))
    return path


# --------------------------------------------------------------------------------------------------- Argoverse 2

_AV2_TYPE = {0: "unknown", 1: "vehicle", 2: "bus", 3: "motorcyclist", 4: "cyclist", 5: "pedestrian"}


def write_av2(root: Path, sc: Scene, scenario_id: str, start_ns: int = 1_650_000_000_000_000_000) -> Path:
    """`<root>/<id>/scenario_<id>.parquet` in the AV2 motion-forecasting layout (missing observations: no row)."""
    a = sc.agents
    n_t, n_a = len(sc.t_s), a["x"].shape[0]
    rows: dict[str, list] = {k: [] for k in ("observed", "track_id", "object_type", "object_category", "timestep",
                                             "position_x", "position_y", "heading", "velocity_x", "velocity_y")}

    def add(track, otype, cat, j, x, y, h, vx, vy):
        for k, v in zip(rows, (j < 50, track, otype, cat, j, x, y, h, vx, vy)):
            rows[k].append(v)

    for j in range(n_t):
        add("AV", "vehicle", 1, j, sc.ego["x"][j], sc.ego["y"][j], sc.ego["heading"][j],
            sc.ego["speed"][j] * np.cos(sc.ego["heading"][j]), sc.ego["speed"][j] * np.sin(sc.ego["heading"][j]))
        for i in range(n_a):
            if a["valid"][i, j]:
                add(str(1000 + i), _AV2_TYPE[int(a["cls"][i])], 2 if i else 3, j, a["x"][i, j], a["y"][i, j],
                    a["heading"][i, j], a["vx"][i, j], a["vy"][i, j])
    n = len(rows["timestep"])
    table = pa.table({**{k: rows[k] for k in ("observed", "track_id", "object_type")},
                      "object_category": pa.array(rows["object_category"], pa.int64()),
                      "timestep": pa.array(rows["timestep"], pa.int64()),
                      **{k: pa.array(rows[k], pa.float64()) for k in ("position_x", "position_y", "heading",
                                                                      "velocity_x", "velocity_y")},
                      "scenario_id": [scenario_id] * n, "start_timestamp": pa.array([start_ns] * n, pa.int64()),
                      "end_timestamp": pa.array([start_ns + (n_t - 1) * 100_000_000] * n, pa.int64()),
                      "num_timestamps": pa.array([n_t] * n, pa.int64()), "focal_track_id": ["1000"] * n,
                      "city": ["PIT"] * n})
    out = root / scenario_id / f"scenario_{scenario_id}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


# ------------------------------------------------------------------------------------------------------- nuPlan

NUPLAN_SCHEMA = """
CREATE TABLE log (token BLOB PRIMARY KEY, vehicle_name VARCHAR(64), date VARCHAR(64), timestamp INTEGER,
                  logfile VARCHAR(64), location VARCHAR(64), map_version VARCHAR(64));
CREATE TABLE ego_pose (token BLOB PRIMARY KEY, timestamp INTEGER, x REAL, y REAL, z REAL, qw REAL, qx REAL, qy REAL,
                       qz REAL, vx REAL, vy REAL, vz REAL, acceleration_x REAL, acceleration_y REAL,
                       acceleration_z REAL, angular_rate_x REAL, angular_rate_y REAL, angular_rate_z REAL,
                       epsg INTEGER, log_token BLOB);
CREATE TABLE lidar_pc (token BLOB PRIMARY KEY, next_token BLOB, prev_token BLOB, ego_pose_token BLOB,
                       lidar_token BLOB, scene_token BLOB, filename VARCHAR(128), timestamp INTEGER);
CREATE TABLE category (token BLOB PRIMARY KEY, name VARCHAR(64), description TEXT);
CREATE TABLE track (token BLOB PRIMARY KEY, category_token BLOB, width REAL, length REAL, height REAL);
CREATE TABLE lidar_box (token BLOB PRIMARY KEY, lidar_pc_token BLOB, track_token BLOB, next_token BLOB,
                        prev_token BLOB, x REAL, y REAL, z REAL, width REAL, length REAL, height REAL, vx REAL,
                        vy REAL, vz REAL, yaw REAL, confidence REAL);
"""
_NUPLAN_CATEGORY = {0: "generic_object", 1: "vehicle", 2: "vehicle", 3: "bicycle", 4: "bicycle", 5: "pedestrian"}


def _tok(*parts: object) -> bytes:
    return ("-".join(map(str, parts))).encode().ljust(8, b"\0")


def write_nuplan(path: Path, sc: Scene, logfile: str, start_us: int = 1_630_000_000_000_000,
                 ego_per_step: int = 5) -> Path:
    """A nuPlan log database: ego poses `ego_per_step` times per scene step (interpolated), one lidar sweep with
    its boxes per scene step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    con.executescript(NUPLAN_SCHEMA)
    con.execute("INSERT INTO log VALUES (?,?,?,?,?,?,?)", (_tok("log"), "nuplan-veh-3", "2021-08-26",
                                                            start_us, logfile, "us-nv-las-vegas", "v1"))
    dt = float(sc.t_s[1] - sc.t_s[0])
    fine = np.arange(len(sc.t_s) * ego_per_step - ego_per_step + 1) * dt / ego_per_step
    e = {k: np.interp(fine, sc.t_s, np.unwrap(v) if k == "heading" else v) for k, v in sc.ego.items()}
    con.executemany("INSERT INTO ego_pose VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
        (_tok("ego", i), start_us + int(round(t * 1e6)), e["x"][i], e["y"][i], 0.0, np.cos(e["heading"][i] / 2), 0.0,
         0.0, np.sin(e["heading"][i] / 2), e["speed"][i], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, e["yaw_rate"][i], 32611,
         _tok("log")) for i, t in enumerate(fine)])
    a = sc.agents
    con.executemany("INSERT INTO category VALUES (?,?,?)", [(_tok("cat", n), n, "") for n in
                                                             sorted(set(_NUPLAN_CATEGORY.values()))])
    con.executemany("INSERT INTO track VALUES (?,?,?,?,?)", [
        (_tok("track", i), _tok("cat", _NUPLAN_CATEGORY[int(a["cls"][i])]), a["width"][i], a["length"][i], 1.6)
        for i in range(a["x"].shape[0])])
    sweeps, boxes = [], []
    for j, t in enumerate(sc.t_s):
        sweeps.append((_tok("pc", j), None, None, _tok("ego", j * ego_per_step), None, None, f"pc{j}.pcd",
                       start_us + int(round(t * 1e6))))
        for i in np.flatnonzero(a["valid"][:, j]):
            boxes.append((_tok("box", i, j), _tok("pc", j), _tok("track", i), None, None, a["x"][i, j], a["y"][i, j],
                          0.5, a["width"][i], a["length"][i], 1.6, a["vx"][i, j], a["vy"][i, j], 0.0,
                          a["heading"][i, j], 0.9))
    con.executemany("INSERT INTO lidar_pc VALUES (?,?,?,?,?,?,?,?)", sweeps)
    con.executemany("INSERT INTO lidar_box VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", boxes)
    con.commit()
    con.close()
    return path
