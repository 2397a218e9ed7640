"""The vehicle agent and the broker command: retries, permanent errors, the uploaded marker, clean start and stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
from kafka.admin import KafkaAdminClient

from ingest.agent import run_agent
from ingest.broker import free_port
from ingest.config import AgentConfig
from ingest.lake import is_uploaded, write_drive
from ingest.synth import synthetic_drive
from tests.ingest_helpers import chunk_records, running_server


def test_unreachable_server_never_marks_uploaded(tmp_path):
    path = write_drive(tmp_path, synthetic_drive("drive-1", "veh-1", 50, agents=3))
    cfg = AgentConfig(server=f"127.0.0.1:{free_port()}", max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.02)
    report = asyncio.run(run_agent(cfg, tmp_path))
    assert report.uploaded == 0 and report.failed[0].attempts == 3
    assert "UNAVAILABLE" in report.failed[0].error
    assert not is_uploaded(path)


def test_permanent_refusal_is_not_retried_and_good_drives_still_upload(kafka_config, tmp_path):
    bad = synthetic_drive("drive-bad", "veh-1", 40, agents=3)
    speeds = bad["ego_speed"].to_numpy().copy()
    speeds[7] = 400.0  # an impossible speed: the server refuses it for good
    bad = bad.set_column(bad.schema.get_field_index("ego_speed"), "ego_speed", [speeds.astype(np.float32)])
    bad_path = write_drive(tmp_path, bad)
    good_path = write_drive(tmp_path, synthetic_drive("drive-good", "veh-2", 300, agents=3))

    async def go():
        async with running_server(kafka_config) as (_, port):
            cfg = AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=100, max_attempts=5)
            return await run_agent(cfg, tmp_path)
    report = asyncio.run(go())
    by_id = {r.drive_id: r for r in report.results}
    assert by_id["drive-bad"].attempts == 1 and "INVALID_ARGUMENT" in by_id["drive-bad"].error
    assert by_id["drive-good"].ok and is_uploaded(good_path) and not is_uploaded(bad_path)
    assert {r.drive_id for r in chunk_records(kafka_config)} == {"drive-good"}
    # a second run skips the uploaded drive and retries only the refused one
    again = asyncio.run(go())
    assert again.skipped == 1 and [r.drive_id for r in again.results] == ["drive-bad"]


def test_server_metrics_endpoint(kafka_config, tmp_path):
    metrics_port = free_port()
    env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka_config.bootstrap_servers,
           "FLYWHEEL_SERVER__METRICS_PORT": str(metrics_port), "FLYWHEEL_SERVER__LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "server"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = next(int(line.split()[-1]) for line in proc.stderr if line.startswith("listening on port"))
        write_drive(tmp_path, synthetic_drive("drive-m", "veh-1", 120, agents=3))
        report = asyncio.run(run_agent(AgentConfig(server=f"127.0.0.1:{port}"), tmp_path))
        assert report.uploaded == 1
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "flywheel_ingest_frames_accepted_total 120.0" in text
        assert "flywheel_ingest_inflight_bytes 0.0" in text
        assert "flywheel_ingest_produce_latency_seconds_count" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_broker_command_serves_topics_and_stops_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "broker"], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, env={**os.environ, "FLYWHEEL_KAFKA__PARTITIONS": "2"})
    try:
        bootstrap = proc.stdout.readline().strip()
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        topics = set(admin.list_topics())
        admin.close()
        assert {"flywheel.frames", "flywheel.frames.dlq", "flywheel.drive-progress"} <= topics
        broker_pids = subprocess.run(["pgrep", "-f", f"tansu.*{bootstrap}"], capture_output=True, text=True).stdout.split()
        assert broker_pids
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    left = subprocess.run(["pgrep", "-f", f"tansu.*{bootstrap}"], capture_output=True, text=True).stdout.split()
    assert left == [], "the broker outlived the command"
