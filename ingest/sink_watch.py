"""The sink's watch on its own progress: a sink that holds no partition while the frames topic has records the lake
lacks, and nothing moves, says so and recovers by itself.

Seen on the embedded broker after a storm of `kill -9`: the group of the sink was never assigned a partition again,
and ingest into the lake stalled silently. The watch, checked after every poll:

1. *stalled*: no partition assigned (or pending), the topic's end offsets past the lake's positions, and the lake's
   positions unchanged, for `stall_after_s` (longer than a join, a dead member's session and a rebalance take);
2. it logs a warning, sets `flywheel_sink_stalled` and writes its state where `flywheel status` reads it
   (`<lake>/.sink/<group>.<host>.<pid>.json`, also refreshed every few seconds as a heartbeat);
3. it rejoins with a fresh consumer (a new member of the group);
4. still stalled after another `stall_after_s`: nothing consumes the topic at all, so it assigns itself every
   partition directly, positioned from the lake as after any assignment (the lake, not the group, decides where each
   partition resumes). It stays so until restarted; the lake's fencing guards against a second writer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prometheus_client import Counter, Gauge

from ingest.lake import HOST, write_json_atomic
from ingest.objstore import delete, get_bytes, is_remote, list_files
from ingest.lake_index import lake_positions

log = logging.getLogger(__name__)

STALLED = Gauge("flywheel_sink_stalled", "1 while the sink holds no partition and the topic has records the lake "
                "lacks, with no progress")
RECOVERIES = Counter("flywheel_sink_stall_recoveries_total", "recoveries from a stall, by how", ["how"])
STATE_DIR = ".sink"
HEARTBEAT_S = 5.0
CHECK_EVERY_S = 1.0


def state_dir(lake: Path) -> Path:
    """Where sinks write their state (beside the tables: no reader's glob lists it)."""
    return Path(lake) / STATE_DIR


def read_states(lake: Path) -> list[dict]:
    """The states the sinks of a lake wrote, with `age_s` (seconds since the last write) added."""
    out = []
    if is_remote(lake):  # object storage: one object per sink, its modification time is the last write
        for e in list_files(state_dir(lake), recursive=False):
            try:
                doc = json.loads(get_bytes(e.path)) if e.path.name.endswith(".json") else None
            except (OSError, ValueError):
                continue
            if doc is not None:
                out.append({**doc, "age_s": round(time.time() - e.mtime_ns / 1e9, 1)})
        return out
    for path in sorted(state_dir(lake).glob("*.json")) if state_dir(lake).is_dir() else ():
        try:
            doc = json.loads(path.read_text())
            doc["age_s"] = round(time.time() - path.stat().st_mtime, 1)
            out.append(doc)
        except (OSError, ValueError):
            continue
    return out


class SinkWatch:
    """Decides when a sink is stalled and what to do about it; `check` returns None, "rejoin" or "assign"."""

    def __init__(self, lake: Path, topic: str, group: str, stall_after_s: float) -> None:
        self.lake, self.topic, self.group, self.stall_after_s = Path(lake), topic, group, stall_after_s
        self.path = state_dir(lake) / f"{group}.{HOST}.{os.getpid()}.json"
        self.started = time.monotonic()
        self.stalled_since: float | None = None
        self.rejoined = False
        self.direct = False
        self._checked = 0.0
        self._written = 0.0
        self._lake_seen: dict[int, int] | None = None
        self.state = "joining"

    def check(self, consumer, holds_partitions: bool) -> str | None:
        now = time.monotonic()
        if holds_partitions:
            if self.stalled_since is not None:
                log.warning("sink group %s: partitions assigned again; no longer stalled", self.group)
            self._reset("direct" if self.direct else "consuming")
            return None
        if now - self._checked < CHECK_EVERY_S:
            return None
        self._checked = now
        self.heartbeat()
        behind, lake = self._behind(consumer)
        if not behind or lake != self._lake_seen:  # nothing to consume, or someone is storing it
            self._lake_seen = lake
            self._reset(self.state if self.state != "stalled" else "waiting")
            return None
        if self.stalled_since is None:
            self.stalled_since = now
        if now - self.stalled_since < self.stall_after_s:
            return None
        if self.state != "stalled":
            STALLED.set(1)
            log.warning("sink group %s holds no partition of %s for %.0f s while the topic has records the lake "
                        "lacks (%s); recovering", self.group, self.topic, now - self.stalled_since,
                        ", ".join(f"p{p}: lake at {lake[p]}, topic at {behind[p]}" for p in sorted(behind)))
            self.state = "stalled"
            self.heartbeat(force=True)
        self.stalled_since = now  # each step gets its own period
        how = "assign" if self.rejoined else "rejoin"
        self.rejoined = True
        self.direct = how == "assign"
        RECOVERIES.labels(how).inc()
        log.warning("sink group %s: %s", self.group, "rejoining with a fresh consumer" if how == "rejoin" else
                    "assigning every partition directly (the lake says where each resumes)")
        return how

    def _reset(self, state: str) -> None:
        if self.stalled_since is not None or self.state != state:
            self.stalled_since = None
            STALLED.set(0)
            self.state = state
            self.heartbeat(force=True)

    def _behind(self, consumer) -> tuple[dict[int, int], dict[int, int]]:
        """Partitions whose end offset is past the lake's next offset (partition -> end), and the lake's positions."""
        from kafka import TopicPartition

        try:
            parts = consumer.partitions_for_topic(self.topic) or set()
            end = consumer.end_offsets([TopicPartition(self.topic, p) for p in parts])
        except Exception as exc:  # Kafka unreachable: not a stall of the group
            log.debug("end offsets unavailable: %s", exc)
            return {}, {}
        lake = {p: pos.next_offset for p, pos in lake_positions(self.lake, self.topic, set(parts)).items()}
        return {tp.partition: o for tp, o in end.items() if o > lake[tp.partition]}, lake

    def heartbeat(self, force: bool = False) -> None:
        """Write the sink's state for `flywheel status` (at most every few seconds unless `force`)."""
        now = time.monotonic()
        if not force and now - self._written < HEARTBEAT_S:
            return
        self._written = now
        try:
            if not is_remote(self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"group": self.group, "topic": self.topic, "host": HOST, "pid": os.getpid(),
                                          "state": self.state, "stalled": self.state == "stalled",
                                          "direct_assignment": self.direct}, indent=None)
        except OSError as exc:
            log.debug("cannot write the sink's state: %s", exc)

    def close(self) -> None:
        if is_remote(self.path):
            delete(self.path)
        else:
            self.path.unlink(missing_ok=True)
