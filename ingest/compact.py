"""Compaction: merge runs of small lake files into one file with large row groups, never exposing a duplicate.

Within each (date directory, topic, Kafka partition) the live files, in offset order, are cut into runs of
consecutive files that are each below `target_rows` and together hold at most `target_rows` rows (and at most
`max_run_bytes` uncompressed, which bounds memory). Each run of two or more files becomes ONE file named from the
run's first and last offset, written atomically by `ingest.lake.write_parquet_atomic`; then the small files are
deleted. Readers resolve the table with `live_files`, which hides every file covered by a larger one, so a crash
between the rename and the deletes leaves readers with the merged file only; the next run deletes such superseded
leftovers first.

One compactor per lake at a time; sinks may keep writing meanwhile (they only add files past the merged offsets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.config import SinkConfig
from ingest.lake import (DRIVE_FINAL_KEY, DRIVE_SEQ_KEY, LakeFile, file_name, live_files, superseded_files,
                         write_parquet_atomic)
from ingest.tables import TABLES
from ingest.lake_index import (SeqRanges, encode_drive_final, encode_drive_seq, merge_drive_final, read_drive_final,
                               read_drive_seq)

log = logging.getLogger(__name__)

DEFAULT_TARGET_ROWS: int = SinkConfig.model_fields["compact_target_rows"].default
DEFAULT_MAX_RUN_BYTES = 512 << 20  # uncompressed bytes read into memory for one merge


@dataclass(frozen=True)
class MergedRun:
    """One merge: the small files `inputs` (in offset order) became `output`."""

    output: Path
    inputs: tuple[Path, ...]
    rows: int


@dataclass
class CompactionReport:
    """What one compaction did (or, with dry_run, would do)."""

    table: str
    dry_run: bool
    files_before: int = 0  # live files when the run started
    files_after: int = 0  # live files when it ended (as planned, for a dry run)
    superseded_removed: int = 0  # leftovers of an earlier crashed run, deleted first
    small_files_removed: int = 0
    rows_merged: int = 0
    runs: list[MergedRun] = field(default_factory=list)


@dataclass(frozen=True)
class _FileInfo:
    file: LakeFile
    rows: int
    nbytes: int  # uncompressed size of its row groups


def _info(f: LakeFile) -> _FileInfo:
    md = pq.read_metadata(f.path)
    return _FileInfo(f, md.num_rows, sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)))


def plan_runs(files: list[_FileInfo], target_rows: int, max_run_bytes: int) -> list[list[_FileInfo]]:
    """Cut one partition's live files (sorted by offset) into runs of >= 2 consecutive small files to merge."""
    runs: list[list[_FileInfo]] = []
    run: list[_FileInfo] = []
    rows = nbytes = 0
    for info in files:
        if info.rows >= target_rows:  # big enough already: it ends the current run
            runs.append(run)
            run, rows, nbytes = [], 0, 0
            continue
        if run and (rows + info.rows > target_rows or nbytes + info.nbytes > max_run_bytes):
            runs.append(run)
            run, rows, nbytes = [], 0, 0
        run.append(info)
        rows += info.rows
        nbytes += info.nbytes
    runs.append(run)
    return [r for r in runs if len(r) >= 2]


def merge_run(run: list[LakeFile], table: str = "frames", row_group_rows: int = DEFAULT_TARGET_ROWS) -> MergedRun:
    """Write the merged file of `run` (consecutive files of one directory/topic/partition); deletes nothing.

    Rows keep offset order; the schema is the table's fixed one; the footer's drive_seq is the union of the inputs'.
    """
    spec = TABLES[table]
    if len({(f.path.parent, f.topic, f.partition) for f in run}) != 1 or len(run) < 2:
        raise ValueError("a run is two or more files of one directory, topic and partition")
    run = sorted(run)
    parts: list[pa.Table] = []
    seqs: dict[str, SeqRanges] = {}
    finals: dict[str, int] = {}
    have_seqs = True
    for f in run:
        t = pq.ParquetFile(f.path).read()
        merge_drive_final(finals, read_drive_final(f.path, t.schema.metadata or {}))
        got = read_drive_seq(f.path, t.schema.metadata or {})
        if got is None:
            have_seqs = False
        else:
            for drive, ranges in got.items():
                union = seqs.setdefault(drive, SeqRanges())
                for lo, hi in ranges.ranges:
                    union.add(lo, hi)
        parts.append(t.select(spec.schema.names).cast(spec.schema))
    merged = pa.concat_tables(parts)
    if "kafka_offset" in merged.column_names:
        offsets = merged["kafka_offset"]
        if len(offsets) > 1 and not pc.all(pc.greater_equal(offsets[1:], offsets[:-1])).as_py():
            raise ValueError(f"rows of {[f.path.name for f in run]} are not in Kafka offset order")
    out = run[0].path.parent / file_name(run[0].topic, run[0].partition, run[0].first, max(f.last for f in run))
    meta = {"flywheel.compacted_from": str(len(run))}
    if have_seqs:  # a partial union would let the sink take stored frames for new ones: then leave the key out
        meta[DRIVE_SEQ_KEY] = encode_drive_seq(seqs)
    if finals:
        meta[DRIVE_FINAL_KEY] = encode_drive_final(finals)
    merged = merged.replace_schema_metadata(spec.schema.metadata)
    write_parquet_atomic(merged, out, row_group_size=row_group_rows, metadata=meta)
    return MergedRun(out, tuple(f.path for f in run), merged.num_rows)


def compact(lake: Path, table: str = "frames", target_rows: int = DEFAULT_TARGET_ROWS, dry_run: bool = False,
            max_run_bytes: int = DEFAULT_MAX_RUN_BYTES) -> CompactionReport:
    """Merge runs of small files of `table` into files of up to `target_rows` rows (row groups of `target_rows`).

    Deletes superseded leftovers of an earlier run first. `max_run_bytes` caps the uncompressed bytes of one merge
    (held in memory). With `dry_run` nothing is written or deleted; the report says what would be.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {sorted(TABLES)}")
    if target_rows < 1 or max_run_bytes < 1:
        raise ValueError("target_rows and max_run_bytes must be positive")
    lake = Path(lake)
    report = CompactionReport(table=table, dry_run=dry_run)
    for f in superseded_files(lake, table):
        report.superseded_removed += 1
        if not dry_run:
            f.path.unlink(missing_ok=True)
    live = live_files(lake, table)
    report.files_before = len(live)
    groups: dict[tuple, list[LakeFile]] = {}
    for f in live:
        groups.setdefault((f.path.parent, f.topic, f.partition), []).append(f)
    expected_schema = TABLES[table].schema.remove_metadata()
    for files in groups.values():
        infos: list[_FileInfo] = []
        for f in sorted(files):
            schema = pq.read_schema(f.path).remove_metadata()
            if not schema.equals(expected_schema):
                # another schema version: never merged with these; it ends a run like a big file does
                log.warning("%s does not have the %s schema; not compacted", f.path, table)
                infos.append(_FileInfo(f, target_rows, 0))
                continue
            infos.append(_info(f))
        for run in plan_runs(infos, target_rows, max_run_bytes):
            files_of_run = [i.file for i in run]
            rows = sum(i.rows for i in run)
            if dry_run:
                out = files_of_run[0].path.parent / file_name(files_of_run[0].topic, files_of_run[0].partition,
                                                               files_of_run[0].first, files_of_run[-1].last)
                merged = MergedRun(out, tuple(f.path for f in files_of_run), rows)
            else:
                merged = merge_run(files_of_run, table, row_group_rows=target_rows)
                # the merged file is durable and covers them: readers already ignore the small ones
                for f in files_of_run:
                    f.path.unlink(missing_ok=True)
            report.runs.append(merged)
            report.small_files_removed += len(run) if not dry_run else 0
            report.rows_merged += merged.rows
            log.info("merged %d files (%d rows) into %s", len(run), merged.rows, merged.output.name)
    report.files_after = report.files_before - sum(len(r.inputs) - 1 for r in report.runs)
    return report
