"""End to end on real parts: vehicle agent -> gRPC server -> Tansu -> sink -> Parquet lake, with processes killed.

Each test checks the one property that matters: every frame the vehicles logged is in the lake exactly once, with
the content they logged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition

from ingest.agent import run_agent
from ingest.broker import free_port
from ingest.config import AgentConfig, SinkConfig
from ingest.contract import FRAME_SCHEMA, arrow_to_frames
from ingest.lake import list_drive_files, live_files, read_drive, write_drive
from ingest.sink import run_sink
from ingest.synth import synthetic_drive
from tests.ingest_helpers import running_server


def make_fleet(root: Path, vehicles: int, drives: int, frames: int) -> int:
    total = 0
    for v in range(vehicles):
        for d in range(drives):
            n = frames + 37 * d  # not a multiple of the chunk size
            write_drive(root, synthetic_drive(f"drive-{v:02d}-{d:02d}", f"veh-{v:02d}", n, agents=8, seed=v * 100 + d))
            total += n
    return total


def lake_rows(lake: Path) -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames"))


def wait_for_rows(lake: Path, expected: int, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    rows = 0
    while time.monotonic() < deadline:
        rows = lake_rows(lake)
        if rows >= expected:
            time.sleep(1.0)  # anything beyond expected would be a duplicate: give it the chance to show
            return lake_rows(lake)
        time.sleep(0.3)
    return rows


def assert_lake_matches(lake: Path, drives_dir: Path) -> None:
    table = pa.concat_tables([pq.read_table(f.path) for f in live_files(lake, "frames")])
    pairs = list(zip(table["drive_id"].to_pylist(), table["seq"].to_pylist()))
    assert len(pairs) == len(set(pairs)), "a frame is stored twice"
    for path in list_drive_files(drives_dir):
        drive = read_drive(path)
        rows = table.filter(pc.equal(table["drive_id"], drive.drive_id)).sort_by("seq")
        assert rows["seq"].to_pylist() == list(range(drive.frames.num_frames)), drive.drive_id
        stored = arrow_to_frames(rows.select(FRAME_SCHEMA.names).cast(FRAME_SCHEMA))
        for name, col in drive.frames.cols.items():
            np.testing.assert_array_equal(col, stored.cols[name], err_msg=f"{drive.drive_id}.{name}")


class SinkThread:
    def __init__(self, kafka, lake: Path, group: str) -> None:
        self.stop = threading.Event()
        cfg = SinkConfig(lake_dir=lake, group_id=group, max_age_s=0.5, max_rows=5000)
        self.thread = threading.Thread(target=run_sink, args=(kafka, cfg, self.stop), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_agent_to_lake_exactly_once(kafka_config, group_id, tmp_path):
    drives, lake = tmp_path / "drives", tmp_path / "lake"
    total = make_fleet(drives, vehicles=4, drives=3, frames=230)

    async def upload():
        async with running_server(kafka_config) as (_, port):
            return await run_agent(AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=50, concurrency=8), drives)

    with SinkThread(kafka_config, lake, group_id):
        report = asyncio.run(upload())
        assert report.uploaded == 12 and not report.failed
        assert wait_for_rows(lake, total) == total
    assert_lake_matches(lake, drives)


def kafka_chunks(kafka) -> int:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        tps = [TopicPartition(kafka.frames_topic, p) for p in consumer.partitions_for_topic(kafka.frames_topic)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def _server_process(kafka, port: int) -> subprocess.Popen:
    env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "FLYWHEEL_SERVER__METRICS_PORT": "0", "FLYWHEEL_SERVER__LISTEN": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "server"], env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("listening on port"):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the pipe
            return proc
    raise RuntimeError(f"server did not start (exit {proc.wait()})")


def test_server_killed_mid_stream_agent_resumes(kafka_config, group_id, tmp_path):
    drives, lake = tmp_path / "drives", tmp_path / "lake"
    total = make_fleet(drives, vehicles=3, drives=2, frames=2000)
    port = free_port()
    server = _server_process(kafka_config, port)
    result = {}
    cfg = AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=20, window=1, concurrency=6, max_attempts=40,
                      backoff_initial_s=0.2, backoff_max_s=1.0)
    agent = threading.Thread(target=lambda: result.setdefault("report", asyncio.run(run_agent(cfg, drives))))
    try:
        with SinkThread(kafka_config, lake, group_id):
            agent.start()
            deadline = time.monotonic() + 30
            while kafka_chunks(kafka_config) < total // 20 // 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.kill()  # kill -9 in the middle of the streams
            server.wait()
            time.sleep(0.5)
            server = _server_process(kafka_config, port)
            agent.join(120)
            report = result["report"]
            assert report.uploaded == 6, [r.error for r in report.failed]
            assert max(r.attempts for r in report.results) > 1, "the kill did not interrupt any upload"
            assert wait_for_rows(lake, total) == total
    finally:
        server.kill()
        server.wait()
    assert_lake_matches(lake, drives)


def _sink_process(kafka, lake: Path, group: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel", "sink", "--bootstrap", kafka.bootstrap_servers,
                             "--lake", str(lake), "--group", group, "--max-age-s", "0.3", "--max-rows", "2000",
                             "--metrics-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sink_killed_mid_run_keeps_each_frame_once(kafka_config, group_id, tmp_path):
    drives, lake = tmp_path / "drives", tmp_path / "lake"
    total = make_fleet(drives, vehicles=3, drives=3, frames=900)
    sink = _sink_process(kafka_config, lake, group_id)
    try:
        async def upload():
            async with running_server(kafka_config) as (_, port):
                return await run_agent(AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=50), drives)

        uploader = threading.Thread(target=lambda: asyncio.run(upload()))
        uploader.start()
        deadline = time.monotonic() + 60
        while lake_rows(lake) < total // 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lake_rows(lake) > 0, "the sink wrote nothing before the kill"
        sink.send_signal(signal.SIGKILL)
        sink.wait()
        uploader.join(120)
        sink = _sink_process(kafka_config, lake, group_id)
        assert wait_for_rows(lake, total) == total
    finally:
        sink.kill()
        sink.wait()
    assert_lake_matches(lake, drives)
