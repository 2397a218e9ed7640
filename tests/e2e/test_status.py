"""`flywheel status` against a running system (real broker, a sink that has written the lake), and with none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from kafka import KafkaProducer

from ingest.config import SinkConfig
from ingest.bus import encode_record
from ingest.contract import SCHEMA_VERSION
from ingest.sink import run_sink
from ingest.synth import synthetic_frames
from tests.e2e.test_e2e import lake_rows


def status(env: dict) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "flywheel", "status", "--json"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def test_status_of_a_running_system(kafka_config, group_id, tmp_path):
    lake = tmp_path / "lake"
    producer = KafkaProducer(bootstrap_servers=kafka_config.bootstrap_servers, acks="all")
    for d in range(3):
        frames = synthetic_frames(40, agents=4, seed=d)
        value, headers = encode_record(frames, f"drive-{d}", "veh-1", 0, True, SCHEMA_VERSION)
        producer.send(kafka_config.frames_topic, key=f"drive-{d}".encode(),
                      value=value, headers=headers)
    producer.flush()
    producer.close()
    stop = threading.Event()
    sink = threading.Thread(target=run_sink, args=(kafka_config, SinkConfig(lake_dir=lake, group_id=group_id,
                                                                             max_age_s=0.3), stop))
    sink.start()
    try:
        deadline = time.monotonic() + 30
        while lake_rows(lake) < 120 and time.monotonic() < deadline:
            time.sleep(0.2)
        env = {"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka_config.bootstrap_servers,
               "FLYWHEEL_SINK__LAKE_DIR": str(lake), "FLYWHEEL_SINK__GROUP_ID": group_id}
        code, st = status(env)
    finally:
        stop.set()
        sink.join(30)
    assert code == 0 and st["broker_ok"]
    assert {"flywheel.frames": 3}.items() <= {t["name"]: t["partitions"] for t in st["topics"]}.items()
    frames = next(t for t in st["tables"] if t["table"] == "frames")
    assert frames["rows"] == 120 and frames["files"] >= 1 and frames["bytes"] > 0
    lag = next(g for g in st["lag"] if g["group"] == group_id)
    assert lag["committed"] == 3 and lag["lag"] == 0  # three records, all written and committed


def test_status_without_a_broker(tmp_path):
    code, st = status({"FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "FLYWHEEL_SINK__LAKE_DIR": str(tmp_path)})
    assert code == 2 and not st["broker_ok"] and "127.0.0.1:1" in st["broker_error"]
    assert [t["rows"] for t in st["tables"]] == [0] * len(st["tables"])
