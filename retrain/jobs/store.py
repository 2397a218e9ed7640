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
* a client request id is unique: a retried trigger returns the job it created the first time;
* a trigger for a student with a queued or running job is refused (StudentBusy) unless it asks to queue behind.

The runner (`retrain.jobs.runner.JobRunner`) reaches the cycle (`retrain.cycle.cycle.run_cycle`) through a small adapter, so
this machinery is tested with stand-in cycles and with the real one.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from retrain.jobs.models import (ACTIVE, TERMINAL, CoolingDown, Job, JobError, JobFinished, JobNotFound, JobsConfig,
                                 JobSpec, JobState, LeaseLost, RequestConflict, StudentBusy)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

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
        with self._write() as con:
            # the clock is read once the write lock is held: read before, a claim that waited for another runner's
            # finish stamped its job as started before the job it queued behind had finished
            now = time.time()
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
