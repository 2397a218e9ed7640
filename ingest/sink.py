"""The Kafka -> Parquet sink: drive chunks from the frames topic into `lake/frames`, each frame exactly once.

One consumer in group `SinkConfig.group_id` reads the records of each assigned Kafka partition (a chunk's frames as
one Arrow record batch, validated by the ingest server: `ingest.bus`; a record in the older protobuf format is decoded
and validated in full here), buffers them and flushes a buffer as one Parquet file named from the Kafka offsets it
covers (`ingest.lake.file_name`), written atomically (temp name, fsync, rename); the partition's offset is committed
only after that. Records that fail their checks go to the dead-letter topic with the reason in headers, flushed
durably before the offsets past them are committed.

Exactly once, even across crashes and resent chunks:
- the lake, not the committed offset, is the source of truth for position: on assignment a partition is sought to
  max(committed offset, last offset in the lake + 1), so a crash between rename and commit never re-writes a range;
- frames are deduplicated by (drive_id, seq): per partition the sink knows the seq ranges stored or buffered per
  drive, rebuilt on assignment from the `flywheel.drive_seq` footers of the partition's live files. A drive is keyed
  by its id, so all its chunks share one partition;
- a worker that stalled past its session while its partitions moved on (or the successor of one) does not publish
  offsets the other already published: just before the rename it lists the partition's directory, and if a file of
  another name holds any of its offsets it drops the buffer uncommitted and re-reads the partition from the lake.
  This narrows the window to the instant between that check and the rename; it is not a lock.

Threading: kafka-python runs rebalance listeners on its IO thread while the caller's `poll()` waits, so listener and
main loop never run at the same time. The listener only flushes (on revoke) and pauses new partitions; positioning
needs blocking consumer calls and happens on the main thread right after `poll()` returns.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from ingest.config import KafkaConfig, SinkConfig
from ingest.bus import decode_record
from ingest.contract import ChunkRejected, RejectReason
from ingest.lake import (DRIVE_FINAL_KEY, DRIVE_SEQ_KEY, file_name, ingest_date, overlapping_files, partition_dir,
                         lake_batch, remove_stale_temporaries, write_parquet_atomic)
from ingest.tables import FRAMES_LAKE_SCHEMA
from ingest.lake_index import SeqRanges, encode_drive_final, encode_drive_seq, lake_positions, merge_drive_final
from ingest.sink_watch import SinkWatch

log = logging.getLogger(__name__)

TABLE = "frames"
# The sink stores whatever the ingest server may accept: the upper bound of ServerConfig.max_frames_per_chunk.
MAX_FRAMES_PER_CHUNK = 100_000
DLQ_FLUSH_TIMEOUT_S = 30.0
KAFKA_CALL_TIMEOUT_MS = 30_000

RECORDS = Counter("flywheel_sink_records_consumed_total", "Kafka records read from the frames topic")
ROWS = Counter("flywheel_sink_rows_written_total", "frame rows written to the lake")
FILES = Counter("flywheel_sink_files_written_total", "Parquet files written to the lake")
DEAD_LETTERED = Counter("flywheel_sink_dead_lettered_total", "records sent to the dead-letter topic", ["reason"])
DUPLICATES = Counter("flywheel_sink_duplicate_frames_total",
                     "frames dropped because their (drive_id, seq) was already stored or buffered")
GAPS = Counter("flywheel_sink_sequence_gaps_total", "chunks starting past the next expected seq of their drive")
OVERTAKEN = Counter("flywheel_sink_overtaken_total", "buffers dropped unwritten because another worker had already "
                    "published some of their offsets (a stalled or evicted worker); the partition is re-read")
FLUSH_SECONDS = Histogram("flywheel_sink_flush_seconds", "seconds to make one partition buffer durable "
                          "(dead letters flushed, Parquet written, fsynced, renamed)",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BUFFERED_ROWS = Gauge("flywheel_sink_buffered_rows", "rows held in memory, not yet written")


@dataclass
class SinkStats:
    """Counters of one sink run (the Prometheus metrics count across runs of the process)."""

    records: int = 0  # Kafka records read
    rows_written: int = 0
    files_written: int = 0
    commits: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)  # by RejectReason value
    duplicate_records: int = 0  # chunks dropped whole: every frame already stored or buffered
    duplicate_frames: int = 0  # frames dropped, from whole and from partly overlapping chunks
    gaps: int = 0
    overtaken: int = 0  # buffers dropped because another worker had published some of their offsets


class LakeOvertaken(Exception):
    """Another worker already published some of the offsets this buffer holds."""


@dataclass(frozen=True)
class FlushResult:
    """One partition buffer made durable; `path` is None when none of its records held new frames."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    rows: int
    path: Path | None
    reason: str  # rows | bytes | age | date | revoke | stop


@dataclass
class _Buffer:
    date: str  # hive partition: UTC date of the Kafka record timestamps
    first: int  # Kafka offset of the first record, bad and duplicate records included
    last: int
    started: float  # time.monotonic() when the first record arrived
    batches: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0  # record value bytes
    drive_seq: dict[str, SeqRanges] = field(default_factory=dict)  # drive_id -> seq ranges in this buffer
    finals: dict[str, int] = field(default_factory=dict)  # drive_id -> last seq, for final chunks in this buffer
    dead_letters: list = field(default_factory=list)  # producer futures, awaited before the commit


class _Listener(AsyncConsumerRebalanceListener):
    """Async so that the revoke commit can be awaited on kafka-python's IO thread (blocking calls are refused there)."""

    def __init__(self, sink: "Sink") -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked):
        offsets, results = self.sink._write_partitions({tp.partition for tp in revoked}, "revoke")
        if offsets:
            try:
                await self.sink._consumer.commit_async(offsets)
                self.sink.stats.commits += 1
            except Exception as exc:  # the files are durable; the next owner seeks past them by the lake
                log.warning("commit on revoke failed (%s); the lake position covers it", exc)
        self.sink._forget({tp.partition for tp in revoked})
        self.sink._report(results)

    async def on_partitions_lost(self, lost):
        # Another member may own these already: writing now could overlap its files. Drop; it re-reads them.
        dropped = sum(b.rows for p, b in self.sink._buffers.items() if p in {tp.partition for tp in lost})
        log.warning("lost partitions %s; dropping %d buffered rows", sorted(tp.partition for tp in lost), dropped)
        self.sink._forget({tp.partition for tp in lost})

    async def on_partitions_assigned(self, assigned):
        # Paused until the main thread has sought each one from the lake (see Sink._position_pending).
        for tp in assigned:
            self.sink._consumer.pause(tp)
        self.sink._pending |= set(assigned)


class Sink:
    """The sink worker. `run()` consumes until `stop` is set, then flushes, commits and closes."""

    def __init__(self, kafka: KafkaConfig, config: SinkConfig,
                 on_flush: Callable[[FlushResult], None] | None = None) -> None:
        self.kafka = kafka
        self.config = config
        self.on_flush = on_flush
        self.stats = SinkStats()
        self._buffers: dict[int, _Buffer] = {}
        self._seen: dict[int, dict[str, SeqRanges]] = {}  # partition -> drive_id -> seqs stored or buffered
        self._next_offset: dict[int, int] = {}  # partition -> next offset to take; older records are stale
        self._pending: set[TopicPartition] = set()
        self._failed = False
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._watch: SinkWatch | None = None

    # ------------------------------------------------------------------------------------------------- lifecycle

    def run(self, stop: threading.Event | None = None) -> SinkStats:
        stop = stop or threading.Event()
        lake = Path(self.config.lake_dir)
        removed = remove_stale_temporaries(lake, TABLE)
        if removed:
            log.info("removed %d stale temporary files", removed)
        opts = self.kafka.client_options()
        self._producer = KafkaProducer(**opts, acks="all", enable_idempotence=True, linger_ms=5)
        self._consumer = self._new_consumer(subscribe=True)
        # another member may hold its records for max_age_s before the lake moves: never call that a stall
        stall_after = max(self.config.stall_after_s, self.config.max_age_s + self.config.session_timeout_ms / 1000)
        self._watch = SinkWatch(lake, self.kafka.frames_topic, self.config.group_id, stall_after)
        log.info("sink consuming %s as group %s into %s", self.kafka.frames_topic, self.config.group_id, lake)
        try:
            while not stop.is_set():
                polled = self._consumer.poll(timeout_ms=self.config.poll_ms)
                action = self._watch.check(self._consumer, bool(self._consumer.assignment() or self._pending))
                if action is not None:
                    self._recover(action)
                    continue
                if self._pending:
                    self._position_pending()
                for tp, records in polled.items():
                    for record in records:
                        if tp in self._pending:
                            break  # overtaken while handling this batch: re-read from the lake first
                        self._handle(tp.partition, record)
                self._flush_due()
            self._flush({*self._buffers}, "stop")
        except BaseException:
            self._failed = True  # nothing more may be committed: the buffers may be half-handled
            raise
        finally:
            self._close()
        log.info("sink stopped: %s", self.stats)
        return self.stats

    def _new_consumer(self, subscribe: bool) -> KafkaConsumer:
        consumer = KafkaConsumer(
            **self.kafka.client_options(), group_id=self.config.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=self.config.session_timeout_ms,
            max_poll_interval_ms=self.config.max_poll_interval_ms,
            heartbeat_interval_ms=max(100, self.config.session_timeout_ms // 3),  # Kafka's rule: under a third
            max_poll_records=self.config.max_poll_records)
        if subscribe:
            consumer.subscribe([self.kafka.frames_topic], listener=_Listener(self))
        return consumer

    def _recover(self, how: str) -> None:
        """A stall (`ingest.sink_watch`): rejoin the group with a fresh consumer, or take every partition directly.
        Nothing is held: a stalled sink owns no partition, so it has no buffer."""
        self._forget(set(self._buffers))
        try:
            self._consumer.close(autocommit=False)
        except Exception:  # a consumer stuck in a join may not close cleanly; it is replaced either way
            log.exception("closing the stalled consumer failed")
        self._consumer = self._new_consumer(subscribe=how == "rejoin")
        if how == "assign":
            parts = self._consumer.partitions_for_topic(self.kafka.frames_topic) or set()
            tps = [TopicPartition(self.kafka.frames_topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            for tp in tps:
                self._consumer.pause(tp)
            self._pending |= set(tps)  # positioned from the lake by _position_pending, as after any assignment

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._failed:
            self._forget(set(self._buffers))
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception:  # closing must not hide the error that got us here
                log.exception("closing the consumer failed")
        if self._producer is not None:
            self._producer.close(timeout=DLQ_FLUSH_TIMEOUT_S)

    def _forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self._buffers.pop(p, None)
            self._seen.pop(p, None)
            self._next_offset.pop(p, None)
        self._pending = {tp for tp in self._pending if tp.partition not in partitions}
        BUFFERED_ROWS.set(sum(b.rows for b in self._buffers.values()))

    def _position_pending(self) -> None:
        """Seek each newly assigned partition to max(committed, lake) and load its dedup state from the lake."""
        pending, self._pending = self._pending, set()
        assigned = self._consumer.assignment()
        pending = {tp for tp in pending if tp in assigned}
        positions = lake_positions(Path(self.config.lake_dir), self.kafka.frames_topic, {tp.partition for tp in pending})
        for tp in sorted(pending):
            pos = positions[tp.partition]
            committed = self._consumer.committed(tp, timeout_ms=KAFKA_CALL_TIMEOUT_MS)
            self._seen[tp.partition] = pos.drive_seq
            if committed is None and pos.next_offset == 0:
                # nothing stored, nothing committed: from the beginning. Explicitly: a partition this consumer gets
                # back after a rebalance keeps its old fetch position, past records whose buffer was dropped
                target = None
                self._consumer.seek_to_beginning(tp)
            else:
                target = max(committed or 0, pos.next_offset)
                self._consumer.seek(tp, target)
            self._next_offset[tp.partition] = target or 0
            log.info("partition %d: committed %s, lake next %d (%d files, %d drives) -> start at %s", tp.partition,
                     committed, pos.next_offset, pos.files, len(pos.drive_seq), target if target is not None else "earliest")
            self._consumer.resume(tp)

    # ------------------------------------------------------------------------------------------------- records

    def _handle(self, partition: int, record) -> None:
        RECORDS.inc()
        self.stats.records += 1
        if record.offset < self._next_offset.get(partition, 0):
            return  # fetched before a seek: already in the lake or in the buffer
        self._next_offset[partition] = record.offset + 1
        ts = record.timestamp if record.timestamp is not None and record.timestamp >= 0 else int(time.time() * 1000)
        date = ingest_date(ts)
        buf = self._buffers.get(partition)
        if buf is not None and buf.date != date:
            self._flush({partition}, "date")
            buf = None
        if buf is None:
            buf = self._buffers[partition] = _Buffer(date, record.offset, record.offset, time.monotonic())
        value = record.value or b""
        buf.last = record.offset
        buf.nbytes += len(value)
        try:
            chunk = decode_record(record.key, value, record.headers, max_frames=MAX_FRAMES_PER_CHUNK)
            first, last = chunk.first_seq, chunk.last_seq
            seen = self._seen.setdefault(partition, {}).setdefault(chunk.drive_id, SeqRanges())
            # only the frames not stored yet: a resent chunk is dropped, an overlapping one is cut, and a chunk that
            # fills an earlier gap is kept (ranges, not a high-water mark)
            pieces = seen.missing(first, last)
            new = sum(hi - lo + 1 for lo, hi in pieces)
            if new < chunk.num_frames:
                self._count_duplicates(chunk.num_frames - new)
                if not pieces:
                    self.stats.duplicate_records += 1
                    return
            if first > seen.max + 1:
                GAPS.inc()
                self.stats.gaps += 1
                log.warning("drive %s: chunk at seq %d, expected %d (partition %d offset %d); storing it anyway",
                            chunk.drive_id, first, seen.max + 1, partition, record.offset)
            # Arrow slices share the record's buffers: no copy until the Parquet writer reads them
            batches = [lake_batch(chunk.frames.slice(lo - first, hi - lo + 1), chunk.schema_version, ts, partition,
                                  record.offset) for lo, hi in pieces]
        except ChunkRejected as exc:
            self._dead_letter(buf, record, exc.reason.value, exc.detail)
            return
        except Exception as exc:  # a chunk the contract let through but we cannot store: park it, keep going
            log.exception("unexpected error decoding partition %d offset %d", partition, record.offset)
            self._dead_letter(buf, record, RejectReason.MALFORMED.value, f"unexpected {type(exc).__name__}: {exc}")
            return
        if chunk.final:
            merge_drive_final(buf.finals, {chunk.drive_id: last})
        in_buffer = buf.drive_seq.setdefault(chunk.drive_id, SeqRanges())
        for (lo, hi), batch in zip(pieces, batches):
            seen.add(lo, hi)
            in_buffer.add(lo, hi)
            buf.batches.append(batch)
            buf.rows += batch.num_rows
            BUFFERED_ROWS.inc(batch.num_rows)
        if buf.rows >= self.config.max_rows:
            self._flush({partition}, "rows")
        elif buf.nbytes >= self.config.max_bytes:
            self._flush({partition}, "bytes")

    def _count_duplicates(self, n: int) -> None:
        DUPLICATES.inc(n)
        self.stats.duplicate_frames += n

    def _dead_letter(self, buf: _Buffer, record, reason: str, detail: str) -> None:
        # the record's own headers travel with it (an Arrow record is read by them), the reason after them
        headers = [*(record.headers or ()), ("reason", reason.encode()),
                   ("detail", detail[:2000].encode("utf-8", "replace")),
                   ("source_topic", record.topic.encode()), ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode())]
        buf.dead_letters.append(self._producer.send(self.kafka.dead_letter_topic, key=record.key,
                                                    value=record.value, headers=headers))
        DEAD_LETTERED.labels(reason).inc()
        self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + 1
        log.info("dead-lettered partition %d offset %d: %s: %s", record.partition, record.offset, reason, detail[:200])

    # ------------------------------------------------------------------------------------------------- flushing

    def _flush_due(self) -> None:
        """Rotate buffers older than max_age_s; runs after every poll, so also while the topic is idle."""
        now = time.monotonic()
        due = {p for p, b in self._buffers.items() if now - b.started >= self.config.max_age_s}
        if due:
            self._flush(due, "age")

    def _flush(self, partitions: set[int], reason: str) -> None:
        offsets, results = self._write_partitions(partitions, reason)
        if offsets:
            try:
                self._consumer.commit(offsets, timeout_ms=KAFKA_CALL_TIMEOUT_MS)
                self.stats.commits += 1
            except KafkaError as exc:  # e.g. a rebalance: the lake position makes the next owner skip these files
                log.warning("commit of %s failed (%s); the lake position covers it",
                            {tp.partition: o.offset for tp, o in offsets.items()}, exc)
        self._report(results)

    def _write_partitions(self, partitions: set[int], reason: str) -> tuple[dict, list[FlushResult]]:
        """Make the buffers durable (dead letters acknowledged, file fsynced and renamed); returns what to commit."""
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        results: list[FlushResult] = []
        if self._failed:
            return offsets, results
        for p in sorted(partitions):
            buf = self._buffers.pop(p, None)
            if buf is None:
                continue
            t0 = time.perf_counter()
            self._await_dead_letters(buf)
            path = None
            if buf.rows:
                try:
                    path = self._write_file(p, buf)
                except LakeOvertaken as exc:
                    self._overtaken(p, buf, reason, exc)
                    continue
                FILES.inc()
                ROWS.inc(buf.rows)
                self.stats.files_written += 1
                self.stats.rows_written += buf.rows
            FLUSH_SECONDS.observe(time.perf_counter() - t0)
            BUFFERED_ROWS.dec(buf.rows)
            offsets[TopicPartition(self.kafka.frames_topic, p)] = OffsetAndMetadata(buf.last + 1, "", -1)
            results.append(FlushResult(self.kafka.frames_topic, p, buf.first, buf.last, buf.rows, path, reason))
            log.debug("flushed partition %d offsets %d-%d (%d rows, %s) to %s", p, buf.first, buf.last, buf.rows,
                      reason, path)
        return offsets, results

    def _overtaken(self, partition: int, buf: _Buffer, reason: str, exc: LakeOvertaken) -> None:
        """Drop the buffer and its offsets uncommitted; unless the partition is being revoked, pause it and seek it
        from the lake again (max of committed and lake, dedup state from the footers) before reading on."""
        OVERTAKEN.inc()
        self.stats.overtaken += 1
        BUFFERED_ROWS.dec(buf.rows)
        log.warning("partition %d: offsets %d-%d not written: %s; re-reading the partition from the lake", partition,
                    buf.first, buf.last, exc)
        self._forget({partition})
        if reason != "revoke":
            tp = TopicPartition(self.kafka.frames_topic, partition)
            self._consumer.pause(tp)
            self._pending.add(tp)

    def _await_dead_letters(self, buf: _Buffer) -> None:
        if not buf.dead_letters:
            return
        self._producer.flush(timeout=DLQ_FLUSH_TIMEOUT_S)
        for fut in buf.dead_letters:
            fut.get(timeout=0)  # raises if the broker refused it: then nothing past it may be committed

    def _write_file(self, partition: int, buf: _Buffer) -> Path:
        table = pa.Table.from_batches(buf.batches, schema=FRAMES_LAKE_SCHEMA)
        path = partition_dir(Path(self.config.lake_dir), TABLE, buf.date) / file_name(
            self.kafka.frames_topic, partition, buf.first, buf.last)
        meta = {DRIVE_SEQ_KEY: encode_drive_seq(buf.drive_seq),
                "flywheel.kafka_topic": self.kafka.frames_topic, "flywheel.kafka_partition": str(partition),
                "flywheel.first_offset": str(buf.first), "flywheel.last_offset": str(buf.last)}
        if buf.finals:
            meta[DRIVE_FINAL_KEY] = encode_drive_final(buf.finals)

        def not_overtaken() -> None:
            # Fencing by the lake, checked once the file is durable and just before it becomes visible: a worker
            # that stalled past its session (or its successor) must not publish offsets the other one already
            # published: partly overlapping files would hold those frames twice. Same name = the same records.
            others = overlapping_files(path.parent, self.kafka.frames_topic, partition, buf.first, buf.last,
                                       except_name=path.name)
            if others:
                raise LakeOvertaken(f"{', '.join(f.path.name for f in others)} already hold(s) some of them")

        try:
            return write_parquet_atomic(table, path, row_group_size=self.config.row_group_rows, metadata=meta,
                                        before_rename=not_overtaken, compression=self.config.compression)
        except FileNotFoundError:
            # another worker starting up removed our temporary file as stale: write it again once
            log.warning("temporary file of %s vanished; writing again", path.name)
            return write_parquet_atomic(table, path, row_group_size=self.config.row_group_rows, metadata=meta,
                                        before_rename=not_overtaken, compression=self.config.compression)

    def _report(self, results: list[FlushResult]) -> None:
        if self.on_flush is not None:
            for r in results:
                self.on_flush(r)


def run_sink(kafka: KafkaConfig, sink: SinkConfig, stop: threading.Event | None = None,
             on_flush: Callable[[FlushResult], None] | None = None) -> SinkStats:
    """Consume `kafka.frames_topic` into `sink.lake_dir` until `stop` is set (forever without one).

    `on_flush` is called after each partition buffer is durable and its offset commit was attempted (from the
    rebalance listener's thread on revoke). Starts no metrics server: the caller exposes prometheus_client's registry.
    """
    return Sink(kafka, sink, on_flush).run(stop)
