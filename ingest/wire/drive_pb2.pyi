from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SchemaVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEMA_VERSION_UNSPECIFIED: _ClassVar[SchemaVersion]
    SCHEMA_VERSION_1: _ClassVar[SchemaVersion]
    SCHEMA_VERSION_2: _ClassVar[SchemaVersion]

class AgentClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_CLASS_UNKNOWN: _ClassVar[AgentClass]
    AGENT_CLASS_CAR: _ClassVar[AgentClass]
    AGENT_CLASS_TRUCK: _ClassVar[AgentClass]
    AGENT_CLASS_MOTORCYCLE: _ClassVar[AgentClass]
    AGENT_CLASS_BICYCLE: _ClassVar[AgentClass]
    AGENT_CLASS_PEDESTRIAN: _ClassVar[AgentClass]

class Lighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIGHTING_UNKNOWN: _ClassVar[Lighting]
    LIGHTING_DAY: _ClassVar[Lighting]
    LIGHTING_NIGHT: _ClassVar[Lighting]
    LIGHTING_GLARE: _ClassVar[Lighting]
    LIGHTING_DUSK: _ClassVar[Lighting]

class Weather(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEATHER_UNKNOWN: _ClassVar[Weather]
    WEATHER_CLEAR: _ClassVar[Weather]
    WEATHER_RAIN: _ClassVar[Weather]
    WEATHER_FOG: _ClassVar[Weather]
    WEATHER_SNOW: _ClassVar[Weather]

class RoadType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROAD_TYPE_UNKNOWN: _ClassVar[RoadType]
    ROAD_TYPE_HIGHWAY: _ClassVar[RoadType]
    ROAD_TYPE_MERGE: _ClassVar[RoadType]
    ROAD_TYPE_ROUNDABOUT: _ClassVar[RoadType]
    ROAD_TYPE_INTERSECTION: _ClassVar[RoadType]
    ROAD_TYPE_URBAN: _ClassVar[RoadType]

class Maneuver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MANEUVER_UNKNOWN: _ClassVar[Maneuver]
    MANEUVER_KEEP_LANE: _ClassVar[Maneuver]
    MANEUVER_CHANGE_LEFT: _ClassVar[Maneuver]
    MANEUVER_CHANGE_RIGHT: _ClassVar[Maneuver]
    MANEUVER_ACCELERATE: _ClassVar[Maneuver]
    MANEUVER_DECELERATE: _ClassVar[Maneuver]
SCHEMA_VERSION_UNSPECIFIED: SchemaVersion
SCHEMA_VERSION_1: SchemaVersion
SCHEMA_VERSION_2: SchemaVersion
AGENT_CLASS_UNKNOWN: AgentClass
AGENT_CLASS_CAR: AgentClass
AGENT_CLASS_TRUCK: AgentClass
AGENT_CLASS_MOTORCYCLE: AgentClass
AGENT_CLASS_BICYCLE: AgentClass
AGENT_CLASS_PEDESTRIAN: AgentClass
LIGHTING_UNKNOWN: Lighting
LIGHTING_DAY: Lighting
LIGHTING_NIGHT: Lighting
LIGHTING_GLARE: Lighting
LIGHTING_DUSK: Lighting
WEATHER_UNKNOWN: Weather
WEATHER_CLEAR: Weather
WEATHER_RAIN: Weather
WEATHER_FOG: Weather
WEATHER_SNOW: Weather
ROAD_TYPE_UNKNOWN: RoadType
ROAD_TYPE_HIGHWAY: RoadType
ROAD_TYPE_MERGE: RoadType
ROAD_TYPE_ROUNDABOUT: RoadType
ROAD_TYPE_INTERSECTION: RoadType
ROAD_TYPE_URBAN: RoadType
MANEUVER_UNKNOWN: Maneuver
MANEUVER_KEEP_LANE: Maneuver
MANEUVER_CHANGE_LEFT: Maneuver
MANEUVER_CHANGE_RIGHT: Maneuver
MANEUVER_ACCELERATE: Maneuver
MANEUVER_DECELERATE: Maneuver

class FrameBlock(_message.Message):
    __slots__ = ("num_frames", "timestamp_ns", "ego_x", "ego_y", "ego_heading", "ego_speed", "ego_accel", "ego_yaw_rate", "ego_lane", "agent_count", "agent_id", "agent_class", "agent_x", "agent_y", "agent_vx", "agent_vy", "agent_heading", "agent_length", "agent_width", "agent_confidence", "lane_count", "lane_width", "lane_offset", "lane_heading", "lane_curvature", "speed_limit", "lighting", "weather", "road_type", "tag_count", "tag", "plan_dt_s", "plan_count", "plan_x", "plan_y", "maneuver", "control_steer", "control_accel", "decision_model", "decision_model_version")
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    EGO_X_FIELD_NUMBER: _ClassVar[int]
    EGO_Y_FIELD_NUMBER: _ClassVar[int]
    EGO_HEADING_FIELD_NUMBER: _ClassVar[int]
    EGO_SPEED_FIELD_NUMBER: _ClassVar[int]
    EGO_ACCEL_FIELD_NUMBER: _ClassVar[int]
    EGO_YAW_RATE_FIELD_NUMBER: _ClassVar[int]
    EGO_LANE_FIELD_NUMBER: _ClassVar[int]
    AGENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_CLASS_FIELD_NUMBER: _ClassVar[int]
    AGENT_X_FIELD_NUMBER: _ClassVar[int]
    AGENT_Y_FIELD_NUMBER: _ClassVar[int]
    AGENT_VX_FIELD_NUMBER: _ClassVar[int]
    AGENT_VY_FIELD_NUMBER: _ClassVar[int]
    AGENT_HEADING_FIELD_NUMBER: _ClassVar[int]
    AGENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    AGENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    AGENT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LANE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LANE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LANE_HEADING_FIELD_NUMBER: _ClassVar[int]
    LANE_CURVATURE_FIELD_NUMBER: _ClassVar[int]
    SPEED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIGHTING_FIELD_NUMBER: _ClassVar[int]
    WEATHER_FIELD_NUMBER: _ClassVar[int]
    ROAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAG_COUNT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PLAN_DT_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PLAN_X_FIELD_NUMBER: _ClassVar[int]
    PLAN_Y_FIELD_NUMBER: _ClassVar[int]
    MANEUVER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_STEER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ACCEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_frames: int
    timestamp_ns: _containers.RepeatedScalarFieldContainer[int]
    ego_x: _containers.RepeatedScalarFieldContainer[float]
    ego_y: _containers.RepeatedScalarFieldContainer[float]
    ego_heading: _containers.RepeatedScalarFieldContainer[float]
    ego_speed: _containers.RepeatedScalarFieldContainer[float]
    ego_accel: _containers.RepeatedScalarFieldContainer[float]
    ego_yaw_rate: _containers.RepeatedScalarFieldContainer[float]
    ego_lane: _containers.RepeatedScalarFieldContainer[int]
    agent_count: _containers.RepeatedScalarFieldContainer[int]
    agent_id: _containers.RepeatedScalarFieldContainer[int]
    agent_class: _containers.RepeatedScalarFieldContainer[AgentClass]
    agent_x: _containers.RepeatedScalarFieldContainer[float]
    agent_y: _containers.RepeatedScalarFieldContainer[float]
    agent_vx: _containers.RepeatedScalarFieldContainer[float]
    agent_vy: _containers.RepeatedScalarFieldContainer[float]
    agent_heading: _containers.RepeatedScalarFieldContainer[float]
    agent_length: _containers.RepeatedScalarFieldContainer[float]
    agent_width: _containers.RepeatedScalarFieldContainer[float]
    agent_confidence: _containers.RepeatedScalarFieldContainer[float]
    lane_count: _containers.RepeatedScalarFieldContainer[int]
    lane_width: _containers.RepeatedScalarFieldContainer[float]
    lane_offset: _containers.RepeatedScalarFieldContainer[float]
    lane_heading: _containers.RepeatedScalarFieldContainer[float]
    lane_curvature: _containers.RepeatedScalarFieldContainer[float]
    speed_limit: _containers.RepeatedScalarFieldContainer[float]
    lighting: _containers.RepeatedScalarFieldContainer[Lighting]
    weather: _containers.RepeatedScalarFieldContainer[Weather]
    road_type: _containers.RepeatedScalarFieldContainer[RoadType]
    tag_count: _containers.RepeatedScalarFieldContainer[int]
    tag: _containers.RepeatedScalarFieldContainer[str]
    plan_dt_s: float
    plan_count: _containers.RepeatedScalarFieldContainer[int]
    plan_x: _containers.RepeatedScalarFieldContainer[float]
    plan_y: _containers.RepeatedScalarFieldContainer[float]
    maneuver: _containers.RepeatedScalarFieldContainer[Maneuver]
    control_steer: _containers.RepeatedScalarFieldContainer[float]
    control_accel: _containers.RepeatedScalarFieldContainer[float]
    decision_model: _containers.RepeatedScalarFieldContainer[str]
    decision_model_version: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_frames: _Optional[int] = ..., timestamp_ns: _Optional[_Iterable[int]] = ..., ego_x: _Optional[_Iterable[float]] = ..., ego_y: _Optional[_Iterable[float]] = ..., ego_heading: _Optional[_Iterable[float]] = ..., ego_speed: _Optional[_Iterable[float]] = ..., ego_accel: _Optional[_Iterable[float]] = ..., ego_yaw_rate: _Optional[_Iterable[float]] = ..., ego_lane: _Optional[_Iterable[int]] = ..., agent_count: _Optional[_Iterable[int]] = ..., agent_id: _Optional[_Iterable[int]] = ..., agent_class: _Optional[_Iterable[_Union[AgentClass, str]]] = ..., agent_x: _Optional[_Iterable[float]] = ..., agent_y: _Optional[_Iterable[float]] = ..., agent_vx: _Optional[_Iterable[float]] = ..., agent_vy: _Optional[_Iterable[float]] = ..., agent_heading: _Optional[_Iterable[float]] = ..., agent_length: _Optional[_Iterable[float]] = ..., agent_width: _Optional[_Iterable[float]] = ..., agent_confidence: _Optional[_Iterable[float]] = ..., lane_count: _Optional[_Iterable[int]] = ..., lane_width: _Optional[_Iterable[float]] = ..., lane_offset: _Optional[_Iterable[float]] = ..., lane_heading: _Optional[_Iterable[float]] = ..., lane_curvature: _Optional[_Iterable[float]] = ..., speed_limit: _Optional[_Iterable[float]] = ..., lighting: _Optional[_Iterable[_Union[Lighting, str]]] = ..., weather: _Optional[_Iterable[_Union[Weather, str]]] = ..., road_type: _Optional[_Iterable[_Union[RoadType, str]]] = ..., tag_count: _Optional[_Iterable[int]] = ..., tag: _Optional[_Iterable[str]] = ..., plan_dt_s: _Optional[float] = ..., plan_count: _Optional[_Iterable[int]] = ..., plan_x: _Optional[_Iterable[float]] = ..., plan_y: _Optional[_Iterable[float]] = ..., maneuver: _Optional[_Iterable[_Union[Maneuver, str]]] = ..., control_steer: _Optional[_Iterable[float]] = ..., control_accel: _Optional[_Iterable[float]] = ..., decision_model: _Optional[_Iterable[str]] = ..., decision_model_version: _Optional[_Iterable[str]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("drive_id", "vehicle_id", "seq", "timestamp_ns", "ego_x", "ego_y", "ego_heading", "ego_speed", "ego_accel", "ego_yaw_rate", "ego_lane", "agents", "lane_count", "lane_width", "lane_offset", "lane_heading", "lane_curvature", "speed_limit", "lighting", "weather", "road_type", "tags", "plan_dt_s", "plan_x", "plan_y", "maneuver", "control_steer", "control_accel", "decision_model", "decision_model_version")
    class Agent(_message.Message):
        __slots__ = ("id", "agent_class", "x", "y", "vx", "vy", "heading", "length", "width", "confidence")
        ID_FIELD_NUMBER: _ClassVar[int]
        AGENT_CLASS_FIELD_NUMBER: _ClassVar[int]
        X_FIELD_NUMBER: _ClassVar[int]
        Y_FIELD_NUMBER: _ClassVar[int]
        VX_FIELD_NUMBER: _ClassVar[int]
        VY_FIELD_NUMBER: _ClassVar[int]
        HEADING_FIELD_NUMBER: _ClassVar[int]
        LENGTH_FIELD_NUMBER: _ClassVar[int]
        WIDTH_FIELD_NUMBER: _ClassVar[int]
        CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
        id: int
        agent_class: AgentClass
        x: float
        y: float
        vx: float
        vy: float
        heading: float
        length: float
        width: float
        confidence: float
        def __init__(self, id: _Optional[int] = ..., agent_class: _Optional[_Union[AgentClass, str]] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., vx: _Optional[float] = ..., vy: _Optional[float] = ..., heading: _Optional[float] = ..., length: _Optional[float] = ..., width: _Optional[float] = ..., confidence: _Optional[float] = ...) -> None: ...
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    EGO_X_FIELD_NUMBER: _ClassVar[int]
    EGO_Y_FIELD_NUMBER: _ClassVar[int]
    EGO_HEADING_FIELD_NUMBER: _ClassVar[int]
    EGO_SPEED_FIELD_NUMBER: _ClassVar[int]
    EGO_ACCEL_FIELD_NUMBER: _ClassVar[int]
    EGO_YAW_RATE_FIELD_NUMBER: _ClassVar[int]
    EGO_LANE_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    LANE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LANE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LANE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LANE_HEADING_FIELD_NUMBER: _ClassVar[int]
    LANE_CURVATURE_FIELD_NUMBER: _ClassVar[int]
    SPEED_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIGHTING_FIELD_NUMBER: _ClassVar[int]
    WEATHER_FIELD_NUMBER: _ClassVar[int]
    ROAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PLAN_DT_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_X_FIELD_NUMBER: _ClassVar[int]
    PLAN_Y_FIELD_NUMBER: _ClassVar[int]
    MANEUVER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_STEER_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ACCEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    vehicle_id: str
    seq: int
    timestamp_ns: int
    ego_x: float
    ego_y: float
    ego_heading: float
    ego_speed: float
    ego_accel: float
    ego_yaw_rate: float
    ego_lane: int
    agents: _containers.RepeatedCompositeFieldContainer[Frame.Agent]
    lane_count: int
    lane_width: float
    lane_offset: float
    lane_heading: float
    lane_curvature: float
    speed_limit: float
    lighting: Lighting
    weather: Weather
    road_type: RoadType
    tags: _containers.RepeatedScalarFieldContainer[str]
    plan_dt_s: float
    plan_x: _containers.RepeatedScalarFieldContainer[float]
    plan_y: _containers.RepeatedScalarFieldContainer[float]
    maneuver: Maneuver
    control_steer: float
    control_accel: float
    decision_model: str
    decision_model_version: str
    def __init__(self, drive_id: _Optional[str] = ..., vehicle_id: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., ego_x: _Optional[float] = ..., ego_y: _Optional[float] = ..., ego_heading: _Optional[float] = ..., ego_speed: _Optional[float] = ..., ego_accel: _Optional[float] = ..., ego_yaw_rate: _Optional[float] = ..., ego_lane: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[Frame.Agent, _Mapping]]] = ..., lane_count: _Optional[int] = ..., lane_width: _Optional[float] = ..., lane_offset: _Optional[float] = ..., lane_heading: _Optional[float] = ..., lane_curvature: _Optional[float] = ..., speed_limit: _Optional[float] = ..., lighting: _Optional[_Union[Lighting, str]] = ..., weather: _Optional[_Union[Weather, str]] = ..., road_type: _Optional[_Union[RoadType, str]] = ..., tags: _Optional[_Iterable[str]] = ..., plan_dt_s: _Optional[float] = ..., plan_x: _Optional[_Iterable[float]] = ..., plan_y: _Optional[_Iterable[float]] = ..., maneuver: _Optional[_Union[Maneuver, str]] = ..., control_steer: _Optional[float] = ..., control_accel: _Optional[float] = ..., decision_model: _Optional[str] = ..., decision_model_version: _Optional[str] = ...) -> None: ...

class DriveChunk(_message.Message):
    __slots__ = ("schema_version", "drive_id", "vehicle_id", "first_seq", "frames", "crc32c", "final")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    schema_version: SchemaVersion
    drive_id: str
    vehicle_id: str
    first_seq: int
    frames: bytes
    crc32c: int
    final: bool
    def __init__(self, schema_version: _Optional[_Union[SchemaVersion, str]] = ..., drive_id: _Optional[str] = ..., vehicle_id: _Optional[str] = ..., first_seq: _Optional[int] = ..., frames: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("drive_id", "committed_seq", "drive_complete")
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    DRIVE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    committed_seq: int
    drive_complete: bool
    def __init__(self, drive_id: _Optional[str] = ..., committed_seq: _Optional[int] = ..., drive_complete: _Optional[bool] = ...) -> None: ...

class DriveStatusRequest(_message.Message):
    __slots__ = ("drive_id", "vehicle_id")
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    vehicle_id: str
    def __init__(self, drive_id: _Optional[str] = ..., vehicle_id: _Optional[str] = ...) -> None: ...

class DriveStatus(_message.Message):
    __slots__ = ("drive_id", "committed_seq", "drive_complete")
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    DRIVE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    committed_seq: int
    drive_complete: bool
    def __init__(self, drive_id: _Optional[str] = ..., committed_seq: _Optional[int] = ..., drive_complete: _Optional[bool] = ...) -> None: ...
