"""Streaming shadow worker: a Kafka consumer group on the frames topic that writes the same tables as the replayer.

    StreamWorker(kafka, lake, teacher, student, StreamConfig()).run(stop)
    flywheel shadow stream --bootstrap HOST:PORT --lake data/lake --teacher T --student S

Throughput scales by starting more workers: the group (default `flywheel-shadow-<pair id>`, one per teacher/student
pair) spreads the partitions over them, and all chunks of a drive are in one partition (key = drive id).

Per partition the worker reads each chunk's frames as the Arrow record batch the ingest server produced (`ingest.bus`:
no per-frame decode; older protobuf records are decoded in full), keeps each drive's recent frames (ego history) and
holds frames back until their 4 s future has arrived, the drive's final chunk came, or the drive has been quiet for
`drive_end_idle_s`.
Ready frames of all partitions are featurized once and run through both models in one batch (`shadow.compute`).
Output files cover the prefix of records whose frames are all computed and whose scenario windows are complete;
they are named from those records' Kafka offsets and written with `shadow.outputs.write_unit`, divergences last;
the partition's offset is committed only after that, so committed offsets never pass the written files.

Restart and coexistence with the batch replayer (`shadow.batch.replay`): the lake, not the committed offset, says what is
done. On assignment a partition resumes at the first offset at or after the committed one that the pair's live
divergences files do not cover; it re-reads from the earliest record holding the ego history of a drive that may
still continue (`shadow.outputs.resume_context`, from the files' drive-context footers, written alike by the batch
replayer and this worker) and treats those records, and any record another writer covered (e.g. a batch replay),
as context only: history for the drives, never computed or written again; windows they opened are not this
worker's. Frames already replayed (the footers' seq ranges) are never computed again, so a resent chunk is dropped.
The batch replay skips what the stream covered, and the stream skips what the batch covered.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ingest.config import KafkaConfig
from ingest.bus import decode_record
from ingest.contract import ChunkRejected
from ingest.lake import ingest_date, remove_stale_temporaries
from ingest.sink import MAX_FRAMES_PER_CHUNK
from shadow.compute import WINDOW_META, Shadow
from shadow.config import StreamConfig
from shadow.outputs import Coverage, FrameInfo, key_live_files, resume_context, unit_outputs, write_unit
from shadow.stream.state import PartitionState

log = logging.getLogger(__name__)

KAFKA_CALL_TIMEOUT_MS = 30_000


@dataclass
class StreamStats:
    records: int = 0
    frames: int = 0  # frames computed
    windows: int = 0
    files: int = 0
    commits: int = 0
    writes: list = field(default_factory=list)  # (partition, first, last) of each written range


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread while the main thread waits in poll(): never concurrently with it."""

    def __init__(self, worker: "StreamWorker") -> None:
        self.w = worker

    async def on_partitions_revoked(self, revoked):
        offsets = self.w._write({tp.partition for tp in revoked}, force=True)
        if offsets:
            try:
                await self.w._consumer.commit_async(offsets)
                self.w.stats.commits += 1
            except Exception as exc:  # the files are durable; the next owner resumes from the lake
                log.warning("commit on revoke failed (%s); the lake covers it", exc)
        for tp in revoked:
            self.w._parts.pop(tp.partition, None)

    async def on_partitions_lost(self, lost):
        for tp in lost:
            self.w._parts.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned):
        for tp in assigned:
            self.w._consumer.pause(tp)
        self.w._pending |= set(assigned)


class StreamWorker:
    """One worker of the group; `run()` consumes until `stop` is set, then writes what is done and commits."""

    def __init__(self, kafka: KafkaConfig, lake: Path, teacher: Path, student: Path,
                 config: StreamConfig | None = None, shadow: Shadow | None = None,
                 on_write: Callable[[int, int, int], None] | None = None) -> None:
        self.kafka, self.lake = kafka, Path(lake)
        self.config = config or StreamConfig()
        self.shadow = shadow or Shadow(teacher, student, self.config)
        self.group_id = self.config.group_id or f"flywheel-shadow-{self.shadow.pair}"
        self.on_write = on_write
        self.stats = StreamStats()
        self.replay_id = uuid.uuid4().hex  # one per worker run, like a batch replay's
        self.coverage = Coverage(self.lake)
        self._parts: dict[int, PartitionState] = {}
        self._pending: set[TopicPartition] = set()
        self._consumer: KafkaConsumer | None = None
        self._failed = False

    def run(self, stop: threading.Event | None = None) -> StreamStats:
        stop = stop or threading.Event()
        for table in ("decisions", "divergences", "scenarios", "noise_floor"):
            remove_stale_temporaries(self.lake, table)
        c = self.config
        self._consumer = KafkaConsumer(
            **self.kafka.client_options(), group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset=c.auto_offset_reset, session_timeout_ms=c.session_timeout_ms,
            max_poll_interval_ms=c.max_poll_interval_ms, heartbeat_interval_ms=max(100, c.session_timeout_ms // 3),
            max_poll_records=c.max_poll_records)
        self._consumer.subscribe([self.kafka.frames_topic], listener=_Listener(self))
        log.info("shadow stream %s consuming %s as group %s", self.shadow.pair, self.kafka.frames_topic, self.group_id)
        try:
            while not stop.is_set():
                polled = self._consumer.poll(timeout_ms=c.poll_ms)
                if self._pending:
                    self._position()
                now = time.monotonic()
                for tp, records in polled.items():
                    state = self._parts.get(tp.partition)
                    if state is None:
                        continue  # revoked meanwhile
                    for r in records:
                        self._handle(state, r, now)
                self._compute(now)
                self._commit(self._write(set(self._parts)))
            self._compute(time.monotonic())
            self._commit(self._write(set(self._parts), force=True))
        except BaseException:
            self._failed = True
            raise
        finally:
            try:
                self._consumer.close(autocommit=False)
            except Exception:
                log.exception("closing the consumer failed")
        log.info("shadow stream stopped: %s", {k: v for k, v in vars(self.stats).items() if k != "writes"})
        return self.stats

    # ------------------------------------------------------------------------------------------------ positions

    def _position(self) -> None:
        """Resume each new partition at the first offset >= committed that the pair's files do not cover."""
        pending, self._pending = self._pending, set()
        assigned = self._consumer.assignment()
        cfg = self.config
        for tp in sorted(p for p in pending if p in assigned):
            self.coverage.refresh(tp.topic, tp.partition)
            cov = self.coverage.get("divergences", "pair", self.shadow.pair, tp.topic, tp.partition)
            committed = self._consumer.committed(tp, timeout_ms=KAFKA_CALL_TIMEOUT_MS)
            files = key_live_files(self.lake, "divergences", "pair", self.shadow.pair, tp.topic, tp.partition)
            seen, ctx = resume_context(files, cfg.drive_end_idle_s)
            start = committed or 0
            for a, b in cov.ranges:
                if a <= start <= b:
                    start = b + 1
            seek = min(start, ctx) if ctx is not None else start
            if committed is None and not cov.ranges:
                log.info("partition %d: nothing committed or written; starting at %s", tp.partition,
                         cfg.auto_offset_reset)
                start = 0
                # an explicit seek: a partition this consumer gets back after a rebalance keeps its old fetch
                # position, which would skip the records it had read but not written
                if cfg.auto_offset_reset == "earliest":
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek_to_end(tp)
            else:
                self._consumer.seek(tp, seek)
                log.info("partition %d: committed %s, resume at %d (context from %d, %d drives seen)", tp.partition,
                         committed, start, seek, len(seen))
            self._parts[tp.partition] = PartitionState(tp.topic, tp.partition, start, cov, seen, cfg.window_frames,
                                                       cfg.history_frames(), cfg.future_frames())
            self._consumer.resume(tp)

    # ------------------------------------------------------------------------------------------------ records

    def _handle(self, state: PartitionState, record, now: float) -> None:
        self.stats.records += 1
        ts = record.timestamp if record.timestamp is not None and record.timestamp >= 0 else int(time.time() * 1000)
        try:
            chunk = decode_record(record.key, record.value, record.headers, max_frames=MAX_FRAMES_PER_CHUNK)
        except ChunkRejected as exc:  # the sink dead-letters it; nothing to replay
            log.debug("partition %d offset %d skipped: %s", record.partition, record.offset, exc)
            chunk = None
        state.add(record.offset, ts, chunk, now)

    def _compute(self, now: float) -> None:
        """Compute every ready frame of every partition in one batch and hand the rows back per partition."""
        idle = self.config.drive_end_idle_s
        work = []  # (state, drive, mask, start row)
        tables, masks, n = [], [], 0
        for state in self._parts.values():
            for d, ok in state.due(now, idle):
                work.append((state, d, ok, n))
                tables.append(d.rows)
                masks.append(ok)
                n += d.rows.num_rows
        if work:
            table = pa.concat_tables(tables)
            c = self.shadow.compute(table, np.concatenate(masks))
            rid = self.replay_id
            out, subsets = self.shadow.frame_rows(table, c, rid)
            meta = table.select(list(WINDOW_META)).take(pa.array(c.rows))
            offsets = meta["kafka_offset"].to_numpy()
            parts = meta["kafka_partition"].to_numpy()
            for state in {id(w[0]): w[0] for w in work}.values():
                sel = parts == state.partition
                state.keep_outputs(out, sel, subsets, offsets)
            for state, d, ok, start in work:
                idx = np.flatnonzero((c.rows >= start) & (c.rows < start + d.rows.num_rows))
                d.emitted = d.emitted | ok
                state.open_windows(d, meta, c.metrics, c.conditions, idx)
            self.stats.frames += int(c.rows.shape[0])
        for state in self._parts.values():
            done = []
            for d in state.drives.values():
                done += state.complete_windows(d, now, idle)
            if done:
                self._windows_to_rows(state, done)
            state.trim(now, idle)

    def _windows_to_rows(self, state: PartitionState, windows: list) -> None:
        metas, metrics, conds, ids = [], {}, {}, []
        for i, w in enumerate(windows):
            for meta, m, cd in w.parts:
                metas.append(meta)
                ids.append(np.full(meta.num_rows, i))
                for k, v in m.items():
                    metrics.setdefault(k, []).append(v)
                for k, v in cd.items():
                    conds.setdefault(k, []).append(v)
        scen = self.shadow.scenarios(pa.concat_tables(metas), {k: np.concatenate(v) for k, v in metrics.items()},
                                     {k: np.concatenate(v) for k, v in conds.items()}, np.concatenate(ids),
                                     self.replay_id)
        state.out["scenarios"].append(scen)
        self.stats.windows += len(windows)

    # ------------------------------------------------------------------------------------------------- writing

    def _write(self, partitions: set[int], force: bool = False) -> dict:
        """Write each partition's prefix of done records when due; returns the offsets to commit."""
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        if self._failed:
            return offsets
        now = time.monotonic()
        for p in sorted(partitions):
            state = self._parts.get(p)
            if state is None:
                continue
            got = state.writable()
            if got is None:
                continue
            first, last, arrived, rows = got
            if not (force or now - arrived >= self.config.max_age_s or rows >= self.config.max_rows):
                continue
            date = ingest_date(state.ts_of(first))
            ts_of = {o: r.ts_ms for o, r in state.records.items() if o <= last}
            outputs = unit_outputs(self.shadow.ids, state.take(first, last))
            div = next(o.rows for o in outputs if o.table == "divergences")
            drive = div["drive_id"].to_numpy(zero_copy_only=False)
            off = div["kafka_offset"].to_numpy()
            ts = np.fromiter((ts_of[o] for o in off.tolist()), np.int64, off.shape[0])
            ended = {d for d in set(drive.tolist()) if d not in state.drives or state.drives[d].final}
            info = FrameInfo(drive, div["seq"].to_numpy(), off, ts, ended)
            self.coverage.refresh(state.topic, p)  # a batch replay may have covered some offsets meanwhile
            res = write_unit(self.coverage, date, state.topic, p, first, last, outputs, info,
                             self.shadow.footer(self.replay_id), self.config.row_group_rows)
            self.stats.files += len(res.files)
            self.stats.writes.append((p, first, last))
            offsets[TopicPartition(state.topic, p)] = OffsetAndMetadata(last + 1, "", -1)
            if self.on_write:
                self.on_write(p, first, last)
        return offsets

    def _commit(self, offsets: dict) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(offsets, timeout_ms=KAFKA_CALL_TIMEOUT_MS)
            self.stats.commits += 1
        except KafkaError as exc:  # e.g. a rebalance: the next owner resumes from the lake
            log.warning("commit failed (%s); the lake covers it", exc)
