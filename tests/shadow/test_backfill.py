"""Backfill replay on a real local Ray (2 CPUs): the same files and rows as the batch replayer, coexistence with it,
and a backfill killed mid-run that resumes without a duplicate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ingest.lake import live_files
from shadow.batch.backfill import backfill
from shadow.batch.replay import replay
from shadow.config import BackfillConfig, ReplayConfig
from tests.shadow.test_replay import IDS, check_exactly_once, models, small_lake  # noqa: F401  (the fixture)

ray = pytest.importorskip("ray")

SHADOW_TABLES = ("decisions", "divergences", "scenarios", "noise_floor")
LENGTHS = {"d0": 230, "d1": 170, "d2": 120, "d3": 95}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def files_of(lake: Path) -> dict[str, list[str]]:
    return {t: sorted(str(f.path.relative_to(lake)) for f in live_files(lake, t)) for t in SHADOW_TABLES}


def same_rows(a: Path, b: Path, rel: str) -> None:
    """The same rows: keys and labels exactly, float measures to float rounding (a task's onnxruntime batches hold
    other frames than the batch replay's, so a sum may round differently); the replay id and the noise floor's
    runtime label (one thread per task vs one per core) are the run's own."""
    ta, tb = pq.read_table(a / rel), pq.read_table(b / rel)
    assert ta.schema == tb.schema and ta.num_rows == tb.num_rows, rel
    for name in ta.column_names:
        if name in ("replay_id", "runtime_a"):
            continue
        x, y = ta[name], tb[name]
        if pa.types.is_floating(x.type) or (pa.types.is_list(x.type) and pa.types.is_floating(x.type.value_type)):
            fx = np.asarray(pc.list_flatten(x) if pa.types.is_list(x.type) else x, np.float64)
            fy = np.asarray(pc.list_flatten(y) if pa.types.is_list(y.type) else y, np.float64)
            np.testing.assert_allclose(fx, fy, rtol=1e-5, atol=1e-6, err_msg=f"{rel} {name}")
        else:
            assert x.equals(y), f"{rel} {name}"


def test_backfill_writes_the_batch_replayers_files(tmp_path, models, local_ray) -> None:  # noqa: F811
    a, b = tmp_path / "a", tmp_path / "b"
    small_lake(a, LENGTHS, chunk=30, per_file=2)
    shutil.copytree(a, b)
    cfg = ReplayConfig(group_frames=256)
    batch = replay(a, models["teacher"], models["student"], cfg)
    seen = []
    report = backfill(b, models["teacher"], models["student"], cfg, BackfillConfig(files_per_task=2),
                      progress=lambda done, total: seen.append((done, total)))
    assert report.tasks > 2 and seen[-1] == (report.tasks, report.tasks)
    assert report.frames_replayed == batch.frames_replayed == sum(LENGTHS.values())
    assert report.execution["student"]["providers"] == ["CPUExecutionProvider"]
    assert files_of(a) == files_of(b)
    for table, names in files_of(a).items():
        for rel in names:
            same_rows(a, b, rel)
    check_exactly_once(b, LENGTHS, *IDS)
    again = backfill(b, models["teacher"], models["student"], cfg, BackfillConfig(files_per_task=2))
    assert again.tasks == 0 and again.frames_replayed == 0 and again.files_covered == len(live_files(b, "frames"))


def test_backfill_after_a_partial_batch_replay(tmp_path, models, local_ray) -> None:  # noqa: F811
    lake = tmp_path / "lake"
    small_lake(lake, LENGTHS, chunk=30, per_file=2)
    first = replay(lake, models["teacher"], models["student"], ReplayConfig(partitions=[0]))
    report = backfill(lake, models["teacher"], models["student"], ReplayConfig(), BackfillConfig(files_per_task=1))
    assert first.frames_replayed + report.frames_replayed == sum(LENGTHS.values())
    assert report.files_covered == first.units
    check_exactly_once(lake, LENGTHS, *IDS)


KILLED = """
import sys
from pathlib import Path
from shadow.batch.backfill import backfill
from shadow.config import BackfillConfig, ReplayConfig
backfill(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), ReplayConfig(group_frames=64),
         BackfillConfig(num_cpus=2, files_per_task=1))
"""


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def test_killed_backfill_resumes_without_duplicates(tmp_path, models, local_ray) -> None:  # noqa: F811
    lake = tmp_path / "lake"
    lengths = {f"d{i}": 240 for i in range(6)}
    small_lake(lake, lengths, chunk=20, per_file=1)
    frames_files = len(live_files(lake, "frames"))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(lake), str(models["teacher"]),
                             str(models["student"])], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not live_files(lake, "divergences") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        written = len(live_files(lake, "divergences"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (raylet, GCS)
        proc.wait()
        # its Ray workers have process groups of their own in the driver's session: end them by id too
        for _ in range(100):
            left = _session_pids(proc.pid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        assert not _session_pids(proc.pid)
    assert 0 < written < frames_files, "the kill should land mid-run"
    report = backfill(lake, models["teacher"], models["student"], ReplayConfig(group_frames=64),
                      BackfillConfig(files_per_task=4))
    assert report.files_covered >= written
    check_exactly_once(lake, lengths, *IDS)
    # the same files as one batch replay of the same frames
    fresh = tmp_path / "fresh"
    small_lake(fresh, lengths, chunk=20, per_file=1)
    replay(fresh, models["teacher"], models["student"], ReplayConfig(group_frames=64))
    assert files_of(fresh) == files_of(lake)
