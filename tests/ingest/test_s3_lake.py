"""The lake on object storage, against a real S3-compatible server (moto's server mode on loopback): the writers'
single PUTs, the sink end to end and killed mid-run then restarted (each frame exactly once), compaction, the replay
and the SQL views over s3:// URIs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from ingest.compact import compact
from ingest.lake import (all_files, file_name, live_files, overlapping_files, partition_dir, remove_stale_temporaries,
                         write_json_atomic, write_parquet_atomic)
from ingest.objstore import get_bytes, is_remote, lake_path, list_files, read_table, uri
from ingest.tables import FRAMES_LAKE_SCHEMA
from tests.ingest.test_sink import (REPO, SinkThread, drive_records, frame_rows, make_drive, produce, sink_config,
                                    wait_until)

moto_server = pytest.importorskip("moto.server")

BUCKET = "flywheel-lake"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback for this module, the AWS_* environment pointing at it, one bucket."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_lake(s3_endpoint) -> Path:
    """A fresh lake prefix in the bucket, as the configuration gives it (an s3:// URI, through Path)."""
    return Path(f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}/lake")


def read_frames(lake: Path) -> pa.Table:
    files = live_files(lake, "frames")
    return pa.concat_tables([read_table(f.path) for f in files]) if files else FRAMES_LAKE_SCHEMA.empty_table()


def test_writers_and_readers_on_s3(s3_lake) -> None:
    assert is_remote(s3_lake) and uri(s3_lake).startswith(f"s3://{BUCKET}/") and lake_path(uri(s3_lake)) == s3_lake
    t = pa.table({"x": [1, 2, 3]})
    d = partition_dir(s3_lake, "frames", "2026-01-02")
    path = d / file_name("topic", 0, 0, 9)

    def refuse() -> None:
        raise RuntimeError("overtaken")

    with pytest.raises(RuntimeError):
        write_parquet_atomic(t, path, before_rename=refuse)
    assert not list_files(s3_lake)  # nothing published: the one PUT never happened
    write_parquet_atomic(t, path, metadata={"k": "v"})
    write_parquet_atomic(t, d / file_name("topic", 0, 10, 19))
    write_parquet_atomic(pa.table({"x": [1]}), d / file_name("topic", 0, 0, 19))  # covers both
    assert [f.path.name for f in all_files(s3_lake, "frames")] == [
        file_name("topic", 0, 0, 9), file_name("topic", 0, 0, 19), file_name("topic", 0, 10, 19)]
    assert [f.path.name for f in live_files(s3_lake, "frames")] == [file_name("topic", 0, 0, 19)]
    assert len(overlapping_files(d, "topic", 0, 5, 12)) == 3 and not overlapping_files(d, "topic", 1, 0, 30)
    assert read_table(path).schema.metadata[b"k"] == b"v"
    assert remove_stale_temporaries(s3_lake, "frames") == 0
    write_json_atomic(s3_lake / ".sink" / "state.json", {"a": 1})
    assert get_bytes(s3_lake / ".sink" / "state.json") == b'{\n "a": 1\n}'


def test_sink_end_to_end_then_compaction_replay_and_sql(kafka_config, group_id, s3_lake, tmp_path) -> None:
    from shadow.batch.replay import replay
    from shadow.catalog import Catalog
    from tests.shadow.test_replay import STUDENT_CFG, TEACHER_CFG, make_model

    drives = [make_drive(f"drive-{i}", 90, 15, seed=60 + i) for i in range(3)]
    records = [r for j in range(6) for i, (_, ch) in enumerate(drives) for r in drive_records(f"drive-{i}", ch[j:j + 1])]
    cfg = sink_config(tmp_path, group_id, max_rows=45).model_copy(update={"lake_dir": s3_lake})
    expected = frame_rows(pa.concat_tables([ref for ref, _ in drives]))
    with SinkThread(kafka_config, cfg) as sink:
        produce(kafka_config, records)
        wait_until(lambda: read_frames(s3_lake).num_rows >= len(expected), 30, "every frame in the S3 lake")
    assert sink.stats.overtaken == 0
    assert frame_rows(read_frames(s3_lake)) == expected
    small = live_files(s3_lake, "frames")
    groups = {(f.path.parent, f.partition) for f in small}
    assert len(small) > len(groups)
    assert not [f for f in list_files(s3_lake) if f.path.name.startswith(".") and ".sink" not in str(f.path)]

    report = compact(s3_lake, target_rows=10_000)
    assert report.small_files_removed == len(small) and len(live_files(s3_lake, "frames")) == len(groups)
    assert len(all_files(s3_lake, "frames")) == len(live_files(s3_lake, "frames"))  # sources deleted
    assert frame_rows(read_frames(s3_lake)) == expected

    teacher = make_model(tmp_path / "models", "teacher", "v1", 0, TEACHER_CFG)
    student = make_model(tmp_path / "models", "student", "v1", 1, STUDENT_CFG)
    from shadow.config import ReplayConfig

    rep = replay(s3_lake, teacher, student, ReplayConfig(drive_end_idle_s=0.0))
    assert rep.frames_replayed == len(expected)
    assert replay(s3_lake, teacher, student, ReplayConfig(drive_end_idle_s=0.0)).frames_replayed == 0
    cat = Catalog(uri(s3_lake))
    got = cat.arrow("SELECT count(*) AS n, count(DISTINCT (drive_id, seq)) AS d FROM frames").to_pylist()[0]
    assert got == {"n": len(expected), "d": len(expected)}
    div = cat.arrow("SELECT pair, count(*) AS n FROM divergences GROUP BY pair").to_pylist()
    assert div == [{"pair": "teacher-v1__student-v1", "n": len(expected)}]
    assert cat.arrow("SELECT sum(frames) AS n FROM divergence_summary").to_pylist()[0]["n"] == len(expected)
    with pytest.raises(Exception, match="(?i)refused|permission|disabled"):
        cat.arrow("SELECT * FROM read_text('/etc/passwd')")
    out = subprocess.run([sys.executable, "-m", "flywheel", "sql", "--lake", uri(s3_lake), "--format", "json",
                          "SELECT count(*) AS n FROM divergences"], capture_output=True, text=True, cwd=REPO,
                         env=os.environ, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout) == [{"n": len(expected)}], out.stderr
    assert "does not exist" not in out.stderr
    from flywheel.status import table_status

    tables = {t.table: t for t in table_status(s3_lake)}
    assert tables["frames"].rows == tables["divergences"].rows == len(expected) and tables["frames"].bytes > 0


def _sink_process(kafka, lake: Path, group: str, log_file: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flywheel", "sink", "--bootstrap", kafka.bootstrap_servers, "--lake", uri(lake),
         "--group", group, "--max-rows", "60", "--max-age-s", "0.3", "--metrics-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log_file, "ab"),
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})


def test_sink_killed_mid_run_on_s3_then_restarted_stores_each_frame_once(kafka_config, group_id, s3_lake, s3_endpoint,
                                                                          tmp_path) -> None:
    drives = [make_drive(f"drive-{i}", 120, 20, seed=80 + i) for i in range(5)]
    records = [r for j in range(6) for i, (_, ch) in enumerate(drives) for r in drive_records(f"drive-{i}", ch[j:j + 1])]
    log_file = tmp_path / "sink.log"
    proc = _sink_process(kafka_config, s3_lake, group_id, log_file, s3_endpoint)
    try:
        wait_until(lambda: "start at" in log_file.read_text(), 30, "the sink to join")
        producer_done = threading.Event()

        def stream() -> None:  # a steady trickle of chunks
            for r in records:
                produce(kafka_config, [r])
                time.sleep(0.03)
            producer_done.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        wait_until(lambda: len(all_files(s3_lake, "frames")) >= 3, 20, "some files")
        proc.send_signal(signal.SIGKILL)  # no flush, no commit; a PUT may be cut off mid-request
        proc.wait()
        assert not producer_done.is_set(), "the stream ended before the kill; the test proves nothing"
        t.join(30)
        proc = _sink_process(kafka_config, s3_lake, group_id, log_file, s3_endpoint)
        expected = frame_rows(pa.concat_tables([ref for ref, _ in drives]))
        wait_until(lambda: read_frames(s3_lake).num_rows >= len(expected), 40, "every row after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert frame_rows(read_frames(s3_lake)) == expected
    assert "sink stopped" in log_file.read_text()
