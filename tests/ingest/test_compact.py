"""Compaction of small lake files: fewer files, the same rows, no duplicate ever visible, crash leftovers cleaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.compact import compact, merge_run
from ingest.config import SinkConfig
from ingest.lake import DRIVE_FINAL_KEY, DRIVE_SEQ_KEY
from ingest.lake_index import lake_positions, read_drive_final
from ingest.tables import FRAMES_LAKE_SCHEMA
from ingest.lake import all_files, file_name, live_files, partition_dir, write_parquet_atomic
from ingest.lake import to_lake_batch
from ingest.synth import EPOCH_NS, synthetic_frames

REPO = Path(__file__).resolve().parents[2]
TOPIC = "flywheel.frames"
T0_MS = EPOCH_NS // 1_000_000


def put_files(lake: Path, date: str, partition: int, first_offset: int, sizes: list[int], drive: str, seed: int) -> None:
    """One file per Kafka record, as the sink writes them: `sizes[i]` frames of `drive` at offset first_offset + i."""
    frames = synthetic_frames(sum(sizes), agents=5, waypoints=3, seed=seed)
    seq = 0
    for i, n in enumerate(sizes):
        offset = first_offset + i
        batch = to_lake_batch(frames.slice(seq, seq + n), drive, "veh-1", seq, 1, T0_MS + offset, partition, offset)
        meta = {DRIVE_SEQ_KEY: json.dumps({drive: [[seq, seq + n - 1]]})}
        if i == len(sizes) - 1:  # the drive's final chunk
            meta[DRIVE_FINAL_KEY] = json.dumps({drive: seq + n - 1})
        write_parquet_atomic(pa.Table.from_batches([batch]),
                             partition_dir(lake, "frames", date) / file_name(TOPIC, partition, offset, offset),
                             metadata=meta, compression=SinkConfig().compression)
        seq += n


def read_rows(lake: Path) -> list[dict]:
    """Every row a reader sees (live files only), as comparable Python values, sorted."""
    tables = [pq.ParquetFile(f.path).read() for f in live_files(lake, "frames")]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted(rows, key=lambda r: (r["kafka_partition"], r["kafka_offset"], r["drive_id"], r["seq"]))


def keys(rows: list[dict]) -> list[tuple]:
    return [(r["kafka_partition"], r["kafka_offset"], r["drive_id"], r["seq"]) for r in rows]


@pytest.fixture
def lake(tmp_path) -> Path:
    lake = tmp_path / "lake"
    put_files(lake, "2026-01-01", 0, 0, [20] * 10, "drive-a", seed=1)
    put_files(lake, "2026-01-01", 1, 0, [20] * 4 + [150] + [20] * 5, "drive-b", seed=2)  # a big file mid-way
    put_files(lake, "2026-01-02", 0, 10, [20] * 3, "drive-c", seed=3)
    return lake


def test_small_files_are_merged_with_every_row_kept(lake):
    before = read_rows(lake)
    positions = lake_positions(lake, TOPIC, {0, 1})
    report = compact(lake, target_rows=100)
    assert (report.files_before, report.files_after) == (23, 6)
    assert report.small_files_removed == 10 + 9 + 3 and report.superseded_removed == 0
    after = read_rows(lake)
    assert after == before  # identical multiset of rows, content included
    assert len(set(keys(after))) == len(after)
    assert all_files(lake, "frames") == live_files(lake, "frames")  # nothing left behind
    spans = sorted((f.path.parent.name, f.partition, f.first, f.last) for f in live_files(lake, "frames"))
    assert spans == [("date=2026-01-01", 0, 0, 4), ("date=2026-01-01", 0, 5, 9), ("date=2026-01-01", 1, 0, 3),
                     ("date=2026-01-01", 1, 4, 4), ("date=2026-01-01", 1, 5, 9), ("date=2026-01-02", 0, 10, 12)]
    for f in live_files(lake, "frames"):
        pf = pq.ParquetFile(f.path)
        assert pf.schema_arrow.remove_metadata().equals(FRAMES_LAKE_SCHEMA.remove_metadata())
        assert pf.schema_arrow.metadata[b"flywheel.table"] == b"frames"
        assert pf.metadata.num_row_groups == 1  # row groups of target_rows: one per merged file here
        # the sink's cheap codec is rewritten with the compact one (the big file nothing merged keeps the sink's)
        codec = pf.metadata.row_group(0).column(0).compression
        assert codec == ("ZSTD" if f.first != f.last else "LZ4"), (f.path.name, codec)
        t = pf.read()
        offsets = t["kafka_offset"].to_pylist()
        assert offsets == sorted(offsets) and f.first == offsets[0] and f.last == offsets[-1]
        seq = t["seq"].to_pylist()
        assert json.loads(pf.schema_arrow.metadata[DRIVE_SEQ_KEY.encode()]) == {t["drive_id"][0].as_py(): [[min(seq), max(seq)]]}
        # the file holding a drive's last frame still says the drive ended there
        finals = read_drive_final(f.path)
        ends = {"drive-a": 199, "drive-b": 329, "drive-c": 59}
        drive = t["drive_id"][0].as_py()
        assert finals == ({drive: ends[drive]} if max(seq) == ends[drive] else {})
    # the sink resumes at the same place, with the same dedup knowledge, from the merged footers
    now = lake_positions(lake, TOPIC, {0, 1})
    def summary(pos):
        return {p: (x.next_offset, {d: r.to_json() for d, r in x.drive_seq.items()}) for p, x in pos.items()}
    assert summary(now) == summary(positions)
    assert compact(lake, target_rows=100).runs == []  # nothing left to do


def test_crash_after_merged_rename_before_deletes(lake):
    before = read_rows(lake)
    small = [f for f in live_files(lake, "frames") if f.partition == 0 and f.path.parent.name == "date=2026-01-01"]
    merged = merge_run(small[:6], row_group_rows=1000)  # ... and the compactor dies before deleting the inputs
    assert merged.output.exists() and len(merged.inputs) == 6 and merged.rows == 120
    assert len(all_files(lake, "frames")) == 24
    after = read_rows(lake)
    assert after == before and len(set(keys(after))) == len(after)  # readers see the merged file, not both
    report = compact(lake, target_rows=100)
    assert report.superseded_removed == 6
    assert read_rows(lake) == before
    assert all_files(lake, "frames") == live_files(lake, "frames")
    assert not list(lake.glob("frames/*/.*.tmp"))


def test_dry_run_writes_and_deletes_nothing(lake):
    names = sorted(p.name for p in lake.rglob("*.parquet"))
    report = compact(lake, target_rows=100, dry_run=True)
    assert report.dry_run and len(report.runs) == 5 and report.files_after == 6
    assert sorted(p.name for p in lake.rglob("*.parquet")) == names


def test_runs_respect_target_rows_and_command_line(lake):
    before = read_rows(lake)
    out = subprocess.run([sys.executable, "-m", "flywheel", "compact", "--lake", str(lake), "--target-rows", "50", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(out.stdout)
    assert report["files_before"] == 23 and report["files_after"] == len(live_files(lake, "frames"))
    assert max(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames") if f.first != f.last) <= 50
    assert read_rows(lake) == before


def test_the_command_prints_a_table(lake):
    """Not a Python object: a table of the merged files, and the counts."""
    out = subprocess.run([sys.executable, "-m", "flywheel", "compact", "--lake", str(lake), "--target-rows", "100",
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"}, check=True)
    assert "CompactionReport(" not in out.stdout and "MergedRun(" not in out.stdout
    assert "frames: would merge 5 runs" in out.stdout and "live files 23 -> 6" in out.stdout
    assert "date=2026-01-01/flywheel.frames-p00000-00000000000000000000-00000000000000000004.parquet" in out.stdout
    assert "100" in out.stdout  # rows of that run
