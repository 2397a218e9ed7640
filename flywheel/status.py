"""`flywheel status`: one text view of a running system, no Grafana needed.

Broker (reachable, topics, partitions), consumer lag per group, lake size per table, the sinks' own state (a
stalled sink says so: `ingest.sink_watch`), the last shadow replay per
model pair, and retraining jobs. Every section degrades to a reason ("unreachable: ...") instead of failing, so the
command is useful exactly when something is wrong.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

from flywheel.settings import Settings
from ingest.tables import TABLES
from ingest.lake import live_files, table_dir
from ingest.objstore import read_metadata, stat
from ingest.sink_watch import read_states

GROUPS_OF_INTEREST = ("sink", "shadow")


@dataclass
class TopicStatus:
    name: str
    partitions: int


@dataclass
class LagStatus:
    group: str
    topic: str
    committed: int
    end: int
    lag: int


@dataclass
class TableStatus:
    table: str
    files: int
    rows: int
    bytes: int
    partitions: list[str] = field(default_factory=list)  # hive partitions below the table (e.g. pair=...)
    newest: str | None = None  # UTC time of the newest file


@dataclass
class Status:
    broker: str
    broker_ok: bool
    broker_error: str | None = None
    topics: list[TopicStatus] = field(default_factory=list)
    lag: list[LagStatus] = field(default_factory=list)
    tables: list[TableStatus] = field(default_factory=list)
    sinks: list[dict] = field(default_factory=list)  # what each running sink says of itself (ingest.sink_watch)
    jobs: list[dict] = field(default_factory=list)
    jobs_error: str | None = None
    taken_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def as_dict(self) -> dict:
        return asdict(self)


def _reachable(bootstrap: str, timeout: float = 2.0) -> None:
    """Fail fast (kafka-python waits 30 s to give up bootstrapping): one TCP connect per bootstrap address."""
    errors = []
    for addr in bootstrap.split(","):
        host, _, port = addr.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{addr}: {exc}")
    raise ConnectionError("; ".join(errors))


def kafka_status(settings: Settings, groups: list[str]) -> tuple[list[TopicStatus], list[LagStatus]]:
    """Topics and per-group lag on the frames topic. Raises on an unreachable broker."""
    _reachable(settings.kafka.bootstrap_servers)
    opts = settings.kafka.client_options()
    admin = KafkaAdminClient(**opts, request_timeout_ms=5000)
    try:
        names = sorted(t for t in admin.list_topics() if not t.startswith("__"))
        described = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(names)} if names else {}
        topics = [TopicStatus(n, described.get(n, 0)) for n in names]
    finally:
        admin.close()
    lag: list[LagStatus] = []
    frames = settings.kafka.frames_topic
    if frames not in described:
        return topics, lag
    tps = [TopicPartition(frames, p) for p in range(described[frames])]
    for group in groups:
        # committed() reads the group's offsets without joining it, so a running group is not disturbed
        consumer = KafkaConsumer(**opts, group_id=group, enable_auto_commit=False, request_timeout_ms=5000)
        try:
            committed = {tp: consumer.committed(tp) for tp in tps}
            if all(c is None for c in committed.values()):
                continue  # the group never committed: not running here
            # Tansu answers end_offsets with the last batch's start + 1, so a lag there can be understated
            end = sum(consumer.end_offsets(tps).values())
            done = sum(c or 0 for c in committed.values())
            lag.append(LagStatus(group, frames, done, end, max(0, end - done)))
        finally:
            consumer.close()
    return topics, lag


def table_status(lake: Path) -> list[TableStatus]:
    out = []
    for name in TABLES:
        files = live_files(lake, name)
        rows = sum(read_metadata(f.path).num_rows for f in files)
        stats = [stat(f.path) for f in files]  # (bytes, mtime ns), local or on object storage
        size = sum(st[0] for st in stats)
        parts = sorted({str(f.path.parent.relative_to(table_dir(lake, name)).parts[0]) for f in files
                        if len(f.path.parent.relative_to(table_dir(lake, name)).parts) > 1})
        newest = max((st[1] / 1e9 for st in stats), default=None)
        out.append(TableStatus(name, len(files), rows, size, parts,
                               datetime.fromtimestamp(newest, timezone.utc).isoformat(timespec="seconds")
                               if newest else None))
    return out


def collect(settings: Settings, lake: Path | None = None, jobs_db: Path | None = None) -> Status:
    groups = [settings.sink.group_id] + [g for g in _extra_groups(settings)]
    status = Status(broker=settings.kafka.bootstrap_servers, broker_ok=False)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # failures are reported in the status itself
    started = time.monotonic()
    try:
        status.topics, status.lag = kafka_status(settings, groups)
        status.broker_ok = True
    except Exception as exc:  # an unreachable broker is a status, not a crash
        status.broker_error = f"unreachable after {time.monotonic() - started:.1f}s: {type(exc).__name__}: {exc}"
    status.tables = table_status(lake or settings.sink.lake_dir)
    status.sinks = read_states(lake or settings.sink.lake_dir)
    status.jobs, status.jobs_error = _jobs(settings, jobs_db)
    return status


def _extra_groups(settings: Settings) -> list[str]:
    shadow = getattr(settings, "shadow", None)
    group = getattr(shadow, "group_id", None) if shadow is not None else None
    return [group] if group else []


def _jobs(settings: Settings, jobs_db: Path | None) -> tuple[list[dict], str | None]:
    """Recent retraining jobs, when the job store exists (retrain.jobs)."""
    try:
        from retrain.jobs.store import JobStore  # the job service is optional
    except ImportError:
        return [], "job service not installed"
    jobs_cfg = getattr(settings, "jobs", None)
    db = jobs_db or (getattr(jobs_cfg, "db_path", None) if jobs_cfg is not None else None)
    if db is None or not Path(db).exists():
        return [], "no job database yet"
    try:
        store = JobStore(Path(db))
        return [{"id": j.id, "student": j.student, "state": j.state.value, "step": j.current_step,
                 "created": datetime.fromtimestamp(j.created_at, timezone.utc).isoformat(timespec="seconds"),
                 "error": j.error[:80]} for j in store.list(limit=10)], None
    except Exception as exc:
        return [], f"{type(exc).__name__}: {exc}"
