"""One entry point for every format: `import_sources(format, sources, out)`, behind `flywheel import`.

Each drive is resampled and validated by the ingest server's checks, then written under a temporary name and
fsynced; a source file's drives become visible (renamed, in batches of files: `ingest.lake.DriveBatch`) only once
the whole file has converted. A bad record raises `ImportFailed` (file and record named) and leaves nothing of that
file in the drive directory. Files converted before it are made visible first, so an import can be rerun after the
bad file is removed: drive files are replaced, not duplicated.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.contract import COLUMNS, DECISION_MODEL_COLUMNS, FRAME_SCHEMA, Frames, frames_to_arrow
from ingest.importers.common import DriveReport, ImportOptions, ImportReport, SourceDrive, convert_drives
from ingest.lake import DriveBatch

FORMATS = {
    "ros2": "ingest.importers.ros2",
    "waymo": "ingest.importers.waymo",
    "av2": "ingest.importers.av2",
    "nuplan": "ingest.importers.nuplan",
    "mcap": "ingest.importers.mcap",
}
"""Format name -> module with `read(path, options, progress)` yielding `SourceDrive`s."""
COMMIT_DRIVES = 256
"""Drives written before they are made visible together (and their directories fsynced once)."""
TABLE_GROUP = 16
"""Drives converted to Arrow together (`drive_tables`) and handed to the writers."""


def source_files(fmt: str, sources: list[Path]) -> list[Path]:
    """The files behind the SRC arguments: a directory stands for the format's files inside it."""
    patterns = {"ros2": "*.mcap", "mcap": "*.mcap", "waymo": "*tfrecord*", "av2": "scenario_*.parquet",
                "nuplan": "*.db"}
    out: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            out.extend(sorted(p for p in src.rglob(patterns[fmt]) if p.is_file()))
        elif src.exists():
            out.append(src)
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    return out


def drive_tables(converted: list[tuple[SourceDrive, Frames]]) -> list[pa.Table]:
    """FRAME_SCHEMA tables of one file's drives, the same as `frames_to_arrow` of each: one conversion of all their
    frames at once (its fixed cost, about 2 ms, is as much as converting a 10 s scenario), then each drive's rows
    with its own drive id, vehicle id, seq 0..n-1 and plan_dt_s."""
    if len(converted) < 2:
        return [pa.Table.from_batches([frames_to_arrow(f, s.drive_id, s.vehicle_id, 0)]) for s, f in converted]
    blocks = [f for _, f in converted]
    cols = {c.name: np.concatenate([f.cols[c.name] for f in blocks]) for c in COLUMNS}
    if any(k in f.cols for f in blocks for k in DECISION_MODEL_COLUMNS):
        for i, k in enumerate(DECISION_MODEL_COLUMNS):
            cols[k] = np.concatenate([f.decision_model()[i] for f in blocks])
    table = pa.Table.from_batches([frames_to_arrow(Frames(cols, blocks[0].plan_dt_s), "-", "-", 0)])
    names = table.schema.names
    out, at = [], 0
    for src, f in converted:
        n = f.num_frames
        t = table.slice(at, n)
        for name, values in (("drive_id", pa.repeat(src.drive_id, n)), ("vehicle_id", pa.repeat(src.vehicle_id, n)),
                             ("seq", pa.array(np.arange(n, dtype=np.int64), FRAME_SCHEMA.field("seq").type)),
                             ("plan_dt_s", pa.array(np.full(n, f.plan_dt_s, np.float32), pa.float32()))):
            i = names.index(name)
            t = t.set_column(i, FRAME_SCHEMA.field(name), values)
        out.append(t)
        at += n
    return out


def import_sources(fmt: str, sources: list[Path], out: Path, options: ImportOptions | None = None,
                   progress: Callable[[Path, int], None] | None = None, writers: int = 4) -> ImportReport:
    """Import every source of format `fmt` into drive directory `out`; returns what was written and dropped.

    `progress(file, bytes_read)` is called as files are read; `writers` threads write the drive files. Raises
    ImportFailed for a bad record (see above), ValueError for an unknown format, FileNotFoundError for a missing
    source.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    opts = options or ImportOptions()
    module = importlib.import_module(FORMATS[fmt])
    report = ImportReport(fmt)
    # drive files are written (and fsynced) by a small pool as the drives convert: a drive's fsync waits on the
    # disk, not the CPU. They stay under temporary names (ingest.lake.DriveBatch) until their file has converted
    # whole, and become visible in batches of files (one directory fsync for all); a failure makes every file
    # converted before it visible, whole, before the error rises, and removes what the failing file had written
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="import-write")
    ready: list[DriveBatch] = []
    pending: list = []

    def settle() -> None:
        try:
            for fut, src, n in pending:
                report.drives.append(DriveReport(src.drive_id, src.vehicle_id, src.record, n, str(fut.result())))
        except BaseException:
            wait([f for f, _, _ in pending])
            for b in ready:
                b.abort()
            raise
        finally:
            pending.clear()
        DriveBatch.commit_all(ready)
        ready.clear()

    try:
        for path in source_files(fmt, sources):
            tick = (lambda n, p=path: progress(p, n)) if progress is not None else None
            mine, writes, group = DriveBatch(), [], []

            def submit() -> None:
                for (src, frames), table in zip(group, drive_tables(group)):
                    writes.append((pool.submit(mine.write, Path(out), table), src, frames.num_frames))
                group.clear()

            try:
                for converted in convert_drives(path, fmt, module.read(path, opts, tick), opts, report):
                    group.append(converted)
                    if len(group) >= TABLE_GROUP:
                        submit()
                submit()
            except BaseException:
                wait([f for f, _, _ in writes])
                mine.abort()
                settle()
                raise
            ready.append(mine)
            pending.extend(writes)
            report.files += 1
            if progress is not None:
                progress(path, path.stat().st_size)
            if len(pending) >= COMMIT_DRIVES:
                settle()
        settle()
    finally:
        pool.shutdown(wait=True)
    return report
