"""The streaming shadow worker against a real Tansu broker, a real lake and real ONNX models."""

from __future__ import annotations

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
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from ingest.config import KafkaConfig
from ingest.bus import encode_record
from ingest.contract import SCHEMA_VERSION, encode_chunk
from ingest.lake import live_files
from shadow.outputs import covered
from shadow.config import ReplayConfig
from shadow.batch.replay import replay
from shadow.config import StreamConfig
from shadow.stream.worker import StreamWorker
from tests.shadow.test_replay import IDS, check_exactly_once, drive, models, read, write_frames  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
PAIR = IDS[2]


def produce(kafka: KafkaConfig, chunks: list[tuple], pause_s: float = 0.0, legacy_every: int = 0) -> list[tuple]:
    """chunks: (drive_id, first_seq, frames, final), produced as the ingest server does (`ingest.bus`), every
    `legacy_every`-th one in the older protobuf format instead; returns (partition, offset, drive_id, first_seq,
    frames)."""
    producer = KafkaProducer(**kafka.client_options(), acks="all", enable_idempotence=True)
    out = []
    try:
        for i, (d, s, f, final) in enumerate(chunks):
            if legacy_every and i % legacy_every == 0:
                value, headers = encode_chunk(d, "veh-1", s, f, final=final).SerializeToString(), None
            else:
                value, headers = encode_record(f, d, "veh-1", s, final, SCHEMA_VERSION)
            md = producer.send(kafka.frames_topic, key=d.encode(), value=value, headers=headers).get(10)
            out.append((md.partition, md.offset, d, s, f))
            if pause_s:
                time.sleep(pause_s)
    finally:
        producer.close()
    return out


def fleet_chunks(lengths: dict[str, int], chunk: int) -> list[tuple]:
    """Round-robin chunks of drives, as vehicles stream them side by side."""
    # 8 waypoints at 0.5 s: the whole on-board plan the onboard table compares
    drives = {d: drive(i, n, lighting=[1, 2, 1, 3][i % 4], road=[1, 4, 3, 1][i % 4], waypoints=8)
              for i, (d, n) in enumerate(lengths.items())}
    starts = {d: list(range(0, n, chunk)) for d, n in lengths.items()}
    out = []
    while any(starts.values()):
        for d, todo in starts.items():
            if todo:
                s = todo.pop(0)
                f = drives[d]
                out.append((d, s, f.slice(s, min(s + chunk, f.num_frames)), s + chunk >= f.num_frames))
    return out


def rows(lake: Path, table: str = "divergences") -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, table))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def by_frame(t: pa.Table) -> pa.Table:
    return t.sort_by([("drive_id", "ascending"), ("seq", "ascending")])


def test_stream_continues_a_batch_replay_and_matches_it(models, kafka_config, group_id, tmp_path):
    lengths = {"d0": 130, "d1": 110, "d2": 150, "d3": 75}
    # a third of the records in the older protobuf format: a topic written before and after an upgrade
    sent = produce(kafka_config, fleet_chunks(lengths, 30), legacy_every=3)
    total = sum(lengths.values())
    now_ms = int(time.time() * 1000)
    # lake A: the sink has stored the first three chunks of every drive and a batch replay ran over them
    lake_a, lake_b = tmp_path / "a", tmp_path / "b"
    write_frames(lake_a, [r for r in sent if r[3] < 90], per_file=1, ingest_ms=now_ms)
    batch_part = replay(lake_a, models["teacher"], models["student"], ReplayConfig())
    assert 0 < batch_part.frames_replayed < total and batch_part.units_deferred > 0
    # the streaming worker takes over from Kafka: it must skip what the batch covered and do the rest
    worker = StreamWorker(kafka_config, lake_a, models["teacher"], models["student"],
                          StreamConfig(group_id=group_id, max_age_s=0.3))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: rows(lake_a) >= total, 60, "every frame replayed")
    finally:
        stop.set()
        thread.join(30)
    assert worker.stats.frames == total - batch_part.frames_replayed
    check_exactly_once(lake_a, lengths, *IDS)
    # lake B: everything stored, one batch replay; the stream's rows must be the batch's
    write_frames(lake_b, sent, per_file=2, ingest_ms=now_ms)
    full = replay(lake_b, models["teacher"], models["student"], ReplayConfig(drive_end_idle_s=0))
    assert full.frames_replayed == total
    a, b = by_frame(read(lake_a, "divergences")), by_frame(read(lake_b, "divergences"))
    for col in ("ade_4s", "fde_1s", "ahe_2s", "maneuver_jsd", "score", "ttc_student", "teacher_ade_driver",
                "student_fde_driver"):
        np.testing.assert_allclose(a[col].to_numpy(zero_copy_only=False), b[col].to_numpy(zero_copy_only=False),
                                   rtol=1e-4, atol=1e-4, err_msg=col)
    assert a["maneuver_student"].to_pylist() == b["maneuver_student"].to_pylist()
    # the per-model log-replay rows and the on-board comparisons too
    for table, key, cols in (("log_replay", IDS[0], ("score", "ego_progress", "horizon_s")),
                             ("log_replay", IDS[1], ("score", "comfort", "min_ttc_s")),
                             ("onboard", PAIR, ("fleet_score", "fleet_ade_4s", "emulation_score"))):
        a, b = by_frame(read(lake_a, table, key)), by_frame(read(lake_b, table, key))
        assert a.num_rows == b.num_rows == total, table
        for col in cols:
            np.testing.assert_allclose(a[col].to_numpy(zero_copy_only=False), b[col].to_numpy(zero_copy_only=False),
                                       rtol=1e-4, atol=1e-4, err_msg=f"{table} {col}")
    sa = read(lake_a, "scenarios").sort_by([("drive_id", "ascending"), ("window_start_seq", "ascending")])
    sb = read(lake_b, "scenarios").sort_by([("drive_id", "ascending"), ("window_start_seq", "ascending")])
    assert sa.select(["drive_id", "window_start_seq", "window_end_seq", "frames", "lighting"]).equals(
        sb.select(["drive_id", "window_start_seq", "window_end_seq", "frames", "lighting"]))
    np.testing.assert_allclose(sa["mean_score"].to_numpy(), sb["mean_score"].to_numpy(), rtol=1e-4)
    # and a batch replay after the stream has nothing left to do
    assert replay(lake_a, models["teacher"], models["student"], ReplayConfig()).units == 0


def _start_worker(kafka: KafkaConfig, lake: Path, models: dict, group: str, log: Path) -> subprocess.Popen:
    cfg = StreamConfig(group_id=group, max_age_s=0.2, max_poll_records=4).model_dump_json()
    return subprocess.Popen(
        [sys.executable, "-m", "flywheel", "shadow", "stream", "--bootstrap", kafka.bootstrap_servers, "--lake",
         str(lake), "--teacher", str(models["teacher"]), "--student", str(models["student"])],
        cwd=REPO, stdout=open(log.with_suffix(".out"), "ab"), stderr=open(log, "ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1", "FLYWHEEL_SHADOW__STREAM": cfg})


def committed(kafka: KafkaConfig, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(**kafka.client_options(), group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(kafka.frames_topic, p)) for p in range(kafka.partitions)}
    finally:
        consumer.close()


def test_kill_9_mid_stream_then_restart_each_frame_once(models, kafka_config, group_id, tmp_path):
    lengths = {f"d{i}": 100 + 10 * i for i in range(6)}
    chunks = fleet_chunks(lengths, 20)
    lake, log = tmp_path / "lake", tmp_path / "worker.log"
    proc = _start_worker(kafka_config, lake, models, group_id, log)
    try:
        wait_until(lambda: "starting at" in log.read_text() or "resume at" in log.read_text(), 40, "the group join")
        done = threading.Event()
        t = threading.Thread(target=lambda: (produce(kafka_config, chunks, pause_s=0.05), done.set()), daemon=True)
        t.start()
        wait_until(lambda: log.with_suffix(".out").read_text().count("wrote") >= 3, 30, "some written ranges")
        proc.kill()  # SIGKILL: no final write, no commit
        proc.wait()
        assert not done.is_set(), "the stream ended before the kill; the test proves nothing"
        # committed offsets never pass the written files: everything below them is covered by the pair's files
        for p, c in committed(kafka_config, group_id).items():
            if c:
                assert not covered(lake, "divergences", "pair", PAIR, kafka_config.frames_topic, p).missing(0, c - 1)
        t.join(60)
        proc = _start_worker(kafka_config, lake, models, group_id, log)
        wait_until(lambda: rows(lake) >= sum(lengths.values()), 60, "every frame after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_exactly_once(lake, lengths, *IDS)
    assert "shadow stream stopped" in log.read_text()
    for p, c in committed(kafka_config, group_id).items():
        if c:
            assert not covered(lake, "divergences", "pair", PAIR, kafka_config.frames_topic, p).missing(0, c - 1)


def two_workers(kafka: KafkaConfig, lake: Path, models: dict, group_id: str):
    """Two stream workers of one group on the lake, not started: (workers, their threads, the stop event)."""
    cfg = StreamConfig(group_id=group_id, max_age_s=0.2, max_poll_records=4)
    workers = [StreamWorker(kafka, lake, models["teacher"], models["student"], cfg) for _ in range(2)]
    stop = threading.Event()
    return workers, [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers], stop


def test_two_workers_share_the_partitions_and_write_each_frame_once(models, kafka_config, group_id, tmp_path):
    """A second worker joining mid-stream takes partitions over (revoke: the first writes what is done and
    commits); together they write every frame exactly once."""
    partitions = kafka_config.partitions

    def partition_of(drive: str) -> int:  # Kafka's default partitioner for a key
        return (murmur2(drive.encode()) & 0x7FFFFFFF) % partitions

    lengths = {f"d{i}": 90 + 10 * i for i in range(6)}
    # the drives sent after the join cover every partition, so whichever the second worker takes has new data
    late = {partition_of(d) for d in ("d3", "d4", "d5")}
    extra = (f"e{i}" for i in range(1000))
    while len(late) < partitions:
        d = next(extra)
        if partition_of(d) not in late:
            late.add(partition_of(d))
            lengths[d] = 90
    chunks = fleet_chunks(lengths, 10)
    lake = tmp_path / "lake"
    workers, threads, stop = two_workers(kafka_config, lake, models, group_id)
    threads[0].start()
    joined = threading.Event()

    def produce_around_the_join() -> None:
        # three whole drives before the second worker joins (so the first worker has complete windows to write),
        # the other three after: the join lands mid-stream however fast or slow the machine is
        produce(kafka_config, [c for c in chunks if c[0] in ("d0", "d1", "d2")], 0.05)
        joined.wait(90)
        produce(kafka_config, [c for c in chunks if c[0] not in ("d0", "d1", "d2")], 0.05)

    try:
        producer = threading.Thread(target=produce_around_the_join, daemon=True)
        producer.start()
        wait_until(lambda: workers[0].stats.files > 0, 60, "the first worker's files")
        threads[1].start()
        wait_until(lambda: workers[1]._parts, 30, "the second worker's partitions")
        joined.set()
        producer.join(90)
        assert not producer.is_alive(), "the producer did not finish"
        wait_until(lambda: rows(lake) >= sum(lengths.values()), 60, "every frame")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert all(w.stats.frames > 0 for w in workers), "the second worker never got a partition"
    check_exactly_once(lake, lengths, *IDS)


def test_a_worker_joining_while_the_first_holds_unwritten_records_loses_none(models, kafka_config, group_id,
                                                                              tmp_path):
    """The first worker has read the first chunks of every drive but written nothing (their 4 s future has not
    arrived) when the second joins; the partitions it gets back must be re-read from the beginning, not from its old
    fetch position."""
    lengths = {f"d{i}": 90 + 10 * i for i in range(6)}
    chunks = fleet_chunks(lengths, 10)
    early = len(lengths) * 3  # three 1 s chunks of each drive: no frame has its future yet
    lake = tmp_path / "lake"
    workers, threads, stop = two_workers(kafka_config, lake, models, group_id)
    threads[0].start()
    try:
        wait_until(lambda: workers[0]._parts, 60, "the first worker's partitions")
        produce(kafka_config, chunks[:early])
        wait_until(lambda: workers[0].stats.records >= early, 30, "the first worker reading the early chunks")
        assert workers[0].stats.files == 0
        threads[1].start()
        wait_until(lambda: workers[1]._parts, 60, "the second worker's partitions")
        produce(kafka_config, chunks[early:])
        wait_until(lambda: rows(lake) >= sum(lengths.values()), 60, "every frame")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    check_exactly_once(lake, lengths, *IDS)
