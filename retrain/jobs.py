"""Retraining jobs: a durable queue in one SQLite file and the runner that executes each job's cycle.

A job asks for one flywheel cycle of a student (mine by SQL or by score, fine-tune, compress for targets, verify,
gate, promote or reject). Its life:

    queued --claim--> running --cycle returned, promoted--> succeeded
       |                 |  \\--cycle returned, a gate failed--> rejected
       |                 |   \\--cycle raised, or its runners died `max_attempts` times--> failed
       \\--cancel-->  cancelled <--cancel (cooperative: at the cycle's next progress report or step boundary)
    running --runner died, lease expired--> running (another runner claims it; the cycle resumes from its work dir)

The database, not the process, keeps the rules, so several runner processes may share one file:

* one running job per student: a partial unique index (`state = 'running'`) refuses a second one whatever process
  tries; every write is a `BEGIN IMMEDIATE` transaction, so check-then-write sequences are atomic across processes;
* a running job carries a lease (owner, expiry) that its runner renews every lease/3 seconds; a job whose lease
  expired belongs to a dead runner and is claimed again (before new work), and every write of a runner names its
  lease, so a runner that lost its job (paused past its lease) can no longer change it;
* a client request id is unique: a retried trigger returns the job it created the first time.

The runner (`retrain.job_runner.JobRunner`) reaches the cycle (`retrain.cycle.run_cycle`) through a small adapter, so
this machinery is tested with stand-in cycles and with the real one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    student TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in JobState)})),
    spec TEXT NOT NULL,                  -- JobSpec as JSON: mining query or score rule, targets, options
    fingerprint TEXT NOT NULL,           -- sha256 of the request, to tell a retry from a different request
    request_id TEXT UNIQUE,              -- client idempotency key (NULLs do not collide)
    requested_by TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    current_step TEXT NOT NULL DEFAULT '',
    steps_done TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    result_path TEXT NOT NULL DEFAULT '',
    report_path TEXT NOT NULL DEFAULT '',
    work_dir TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL
);
-- the rule "one running job per student", kept by the database for every process that writes
CREATE UNIQUE INDEX IF NOT EXISTS one_running_job_per_student ON jobs (student) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at, id);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,                  -- claimed | step | cancel | finished | lease_lost ...
    step TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, at);
"""


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


class LeaseLost(JobError):
    """The runner no longer holds the job (its lease expired and another runner took it)."""


class JobCancelled(Exception):
    """Raised into the cycle (from its progress callback) when its job is cancelled or its lease is lost."""


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d.pop("student"), d.pop("fingerprint")
    d["spec"] = JobSpec.model_validate_json(d["spec"])
    d["steps_done"] = json.loads(d["steps_done"])
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


class JobStore:
    """The jobs in one SQLite file; safe to share between threads and processes (one connection per thread)."""

    def __init__(self, path: Path, work_root: Path | None = None) -> None:
        self.path = Path(path)
        self.work_root = Path(work_root) if work_root is not None else self.path.parent / "work"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._con().executescript(_SCHEMA)  # idempotent: IF NOT EXISTS everywhere
        with self._write() as con:
            row = con.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise JobError(f"{self.path}: jobs schema version {row[0]}, this code knows {SCHEMA_VERSION}")

    @classmethod
    def from_config(cls, config: JobsConfig) -> "JobStore":
        return cls(config.db_path, config.work_root)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # autocommit mode: transactions are the explicit BEGIN IMMEDIATE of _write
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a claimed or finished job survives a power cut
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    class _Txn:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock first: the reads of a check-then-write see what the write will change
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, kind, exc, tb) -> None:
            self.con.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> "JobStore._Txn":
        return JobStore._Txn(self._con())

    @staticmethod
    def _event(con: sqlite3.Connection, job_id: str, kind: str, step: str = "", message: str = "") -> None:
        con.execute("INSERT INTO job_events VALUES (?, ?, ?, ?, ?)", (job_id, time.time(), kind, step, message))

    # ----------------------------------------------------------------------------------------------------- clients

    def create(self, spec: JobSpec, request_id: str | None = None, requested_by: str = "", queue_behind: bool = False,
               cooldown_s: float | None = None) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). A repeated request id returns the first job (created False).

        Raises StudentBusy when the student has a queued or running job (unless `queue_behind`), CoolingDown when
        `requested_by` created a job for the student less than `cooldown_s` ago, RequestConflict when the request
        id was used for another request.
        """
        fp = spec.fingerprint()
        now = time.time()
        with self._write() as con:
            if request_id:
                row = con.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    if row["fingerprint"] != fp:
                        raise RequestConflict(f"request id {request_id!r} was used for job {row['id']}, "
                                              "a different request")
                    return _job(row), False
            if not queue_behind:
                row = con.execute("SELECT id, state FROM jobs WHERE student = ? AND state IN (?, ?)",
                                  (spec.student, *ACTIVE)).fetchone()
                if row is not None:
                    raise StudentBusy(f"student {spec.student!r} already has job {row['id']} {row['state']}")
            if cooldown_s:
                last = con.execute("SELECT max(created_at) FROM jobs WHERE student = ? AND requested_by = ?",
                                   (spec.student, requested_by)).fetchone()[0]
                if last is not None and now - last < cooldown_s:
                    raise CoolingDown(f"{requested_by or 'this requester'} triggered a job for {spec.student!r} "
                                      f"{now - last:.0f} s ago (cooldown {cooldown_s:.0f} s)")
            job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)
            work_dir = (self.work_root / job_id).resolve()
            con.execute("INSERT INTO jobs (id, student, state, spec, fingerprint, request_id, requested_by, "
                        "created_at, work_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, spec.student, JobState.QUEUED.value, spec.model_dump_json(), fp, request_id or None,
                         requested_by, now, str(work_dir)))
            self._event(con, job_id, "queued", message=requested_by)
        log.info("job %s queued for %s by %s", job_id, spec.student, requested_by or "anonymous")
        return self.get(job_id), True

    def get(self, job_id: str) -> Job:
        row = self._con().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _job(row)

    def list(self, states: list[JobState] | None = None, student: str | None = None, limit: int = 50,
             before: tuple[float, str] | None = None) -> list[Job]:
        """Jobs newest first; `before` = (created_at, id) of the last job of the previous page (keyset paging)."""
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += [JobState(s).value for s in states]
        if student:
            where.append("student = ?")
            args.append(student)
        if before is not None:
            where.append("(created_at, id) < (?, ?)")
            args += list(before)
        sql = f"SELECT * FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} " \
              "ORDER BY created_at DESC, id DESC LIMIT ?"
        return [_job(r) for r in self._con().execute(sql, (*args, limit)).fetchall()]

    def events(self, job_id: str) -> list[dict]:
        rows = self._con().execute("SELECT at, kind, step, message FROM job_events WHERE job_id = ? ORDER BY rowid",
                                   (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def cancel(self, job_id: str, reason: str = "cancelled on request") -> Job:
        """Cancel: a queued job (or one whose runner is dead) at once, a running one at its next progress report."""
        now = time.time()
        with self._write() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            state = JobState(row["state"])
            if state == JobState.CANCELLED:
                return _job(row)  # idempotent
            if state in TERMINAL:
                raise JobFinished(f"job {job_id} already {state.value}")
            if state == JobState.QUEUED or (row["lease_expires"] or 0) < now:
                con.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ?, cancel_requested = 1, "
                            "lease_owner = NULL WHERE id = ?", (now, reason, job_id))
            else:
                con.execute("UPDATE jobs SET cancel_requested = 1, error = ? WHERE id = ?", (reason, job_id))
            self._event(con, job_id, "cancel", message=reason)
        return self.get(job_id)

    # ----------------------------------------------------------------------------------------------------- runners

    def claim(self, owner: str, lease_s: float, max_attempts: int = 3) -> Job | None:
        """Take the next job: first one whose runner died (lease expired), else the oldest queued one whose student
        has no running job. Returns None when there is nothing to do."""
        now = time.time()
        with self._write() as con:
            for row in con.execute("SELECT * FROM jobs WHERE state = 'running' AND lease_expires < ? "
                                   "ORDER BY created_at", (now,)).fetchall():
                if row["cancel_requested"]:
                    con.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, lease_owner = NULL "
                                "WHERE id = ?", (now, row["id"]))
                elif row["attempts"] >= max_attempts:
                    con.execute("UPDATE jobs SET state = 'failed', finished_at = ?, lease_owner = NULL, error = ? "
                                "WHERE id = ?", (now, f"its runner died {row['attempts']} times "
                                                 f"(last at step {row['current_step'] or 'start'})", row["id"]))
                    self._event(con, row["id"], "finished", message="failed: runners died")
                else:
                    con.execute("UPDATE jobs SET lease_owner = ?, lease_expires = ?, attempts = attempts + 1 "
                                "WHERE id = ?", (owner, now + lease_s, row["id"]))
                    self._event(con, row["id"], "claimed", message=f"{owner} resumes after {row['lease_owner']}")
                    return self._get_in(con, row["id"])
            row = con.execute("SELECT id FROM jobs WHERE state = 'queued' AND student NOT IN "
                              "(SELECT student FROM jobs WHERE state = 'running') ORDER BY created_at, id LIMIT 1"
                              ).fetchone()
            if row is None:
                return None
            con.execute("UPDATE jobs SET state = 'running', started_at = ?, lease_owner = ?, lease_expires = ?, "
                        "attempts = attempts + 1 WHERE id = ?", (now, owner, now + lease_s, row["id"]))
            self._event(con, row["id"], "claimed", message=owner)
            return self._get_in(con, row["id"])

    @staticmethod
    def _get_in(con: sqlite3.Connection, job_id: str) -> Job:
        return _job(con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _owned(self, con: sqlite3.Connection, job_id: str, owner: str, sql: str, args: tuple) -> None:
        cur = con.execute(f"{sql} WHERE id = ? AND lease_owner = ? AND state = 'running'", (*args, job_id, owner))
        if cur.rowcount != 1:
            raise LeaseLost(f"runner {owner} no longer holds job {job_id}")

    def heartbeat(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Renew the lease; returns whether a cancel is pending. LeaseLost when another runner took the job."""
        with self._write() as con:
            self._owned(con, job_id, owner, "UPDATE jobs SET lease_expires = ?", (time.time() + lease_s,))
            return bool(con.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    def record_step(self, job_id: str, owner: str, step: str, status: str, message: str = "") -> None:
        """A progress report of the cycle: `status` 'done' (or 'skipped', resumed) adds the step to steps_done."""
        with self._write() as con:
            done = json.loads(con.execute("SELECT steps_done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            if status in ("done", "skipped") and step not in done:
                done.append(step)
            self._owned(con, job_id, owner, "UPDATE jobs SET current_step = ?, steps_done = ?",
                        (step, json.dumps(done)))
            self._event(con, job_id, "step", step, f"{status} {message}".strip())

    def finish(self, job_id: str, owner: str, state: JobState, error: str = "", result_path: str = "",
               report_path: str = "") -> Job:
        if state not in TERMINAL:
            raise ValueError(f"{state} is not a final state")
        with self._write() as con:
            self._owned(con, job_id, owner, "UPDATE jobs SET state = ?, finished_at = ?, error = ?, result_path = ?, "
                        "report_path = ?, lease_owner = NULL", (state.value, time.time(), error, result_path,
                                                                report_path))
            self._event(con, job_id, "finished", message=f"{state.value} {error}".strip())
        log.info("job %s %s%s", job_id, state.value, f": {error}" if error else "")
        return self.get(job_id)
