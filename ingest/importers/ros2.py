"""ROS 2 MCAP logs with standard messages -> drives, decoded by `mcap-ros2-support` from the schemas in the file.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory

from ingest.importers.common import (AgentObs, EgoTrack, ImportFailed, ImportOptions, PlanObs, Progress, SourceDrive,
                                     safe_id)

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
    """The drive of one ROS 2 MCAP file (see the module docstring)."""
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
                if channel.topic == opts.odometry_topic:
                    if name != ODOMETRY:
                        raise ImportFailed(path, where, f"schema {name!r}, expected {ODOMETRY}")
                    p, tw = msg.pose.pose, msg.twist.twist
                    for k, v in zip(ego, (t, p.position.x, p.position.y, _yaw(p.orientation), tw.linear.x,
                                          tw.angular.z)):
                        ego[k].append(v)
                elif channel.topic == opts.objects_topic:
                    if name not in OBJECTS:
                        raise ImportFailed(path, where, f"schema {name!r}, expected one of {OBJECTS}")
                    _objects(msg, t, name == OBJECTS[1], ag)
                else:
                    if name != TRAJECTORY:
                        raise ImportFailed(path, where, f"schema {name!r}, expected {TRAJECTORY}")
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
    if not ego["t"]:
        raise ImportFailed(path, opts.odometry_topic, f"no {ODOMETRY} message on {opts.odometry_topic}")
    order = np.argsort(plan_t, kind="stable")
    plan = None
    if plan_t:
        off = np.asarray(plan_off)
        idx = np.concatenate([np.arange(off[i], off[i + 1]) for i in order]).astype(np.int64)
        lens = np.diff(off)[order]
        plan = PlanObs(np.asarray(plan_t, np.int64)[order], np.concatenate([[0], np.cumsum(lens)]),
                       np.asarray(plan_tfs)[idx], np.asarray(plan_x)[idx], np.asarray(plan_y)[idx])
    f = np.asarray
    yield SourceDrive(record=f"{Path(path).name}", drive_id=safe_id(Path(path).stem),
                      vehicle_id=opts.vehicle_id or "ros2",
                      ego=EgoTrack(f(ego["t"], np.int64), f(ego["x"]), f(ego["y"]), f(ego["h"]), f(ego["v"]),
                                   None, f(ego["w"])),
                      agents=AgentObs.from_lists(ag), plan=plan)


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
