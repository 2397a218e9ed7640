"""The job service's data: job states, the specification and record of a job, the configurations of the job store,
its runners and the control service, and the store's refusals. Light on purpose (pydantic only): the umbrella
settings import it.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED})
ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)

class JobsConfig(BaseModel):
    """Where jobs are kept and how runners take them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    db_path: Path = Field(Path("data/jobs/jobs.sqlite"), description="the SQLite file holding every job (WAL mode)")
    work_root: Path = Field(Path("data/jobs/work"), description="each job's cycle works in <work_root>/<job id>")
    lease_s: float = Field(30.0, gt=0, description="a running job whose runner has not renewed its lease for this "
                           "long belongs to a dead runner and is taken again")
    poll_interval_s: float = Field(2.0, gt=0, description="how often an idle runner looks for queued jobs")
    max_attempts: int = Field(3, ge=1, description="runners a job may outlive before it is marked failed")
    lake_dir: Path | None = Field(None, description="the lake, for SQL validation and reports; None: not checked")
    targets_dir: Path | None = Field(None, description="target profiles; None: deploy/targets of this checkout")
    registry_dir: Path | None = Field(None, description="model registry; when set, students must be registered")


class ScoreRule(BaseModel):
    """Mining by score: scenario windows of the student's pair with max_score >= min_score, highest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_score: float = Field(ge=0, allow_inf_nan=False, description="smallest max_score of a mined window")
    top_k: int = Field(0, ge=0, le=1_000_000, description="at most this many windows; 0 = no limit")
    pair: str = Field("", description="pair id; empty = the student's latest pair")
    road_types: tuple[str, ...] = Field((), description="only these road types; empty = any")
    lightings: tuple[str, ...] = Field((), description="only these lightings; empty = any")
    weathers: tuple[str, ...] = Field((), description="only these weathers; empty = any")

    @model_validator(mode="after")
    def _known_values(self) -> "ScoreRule":
        from ingest.contract import ENUMS  # the frame contract's names of each condition

        for field, enum in (("road_types", "road_type"), ("lightings", "lighting"), ("weathers", "weather")):
            bad = sorted(set(getattr(self, field)) - set(ENUMS[enum][1]))
            if bad:
                raise ValueError(f"unknown {enum} {bad}; known: {ENUMS[enum][1]}")
        if self.pair and not set(self.pair) <= _NAME_CHARS:
            raise ValueError(f"pair {self.pair!r} may hold only letters, digits, '.', '_', '-'")
        return self


class JobSpec(BaseModel):
    """What a job was asked to do: exactly one of `sql` and `score_rule`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="registry name of the student to retrain")
    sql: str | None = Field(None, description="mining query: one read-only statement over the lake's views")
    score_rule: ScoreRule | None = Field(None, description="mining by score instead of SQL")
    targets: tuple[str, ...] = Field((), description="target chips (deploy/targets/<chip>.toml); empty = every one")
    options: dict[str, Any] = Field(default_factory=dict, description="overrides of the cycle's configuration")

    @field_validator("student")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or len(v) > 128 or not set(v) <= _NAME_CHARS or v.startswith("."):
            raise ValueError(f"student {v!r} must be 1-128 letters, digits, '.', '_', '-' (registry name)")
        return v

    @model_validator(mode="after")
    def _one_mining(self) -> "JobSpec":
        if (self.sql is None or not self.sql.strip()) == (self.score_rule is None):
            raise ValueError("give exactly one of a mining query (sql) and a score rule")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets repeated: {list(self.targets)}")
        return self

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class Job(BaseModel):
    """A job as stored."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="job id")
    spec: JobSpec = Field(description="what was asked")
    state: JobState = Field(description="see the module docstring")
    request_id: str | None = Field(None, description="client idempotency key")
    requested_by: str = Field("", description="token identity or policy rule that triggered it")
    created_at: float = Field(description="unix time")
    started_at: float | None = Field(None, description="first claim, unix time")
    finished_at: float | None = Field(None, description="unix time it ended")
    current_step: str = Field("", description="the cycle step running now or last")
    steps_done: list[str] = Field(default_factory=list, description="steps completed, in order")
    attempts: int = Field(0, description="claims by runners")
    error: str = Field("", description="why it failed, was rejected or cancelled")
    result_path: str = Field("", description="the cycle's result JSON")
    report_path: str = Field("", description="the job's HTML report")
    work_dir: str = Field(description="the cycle's work directory")
    cancel_requested: bool = Field(False, description="a cancel is pending")
    lease_owner: str | None = Field(None, description="runner holding the job")
    lease_expires: float | None = Field(None, description="unix time the lease ends")

    @property
    def student(self) -> str:
        return self.spec.student


class ControlConfig(BaseModel):
    """The control service and what `flywheel control` runs beside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = Field("127.0.0.1:50061", description="host:port of the RetrainControl gRPC service")
    token_file: Path | None = Field(None, description="JSON identity -> sha256 of its bearer token (`flywheel token "
                                    "issue`); None disables authentication")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA of operator certificates; enables mTLS (identity = "
                                       "certificate CN)")
    allow_unauthenticated: bool = Field(False, description="serve without token_file or mTLS on an address other "
                                        "than loopback (refused otherwise)")
    runners: int = Field(1, ge=0, le=16, description="job runner threads beside the service (0: service only)")
    policy_file: Path | None = Field(None, description="trigger policy (retrain.jobs.policy, TOML); None: no policy")
    policy_interval_s: float = Field(300.0, gt=0, description="how often the policy is evaluated")
    grace_s: float = Field(5.0, ge=0, description="on shutdown, how long open calls get to finish")

    @model_validator(mode="after")
    def _tls_pair(self) -> "ControlConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mTLS (tls_client_ca) needs tls_cert and tls_key")
        return self


class JobError(Exception):
    """Base of the store's refusals."""


class JobNotFound(JobError):
    pass


class StudentBusy(JobError):
    """The student already has a queued or running job."""


class RequestConflict(JobError):
    """A request id reused for a different request."""


class JobFinished(JobError):
    """The job already ended; it cannot be cancelled."""


class CoolingDown(JobError):
    """The same requester triggered a job for this student too recently."""


class NotConfigured(JobError):
    """The service cannot run cycles as configured (no lake or registry): the operator's to fix, not the caller's."""


class LeaseLost(JobError):
    """The runner no longer holds the job (its lease expired and another runner took it)."""


class JobCancelled(Exception):
    """Raised into the cycle (from its progress callback) when its job is cancelled or its lease is lost."""


class InvalidRequest(JobError):
    """A trigger that cannot run; the message is the reason."""


class UnknownStudent(JobError):
    """The student is not in the registry."""
