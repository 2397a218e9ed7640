"""ROS 2 MCAP logs with standard messages -> drives, decoded from the schemas in the file (see Decoding below).

One MCAP file is one drive (drive id from the file name). Topics (`ImportOptions`):

- `odometry_topic`, `nav_msgs/msg/Odometry`: the ego. Position and yaw from `pose.pose` (the map frame), speed
  and yaw rate from `twist.twist` (the body frame, as REP 105 and Autoware publish it): linear.x, angular.z;
- `objects_topic`, `autoware_perception_msgs/msg/TrackedObjects` or `PredictedObjects`: the agents. Id from the
  object's UUID, class from its most probable classification, pose from `kinematics.pose_with_covariance` (or
  `initial_pose_with_covariance`), velocity from the twist, given in the object's frame and rotated into the map
  frame, length and width from `shape.dimensions`, confidence from `existence_probability` (the best
  classification probability where that is 0, as many stacks leave it);
- `trajectory_topic`, `autoware_planning_msgs/msg/Trajectory`, when the log has it: the on-board plan, its
  points' `time_from_start` and map positions.

Times are the messages' `header.stamp` (the log time where a stamp is zero). Other topics are ignored.

Decoding: the file's records are walked by `ingest.importers.mcap_scan` (CRCs checked) and each topic's messages
decoded all at once by `ingest.importers.cdr`, from the schema embedded in the file, read by mcap-ros2-support's
own msg parser (30x faster than message by message: mcap-ros2-support takes about 2 ms per TrackedObjects message
of 30 objects). A schema or message that decoder does not take (a field of another type than the published
definitions, wstring, big-endian CDR) is decoded message by message with mcap-ros2-support instead, and the log
says so (`read_reference`, the same results; tests/ingest/test_cdr.py holds the two to each other).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory

from ingest.importers.cdr import CdrError, Decoded, Program, Unsupported, decode
from ingest.importers.common import (AgentObs, EgoTrack, ImportFailed, ImportOptions, PlanObs, Progress, SourceDrive,
                                     group_rows, safe_id)
from ingest.importers.mcap_scan import scan

log = logging.getLogger(__name__)

ODOMETRY = "nav_msgs/msg/Odometry"
OBJECTS = ("autoware_perception_msgs/msg/TrackedObjects", "autoware_perception_msgs/msg/PredictedObjects")
TRAJECTORY = "autoware_planning_msgs/msg/Trajectory"
# autoware_perception_msgs/msg/ObjectClassification labels -> AgentClass codes
# (UNKNOWN, CAR, TRUCK, BUS, TRAILER, MOTORCYCLE, BICYCLE, PEDESTRIAN) -> (unknown, car, truck, motorcycle, ...)
LABEL_TO_CLASS = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 4, 7: 5}


def _yaw(q) -> float:
    return math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))


def _stamp(msg, log_time: int) -> int:
    s = msg.header.stamp
    t = int(s.sec) * 1_000_000_000 + int(s.nanosec)
    return t if t else int(log_time)


def _uuid(u) -> int:
    return int.from_bytes(bytes(bytearray(u.uuid))[:8], "little") & (2**63 - 1)


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """The drive of one ROS 2 MCAP file (see the module docstring): decoded column-wise (`ingest.importers.cdr`)
    where the file allows it, else message by message with mcap-ros2-support (the reference decoder)."""
    try:
        ego, agents, plan = read_columnar(path, opts, progress)
    except Unsupported as exc:
        log.info("%s: decoded by mcap-ros2-support, message by message (%s)", path, exc)
        ego, agents, plan = read_reference(path, opts, progress)
    if not ego["t"].size:
        raise ImportFailed(path, opts.odometry_topic, f"no {ODOMETRY} message on {opts.odometry_topic}")
    plan_obs = None
    if plan[0].size:
        plan_t, off, tfs, px, py = plan
        order = np.argsort(plan_t, kind="stable")
        lens = np.diff(off)[order]
        idx = group_rows(off, order)
        plan_obs = PlanObs(plan_t[order], np.concatenate([[0], np.cumsum(lens)]), tfs[idx], px[idx], py[idx])
    yield SourceDrive(record=f"{Path(path).name}", drive_id=safe_id(Path(path).stem),
                      vehicle_id=opts.vehicle_id or "ros2",
                      ego=EgoTrack(ego["t"], ego["x"], ego["y"], ego["h"], ego["v"], None, ego["w"]), agents=agents,
                      plan=plan_obs)


def read_reference(path: Path, opts: ImportOptions, progress: Progress | None) -> tuple[dict, AgentObs, tuple]:
    """Ego columns, agent observations and plans (t, offsets, tfs, x, y) decoded by mcap-ros2-support."""
    ego = {k: [] for k in ("t", "x", "y", "h", "v", "w")}
    ag = {k: [] for k in ("t_ns", "id", "cls", "x", "y", "vx", "vy", "heading", "length", "width", "conf")}
    plan_t, plan_off, plan_tfs, plan_x, plan_y = [], [0], [], [], []
    topics = [opts.odometry_topic, opts.objects_topic, opts.trajectory_topic]
    where = "the file header"
    with open(path, "rb") as fh:
        try:
            reader = make_reader(fh, validate_crcs=True, decoder_factories=[DecoderFactory()])
            for count, (schema, channel, message, msg) in enumerate(
                    reader.iter_decoded_messages(topics=topics, log_time_order=False)):
                where = f"message {count} on {channel.topic} at log time {message.log_time}"
                name = schema.name if schema is not None else ""
                t = _stamp(msg, message.log_time)
                _check_schema(path, where, channel.topic, name, opts)
                if channel.topic == opts.odometry_topic:
                    p, tw = msg.pose.pose, msg.twist.twist
                    for k, v in zip(ego, (t, p.position.x, p.position.y, _yaw(p.orientation), tw.linear.x,
                                          tw.angular.z)):
                        ego[k].append(v)
                elif channel.topic == opts.objects_topic:
                    _objects(msg, t, name == OBJECTS[1], ag)
                else:
                    plan_t.append(t)
                    for pt in msg.points:
                        plan_tfs.append(pt.time_from_start.sec + pt.time_from_start.nanosec * 1e-9)
                        plan_x.append(pt.pose.position.x)
                        plan_y.append(pt.pose.position.y)
                    plan_off.append(len(plan_tfs))
                if progress is not None and count % 1024 == 0:
                    progress(fh.tell())
        except ImportFailed:
            raise
        except (McapError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError, OSError) as exc:
            raise ImportFailed(path, f"after {where}", f"unreadable MCAP or ROS 2 message "
                               f"({type(exc).__name__}: {exc})") from None
    f = np.asarray
    return ({"t": f(ego["t"], np.int64), **{k: f(ego[k], np.float64) for k in ("x", "y", "h", "v", "w")}},
            AgentObs.from_lists(ag), (f(plan_t, np.int64), f(plan_off, np.int64), f(plan_tfs, np.float64),
                                      f(plan_x, np.float64), f(plan_y, np.float64)))


def _check_schema(path: Path, where: str, topic: str, name: str, opts: ImportOptions) -> None:
    if topic == opts.odometry_topic and name != ODOMETRY:
        raise ImportFailed(path, where, f"schema {name!r}, expected {ODOMETRY}")
    if topic == opts.objects_topic and name not in OBJECTS:
        raise ImportFailed(path, where, f"schema {name!r}, expected one of {OBJECTS}")
    if topic == opts.trajectory_topic and name != TRAJECTORY:
        raise ImportFailed(path, where, f"schema {name!r}, expected {TRAJECTORY}")


def _objects(msg, t: int, predicted: bool, ag: dict[str, list]) -> None:
    for o in msg.objects:
        k = o.kinematics
        pose = (k.initial_pose_with_covariance if predicted else k.pose_with_covariance).pose
        tw = (k.initial_twist_with_covariance if predicted else k.twist_with_covariance).twist
        yaw = _yaw(pose.orientation)
        c, s = math.cos(yaw), math.sin(yaw)
        best = max(o.classification, key=lambda cl: cl.probability, default=None)
        conf = o.existence_probability or (best.probability if best is not None else 0.0)
        dims = o.shape.dimensions
        for key, v in (("t_ns", t), ("id", _uuid(o.object_id)),
                       ("cls", LABEL_TO_CLASS.get(int(best.label), 0) if best is not None else 0),
                       ("x", pose.position.x), ("y", pose.position.y),
                       ("vx", c * tw.linear.x - s * tw.linear.y), ("vy", s * tw.linear.x + c * tw.linear.y),
                       ("heading", yaw), ("length", dims.x), ("width", dims.y), ("conf", min(max(conf, 0.0), 1.0))):
            ag[key].append(v)


# ------------------------------------------------------------------------------------------- column-wise decoding

_POSE = {False: "objects[].kinematics.pose_with_covariance.pose.",
         True: "objects[].kinematics.initial_pose_with_covariance.pose."}
_TWIST = {False: "objects[].kinematics.twist_with_covariance.twist.linear.",
          True: "objects[].kinematics.initial_twist_with_covariance.twist.linear."}
_STAMP = ("header.stamp.sec", "header.stamp.nanosec")
_QUAT = ("orientation.x", "orientation.y", "orientation.z", "orientation.w")
_CLASS = ("objects[].classification[].label", "objects[].classification[].probability")
WANT = {
    "odometry": {*_STAMP, "pose.pose.position.x", "pose.pose.position.y", *(f"pose.pose.{q}" for q in _QUAT),
                 "twist.twist.linear.x", "twist.twist.angular.z"},
    "trajectory": {*_STAMP, "points[].time_from_start.sec", "points[].time_from_start.nanosec",
                   "points[].pose.position.x", "points[].pose.position.y"},
    **{("objects", p): {*_STAMP, "objects[].object_id.uuid", "objects[].existence_probability", *_CLASS,
                        _POSE[p] + "position.x", _POSE[p] + "position.y", *(_POSE[p] + q for q in _QUAT),
                        _TWIST[p] + "x", _TWIST[p] + "y", "objects[].shape.dimensions.x",
                        "objects[].shape.dimensions.y"} for p in (False, True)},
}
_LABELS = np.zeros(256, np.int32)
_LABELS[list(LABEL_TO_CLASS)] = list(LABEL_TO_CLASS.values())
_atan2 = np.frompyfunc(math.atan2, 2, 1)  # math's, as the reference path: numpy's SIMD arctan2 differs by an ulp


def _yaws(x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`_yaw` of quaternions given as float64 arrays, the same operations in the same order."""
    a = 2.0 * (w * z + x * y)
    b = 1.0 - 2.0 * (y * y + z * z)
    return _atan2(a, b).astype(np.float64) if a.size else np.zeros(0)


def _stamps(dec: Decoded, log_time: np.ndarray) -> np.ndarray:
    sec, nsec = dec.col(_STAMP[0]), dec.col(_STAMP[1])
    if sec.dtype.kind not in "iu" or nsec.dtype.kind not in "iu":
        raise Unsupported("header.stamp is not integer")
    t = sec.astype(np.int64) * 1_000_000_000 + nsec.astype(np.int64)
    return np.where(t != 0, t, log_time)


def _f(dec: Decoded, path: str) -> np.ndarray:
    a = dec.col(path)
    if a.ndim != 1 or a.dtype.kind not in "fiu":
        raise Unsupported(f"field {path} is not a number")
    return a.astype(np.float64)


def _columns_objects(dec: Decoded, t: np.ndarray, predicted: bool) -> AgentObs:
    """`_objects` of every message at once."""
    pose, tw = _POSE[predicted], _TWIST[predicted]
    uuid = dec.col("objects[].object_id.uuid")
    if uuid.dtype != np.uint8 or uuid.ndim != 2 or uuid.shape[1] < 8:
        raise Unsupported("object_id.uuid is not uint8[16]")
    ids = (np.ascontiguousarray(uuid[:, :8]).view("<u8")[:, 0] & np.uint64(2**63 - 1)).astype(np.int64)
    yaw = _yaws(*(_f(dec, pose + q) for q in _QUAT))
    c, s = np.cos(yaw), np.sin(yaw)
    lx, ly = _f(dec, tw + "x"), _f(dec, tw + "y")
    # the most probable classification, the first of equals (Python's max): a scan over the classifications
    n_cls = dec.counts("objects[].classification")
    label, prob = dec.col(_CLASS[0]), _f(dec, _CLASS[1])
    if label.dtype.kind not in "iu":
        raise Unsupported("classification label is not an integer")
    first = np.cumsum(n_cls) - n_cls
    has = n_cls > 0
    best = np.where(has, first, 0)
    best_p = np.where(has, prob[np.minimum(first, max(prob.size - 1, 0))] if prob.size else 0.0, 0.0)
    for k in range(1, int(n_cls.max()) if n_cls.size else 0):
        more = np.flatnonzero(n_cls > k)
        better = prob[first[more] + k] > best_p[more]
        best[more[better]] = first[more[better]] + k
        best_p[more[better]] = prob[first[more[better]] + k]
    lab = label[best].astype(np.int64) if label.size else np.zeros(has.shape[0], np.int64)
    cls = np.where(has & (lab >= 0) & (lab < 256), _LABELS[np.clip(lab, 0, 255)], 0).astype(np.int32)
    exist = _f(dec, "objects[].existence_probability")
    conf = np.where(exist != 0, exist, np.where(has, best_p, 0.0))
    t_obj = np.repeat(t, dec.counts("objects"))
    return AgentObs(t_obj, ids, cls, _f(dec, pose + "position.x"), _f(dec, pose + "position.y"), c * lx - s * ly,
                    s * lx + c * ly, yaw, _f(dec, "objects[].shape.dimensions.x"),
                    _f(dec, "objects[].shape.dimensions.y"), np.clip(conf, 0.0, 1.0))


def read_columnar(path: Path, opts: ImportOptions, progress: Progress | None) -> tuple[dict, AgentObs, tuple]:
    """What `read_reference` returns, decoded column-wise; Unsupported where the file needs the reference."""
    kinds = {opts.trajectory_topic: "trajectory", opts.objects_topic: "objects", opts.odometry_topic: "odometry"}
    schemas: dict = {}
    channels: dict = {}
    ego: list[dict] = []
    agents: list[AgentObs] = []
    plans: list[tuple] = []
    seen = [0]
    with open(path, "rb") as fh:
        try:
            for b in scan(fh, lambda ch, _: ch.topic in kinds, schemas, channels, progress, seen=seen):
                ids = np.unique(b.channel_id)
                firsts = [int(np.argmax(b.channel_id == cid)) for cid in ids]
                for cid, i in sorted(zip(ids.tolist(), firsts), key=lambda p: p[1]):
                    ch = channels[cid]
                    schema = schemas.get(ch.schema_id)
                    name = schema.name if schema is not None else ""
                    _check_schema(path, f"message {b.index[i]} on {ch.topic} at log time {b.log_time[i]}",
                                  ch.topic, name, opts)
                    if ch.message_encoding != "cdr" or schema.encoding != "ros2msg":
                        raise Unsupported(f"{ch.topic}: {ch.message_encoding} messages, {schema.encoding} schema")
                for cid in ids.tolist():
                    sel = np.flatnonzero(b.channel_id == cid)
                    ch, kind = channels[cid], kinds[channels[cid].topic]
                    schema = schemas[ch.schema_id]
                    predicted = schema.name == OBJECTS[1]
                    try:
                        dec = decode(Program.of(schema.name, schema.data.decode()), b.buf, b.starts[sel],
                                     b.ends[sel], WANT[(kind, predicted) if kind == "objects" else kind])
                    except CdrError as exc:
                        i = sel[exc.index]
                        raise ImportFailed(path, f"message {b.index[i]} on {ch.topic} at log time {b.log_time[i]}",
                                           f"unreadable MCAP or ROS 2 message (CdrError: {exc.detail})") from None
                    t = _stamps(dec, b.log_time[sel])
                    order = b.index[sel]
                    if kind == "odometry":
                        ego.append({"o": order, "t": t, "x": _f(dec, "pose.pose.position.x"),
                                    "y": _f(dec, "pose.pose.position.y"),
                                    "h": _yaws(*(_f(dec, f"pose.pose.{q}") for q in _QUAT)),
                                    "v": _f(dec, "twist.twist.linear.x"), "w": _f(dec, "twist.twist.angular.z")})
                    elif kind == "objects":
                        agents.append((np.repeat(order, dec.counts("objects")), _columns_objects(dec, t, predicted)))
                    else:
                        tfs = (_f(dec, "points[].time_from_start.sec")
                               + _f(dec, "points[].time_from_start.nanosec") * 1e-9)
                        plans.append((t, dec.counts("points"), tfs, _f(dec, "points[].pose.position.x"),
                                      _f(dec, "points[].pose.position.y"), order))
        except (ImportFailed, Unsupported):
            raise
        except (McapError, EOFError, ValueError, KeyError, OSError, struct.error) as exc:
            raise ImportFailed(path, f"after message {seen[0]} of the chosen topics", f"unreadable MCAP or ROS 2 "
                               f"message ({type(exc).__name__}: {exc})") from None
    # parts come per channel and batch: back into file order (stable), as the reference path appends them
    cat = (lambda parts, k, dt=np.float64: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, dt))
    o = np.argsort(cat(ego, "o", np.int64), kind="stable")
    ego_cols = {"t": cat(ego, "t", np.int64)[o], **{k: cat(ego, k)[o] for k in ("x", "y", "h", "v", "w")}}
    ag = AgentObs.empty()
    if agents:
        o = np.argsort(np.concatenate([a[0] for a in agents]), kind="stable")
        ag = AgentObs(*(np.concatenate([getattr(a[1], f.name) for a in agents])[o] for f in fields(AgentObs)))
    counts = cat(plans, 1, np.int64)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    o = np.argsort(cat(plans, 5, np.int64), kind="stable")
    idx = group_rows(off, o)
    plan = (cat(plans, 0, np.int64)[o], np.concatenate([[0], np.cumsum(counts[o])]).astype(np.int64),
            cat(plans, 2)[idx], cat(plans, 3)[idx], cat(plans, 4)[idx])
    return ego_cols, ag, plan
