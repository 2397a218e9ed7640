"""The Kafka -> Parquet sink against a real Tansu broker and a real lake: exactly once, dead letters, rotation, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from ingest.config import KafkaConfig, SinkConfig
from ingest.bus import encode_record
from ingest.contract import FRAME_SCHEMA, SCHEMA_VERSION, encode_chunk, frames_to_arrow
from ingest.tables import FRAMES_LAKE_SCHEMA
from ingest.lake import all_files, file_name, live_files, parse_file, partition_dir, write_parquet_atomic
from ingest.lake import DRIVE_SEQ_KEY
from ingest.broker import ensure_topics
from ingest.lake_index import lake_positions, read_drive_final
from ingest.sink import Sink, SinkStats
from ingest.lake import ingest_date, to_lake_batch
from ingest.synth import EPOCH_NS, synthetic_frames

REPO = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000
T0_MS = EPOCH_NS // 1_000_000  # 2026-01-01T00:00:00Z


# ------------------------------------------------------------------------------------------------------------ helpers


def make_drive(drive_id: str, n_frames: int, chunk: int, seed: int, vehicle: str = "veh-1", legacy: bool = False):
    """(reference FRAME_SCHEMA table of the whole drive, [(first_seq, record)]): each record as the ingest server
    produces it, (Arrow IPC value, headers) (`ingest.bus`), or with `legacy` a serialized DriveChunk (the older
    format)."""
    frames = synthetic_frames(n_frames, agents=5, waypoints=3, seed=seed)
    ref = pa.Table.from_batches([frames_to_arrow(frames, drive_id, vehicle, 0)])
    chunks = []
    for s in range(0, n_frames, chunk):
        part, final = frames.slice(s, min(s + chunk, n_frames)), s + chunk >= n_frames
        chunks.append((s, encode_chunk(drive_id, vehicle, s, part, final=final).SerializeToString() if legacy
                       else encode_record(part, drive_id, vehicle, s, final, SCHEMA_VERSION)))
    return ref, chunks


def produce(kafka: KafkaConfig, records: list[tuple], topic: str | None = None) -> list:
    """records: (key, value[, timestamp_ms]), value either bytes or (bytes, headers); returns the RecordMetadata of
    each, in order."""
    producer = KafkaProducer(**kafka.client_options(), acks="all", enable_idempotence=True)
    try:
        futures = [producer.send(topic or kafka.frames_topic, key=r[0],
                                 value=r[1][0] if isinstance(r[1], tuple) else r[1],
                                 headers=r[1][1] if isinstance(r[1], tuple) else None,
                                 timestamp_ms=r[2] if len(r) > 2 else None) for r in records]
        producer.flush()
        return [f.get(timeout=10) for f in futures]
    finally:
        producer.close()


def drive_records(drive_id: str, chunks, ts_ms: int | None = None) -> list[tuple]:
    return [(drive_id.encode(), data, ts_ms) for _, data in chunks]


def read_lake(lake: Path) -> pa.Table:
    files = live_files(lake, "frames")
    if not files:
        return FRAMES_LAKE_SCHEMA.empty_table()
    return pa.concat_tables([pq.ParquetFile(f.path).read() for f in files])


def lake_rows(lake: Path) -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames"))


def frame_rows(table: pa.Table) -> list[dict]:
    """Rows of the frame contract's columns, sorted by (drive_id, seq), as Python values."""
    t = table.select(FRAME_SCHEMA.names).sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    return t.to_pylist()


def committed_offsets(kafka: KafkaConfig, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(**kafka.client_options(), group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(kafka.frames_topic, p)) for p in range(kafka.partitions)}
    finally:
        consumer.close()


def next_offsets(sent: list) -> dict[int, int]:
    """Partition -> offset after the last produced record. (Tansu's ListOffsets answers the last batch's base
    offset + 1 instead of the end of the log, so `end_offsets()` cannot be used here.)"""
    out: dict[int, int] = {}
    for md in sent:
        out[md.partition] = max(out.get(md.partition, 0), md.offset + 1)
    return out


WAIT_SCALE = 4  # the timeouts below bound a wait, they measure nothing: a consumer group's first join can take over
# 15 s on a loaded 2-core host (a CI run failed that way while other brokers ran beside it)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * WAIT_SCALE
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout * WAIT_SCALE}s waiting for {what}")
        time.sleep(0.1)


class SinkThread:
    """A Sink in a thread of the test process; leaving the block stops it (final flush) and re-raises its error."""

    def __init__(self, kafka: KafkaConfig, config: SinkConfig) -> None:
        self.flushes = []
        self.sink = Sink(kafka, config, on_flush=self.flushes.append)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.stats: SinkStats = self.sink.stats  # live: the sink updates it while it runs
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.sink.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> "SinkThread":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.thread.is_alive():
            raise RuntimeError("sink did not stop within 30 s")
        if self.error is not None:
            raise self.error


def sink_config(tmp_path: Path, group_id: str, **kw) -> SinkConfig:
    return SinkConfig(lake_dir=tmp_path / "lake", group_id=group_id, **{"max_age_s": 0.5, "poll_ms": 100, **kw})


def check_files(lake: Path, topic: str) -> None:
    """Every live file: fixed schema, name = its Kafka offsets, footer drive_seq = its rows, date = ingest date."""
    for f in live_files(lake, "frames"):
        pf = pq.ParquetFile(f.path)
        assert pf.schema_arrow.remove_metadata().equals(FRAMES_LAKE_SCHEMA.remove_metadata()), f.path
        assert pf.metadata.row_group(0).column(0).compression == "LZ4"  # the sink's codec (compaction recompresses)
        t = pf.read()
        assert f.topic == topic
        assert set(t["kafka_partition"].to_pylist()) == {f.partition}
        offsets = t["kafka_offset"].to_numpy()
        assert f.first <= offsets.min() and offsets.max() <= f.last and np.all(np.diff(offsets) >= 0)
        meta = pf.schema_arrow.metadata
        footer = json.loads(meta[DRIVE_SEQ_KEY.encode()])
        agg = t.group_by("drive_id").aggregate([("seq", "min"), ("seq", "max")])
        assert footer == {d: [[lo, hi]] for d, lo, hi in zip(*(agg[c].to_pylist() for c in ("drive_id", "seq_min", "seq_max")))}
        dates = {ingest_date(int(ms)) for ms in t["ingest_time"].cast(pa.int64()).to_numpy()}
        assert dates == {f.path.parent.name.removeprefix("date=")}


# -------------------------------------------------------------------------------------------------------------- tests


def test_every_frame_lands_once_with_equal_content(kafka_config, group_id, tmp_path):
    drives = [make_drive(f"drive-{i}", 60 + 10 * i, 25, seed=i) for i in range(3)]
    sent = produce(kafka_config, [r for i, (_, ch) in enumerate(drives) for r in drive_records(f"drive-{i}", ch)])
    expected = sum(ref.num_rows for ref, _ in drives)
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= expected, 15, "all rows in the lake")
        wait_until(lambda: sum(r.last_offset - r.first_offset + 1 for r in st.flushes) >= len(sent), 5, "commits")
    lake = read_lake(cfg.lake_dir)
    assert lake.num_rows == expected
    assert frame_rows(lake) == frame_rows(pa.concat_tables([ref for ref, _ in drives]))
    check_files(cfg.lake_dir, kafka_config.frames_topic)
    # the lake columns say where each row came from in Kafka
    by_offset = {(md.partition, md.offset): md.timestamp for md in sent}
    for p, o, ts in zip(*(lake[c].to_pylist() for c in ("kafka_partition", "kafka_offset", "ingest_time"))):
        assert int(ts.timestamp() * 1000) == by_offset[(p, o)]
    assert set(lake["schema_version"].to_pylist()) == {SCHEMA_VERSION}
    committed = committed_offsets(kafka_config, group_id)
    assert {p: committed[p] for p in next_offsets(sent)} == next_offsets(sent)
    assert st.stats.records == len(sent) and st.stats.rows_written == expected and not st.stats.dead_lettered
    # the file holding each drive's final chunk says so, with the drive's last seq
    finals: dict[str, int] = {}
    for f in live_files(Path(cfg.lake_dir), "frames"):
        finals.update(read_drive_final(f.path))
    assert finals == {f"drive-{i}": ref.num_rows - 1 for i, (ref, _) in enumerate(drives)}


def test_resent_and_rechunked_frames_are_stored_once(kafka_config, group_id, tmp_path):
    ref, chunks = make_drive("drive-dup", 100, 25, seed=7)
    frames = synthetic_frames(100, agents=5, waypoints=3, seed=7)
    rechunked = encode_chunk("drive-dup", "veh-1", 40, frames.slice(40, 60)).SerializeToString()  # seq 40..59
    key = b"drive-dup"
    # c0, c1, c1 again (a vehicle resending after a server crash), 40..59 (overlaps c1), c2 = 50..74 (overlaps)
    produce(kafka_config, [(key, chunks[0][1]), (key, chunks[1][1]), (key, chunks[1][1]), (key, rechunked),
                           (key, chunks[2][1])])
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 75, 15, "75 rows")
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref.slice(0, 75))
    assert st.stats.duplicate_records == 1 and st.stats.duplicate_frames == 25 + 10 + 10

    # A restarted sink knows what is stored from the files' footers alone: resends of old chunks are dropped.
    produce(kafka_config, [(key, chunks[0][1]), (key, chunks[3][1]), (key, chunks[2][1]), (key, chunks[3][1])])
    with SinkThread(kafka_config, cfg) as st2:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 100, 15, "100 rows")
        wait_until(lambda: st2.stats.records >= 4, 5, "all records read")
    lake = read_lake(cfg.lake_dir)
    assert lake.num_rows == 100
    assert frame_rows(lake) == frame_rows(ref)
    assert st2.stats.records == 4 and st2.stats.duplicate_records == 3 and st2.stats.rows_written == 25
    check_files(cfg.lake_dir, kafka_config.frames_topic)


def test_a_chunk_filling_an_earlier_gap_is_kept(kafka_config, group_id, tmp_path):
    """Kafka may hold a later chunk before an earlier one (a produce failed, the vehicle resent from its status):
    the earlier frames are new, not duplicates, also for a sink restarted in between."""
    ref, chunks = make_drive("drive-gap", 100, 25, seed=9)
    key = b"drive-gap"
    produce(kafka_config, [(key, chunks[0][1]), (key, chunks[2][1])])  # 0..24, then 50..74: a gap
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 50, 15, "50 rows")
    assert st.stats.gaps == 1
    footer = {d: r.to_json() for d, r in lake_positions(cfg.lake_dir, kafka_config.frames_topic, {0, 1, 2})[
        next(f.partition for f in live_files(cfg.lake_dir, "frames"))].drive_seq.items()}
    assert footer == {"drive-gap": [[0, 24], [50, 74]]}
    # the resend: 25..49 fills the gap, 50..74 is a duplicate, 75..99 is new
    produce(kafka_config, [(key, chunks[1][1]), (key, chunks[2][1]), (key, chunks[3][1])])
    with SinkThread(kafka_config, cfg) as st2:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 100, 15, "100 rows")
        wait_until(lambda: st2.stats.records >= 3, 5, "all records read")
    assert st2.stats.duplicate_frames == 25
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref)


def test_lake_beyond_committed_offset_is_not_written_again(kafka_config, group_id, tmp_path):
    """A crash after a file's rename but before the commit: the restarted sink resumes after the lake's last file."""
    ref, chunks = make_drive("drive-c", 150, 25, seed=3)
    sent = produce(kafka_config, drive_records("drive-c", chunks[:4]))
    partition = sent[0].partition
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg):
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 100, 15, "100 rows")
    tp = TopicPartition(kafka_config.frames_topic, partition)
    # Lose the commit: the group's offset goes back to before the files that are already in the lake.
    rewind = KafkaConsumer(**kafka_config.client_options(), group_id=group_id, enable_auto_commit=False)
    rewind.assign([tp])
    rewind.commit({tp: OffsetAndMetadata(1, "", -1)})
    assert rewind.committed(tp) == 1
    rewind.close()
    files_before = {f.path.name for f in all_files(cfg.lake_dir, "frames")}
    assert lake_positions(cfg.lake_dir, kafka_config.frames_topic, {partition})[partition].next_offset == 4

    produce(kafka_config, drive_records("drive-c", chunks[4:]))
    with SinkThread(kafka_config, cfg.model_copy(update={"max_rows": 10_000})) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 150, 15, "150 rows")
    assert st.stats.records == 2 and st.stats.duplicate_records == 0  # offsets 1..3 were never read again
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref)
    new = [parse_file(Path(n)) for n in {f.path.name for f in all_files(cfg.lake_dir, "frames")} - files_before]
    assert [(f.first, f.last) for f in new] == [(4, 5)]
    assert committed_offsets(kafka_config, group_id)[partition] == 6


def test_lake_positions_read_footers_only(tmp_path):
    lake, topic = tmp_path / "lake", "t"
    frames = synthetic_frames(10, agents=2, waypoints=2, seed=1)

    def put(partition, first, last, drive, seq0, footer=True):
        batch = pa.Table.from_batches([to_lake_batch(frames, drive, "v", seq0, 1, T0_MS, partition, first)])
        meta = {DRIVE_SEQ_KEY: json.dumps({drive: [[seq0, seq0 + 9]]})} if footer else None
        write_parquet_atomic(batch, partition_dir(lake, "frames", "2026-01-01") / file_name(topic, partition, first, last),
                             metadata=meta)

    put(0, 0, 4, "a", 0)
    put(0, 5, 9, "a", 10)
    put(0, 10, 12, "b", 0, footer=False)  # no footer: its two columns are scanned instead
    put(0, 0, 9, "a", 0)  # a compacted file covering the first two; its footer says less, the live files decide
    put(1, 3, 3, "c", 40)
    pos = lake_positions(lake, topic, {0, 1, 2})
    ranges = {p: {d: r.to_json() for d, r in x.drive_seq.items()} for p, x in pos.items()}
    assert pos[0].next_offset == 13 and ranges[0] == {"a": [[0, 9]], "b": [[0, 9]]} and pos[0].files == 2
    assert pos[1].next_offset == 4 and ranges[1] == {"c": [[40, 49]]}
    assert pos[2].next_offset == 0 and ranges[2] == {}


def test_bad_records_go_to_dead_letter_topic_with_reason(kafka_config, group_id, tmp_path):
    ref, chunks = make_drive("drive-bad", 75, 25, seed=5)
    frames = synthetic_frames(75, agents=5, waypoints=3, seed=5).slice(25, 50)
    wrong_version = encode_chunk("drive-bad", "veh-1", 25, frames, schema_version=7).SerializeToString()
    bad_crc = encode_chunk("drive-bad", "veh-1", 25, frames)
    bad_crc.crc32c ^= 1
    nan = synthetic_frames(75, agents=5, waypoints=3, seed=5).slice(25, 50)
    nan.cols["ego_speed"] = nan.cols["ego_speed"].copy()
    nan.cols["ego_speed"][3] = np.nan
    key = b"drive-bad"
    bad = [(key, b"\x0a\xff\xff\xff\xff\x0f", "malformed"), (key, wrong_version, "schema_version"),
           (key, bad_crc.SerializeToString(), "checksum"),
           (key, encode_chunk("drive-bad", "veh-1", 25, nan).SerializeToString(), "non_finite"),
           (b"someone-else", chunks[1][1], "bad_id")]
    sent = produce(kafka_config, [(key, chunks[0][1]), *[b[:2] for b in bad], (key, chunks[1][1]), (key, chunks[2][1])])
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 75, 15, "75 rows")
        wait_until(lambda: sum(r.last_offset - r.first_offset + 1 for r in st.flushes) >= len(sent), 5, "commits")
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref)
    assert st.stats.dead_lettered == {reason: 1 for _, _, reason in bad}
    partition = sent[0].partition
    assert committed_offsets(kafka_config, group_id)[partition] == len(sent)
    # the files' offset ranges tile the partition, the dead-lettered offsets included
    covered = sorted((f.first, f.last) for f in live_files(cfg.lake_dir, "frames"))
    assert covered[0][0] == 0 and covered[-1][1] == len(sent) - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(covered, covered[1:]))

    dlq = KafkaConsumer(**kafka_config.client_options(), enable_auto_commit=False, auto_offset_reset="earliest")
    tps = [TopicPartition(kafka_config.dead_letter_topic, p) for p in dlq.partitions_for_topic(kafka_config.dead_letter_topic)]
    dlq.assign(tps)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < len(bad) and time.monotonic() < deadline:
        for records in dlq.poll(timeout_ms=200).values():
            got.extend(records)
    dlq.close()
    got.sort(key=lambda r: int(dict(r.headers)["source_offset"]))
    assert len(got) == len(bad)
    for record, (k, value, reason), md in zip(got, bad, sent[1:]):
        h = dict(record.headers)
        assert h["reason"].decode() == reason and h["detail"]
        assert (h["source_topic"].decode(), int(h["source_partition"]), int(h["source_offset"])) == \
            (kafka_config.frames_topic, md.partition, md.offset)
        assert record.key == k and record.value == (value[0] if isinstance(value, tuple) else value)


def test_rotation_by_rows_date_age_and_stop(kafka_config, group_id, tmp_path):
    ref, chunks = make_drive("drive-r", 300, 25, seed=9)
    key = b"drive-r"
    # 8 chunks on 2026-01-01 (4 files by rows), one on 01-02 (flushed when 01-03 starts), one on 01-03 (by age)
    records = [(key, chunks[i][1], T0_MS + i) for i in range(8)]
    records += [(key, chunks[8][1], T0_MS + DAY_MS), (key, chunks[9][1], T0_MS + 2 * DAY_MS)]
    produce(kafka_config, records)
    cfg = sink_config(tmp_path, group_id, max_rows=50, max_age_s=1.0)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: len(st.flushes) >= 6, 15, "six flushes")
        produce(kafka_config, [(key, chunks[10][1], T0_MS + 2 * DAY_MS + 1)])
        wait_until(lambda: len(st.flushes) >= 7, 10, "an age flush")
        produce(kafka_config, [(key, chunks[11][1], T0_MS + 2 * DAY_MS + 2)])
        wait_until(lambda: st.stats.records >= 12, 10, "the last record read")
    assert [r.reason for r in st.flushes] == ["rows"] * 4 + ["date", "age", "age", "stop"]
    assert [r.rows for r in st.flushes] == [50] * 4 + [25] * 4
    dates = [f.path.parent.name for f in live_files(cfg.lake_dir, "frames")]
    assert sorted(dates) == ["date=2026-01-01"] * 4 + ["date=2026-01-02"] + ["date=2026-01-03"] * 3
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref)
    check_files(cfg.lake_dir, kafka_config.frames_topic)


def test_rebalance_flushes_and_commits_revoked_partitions(kafka_config, group_id, tmp_path):
    drives = [make_drive(f"drive-{i}", 50, 25, seed=20 + i) for i in range(4)]
    sent = produce(kafka_config, [r for i, (_, ch) in enumerate(drives) for r in drive_records(f"drive-{i}", ch)])
    cfg = sink_config(tmp_path, group_id, max_age_s=60)  # nothing lands by age within the test
    with SinkThread(kafka_config, cfg) as a:
        wait_until(lambda: a.stats.records >= len(sent), 15, "sink A read everything")
        assert lake_rows(cfg.lake_dir) == 0
        with SinkThread(kafka_config, cfg) as b:  # joining makes A give up its partitions: it flushes and commits
            wait_until(lambda: any(r.reason == "revoke" for r in a.flushes), 15, "A's revoke flush")
            assert lake_rows(cfg.lake_dir) == 200
            committed = committed_offsets(kafka_config, group_id)
            assert {p: committed[p] for p in next_offsets(sent)} == next_offsets(sent)
            more = make_drive("drive-9", 50, 25, seed=29)
            produce(kafka_config, drive_records("drive-9", more[1]))
            wait_until(lambda: a.stats.records + b.stats.records >= len(sent) + 2, 15, "the new chunks")
    lake = read_lake(cfg.lake_dir)
    assert frame_rows(lake) == frame_rows(pa.concat_tables([ref for ref, _ in drives] + [more[0]]))


def _start_sink_process(kafka: KafkaConfig, lake: Path, group: str, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flywheel", "sink", "--bootstrap", kafka.bootstrap_servers, "--lake", str(lake),
         "--group", group, "--max-rows", "60", "--max-age-s", "0.3", "--metrics-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log_file, "ab"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_kill_9_mid_stream_then_restart_stores_each_frame_once(kafka_config, group_id, tmp_path):
    drives = [make_drive(f"drive-{i}", 120, 20, seed=40 + i) for i in range(6)]
    records = [r for j in range(6) for i, (_, ch) in enumerate(drives) for r in drive_records(f"drive-{i}", ch[j:j + 1])]
    lake, log_file = tmp_path / "lake", tmp_path / "sink.log"
    proc = _start_sink_process(kafka_config, lake, group_id, log_file)
    try:
        wait_until(lambda: "start at" in log_file.read_text(), 20, "the sink to join")
        producer_done = threading.Event()

        def stream():  # a steady trickle of chunks, ~25 per second
            for r in records:
                produce(kafka_config, [r])
                time.sleep(0.02)
            producer_done.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        wait_until(lambda: len(all_files(lake, "frames")) >= 3, 15, "some files")
        proc.kill()  # SIGKILL: no flush, no commit, maybe a temporary file half written
        proc.wait()
        assert not producer_done.is_set(), "the stream ended before the kill; the test proves nothing"
        t.join(30)
        proc = _start_sink_process(kafka_config, lake, group_id, log_file)
        expected = sum(ref.num_rows for ref, _ in drives)
        wait_until(lambda: lake_rows(lake) >= expected, 25, "every row after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    table = read_lake(lake)
    assert frame_rows(table) == frame_rows(pa.concat_tables([ref for ref, _ in drives]))
    assert not list(lake.glob("frames/*/.*.tmp"))
    assert "sink stopped" in log_file.read_text()
    check_files(lake, kafka_config.frames_topic)


def test_a_worker_overtaken_by_another_drops_its_buffer_and_rereads_from_the_lake(kafka_config, group_id, tmp_path):
    """Two workers own the same partition at once (as a stalled worker and its successor do): one that would
    publish offsets the other already published drops its buffer and re-reads from the lake, so no frame is stored
    twice. Without that, worker B's file [0, 6] and worker A's [5, 9] would both be live, with offsets 5-6 twice."""
    kafka = kafka_config.model_copy(update={"frames_topic": f"frames-{group_id}", "partitions": 1})
    ensure_topics(kafka)
    ref, chunks = make_drive("drive-z", 100, 10, seed=5)
    records = drive_records("drive-z", chunks)
    cfg_a = sink_config(tmp_path, group_id + "-a", max_age_s=0.5)  # flushes whatever it has after 0.5 s
    cfg_b = sink_config(tmp_path, group_id + "-b", max_age_s=60.0, max_rows=70)  # flushes at 7 records or on stop
    with SinkThread(kafka, cfg_a) as a, SinkThread(kafka, cfg_b) as b:
        wait_until(lambda: a.sink._buffers is not None and b.sink._consumer is not None
                   and a.sink._consumer.assignment() and b.sink._consumer.assignment(), 30, "both assigned")
        produce(kafka, records[:5])
        wait_until(lambda: lake_rows(cfg_a.lake_dir) >= 50 and b.stats.records >= 5, 20, "A's first file, B reading")
        produce(kafka, records[5:])
        wait_until(lambda: a.stats.records >= 10 and b.stats.records >= 10, 20, "both reading the rest")
        wait_until(lambda: lake_rows(cfg_a.lake_dir) >= 100, 20, "every frame")
    lake = read_lake(cfg_a.lake_dir)
    assert lake.num_rows == 100
    assert frame_rows(lake) == frame_rows(ref)
    assert a.stats.overtaken + b.stats.overtaken >= 1
    spans = [(f.first, f.last) for f in live_files(cfg_a.lake_dir, "frames")]
    assert all(x[1] < y[0] for x, y in zip(spans, spans[1:])), spans  # live files never share an offset
