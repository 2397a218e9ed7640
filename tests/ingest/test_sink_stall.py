"""A sink whose consumer group never assigns it a partition notices, says so (log, metric, `flywheel status`) and
recovers by itself; and after a storm of `kill -9` the default settings fill the lake (real broker, real processes)."""

from __future__ import annotations

import logging
import random
import time

import pyarrow as pa
from kafka import KafkaConsumer
from prometheus_client import REGISTRY

from flywheel.settings import Settings
from flywheel.status import collect
from ingest.sink_watch import read_states
from tests.ingest.test_sink import (SinkThread, _start_sink_process, frame_rows, lake_rows, make_drive, produce,
                                    read_lake, sink_config, wait_until)


def recoveries(how: str) -> float:
    return REGISTRY.get_sample_value("flywheel_sink_stall_recoveries_total", {"how": how}) or 0.0


def stuck_member(kafka, group: str) -> KafkaConsumer:
    """A member that joins the group, takes every partition and then never polls again: each rebalance waits for
    it (its poll interval is long), so no other member is ever assigned anything: the group is wedged."""
    consumer = KafkaConsumer(**kafka.client_options(), group_id=group, enable_auto_commit=False,
                             session_timeout_ms=6000, heartbeat_interval_ms=2000, max_poll_interval_ms=600_000)
    consumer.subscribe([kafka.frames_topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200, max_records=1)
    assert consumer.assignment(), "the stuck member never joined"
    consumer.pause(*consumer.assignment())
    return consumer


def test_a_sink_in_a_wedged_group_reports_the_stall_and_recovers(kafka_config, group_id, tmp_path, caplog):
    drives = [make_drive(f"drive-{i}", 50, 25, seed=60 + i) for i in range(3)]
    produce(kafka_config, [(f"drive-{i}".encode(), c) for i, (_, ch) in enumerate(drives) for _, c in ch])
    stuck = stuck_member(kafka_config, group_id)
    cfg = sink_config(tmp_path, group_id, stall_after_s=3.0)
    rejoin0, assign0 = recoveries("rejoin"), recoveries("assign")
    seen_states: set[str] = set()
    caplog.set_level(logging.WARNING, logger="ingest.sink_watch")
    try:
        with SinkThread(kafka_config, cfg):
            def progress() -> bool:
                seen_states.update(s["state"] for s in read_states(cfg.lake_dir))
                return lake_rows(cfg.lake_dir) >= 150
            wait_until(progress, 90, "the lake to fill despite the wedged group")
            status = collect(Settings(kafka=kafka_config, sink=cfg), cfg.lake_dir)
            assert [s["state"] for s in status.sinks] == ["direct"] and status.sinks[0]["direct_assignment"]
    finally:
        stuck.close(autocommit=False)
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(pa.concat_tables([ref for ref, _ in drives]))
    assert "stalled" in seen_states  # flywheel status said so while it lasted
    assert recoveries("rejoin") == rejoin0 + 1 and recoveries("assign") == assign0 + 1
    assert any("holds no partition" in r.getMessage() for r in caplog.records)
    assert not read_states(cfg.lake_dir)  # a stopped sink leaves no state behind


def test_twenty_sink_kills_in_a_row_then_the_lake_fills(kafka_config, tmp_path):
    """The default group, default settings: kill -9 at random moments (mid-join, mid-write), twenty times."""
    lake, log_file = tmp_path / "lake", tmp_path / "sink.log"
    rng = random.Random(7)
    refs = []
    for i in range(20):
        ref, chunks = make_drive(f"drive-{i}", 50, 25, seed=i)
        refs.append(ref)
        produce(kafka_config, [(f"drive-{i}".encode(), c) for _, c in chunks])
        proc = _start_sink_process(kafka_config, lake, "flywheel-sink", log_file)
        time.sleep(rng.uniform(0.3, 4.0))
        proc.kill()
        proc.wait()
    proc = _start_sink_process(kafka_config, lake, "flywheel-sink", log_file)
    try:
        wait_until(lambda: lake_rows(lake) >= 1000, 180, "every frame after the kill storm")
    finally:
        proc.kill()
        proc.wait()
    table = read_lake(lake)
    assert table.num_rows == 1000
    assert frame_rows(table) == frame_rows(pa.concat_tables(refs))
