import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_REJECTED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_REJECTED: JobState

class ScoreRule(_message.Message):
    __slots__ = ("min_score", "top_k", "pair", "road_types", "lightings", "weathers")
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    ROAD_TYPES_FIELD_NUMBER: _ClassVar[int]
    LIGHTINGS_FIELD_NUMBER: _ClassVar[int]
    WEATHERS_FIELD_NUMBER: _ClassVar[int]
    min_score: float
    top_k: int
    pair: str
    road_types: _containers.RepeatedScalarFieldContainer[str]
    lightings: _containers.RepeatedScalarFieldContainer[str]
    weathers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, min_score: _Optional[float] = ..., top_k: _Optional[int] = ..., pair: _Optional[str] = ..., road_types: _Optional[_Iterable[str]] = ..., lightings: _Optional[_Iterable[str]] = ..., weathers: _Optional[_Iterable[str]] = ...) -> None: ...

class TriggerRetrainRequest(_message.Message):
    __slots__ = ("student", "sql", "score_rule", "targets", "options_json", "request_id", "queue_behind")
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    SCORE_RULE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BEHIND_FIELD_NUMBER: _ClassVar[int]
    student: str
    sql: str
    score_rule: ScoreRule
    targets: _containers.RepeatedScalarFieldContainer[str]
    options_json: str
    request_id: str
    queue_behind: bool
    def __init__(self, student: _Optional[str] = ..., sql: _Optional[str] = ..., score_rule: _Optional[_Union[ScoreRule, _Mapping]] = ..., targets: _Optional[_Iterable[str]] = ..., options_json: _Optional[str] = ..., request_id: _Optional[str] = ..., queue_behind: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "student", "state", "sql", "score_rule", "targets", "options_json", "created_at", "started_at", "finished_at", "current_step", "steps_done", "attempts", "error", "result_path", "report_path", "work_dir", "cancel_requested", "request_id", "requested_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    SCORE_RULE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_PATH_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    WORK_DIR_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    student: str
    state: JobState
    sql: str
    score_rule: ScoreRule
    targets: _containers.RepeatedScalarFieldContainer[str]
    options_json: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    current_step: str
    steps_done: _containers.RepeatedScalarFieldContainer[str]
    attempts: int
    error: str
    result_path: str
    report_path: str
    work_dir: str
    cancel_requested: bool
    request_id: str
    requested_by: str
    def __init__(self, id: _Optional[str] = ..., student: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., sql: _Optional[str] = ..., score_rule: _Optional[_Union[ScoreRule, _Mapping]] = ..., targets: _Optional[_Iterable[str]] = ..., options_json: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., current_step: _Optional[str] = ..., steps_done: _Optional[_Iterable[str]] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., result_path: _Optional[str] = ..., report_path: _Optional[str] = ..., work_dir: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., request_id: _Optional[str] = ..., requested_by: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "student", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    student: str
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., student: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
