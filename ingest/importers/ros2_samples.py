"""ROS 2 MCAP files of a synthetic scene (`ingest.importers.samples.Scene`), written with `mcap-ros2-support` and the
published message definitions of nav_msgs/Odometry and Autoware's TrackedObjects, PredictedObjects and Trajectory
embedded, as `ros2 bag record` stores them: for the importer tests and `bench.importers`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from mcap_ros2.writer import Writer

from ingest.importers.samples import Scene

_SEP = "=" * 80
_DEPS = {
    "builtin_interfaces/Time": "int32 sec\nuint32 nanosec",
    "builtin_interfaces/Duration": "int32 sec\nuint32 nanosec",
    "std_msgs/Header": "builtin_interfaces/Time stamp\nstring frame_id",
    "geometry_msgs/Point": "float64 x\nfloat64 y\nfloat64 z",
    "geometry_msgs/Point32": "float32 x\nfloat32 y\nfloat32 z",
    "geometry_msgs/Quaternion": "float64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1",
    "geometry_msgs/Vector3": "float64 x\nfloat64 y\nfloat64 z",
    "geometry_msgs/Pose": "Point position\nQuaternion orientation",
    "geometry_msgs/PoseWithCovariance": "Pose pose\nfloat64[36] covariance",
    "geometry_msgs/Twist": "Vector3 linear\nVector3 angular",
    "geometry_msgs/TwistWithCovariance": "Twist twist\nfloat64[36] covariance",
    "geometry_msgs/Accel": "Vector3 linear\nVector3 angular",
    "geometry_msgs/AccelWithCovariance": "Accel accel\nfloat64[36] covariance",
    "geometry_msgs/Polygon": "Point32[] points",
    "unique_identifier_msgs/UUID": "uint8[16] uuid",
    "autoware_perception_msgs/ObjectClassification": (
        "uint8 UNKNOWN=0\nuint8 CAR=1\nuint8 TRUCK=2\nuint8 BUS=3\nuint8 TRAILER=4\nuint8 MOTORCYCLE=5\n"
        "uint8 BICYCLE=6\nuint8 PEDESTRIAN=7\nuint8 label\nfloat32 probability"),
    "autoware_perception_msgs/Shape": (
        "uint8 BOUNDING_BOX=0\nuint8 CYLINDER=1\nuint8 POLYGON=2\nuint8 type\ngeometry_msgs/Polygon footprint\n"
        "geometry_msgs/Vector3 dimensions"),
    "autoware_perception_msgs/TrackedObjectKinematics": (
        "uint8 UNAVAILABLE=0\nuint8 SIGN_UNKNOWN=1\nuint8 AVAILABLE=2\n"
        "geometry_msgs/PoseWithCovariance pose_with_covariance\nuint8 orientation_availability\n"
        "geometry_msgs/TwistWithCovariance twist_with_covariance\n"
        "geometry_msgs/AccelWithCovariance acceleration_with_covariance\nbool is_stationary"),
    "autoware_perception_msgs/TrackedObject": (
        "unique_identifier_msgs/UUID object_id\nfloat32 existence_probability\n"
        "ObjectClassification[] classification\nTrackedObjectKinematics kinematics\nShape shape"),
    "autoware_perception_msgs/PredictedPath": (
        "geometry_msgs/Pose[] path\nbuiltin_interfaces/Duration time_step\nfloat32 confidence"),
    "autoware_perception_msgs/PredictedObjectKinematics": (
        "geometry_msgs/PoseWithCovariance initial_pose_with_covariance\n"
        "geometry_msgs/TwistWithCovariance initial_twist_with_covariance\n"
        "geometry_msgs/AccelWithCovariance initial_acceleration_with_covariance\nPredictedPath[] predicted_paths"),
    "autoware_perception_msgs/PredictedObject": (
        "unique_identifier_msgs/UUID object_id\nfloat32 existence_probability\n"
        "ObjectClassification[] classification\nPredictedObjectKinematics kinematics\nShape shape"),
    "autoware_planning_msgs/TrajectoryPoint": (
        "builtin_interfaces/Duration time_from_start\ngeometry_msgs/Pose pose\nfloat32 longitudinal_velocity_mps\n"
        "float32 lateral_velocity_mps\nfloat32 acceleration_mps2\nfloat32 heading_rate_rps\n"
        "float32 front_wheel_angle_rad\nfloat32 rear_wheel_angle_rad"),
}
_MAIN = {
    "nav_msgs/msg/Odometry": ("std_msgs/Header header\nstring child_frame_id\n"
                              "geometry_msgs/PoseWithCovariance pose\ngeometry_msgs/TwistWithCovariance twist"),
    "autoware_perception_msgs/msg/TrackedObjects": "std_msgs/Header header\nTrackedObject[] objects",
    "autoware_perception_msgs/msg/PredictedObjects": "std_msgs/Header header\nPredictedObject[] objects",
    "autoware_planning_msgs/msg/Trajectory": "std_msgs/Header header\nTrajectoryPoint[] points",
}
_USES = {
    "nav_msgs/msg/Odometry": ["std_msgs/Header", "builtin_interfaces/Time", "geometry_msgs/PoseWithCovariance",
                              "geometry_msgs/Pose", "geometry_msgs/Point", "geometry_msgs/Quaternion",
                              "geometry_msgs/TwistWithCovariance", "geometry_msgs/Twist", "geometry_msgs/Vector3"],
    "autoware_perception_msgs/msg/TrackedObjects": [
        "std_msgs/Header", "builtin_interfaces/Time", "autoware_perception_msgs/TrackedObject",
        "unique_identifier_msgs/UUID", "autoware_perception_msgs/ObjectClassification",
        "autoware_perception_msgs/TrackedObjectKinematics", "geometry_msgs/PoseWithCovariance", "geometry_msgs/Pose",
        "geometry_msgs/Point", "geometry_msgs/Quaternion", "geometry_msgs/TwistWithCovariance", "geometry_msgs/Twist",
        "geometry_msgs/Vector3", "geometry_msgs/AccelWithCovariance", "geometry_msgs/Accel",
        "autoware_perception_msgs/Shape", "geometry_msgs/Polygon", "geometry_msgs/Point32"],
    "autoware_perception_msgs/msg/PredictedObjects": [
        "std_msgs/Header", "builtin_interfaces/Time", "autoware_perception_msgs/PredictedObject",
        "unique_identifier_msgs/UUID", "autoware_perception_msgs/ObjectClassification",
        "autoware_perception_msgs/PredictedObjectKinematics", "geometry_msgs/PoseWithCovariance",
        "geometry_msgs/Pose", "geometry_msgs/Point", "geometry_msgs/Quaternion",
        "geometry_msgs/TwistWithCovariance", "geometry_msgs/Twist", "geometry_msgs/Vector3",
        "geometry_msgs/AccelWithCovariance", "geometry_msgs/Accel", "autoware_perception_msgs/PredictedPath",
        "builtin_interfaces/Duration", "autoware_perception_msgs/Shape", "geometry_msgs/Polygon",
        "geometry_msgs/Point32"],
    "autoware_planning_msgs/msg/Trajectory": [
        "std_msgs/Header", "builtin_interfaces/Time", "autoware_planning_msgs/TrajectoryPoint",
        "builtin_interfaces/Duration", "geometry_msgs/Pose", "geometry_msgs/Point", "geometry_msgs/Quaternion"],
}
_LABEL = {0: 0, 1: 1, 2: 2, 3: 5, 4: 6, 5: 7}  # AgentClass -> ObjectClassification label


def msgdef(datatype: str) -> str:
    """The message definition text of a datatype with its dependencies, as rosbag2 embeds it."""
    parts = [_MAIN[datatype]] + [f"{_SEP}\nMSG: {dep}\n{_DEPS[dep]}" for dep in _USES[datatype]]
    return "\n".join(parts)


def _stamp(t_ns: int) -> dict:
    return {"sec": t_ns // 1_000_000_000, "nanosec": t_ns % 1_000_000_000}


def _quat(yaw: float) -> dict:
    return {"x": 0.0, "y": 0.0, "z": math.sin(yaw / 2), "w": math.cos(yaw / 2)}


def _vec(x: float = 0.0, y: float = 0.0, z: float = 0.0) -> dict:
    return {"x": float(x), "y": float(y), "z": float(z)}


def write_ros2(path: Path, sc: Scene, start_ns: int = 1_700_000_000_000_000_000, objects: str = "tracked",
               trajectory: bool = True, topics: dict[str, str] | None = None) -> Path:
    """A ROS 2 MCAP of the scene: Odometry, Tracked/PredictedObjects (`objects`) and, with `trajectory`, the ego's
    actual future as an Autoware Trajectory (8 s, 0.5 s apart) at every step."""
    from ingest.importers.common import ImportOptions

    d = ImportOptions()
    tp = {"odometry": d.odometry_topic, "objects": d.objects_topic, "trajectory": d.trajectory_topic, **(topics or {})}
    obj_type = {"tracked": "autoware_perception_msgs/msg/TrackedObjects",
                "predicted": "autoware_perception_msgs/msg/PredictedObjects"}[objects]
    zero36 = [0.0] * 36
    e, a = sc.ego, sc.agents
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        w = Writer(fh)
        odo = w.register_msgdef("nav_msgs/msg/Odometry", msgdef("nav_msgs/msg/Odometry"))
        obj = w.register_msgdef(obj_type, msgdef(obj_type))
        traj = w.register_msgdef("autoware_planning_msgs/msg/Trajectory",
                                 msgdef("autoware_planning_msgs/msg/Trajectory"))
        for j, t in enumerate(sc.t_s):
            t_ns = start_ns + int(round(t * 1e9))
            header = {"stamp": _stamp(t_ns), "frame_id": "map"}
            w.write_message(tp["odometry"], odo, {
                "header": header, "child_frame_id": "base_link",
                "pose": {"pose": {"position": _vec(e["x"][j], e["y"][j]), "orientation": _quat(e["heading"][j])},
                         "covariance": zero36},
                "twist": {"twist": {"linear": _vec(e["speed"][j]), "angular": _vec(z=e["yaw_rate"][j])},
                          "covariance": zero36}}, log_time=t_ns, publish_time=t_ns, sequence=j)
            objs = []
            for i in np.flatnonzero(a["valid"][:, j]):
                yaw = float(a["heading"][i, j])
                c, s = math.cos(yaw), math.sin(yaw)
                vx, vy = a["vx"][i, j], a["vy"][i, j]
                pose = {"pose": {"position": _vec(a["x"][i, j], a["y"][i, j]), "orientation": _quat(yaw)},
                        "covariance": zero36}
                twist = {"twist": {"linear": _vec(c * vx + s * vy, -s * vx + c * vy), "angular": _vec()},
                         "covariance": zero36}
                accel = {"accel": {"linear": _vec(), "angular": _vec()}, "covariance": zero36}
                kin = ({"pose_with_covariance": pose, "orientation_availability": 2, "twist_with_covariance": twist,
                        "acceleration_with_covariance": accel, "is_stationary": False} if objects == "tracked" else
                       {"initial_pose_with_covariance": pose, "initial_twist_with_covariance": twist,
                        "initial_acceleration_with_covariance": accel, "predicted_paths": []})
                objs.append({"object_id": {"uuid": list(int(1000 + i).to_bytes(16, "little"))},
                             "existence_probability": 0.0,
                             "classification": [{"label": _LABEL[int(a["cls"][i])], "probability": 0.8}],
                             "kinematics": kin,
                             "shape": {"type": 0, "footprint": {"points": []},
                                       "dimensions": _vec(a["length"][i], a["width"][i], 1.6)}})
            w.write_message(tp["objects"], obj, {"header": header, "objects": objs}, log_time=t_ns,
                            publish_time=t_ns, sequence=j)
            if trajectory:
                fut = np.arange(1, 17) * 0.5
                pts = []
                for k in fut:
                    tt = t + k
                    if tt > sc.t_s[-1]:
                        break
                    px, py = np.interp(tt, sc.t_s, e["x"]), np.interp(tt, sc.t_s, e["y"])
                    pts.append({"time_from_start": {"sec": int(k), "nanosec": int(round((k % 1) * 1e9))},
                                "pose": {"position": _vec(px, py), "orientation": _quat(0.0)},
                                "longitudinal_velocity_mps": 10.0, "lateral_velocity_mps": 0.0,
                                "acceleration_mps2": 0.0, "heading_rate_rps": 0.0, "front_wheel_angle_rad": 0.0,
                                "rear_wheel_angle_rad": 0.0})
                w.write_message(tp["trajectory"], traj, {"header": header, "points": pts}, log_time=t_ns,
                                publish_time=t_ns, sequence=j)
        w.finish()
    return path
