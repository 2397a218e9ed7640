"""Batch shadow replay over the lake: teacher and student on every logged frame not yet replayed for their pair.

    report = replay("data/lake", "artifacts/teacher", "artifacts/student/int8", ReplayConfig())

Incremental by offset coverage (see shadow.outputs): for each Kafka partition, the live `frames` files are cut into
units, the parts of each file's offset range that the pair's live `divergences` files do not cover. Replaying twice
does nothing the second time; new frames files are the only new units; a new student version is a new pair id and
replays the whole history; a crash leaves at most some files without their divergences marker, which the rerun
overwrites under the same names. No state lives outside the lake.

Context. A frame's features need the ego history (9 frames before it), its driver metrics the logged future (4 s =
40 frames after it), and a scenario window it opens the rest of its window (W - 1 frames). All chunks of a drive are
in one Kafka partition, so the partition's files hold the context; which file holds which seqs of which drive comes
from the `flywheel.drive_seq` footers alone, and only those rows are read (tables cached per group). A unit is
replayed once its context is in the lake: every drive in it has its frames up to `context_after` frames past its
last frame stored, or has ended: its final chunk is stored (the `flywheel.drive_final` footer) with every frame
before it, or it has been quiet for `drive_end_idle_s`. An ended drive's last frames get null driver metrics.
Otherwise the unit is deferred to a later run (counted in the report).

Scenario windows are frames seq // W of a drive. A window's row is written with the unit holding the window's first
stored frame, aggregated over all of its frames (later ones come from the loaded context).

Throughput: each group of units (`group_frames`) is featurized once and fed to both models (`shadow.compute`);
a background stage loads and runs the models on the next group while this thread computes the metrics and writes
the current one, in order (writes never leave this thread).

Coexistence with the streaming worker (shadow.stream): both write the same tables with the same naming, so
whatever offsets one covered the other skips. Before writing each group the batch lists the lake again and writes
each table only for offsets it does not hold yet; two writers on the same pair and partition at the very same
moment could still overlap by the offsets in flight, so run the backfill where the stream is not consuming, or
after it. A drive that resumes after `drive_end_idle_s` of silence keeps the null driver metrics of the frames
replayed before it resumed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ingest.contract import ENUMS
from ingest.lake import LakeFile, live_files, remove_stale_temporaries
from ingest.lake_index import SeqRanges
from shadow.batch.frames_index import FileInfo, PartitionIndex, load_context
from shadow.criteria import pass_rates
from shadow.compute import WINDOW_META, Inferred, Shadow
from shadow.config import ReplayConfig
from shadow.numerics import numerics_record
from shadow.models import runtime_label
from shadow.outputs import Coverage, FrameInfo, covered, stored_decisions, unit_outputs, write_unit

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class ReplayReport(BaseModel):
    """What one replay run did; records are plain dicts for printing or JSON."""

    model_config = ConfigDict(extra="forbid")

    replay_id: str
    pair: str
    teacher: str
    student: str
    frames_replayed: int = 0
    frames_computed: int = Field(0, description="replayed frames plus window context computed with them")
    units: int = Field(0, description="offset ranges replayed")
    units_deferred: int = Field(0, description="offset ranges whose context is not in the lake yet")
    files_covered: int = Field(0, description="frames files the pair had replayed already")
    files_written: int = 0
    windows: int = 0
    noise_frames: int = 0
    teacher_reused: int = Field(0, description="computed frames whose teacher outputs were its stored decisions")
    seconds: float = 0.0
    frames_per_s: float = 0.0
    by_condition: list[dict] = Field(default_factory=list, description="divergence per condition value and per "
                                     "source (group 'source': an import's format, else fleet)")
    pass_rates: list[dict] = Field(default_factory=list, description="criteria pass rates vs required")
    noise_floor: dict = Field(default_factory=dict, description="teacher vs itself across runtimes")
    numerics: dict = Field(default_factory=dict, description="integer kernel the student ran with and the host's "
                           "CPU features (shadow.numerics.numerics_record)")
    execution: dict = Field(default_factory=dict, description="execution providers each model ran on, what was "
                            "requested, and whether it fell back (shadow.models.execution_record); the files "
                            "written carry the providers in their footer (flywheel.shadow.providers)")


@dataclass
class _Unit:
    file: int  # index into PartitionIndex.files
    lo: int
    hi: int
    frames: int  # estimate, for progress


@dataclass
class _Totals:
    cond: dict = field(default_factory=dict)  # (group, value) -> [frames, ade, miss, disagree, score]
    windows: dict = field(default_factory=lambda: {"road_type": [], "lighting": [], "weather": [], "passed": []})
    noise: list = field(default_factory=lambda: [0, 0.0, 0.0, 0.0])  # frames, sum ade_4s, max fde_4s, sum jsd


# ------------------------------------------------------------------------------------------------------- replay


def replay(lake: Path, teacher_path: Path, student_path: Path, config: ReplayConfig | None = None,
           progress: Progress | None = None, shadow: Shadow | None = None) -> ReplayReport:
    """Replay every frame of the lake the pair has not replayed yet; see the module docstring.

    `progress(done, total)` is called with estimated frame counts after each unit is written. `shadow` reuses
    models already loaded (it must have been built with the same config).
    """
    config = config or ReplayConfig()
    lake = Path(lake)
    t0 = time.perf_counter()
    shadow = shadow or Shadow(teacher_path, student_path, config)
    report = ReplayReport(replay_id=uuid.uuid4().hex, pair=shadow.pair, teacher=shadow.teacher_id,
                          student=shadow.student_id, numerics=numerics_record(config.runtime.int8_kernel),
                          execution=shadow.execution())
    for table in ("decisions", "divergences", "scenarios", "noise_floor"):
        remove_stale_temporaries(lake, table)
    coverage = Coverage(lake)
    parts: dict[tuple[str, int], list[LakeFile]] = {}
    for f in live_files(lake, "frames", config.topic):
        if config.partitions is None or f.partition in config.partitions:
            parts.setdefault((f.topic, f.partition), []).append(f)
    plans = []
    for (topic, partition), files in sorted(parts.items()):
        index = PartitionIndex(files)
        done = coverage.get("divergences", "pair", shadow.pair, topic, partition)
        units = []
        for i, info in enumerate(index.files):
            f = info.lake_file
            if config.files is not None and f.path.name not in config.files:
                continue  # another task's share (shadow.batch.backfill); still context for this one's
            todo = done.missing(f.first, f.last)
            if not todo:
                report.files_covered += 1
                continue
            if not _settled(info, index, config):
                report.units_deferred += len(todo)
                continue
            span = f.last - f.first + 1
            units += [_Unit(i, a, b, max(1, info.rows * (b - a + 1) // span)) for a, b in todo]
        plans.append((topic, partition, index, units))
    total = sum(u.frames for *_, units in plans for u in units)
    done_frames = 0
    totals = _Totals()
    if progress:
        progress(0, total)
    # Two stages: a background thread loads, featurizes and runs the models on group k + 1 while this thread
    # measures and writes group k; the models keep both cores busy and the single-threaded numpy and Parquet work
    # of the other stage fills the gaps. Writes stay in this thread, in order.
    jobs = [(topic, partition, index, g) for topic, partition, index, units in plans
            for g in _groups(units, config.group_frames)]
    caches: dict[tuple[str, int], OrderedDict] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="shadow-infer") as ex:
        nxt = ex.submit(_prepare, shadow, jobs[0], caches, config, lake) if jobs and config.prefetch else None
        for k in range(len(jobs)):
            ready = nxt.result() if config.prefetch else _prepare(shadow, jobs[k], caches, config, lake)
            if config.prefetch and k + 1 < len(jobs):
                nxt = ex.submit(_prepare, shadow, jobs[k + 1], caches, config, lake)
            coverage.refresh(ready.topic, ready.partition)  # a streaming worker may have covered offsets meanwhile
            for u in _finish(shadow, coverage, ready, config, report, totals):
                done_frames += u.frames
                if progress:
                    progress(min(done_frames, total), total)
    report.seconds = time.perf_counter() - t0
    report.frames_per_s = report.frames_replayed / report.seconds if report.seconds else 0.0
    _summarise(report, totals, shadow)
    log.info("replay %s of %s: %d frames in %d units (%d deferred, %d files already covered), %.0f frames/s",
             report.replay_id, report.pair, report.frames_replayed, report.units, report.units_deferred,
             report.files_covered, report.frames_per_s)
    return report


def _settled(info: FileInfo, index: PartitionIndex, config: ReplayConfig) -> bool:
    """Whether every drive of a frames file has its context after it in the lake, or has ended."""
    need = config.context_after()
    now = time.time()
    for d, r in info.drive_seq.items():
        if not index.ranges[d].missing(r.max + 1, r.max + need):
            continue  # its whole future is stored (a gap before it may still be filled by a resend)
        if index.ended(d, config.drive_end_idle_s, now):
            continue
        return False
    return True


def _groups(units: list[_Unit], frames: int):
    group, n = [], 0
    for u in units:
        group.append(u)
        n += u.frames
        if n >= frames:
            yield group
            group, n = [], 0
    if group:
        yield group


def _windows(table: pa.Table, unit_of: np.ndarray, index: PartitionIndex, w_frames: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Scenario windows the group's units write: (window id per row (N,), -1 for none; emitting unit per id)."""
    drive = table["drive_id"].to_numpy(zero_copy_only=False)
    seq = table["seq"].to_numpy()
    names, dcode = np.unique(drive, return_inverse=True)
    w = seq // w_frames
    key = dcode.astype(np.int64) * (int(w.max(initial=0)) + 1) + w
    mine = unit_of >= 0
    window = np.full(len(seq), -1, np.int64)
    emitters = []
    row_of = {(int(dcode[r]), int(seq[r])): r for r in np.flatnonzero(mine)}
    for k in np.unique(key[mine]):
        r0 = int(np.flatnonzero(key == k)[0])
        d, wi = int(dcode[r0]), int(w[r0])
        first = index.first_stored(str(names[d]), wi * w_frames, wi * w_frames + w_frames - 1)
        r = row_of.get((d, first)) if first is not None else None
        if r is None:
            continue  # the window's first frame is in another unit (or already replayed): that one writes it
        window[key == k] = len(emitters)
        emitters.append(int(unit_of[r]))
    return window, np.array(emitters, np.int64)


@dataclass
class _Prepared:
    topic: str
    partition: int
    index: PartitionIndex
    group: list[_Unit]
    table: pa.Table  # the group's rows and context, sorted by (drive_id, seq)
    unit_of: np.ndarray  # (N,) unit of each row in `group`, -1 for context
    window: np.ndarray  # (N,) scenario window id, -1 for none
    emitter: np.ndarray  # (W,) unit that writes each window
    inferred: Inferred


def _prepare(shadow: Shadow, job: tuple, caches: dict, config: ReplayConfig, lake: Path) -> _Prepared:
    """Load a group with its context, decide what to compute, run the models (background stage)."""
    topic, partition, index, group = job
    cache = caches.setdefault((topic, partition), OrderedDict())
    table, src = load_context(index, sorted({u.file for u in group}), cache, config.history_frames(),
                              config.context_after())
    off = table["kafka_offset"].to_numpy()
    seq = table["seq"].to_numpy()
    unit_of = np.full(table.num_rows, -1, np.int64)
    for k, u in enumerate(group):
        unit_of[(src == u.file) & (off >= u.lo) & (off <= u.hi)] = k
    window, emitter = _windows(table, unit_of, index, config.window_frames)
    mine = unit_of >= 0
    noise = mine & (seq % config.noise_every == 0)
    known = stored_decisions(lake, shadow.teacher_id, topic, partition, table) if config.reuse_teacher else None
    driven = None
    if known is not None:
        def stored_in(table_name: str) -> np.ndarray:  # rows whose offsets the teacher's rows of that table cover
            return _in_ranges(off, covered(lake, table_name, "model", shadow.teacher_id, topic, partition))

        # and its log-replay rows: a frame whose row is stored is not driven again (it would not be written)
        driven = ~stored_in("log_replay")
        # a frame with stored teacher decisions usually has its noise floor stored too: not computed again
        stored = np.zeros(table.num_rows, bool)
        stored[known.rows] = True
        noise &= ~(stored & stored_in("noise_floor"))
    inferred = shadow.infer(table, mine | (window >= 0), noise, known, driven)
    return _Prepared(topic, partition, index, group, table, unit_of, window, emitter, inferred)


def _in_ranges(off: np.ndarray, ranges: SeqRanges) -> np.ndarray:
    """(N,) bool: the offsets `off` (N,) that lie in one of `ranges`."""
    out = np.zeros(off.shape, bool)
    for a, b in ranges.ranges:
        out |= (off >= a) & (off <= b)
    return out


def _finish(shadow: Shadow, coverage: Coverage, p: _Prepared, config: ReplayConfig, report: ReplayReport,
            totals: _Totals):
    """Measure a prepared group and write its units, divergences last; yields each unit once written."""
    table, unit_of, emitter, index = p.table, p.unit_of, p.emitter, p.index
    c = shadow.measure(p.inferred)
    rid = report.replay_id
    frame_rows, subsets = shadow.frame_rows(table, c, rid)
    meta = table.select(list(WINDOW_META)).take(pa.array(c.rows))
    scen = shadow.scenarios(meta, c.metrics, c.conditions, p.window[c.rows], rid)
    c_unit = unit_of[c.rows]
    n_unit = c_unit[c.noise_pos]
    drive = table["drive_id"].to_numpy(zero_copy_only=False)
    seq = table["seq"].to_numpy()
    off = table["kafka_offset"].to_numpy()
    ts_ms = table["ingest_time"].cast(pa.int64()).to_numpy()
    _accumulate(totals, c, c_unit >= 0, scen)
    report.frames_computed += int(c.rows.shape[0])
    report.teacher_reused += p.inferred.teacher_reused
    for k, u in enumerate(p.group):
        sel = c_unit == k
        rows = {name: t.filter(pa.array(c_unit[subsets[name]] == k if name in subsets else sel))
                for name, t in frame_rows.items()}
        outputs = unit_outputs(shadow.ids, {**rows, "scenarios": scen.filter(pa.array(emitter == k))})
        m = unit_of == k
        ended = {d for d in np.unique(drive[m]).tolist() if index.ranges[d].max <= int(seq[m & (drive == d)].max())
                 and index.ended(d, config.drive_end_idle_s, time.time())}
        info = FrameInfo(drive[m], seq[m], off[m], ts_ms[m], ended)
        res = write_unit(coverage, index.files[u.file].date, p.topic, p.partition, u.lo, u.hi, outputs, info,
                         shadow.footer(rid), config.row_group_rows)
        report.units += 1
        report.files_written += len(res.files)
        report.frames_replayed += int(sel.sum())
        report.windows += int((emitter == k).sum())
        report.noise_frames += int((n_unit == k).sum())
        yield u


def _accumulate(totals: _Totals, c, written: np.ndarray, scen: pa.Table) -> None:
    m = c.metrics
    for group in ("road_type", "lighting", "weather", "source"):
        codes = c.conditions[group]
        for code in np.unique(codes[written]):
            sel = written & (codes == code)
            value = ENUMS[group][1][int(code)] if group in ENUMS else str(code)  # source: a name already
            acc = totals.cond.setdefault((group, value), [0, 0.0, 0, 0, 0.0])
            acc[0] += int(sel.sum())
            acc[1] += float(m["ade_4s"][sel].sum())
            acc[2] += int(m["miss_4s"][sel].sum())
            acc[3] += int(m["maneuver_disagree"][sel].sum())
            acc[4] += float(m["score"][sel].sum())
    for k in ("road_type", "lighting", "weather"):
        totals.windows[k] += scen[k].cast(pa.string()).to_pylist()
    totals.windows["passed"] += scen["passed"].to_pylist()
    if c.noise:
        n = totals.noise
        n[0] += len(c.noise["ade_4s"])
        n[1] += float(c.noise["ade_4s"].sum())
        n[2] = max(n[2], float(c.noise["fde_4s"].max(initial=0.0)))
        n[3] += float(c.noise["maneuver_jsd"].sum())


def _summarise(report: ReplayReport, totals: _Totals, shadow: Shadow) -> None:
    report.by_condition = [{"group": g, "value": v, "frames": a[0], "mean_ade_4s": a[1] / a[0],
                            "miss_rate_4s": a[2] / a[0], "disagree_rate": a[3] / a[0], "mean_score": a[4] / a[0]}
                           for (g, v), a in sorted(totals.cond.items()) if a[0]]
    w = totals.windows
    if w["passed"]:
        report.pass_rates = pass_rates({k: np.array(v, object) for k, v in w.items() if k != "passed"},
                                       np.array(w["passed"]), shadow.criteria)
    n = totals.noise
    if n[0]:
        report.noise_floor = {"frames": n[0], "mean_ade_4s": n[1] / n[0], "max_fde_4s": n[2],
                              "mean_jsd": n[3] / n[0], "runtime_a": runtime_label(shadow.teacher.runtime),
                              "runtime_b": runtime_label(shadow.noise_teacher.runtime)}
