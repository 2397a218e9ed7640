"""Compaction: merge runs of small lake files into one file with large row groups, never exposing a duplicate.

Within each (date directory, topic, Kafka partition) the live files, in offset order, are cut into runs of
consecutive files that are each below `target_rows` and together hold at most `target_rows` rows (and at most
`max_run_bytes` uncompressed, which bounds memory). Each run of two or more files becomes ONE file named from the
run's first and last offset (ZSTD-compressed, whatever the sink wrote).

Every reader sees a directory before or after its compaction, whole (`swap_in`): the merged files are written into a
new version of the directory beside the lake (`<lake>/.compact/`), the files it keeps are hard-linked there, and the
two versions are exchanged atomically (`ingest.dirswap`). So plain globs (`read_parquet('frames/**/*.parquet')` in
DuckDB, polars, Spark, Trino, pyarrow datasets) count every row once, even after a compaction killed at any step;
the next run removes what a killed one left beside the lake. On a filesystem without an atomic exchange, merged
files are renamed in before the small files are deleted, as before: `live_files` hides the small files, naive globs
may not, until the deletes end. On object storage (`ingest.objstore`) likewise: each merged file is PUT under its
final name, then its small files are deleted (`publish_then_delete`).

One compactor per lake at a time; sinks may keep writing meanwhile (they only add files past the merged offsets, and
hold the directory's lock while they do).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ingest.config import SinkConfig
from ingest.dirswap import dir_lock, exchange_dirs, exchange_supported
from ingest.lake import (DRIVE_FINAL_KEY, DRIVE_SEQ_KEY, LakeFile, file_name, fsync_dir, live_files,
                         overlapping_files, superseded_files, write_parquet_atomic)
from ingest.objstore import delete, is_remote, parquet_file, read_metadata, read_schema
from ingest.tables import TABLES, upgrade_frame_rows
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
    md = read_metadata(f.path)
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


def merge_run(run: list[LakeFile], table: str = "frames", row_group_rows: int = DEFAULT_TARGET_ROWS,
              out_dir: Path | None = None) -> MergedRun:
    """Write the merged file of `run` (consecutive files of one directory/topic/partition) into `out_dir` (default:
    the run's directory); deletes nothing. `output` of the result names the file in the run's directory.

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
        t = parquet_file(f.path).read()
        merge_drive_final(finals, read_drive_final(f.path, t.schema.metadata or {}))
        got = read_drive_seq(f.path, t.schema.metadata or {})
        if got is None:
            have_seqs = False
        else:
            for drive, ranges in got.items():
                union = seqs.setdefault(drive, SeqRanges())
                for lo, hi in ranges.ranges:
                    union.add(lo, hi)
        if table == "frames":  # files of frame schema version 1 merge as version 2 ("" = no model known)
            t = upgrade_frame_rows(t, spec.schema)
        parts.append(t.select(spec.schema.names).cast(spec.schema))
    merged = pa.concat_tables(parts)
    if "kafka_offset" in merged.column_names:
        offsets = merged["kafka_offset"]
        if len(offsets) > 1 and not pc.all(pc.greater_equal(offsets[1:], offsets[:-1])).as_py():
            raise ValueError(f"rows of {[f.path.name for f in run]} are not in Kafka offset order")
    out = run[0].path.parent / file_name(run[0].topic, run[0].partition, run[0].first, max(f.last for f in run))
    written = (Path(out_dir) / out.name) if out_dir is not None else out
    meta = {"flywheel.compacted_from": str(len(run))}
    if have_seqs:  # a partial union would let the sink take stored frames for new ones: then leave the key out
        meta[DRIVE_SEQ_KEY] = encode_drive_seq(seqs)
    if finals:
        meta[DRIVE_FINAL_KEY] = encode_drive_final(finals)
    merged = merged.replace_schema_metadata(spec.schema.metadata)
    write_parquet_atomic(merged, written, row_group_size=row_group_rows, metadata=meta)
    return MergedRun(out, tuple(f.path for f in run), merged.num_rows)


def staging_root(lake: Path, table: str) -> Path:
    """Where compaction builds the next versions of a table's directories: beside the tables, so no reader's glob
    over a table (`<lake>/<table>/**`) ever lists it, and on the lake's filesystem, so it can be exchanged."""
    return Path(lake) / ".compact" / table


def swap_in(lake: Path, table: str, directory: Path, runs: list[list[LakeFile]], row_group_rows: int,
            atomic: bool = True) -> list[MergedRun]:
    """Replace the runs of small files of one directory by their merged files in one atomic exchange.

    1. each run's merged file is written into a new version of the directory, beside the lake;
    2. under the directory's exclusive lock (writers wait), every other file of the live directory is hard-linked
       into the new version, which is then exchanged with the live one (`ingest.dirswap.exchange_dirs`);
    3. the old version, now at the staging path, is removed.
    Killed anywhere, the live directory is the old version or the new one, whole; the next run removes the rest.
    Without `atomic` (a filesystem that cannot exchange directories) step 2 renames the merged files in and then
    deletes the small ones: `live_files` readers see no duplicate, plain globs may until the deletes end.
    """
    rel = directory.relative_to(Path(lake) / table)
    stage = staging_root(lake, table) / rel.parent / f"{rel.name}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    merged = [merge_run(run, table, row_group_rows, out_dir=stage) for run in runs]
    with dir_lock(directory, exclusive=True):
        # the runs were planned from a listing taken without the lock: a file renamed in meanwhile (a sink's) inside
        # a run's offset range would be hidden by the merged file (and removed later as superseded). Under the lock
        # the directory holds still: keep only the runs that are still exactly what covers their range.
        kept = [m for m, run in zip(merged, runs) if _still_exact(directory, run)]
        for m in merged:
            if m not in kept:
                log.warning("not merging into %s: a file was written into its offset range meanwhile", m.output.name)
                (stage / m.output.name).unlink()
        if kept and atomic:
            link_rest(directory, stage, {f.name for m in kept for f in m.inputs})
            exchange_dirs(stage, directory)
            fsync_dir(directory.parent)
            fsync_dir(stage.parent)
        elif kept:
            for m in kept:
                os.replace(stage / m.output.name, m.output)
            fsync_dir(directory)
            for f in (f for m in kept for f in m.inputs):
                f.unlink(missing_ok=True)
    remove_tree(stage)
    return kept


def publish_then_delete(directory: Path, runs: list[list[LakeFile]], table: str, row_group_rows: int
                        ) -> list[MergedRun]:
    """Object storage (no rename, no directory to exchange): each run's merged file is PUT under its final name in
    the live directory, then its small files are deleted. `live_files` (the replay, the sink's resume, the SQL
    views) hides the small files from the moment the merged one exists, so those readers never count a row twice;
    a plain glob may until the deletes end. Killed in between, the next run deletes the superseded files."""
    done = []
    for run in runs:
        if not _still_exact(directory, run):
            log.warning("not merging %s..%s: a file was written into its offset range meanwhile", run[0].path.name,
                        run[-1].path.name)
            continue
        m = merge_run(run, table, row_group_rows)
        for f in m.inputs:
            delete(f)
        log.info("merged %d files (%d rows) into %s", len(m.inputs), m.rows, m.output.name)
        done.append(m)
    return done


def _still_exact(directory: Path, run: list[LakeFile]) -> bool:
    """Whether the data files of `directory` holding offsets of the run's range are exactly the run's files."""
    first, last = min(f.first for f in run), max(f.last for f in run)
    now = overlapping_files(directory, run[0].topic, run[0].partition, first, last)
    return {f.path.name for f in now} == {f.path.name for f in run}


def link_rest(directory: Path, stage: Path, sources: set[str]) -> None:
    """Hard-link every entry of `directory` but the `sources` into `stage` (whose merged files win a name clash)."""
    for entry in os.scandir(directory):
        if entry.name in sources or (stage / entry.name).exists():
            continue
        os.link(entry.path, stage / entry.name)
    fsync_dir(stage)


def remove_tree(path: Path) -> None:
    """Delete a directory version no reader can reach any more."""
    shutil.rmtree(path, ignore_errors=True)


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
    remote = is_remote(lake)
    report = CompactionReport(table=table, dry_run=dry_run)
    staging = staging_root(lake, table)
    if not dry_run and not remote and staging.exists():  # versions a killed run left: the old one or an unused one
        remove_tree(staging)
    for f in superseded_files(lake, table):
        report.superseded_removed += 1
        if not dry_run:
            delete(f.path) if remote else f.path.unlink(missing_ok=True)
    live = live_files(lake, table)
    report.files_before = len(live)
    groups: dict[tuple, list[LakeFile]] = {}
    for f in live:
        groups.setdefault((f.path.parent, f.topic, f.partition), []).append(f)
    expected_schema = TABLES[table].schema.remove_metadata()
    planned: dict[Path, list[list[LakeFile]]] = {}
    for files in groups.values():
        infos: list[_FileInfo] = []
        for f in sorted(files):
            schema = read_schema(f.path).remove_metadata()
            if not schema.equals(expected_schema):
                # another schema version: never merged with these; it ends a run like a big file does
                log.warning("%s does not have the %s schema; not compacted", f.path, table)
                infos.append(_FileInfo(f, target_rows, 0))
                continue
            infos.append(_info(f))
        for run in plan_runs(infos, target_rows, max_run_bytes):
            planned.setdefault(files[0].path.parent, []).append([i.file for i in run])
            if dry_run:
                first, last = run[0].file, run[-1].file
                out = first.path.parent / file_name(first.topic, first.partition, first.first, last.last)
                report.runs.append(MergedRun(out, tuple(i.file.path for i in run), sum(i.rows for i in run)))
    if remote:
        for directory, runs in ({} if dry_run else planned).items():
            for m in publish_then_delete(directory, runs, table, target_rows):
                report.runs.append(m)
                report.small_files_removed += len(m.inputs)
        report.rows_merged = sum(r.rows for r in report.runs)
        report.files_after = report.files_before - sum(len(r.inputs) - 1 for r in report.runs)
        return report
    atomic = bool(planned) and not dry_run and exchange_supported(staging)
    if planned and not dry_run and not atomic:
        log.warning("this filesystem cannot exchange directories atomically: merged files are published before "
                    "their small files are removed, and readers not using ingest.lake.live_files may count rows "
                    "twice meanwhile")
    for directory, runs in ({} if dry_run else planned).items():
        for m in swap_in(lake, table, directory, runs, target_rows, atomic):
            report.runs.append(m)
            report.small_files_removed += len(m.inputs)
            log.info("merged %d files (%d rows) into %s", len(m.inputs), m.rows, m.output.name)
    if not dry_run and staging.exists():
        remove_tree(staging)  # the emptied staging directories
    report.rows_merged = sum(r.rows for r in report.runs)
    report.files_after = report.files_before - sum(len(r.inputs) - 1 for r in report.runs)
    return report
