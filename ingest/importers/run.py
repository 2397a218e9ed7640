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
    """FRAME_SCHEMA tables of several drives, the same as `frames_to_arrow` of each: one conversion of all their
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


class _Writes:
    """The drives of an import on their way to disk: converted ones grouped (across files) for `drive_tables`, then
    written by the pool into their file's DriveBatch; `settle` makes every file converted whole visible."""

    def __init__(self, out: Path, pool: ThreadPoolExecutor, report: ImportReport) -> None:
        self.out, self.pool, self.report = out, pool, report
        self.group: list[tuple[SourceDrive, Frames, DriveBatch]] = []
        self.files: list[tuple[DriveBatch, list]] = []  # each file's batch and its writes, in file order

    def open_file(self) -> DriveBatch:
        self.files.append((DriveBatch(), []))
        return self.files[-1][0]

    def add(self, src: SourceDrive, frames: Frames, batch: DriveBatch) -> None:
        self.group.append((src, frames, batch))
        if len(self.group) >= TABLE_GROUP:
            self.submit()

    def submit(self) -> None:
        group, self.group = self.group, []
        writes = {id(b): ws for b, ws in self.files}
        for (src, frames, batch), table in zip(group, drive_tables([(s, f) for s, f, _ in group])):
            writes[id(batch)].append((self.pool.submit(batch.write, self.out, table), src, frames.num_frames))

    def written(self) -> int:
        return sum(len(ws) for _, ws in self.files) + len(self.group)

    def drop_file(self, batch: DriveBatch) -> None:
        """A file that failed: what it had written goes, nothing of it is left to write."""
        self.group = [g for g in self.group if g[2] is not batch]
        ws = next(ws for b, ws in self.files if b is batch)
        self.files = [(b, w) for b, w in self.files if b is not batch]
        wait([f for f, _, _ in ws])
        batch.abort()

    def settle(self) -> None:
        self.submit()
        files, self.files = self.files, []
        try:
            for _, ws in files:
                for fut, src, n in ws:
                    self.report.drives.append(DriveReport(src.drive_id, src.vehicle_id, src.record, n,
                                                          str(fut.result())))
        except BaseException:
            wait([f for _, ws in files for f, _, _ in ws])
            for b, _ in files:
                b.abort()
            raise
        DriveBatch.commit_all([b for b, _ in files])


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
    w = _Writes(Path(out), pool, report)
    try:
        for path in source_files(fmt, sources):
            tick = (lambda n, p=path: progress(p, n)) if progress is not None else None
            mine = w.open_file()
            try:
                for src, frames in convert_drives(path, fmt, module.read(path, opts, tick), opts, report):
                    w.add(src, frames, mine)
            except BaseException:
                w.drop_file(mine)
                w.settle()
                raise
            report.files += 1
            if progress is not None:
                progress(path, path.stat().st_size)
            if w.written() >= COMMIT_DRIVES:
                w.settle()
        w.settle()
    finally:
        pool.shutdown(wait=True)
    return report
