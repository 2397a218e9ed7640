"""Readers that know nothing of `live_files` (the duckdb command line and pyarrow's dataset reader over a plain glob)
count every row of the lake once, also after a compaction killed (SIGKILL) at each of its steps, and a sink writing
into a directory while it is compacted loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ingest.compact import compact, staging_root
from ingest.lake import all_files, live_files
from tests.ingest.test_compact import keys, lake, put_files, read_rows  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[2]
DUCKDB = shutil.which("duckdb", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

# Runs compaction in a process that SIGKILLs itself around the n-th call of one of its step functions.
KILLED_AT = """
import os, signal, sys
from pathlib import Path
import ingest.compact as c
lake, step, when, nth = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
calls, original = [0], getattr(c, step)
def step_then_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(c, step, step_then_die)
c.compact(lake, target_rows=100)
"""


def live_rows(lake: Path) -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames"))


def duckdb_cli(lake: Path, query: str) -> str:
    out = subprocess.run([DUCKDB, "-csv", "-noheader", "-c", query.replace("GLOB", f"'{lake}/frames/**/*.parquet'")],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def check_plain_readers(lake: Path, expected: int) -> None:
    assert live_rows(lake) == expected
    assert duckdb_cli(lake, "SELECT count(*) FROM read_parquet(GLOB)") == str(expected)
    assert duckdb_cli(lake, "SELECT count(DISTINCT (kafka_partition, kafka_offset, drive_id, seq)) "
                            "FROM read_parquet(GLOB)") == str(expected)
    assert ds.dataset(lake / "frames", format="parquet", partitioning="hive").count_rows() == expected


@pytest.mark.skipif(DUCKDB is None, reason="the duckdb command line comes with the dev extra (duckdb-cli)")
@pytest.mark.parametrize("step,when,nth", [
    ("merge_run", "after", 1),  # one merged file staged beside the lake, nothing exchanged
    ("merge_run", "after", 2),
    ("link_rest", "after", 1),  # the next version complete, not exchanged yet
    ("exchange_dirs", "after", 1),  # exchanged; the old version still beside the lake
    ("remove_tree", "after", 1),  # one directory done, the others not started
    ("exchange_dirs", "after", 2),
])
def test_plain_glob_readers_after_a_compaction_killed_at_each_step(lake, step, when, nth):
    before = read_rows(lake)
    proc = subprocess.run([sys.executable, "-c", KILLED_AT, str(lake), step, when, str(nth)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # it died where it was told to
    check_plain_readers(lake, len(before))
    assert read_rows(lake) == before  # the rows themselves, not only their count
    report = compact(lake, target_rows=100)  # the next run finishes the job and removes the leftovers
    assert report.runs or step != "merge_run"
    check_plain_readers(lake, len(before))
    assert read_rows(lake) == before
    assert all_files(lake, "frames") == live_files(lake, "frames") and not staging_root(lake, "frames").exists()
    assert compact(lake, target_rows=100).runs == []


def test_a_sink_writing_during_compaction_loses_nothing(lake):
    before = read_rows(lake)
    stop = threading.Event()
    written = [0]

    def sink():  # one-record files of a new partition into the directory being compacted, as a sink adds them
        offset = 0
        while not stop.is_set() and offset < 400:
            put_files(lake, "2026-01-01", 2, offset, [10], f"drive-s{offset}", seed=offset)
            written[0] += 10
            offset += 1

    thread = threading.Thread(target=sink)
    thread.start()
    try:
        for _ in range(5):
            compact(lake, target_rows=100)
    finally:
        stop.set()
        thread.join(60)
    rows = read_rows(lake)
    assert len(rows) == len(before) + written[0] and len(set(keys(rows))) == len(rows)
    compact(lake, target_rows=100)
    assert len(read_rows(lake)) == len(before) + written[0]
