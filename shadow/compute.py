"""The per-frame shadow computation shared by the batch replayer and the streaming worker, and its output rows.

Given frames with their context (rows of FRAMES_LAKE_SCHEMA sorted by drive and seq: the frames to compute plus the
ego history before them and the logged future after them), `Shadow.compute` featurizes every row ONCE, runs the
teacher and the student on the same features, the teacher again on the second runtime for the noise-floor sample,
and computes every divergence metric. The table builders turn the result into rows of the fixed lake schemas
(`ingest.tables`): decisions per model, divergences per pair, noise floor, and scenario windows judged by the criteria.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.contract import ENUMS, FRAME_SCHEMA, Frames, arrow_to_frames
from ingest.tables import (DECISIONS_SCHEMA, DIVERGENCES_SCHEMA, LOG_REPLAY_SCHEMA, NOISE_FLOOR_SCHEMA, ONBOARD_SCHEMA,
                           SCENARIOS_SCHEMA, SHADOW_SCHEMA_VERSION, DIVERGENCE_HORIZONS_S)
from ingest.lake import model_id, pair_id
from shadow import featurize as fz
from shadow.criteria import Criteria, evaluate_windows, load_criteria
from shadow.metrics import WINDOW_METRICS, dominant, driver_metrics, pair_metrics, window_aggregates
from shadow.config import PipelineConfig
from shadow.log_replay import LogReplayScores, log_replay
from shadow.models import LoadedModel, load_model, runtime_label
from shadow.onboard import onboard_rows
from shadow.plugins import FeatureCache

log = logging.getLogger(__name__)

_DICT = {k: pa.array(names, pa.string()) for k, (_, names) in ENUMS.items()}
_F32_LIST = pa.list_(pa.field("item", pa.float32(), nullable=False))
_STR_LIST = pa.list_(pa.field("item", pa.string(), nullable=False))
WINDOW_META = ("drive_id", "vehicle_id", "seq", "timestamp", "tags", "kafka_partition", "kafka_offset")


@dataclass
class Computed:
    """Results for the computed rows of a source table; every array's first axis is n = len(rows)."""

    rows: np.ndarray  # (n,) row indices into the source table
    teacher: tuple[np.ndarray, np.ndarray]  # trajectory (n, T, 3) [m, m, rad], logits (n, 6)
    student: tuple[np.ndarray, np.ndarray]
    metrics: dict[str, np.ndarray]  # pair_metrics and {teacher,student}_{ade,fde}_driver, (n,) each
    conditions: dict[str, np.ndarray]  # road_type, lighting, weather (n,) enum codes; source (n,) names
    noise_pos: np.ndarray  # (k,) positions in `rows` of the noise-floor frames
    noise: dict[str, np.ndarray]  # pair_metrics of the teacher against itself on the second runtime, (k,) each
    agents: dict[str, np.ndarray]  # the logged agents of the rows in each one's ego frame (agents_in_ego_frame)
    log_replay: dict[str, LogReplayScores]  # "teacher", "student": each plan driven from its frame (every computed
    # row; the teacher's only where its row is not stored yet); .rows are source rows, a subset of `rows`


@dataclass
class Known:
    """A model's outputs already stored for some rows of a source table (its `decisions` rows): reused, not run."""

    rows: np.ndarray  # (k,) row indices into the source table, ascending
    traj: np.ndarray  # (k, T, 3) float32 [m, m, rad]
    logits: np.ndarray  # (k, 6) float32: log of the stored maneuver probabilities (the same softmax and arg-max)


@dataclass
class Inferred:
    """Model outputs of the computed rows (n = len(rows)), before any metric."""

    cols: dict[str, np.ndarray]  # Frames.cols of the whole source table (agents for TTC, conditions)
    rows: np.ndarray  # (n,) row indices into the source table
    target: np.ndarray  # (n, T, 3) logged future (featurizer targets)
    target_mask: np.ndarray  # (n, T) bool
    teacher: tuple[np.ndarray, np.ndarray]
    student: tuple[np.ndarray, np.ndarray]
    noise_pos: np.ndarray  # (k,) positions in `rows` of the noise-floor frames
    noise: tuple[np.ndarray, np.ndarray] | None  # the teacher on the noise runtime, (k, T, 3) and (k, 6)
    segments: np.ndarray  # (N,) contiguous runs of one drive over the whole source table (featurize.segments_of)
    teacher_reused: int = 0  # rows whose teacher outputs were stored ones, not run
    teacher_driven: np.ndarray | None = None  # (n,) bool: rows whose teacher log-replay row is needed (None: all)


def agents_in_ego_frame(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Flat logged agents of frames `rows` in each frame's ego frame: frame (M,) = position in `rows`, x, y [m],
    vx, vy [m/s] (world velocity rotated, not relative), heading [rad] relative to the ego, length, width [m]."""
    counts = cols["agent_count"].astype(np.int64)
    off = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    c = counts[rows]
    frame = np.repeat(np.arange(rows.shape[0]), c)
    start = np.repeat(off[rows] - np.concatenate([[0], np.cumsum(c)[:-1]]), c) if c.size else np.zeros(0, np.int64)
    flat = start + np.arange(frame.shape[0])
    src = rows[frame]
    psi = cols["ego_heading"].astype(np.float64)[src]
    cp, sp = np.cos(psi), np.sin(psi)
    dx = cols["agent_x"][flat] - cols["ego_x"][src]
    dy = cols["agent_y"][flat] - cols["ego_y"][src]
    vx, vy = cols["agent_vx"][flat].astype(np.float64), cols["agent_vy"][flat].astype(np.float64)
    return {"frame": frame, "x": cp * dx + sp * dy, "y": -sp * dx + cp * dy, "vx": cp * vx + sp * vy,
            "vy": -sp * vx + cp * vy, "heading": cols["agent_heading"][flat] - psi,
            "length": cols["agent_length"][flat], "width": cols["agent_width"][flat]}


def sources_of(cols: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Where frames `rows` came from, (n,) object: the name of a frame's `source:<name>` tag (`flywheel import`
    writes one per format), else "fleet" (frames streamed by vehicles)."""
    out = np.full(rows.shape[0], "fleet", dtype=object)
    tags = cols["tag"]
    if not tags.size:
        return out
    hit = np.flatnonzero([str(t).startswith("source:") for t in tags.tolist()])
    if not hit.size:
        return out
    frame_of_tag = np.repeat(np.arange(cols["tag_count"].shape[0]), cols["tag_count"].astype(np.int64))
    first = np.full(cols["tag_count"].shape[0], -1, np.int64)
    first[frame_of_tag[hit[::-1]]] = hit[::-1]  # the first source tag of each frame wins
    at = first[rows]
    have = np.flatnonzero(at >= 0)
    out[have] = [str(tags[i])[len("source:"):] for i in at[have]]
    return out


def take_agents(agents: dict[str, np.ndarray], positions: np.ndarray) -> dict[str, np.ndarray]:
    """The agents of the frames at `positions` (k,) of an agents dict, renumbered 0..k-1."""
    # sized for both: a sampled frame may come after the last frame that has any agent
    remap = np.full(max(int(agents["frame"].max(initial=-1)), int(positions.max(initial=-1))) + 1, -1)
    remap[positions] = np.arange(positions.shape[0])
    keep = remap[agents["frame"]] >= 0 if agents["frame"].size else np.zeros(0, bool)
    out = {k: v[keep] for k, v in agents.items()}
    out["frame"] = remap[out["frame"]]
    return out


def _lists(values: np.ndarray) -> pa.ListArray:
    """(n, T) float -> list<float32 not null> column."""
    n, t = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * t + 1, t, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(values, np.float32).ravel()), type=_F32_LIST)


def _enum(codes: np.ndarray, name: str) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes).astype(np.int8)), _DICT[name])


def _f32(a: np.ndarray) -> pa.Array:
    """float32 column; NaN becomes null (for the nullable columns)."""
    return pa.array(np.asarray(a, np.float32), pa.float32(), from_pandas=True)


def _const(value, n: int, t: pa.DataType) -> pa.Array:
    return pa.array([value] * n, t) if n < 64 else pa.repeat(pa.scalar(value, t), n)


def _build(schema: pa.Schema, cols: dict[str, pa.Array]) -> pa.Table:
    """A table of exactly `schema` (types checked, nothing inferred)."""
    return pa.Table.from_arrays([cols[f.name].cast(f.type) if cols[f.name].type != f.type else cols[f.name]
                                 for f in schema], schema=schema)


class Shadow:
    """Teacher, student (and the teacher on the noise runtime) loaded, with the criteria and the metric setup."""

    def __init__(self, teacher_path: Path, student_path: Path, config: PipelineConfig | None = None) -> None:
        self.config = config or PipelineConfig()
        self.teacher: LoadedModel = load_model(teacher_path, self.config.runtime)
        self.student: LoadedModel = load_model(student_path, self.config.runtime)
        self.noise_teacher: LoadedModel = load_model(teacher_path, self.config.noise_runtime)
        self.criteria: Criteria = load_criteria(self.config.criteria)
        self.teacher_id = model_id(self.teacher.name, self.teacher.version)
        self.student_id = model_id(self.student.name, self.student.version)
        self.pair = pair_id(self.teacher_id, self.student_id)

    def execution(self) -> dict:
        """The execution providers each model ran on (`shadow.models.execution_record`), for reports."""
        return {"teacher": self.teacher.execution, "student": self.student.execution,
                "noise_teacher": self.noise_teacher.execution}

    def footer(self, replay_id: str) -> dict[str, str]:
        """Footer of every file a replay writes: its id and the providers that computed it."""
        return {"flywheel.shadow.replay_id": replay_id,
                "flywheel.shadow.providers": json.dumps({"teacher": self.teacher.execution["providers"],
                                                         "student": self.student.execution["providers"]},
                                                        separators=(",", ":"))}

    @property
    def ids(self) -> dict[str, str]:
        """Model ids of "teacher" and "student", and the "pair" id."""
        return {"teacher": self.teacher_id, "student": self.student_id, "pair": self.pair}

    # ---------------------------------------------------------------------------------------------------- compute

    def compute(self, table: pa.Table, mask: np.ndarray, noise_mask: np.ndarray | None = None) -> Computed:
        """Featurize all rows of `table` (context included) once; run and measure the rows where `mask` (N,) holds.

        `table`: FRAMES_LAKE_SCHEMA rows sorted by (drive_id, seq). `noise_mask` (N,) selects the noise-floor frames
        among the masked ones (default: seq % noise_every == 0). Same as `measure(infer(...))`.
        """
        return self.measure(self.infer(table, mask, noise_mask))

    def infer(self, table: pa.Table, mask: np.ndarray, noise_mask: np.ndarray | None = None,
              teacher_known: Known | None = None, teacher_driven: np.ndarray | None = None) -> "Inferred":
        """The model half of `compute`: featurize once, teacher, student, and the teacher on the noise runtime.

        `teacher_known`: the teacher's stored outputs for some rows; the teacher runs only on the others (the noise
        floor still runs where `noise_mask` says). `teacher_driven` (N,) bool: the rows whose teacher plan must be
        driven in the log-replay closed loop (default all; a replay leaves out those whose row is stored)."""
        frames = arrow_to_frames(table.select(FRAME_SCHEMA.names))
        segments = fz.segments_of(table)
        feats = fz.featurize(frames, segments=segments, with_targets=True)
        rows = np.flatnonzero(mask)
        f = feats.take(rows)
        # each model eats its own featurizer's inputs (shadow.plugins), computed once per featurizer
        cache = FeatureCache(frames, segments, feats)
        by_featurizer: dict[str, dict[str, np.ndarray]] = {}

        def inputs_of(model: LoadedModel) -> dict[str, np.ndarray]:
            name = model.featurizer.name
            if name not in by_featurizer:
                by_featurizer[name] = {k: v[rows] for k, v in cache.inputs(model.featurizer).items()}
            return by_featurizer[name]

        inputs = inputs_of(self.teacher)
        reused = np.zeros(rows.shape[0], bool)
        if teacher_known is not None and teacher_known.rows.size:
            at = np.searchsorted(rows, teacher_known.rows)
            hit = (at < rows.shape[0]) & (rows[np.minimum(at, rows.shape[0] - 1)] == teacher_known.rows)
            reused[at[hit]] = True
        if reused.any():
            todo = np.flatnonzero(~reused)
            run = self.teacher.predict({k: np.ascontiguousarray(v[todo]) for k, v in inputs.items()}) if todo.size \
                else None
            known = teacher_known
            traj = np.empty((rows.shape[0], *known.traj.shape[1:]), np.float32)
            logits = np.empty((rows.shape[0], known.logits.shape[1]), np.float32)
            traj[at[hit]], logits[at[hit]] = known.traj[hit], known.logits[hit]
            if run is not None:
                traj[todo], logits[todo] = run
            t = (traj, logits)
        else:
            t = self.teacher.predict(inputs)
        s = self.student.predict(inputs_of(self.student))
        if noise_mask is None:
            noise_mask = table["seq"].to_numpy() % self.config.noise_every == 0
        noise_pos = np.flatnonzero(noise_mask[rows])
        tn = None
        if noise_pos.size:
            tn = self.noise_teacher.predict({k: np.ascontiguousarray(v[noise_pos]) for k, v in inputs.items()})
        driven = None if teacher_driven is None else np.asarray(teacher_driven, bool)[rows]
        return Inferred(frames.cols, rows, f.traj, f.traj_mask, t, s, noise_pos, tn, segments, int(reused.sum()),
                        driven)

    def measure(self, inf: "Inferred") -> Computed:
        """The numpy half of `compute`: every divergence metric of what `infer` produced."""
        rows, t, s = inf.rows, inf.teacher, inf.student
        agents = agents_in_ego_frame(inf.cols, rows)
        m = pair_metrics(t, s, self.config.metrics, agents)
        m["teacher_ade_driver"], m["teacher_fde_driver"] = driver_metrics(t[0], inf.target, inf.target_mask)
        m["student_ade_driver"], m["student_fde_driver"] = driver_metrics(s[0], inf.target, inf.target_mask)
        noise: dict[str, np.ndarray] = {}
        if inf.noise is not None:
            p = inf.noise_pos
            noise = pair_metrics((t[0][p], t[1][p]), inf.noise, self.config.metrics, take_agents(agents, p))
        conditions = {k: inf.cols[k][rows] for k in ("road_type", "lighting", "weather")}
        conditions["source"] = sources_of(inf.cols, rows)
        # every plan driven from its own frame among the logged agents: the frames after it are in the table (the
        # context the drivers load covers PipelineConfig.future_frames, the log-replay horizon included)
        frames = Frames(inf.cols, fz.HORIZON_DT_S)  # the spacing of the logged on-board plan is not read here
        pos = {"teacher": np.arange(rows.shape[0]) if inf.teacher_driven is None else
               np.flatnonzero(inf.teacher_driven), "student": np.arange(rows.shape[0])}
        lr = {}
        for which, out, model in (("teacher", t, self.teacher), ("student", s, self.student)):
            p = pos[which]
            lr[which] = log_replay(frames, rows[p], out[0][p], model.spec.horizon_dt_s, inf.segments,
                                   self.config.log_replay)
        return Computed(rows, t, s, m, conditions, inf.noise_pos, noise, agents, lr)

    # ------------------------------------------------------------------------------------------------ table rows

    def _key(self, table: pa.Table, rows: np.ndarray) -> dict[str, pa.Array]:
        idx = pa.array(rows)
        return {name: table[name].take(idx) for name in ("drive_id", "vehicle_id", "seq", "timestamp",
                                                         "kafka_partition", "kafka_offset")}

    def _conditions(self, table: pa.Table, rows: np.ndarray) -> dict[str, pa.Array]:
        idx = pa.array(rows)
        return {k: table[k].take(idx) for k in ("road_type", "lighting", "weather", "tags")}

    def _lineage(self, n: int, replay_id: str) -> dict[str, pa.Array]:
        return {"replay_id": _const(replay_id, n, pa.string()),
                "schema_version": pa.array(np.full(n, SHADOW_SCHEMA_VERSION, np.int16))}

    def _pair_cols(self, n: int) -> dict[str, pa.Array]:
        return {"teacher_name": _const(self.teacher.name, n, pa.string()),
                "teacher_version": _const(self.teacher.version, n, pa.string()),
                "student_name": _const(self.student.name, n, pa.string()),
                "student_version": _const(self.student.version, n, pa.string())}

    def decisions(self, table: pa.Table, c: Computed, which: str, replay_id: str) -> pa.Table:
        """DECISIONS_SCHEMA rows of every computed frame for `which` = "teacher" | "student"."""
        model = self.teacher if which == "teacher" else self.student
        traj, logits = c.teacher if which == "teacher" else c.student
        n = c.rows.shape[0]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        cols = {**self._key(table, c.rows), "model_name": _const(model.name, n, pa.string()),
                "model_version": _const(model.version, n, pa.string()),
                "featurizer_version": _const(model.spec.featurizer_version, n, pa.string()),
                "traj_x": _lists(traj[..., 0]), "traj_y": _lists(traj[..., 1]), "traj_yaw": _lists(traj[..., 2]),
                "maneuver": _enum(logits.argmax(axis=1), "maneuver"), "maneuver_probs": _lists(probs),
                **self._lineage(n, replay_id)}
        return _build(DECISIONS_SCHEMA, cols)

    def divergences(self, table: pa.Table, c: Computed, replay_id: str) -> pa.Table:
        """DIVERGENCES_SCHEMA rows of every computed frame."""
        n = c.rows.shape[0]
        m = c.metrics
        cols = {**self._key(table, c.rows), **self._pair_cols(n), **self._conditions(table, c.rows),
                "maneuver_teacher": _enum(m["maneuver_teacher"], "maneuver"),
                "maneuver_student": _enum(m["maneuver_student"], "maneuver"),
                "maneuver_disagree": pa.array(m["maneuver_disagree"]), **self._lineage(n, replay_id)}
        for name in ("maneuver_jsd", "ttc_teacher", "ttc_student", "teacher_ade_driver", "teacher_fde_driver",
                     "student_ade_driver", "student_fde_driver", "score"):
            cols[name] = _f32(m[name])
        for h in DIVERGENCE_HORIZONS_S:
            for k in ("ade", "fde", "ahe", "fhe"):
                cols[f"{k}_{h}s"] = _f32(m[f"{k}_{h}s"])
            cols[f"miss_{h}s"] = pa.array(m[f"miss_{h}s"])
        return _build(DIVERGENCES_SCHEMA, cols)

    def noise_floor(self, table: pa.Table, c: Computed, replay_id: str) -> pa.Table:
        """NOISE_FLOOR_SCHEMA rows of the noise-floor frames: the teacher on both runtimes."""
        rows = c.rows[c.noise_pos]
        n = rows.shape[0]
        if n == 0:
            return NOISE_FLOOR_SCHEMA.empty_table()
        m = c.noise
        cols = {**self._key(table, rows), "model_name": _const(self.teacher.name, n, pa.string()),
                "model_version": _const(self.teacher.version, n, pa.string()),
                "runtime_a": _const(runtime_label(self.teacher.runtime), n, pa.string()),
                "runtime_b": _const(runtime_label(self.noise_teacher.runtime), n, pa.string()),
                "maneuver_jsd": _f32(m["maneuver_jsd"]), "score": _f32(m["score"]), **self._lineage(n, replay_id)}
        for h in DIVERGENCE_HORIZONS_S:
            for k in ("ade", "fde", "ahe", "fhe"):
                cols[f"{k}_{h}s"] = _f32(m[f"{k}_{h}s"])
            cols[f"miss_{h}s"] = pa.array(m[f"miss_{h}s"])
        return _build(NOISE_FLOOR_SCHEMA, cols)

    def onboard(self, table: pa.Table, c: Computed, replay_id: str) -> tuple[np.ndarray, pa.Table]:
        """ONBOARD_SCHEMA rows of the computed frames that log a whole on-board plan (`shadow.onboard`), with their
        positions in `c.rows`."""
        pos, m = onboard_rows(table, c.rows, c.teacher, c.student, (self.student.name, self.student.version),
                              c.metrics["score"], lambda p: take_agents(c.agents, p), self.config)
        n = pos.shape[0]
        out = {**self._key(table, c.rows[pos]), **self._pair_cols(n), **self._conditions(table, c.rows[pos]),
               **self._lineage(n, replay_id)}
        for k, v in m.items():
            out[k] = pa.array(v, ONBOARD_SCHEMA.field(k).type, from_pandas=True)
        return pos, _build(ONBOARD_SCHEMA, out)

    def log_replay(self, table: pa.Table, c: Computed, which: str, replay_id: str) -> tuple[np.ndarray, pa.Table]:
        """LOG_REPLAY_SCHEMA rows for `which` = "teacher" | "student" of the computed frames its plan was driven
        from in the log-replay closed loop (`shadow.log_replay`; every one, but the teacher's stored ones), NaN
        stored as null, with their positions in `c.rows`."""
        model = self.teacher if which == "teacher" else self.student
        rows = c.log_replay[which].rows
        pos = np.searchsorted(c.rows, rows)  # c.rows ascends
        n = rows.shape[0]
        scores = c.log_replay[which].table()
        cols = {**self._key(table, rows), "model_name": _const(model.name, n, pa.string()),
                "model_version": _const(model.version, n, pa.string()), **self._conditions(table, rows),
                **{name: scores[name] for name in scores.column_names}, **self._lineage(n, replay_id)}
        return pos, _build(LOG_REPLAY_SCHEMA, cols)

    def frame_rows(self, table: pa.Table, c: Computed, replay_id: str
                   ) -> tuple[dict[str, pa.Table], dict[str, np.ndarray]]:
        """Every per-frame output of a computation, by `shadow.outputs.OUTPUT_TABLES` name (all but the scenario
        windows, which both drivers build as their windows complete), and for the tables that hold only some of
        the computed frames, their rows' positions in `c.rows` (the others: one row per computed frame, in order)."""
        lr_t_pos, lr_t = self.log_replay(table, c, "teacher", replay_id)
        lr_s_pos, lr_s = self.log_replay(table, c, "student", replay_id)
        o_pos, onboard = self.onboard(table, c, replay_id)
        rows = {"teacher_decisions": self.decisions(table, c, "teacher", replay_id),
                "student_decisions": self.decisions(table, c, "student", replay_id),
                "teacher_log_replay": lr_t, "student_log_replay": lr_s,
                "noise_floor": self.noise_floor(table, c, replay_id), "onboard": onboard,
                "divergences": self.divergences(table, c, replay_id)}
        subsets = {"teacher_log_replay": lr_t_pos, "student_log_replay": lr_s_pos, "noise_floor": c.noise_pos,
                   "onboard": o_pos}
        return rows, subsets

    def scenarios(self, meta: pa.Table, metrics: dict[str, np.ndarray], conditions: dict[str, np.ndarray],
                  window: np.ndarray, replay_id: str) -> pa.Table:
        """SCENARIOS_SCHEMA rows, one per window id >= 0 in `window` (n,), judged by the criteria.

        Per frame (n rows each): `meta` with the columns WINDOW_META of the frames, `metrics` from `compute`
        (pair_metrics), `conditions` road_type / lighting / weather codes. A window's lineage (kafka_partition,
        kafka_offset) is that of its first frame, which is how a writer knows which output file holds the row.
        Conditions are the window's most frequent values; tags the union of its frames' tags.
        """
        sel = np.flatnonzero(window >= 0)
        if sel.size == 0:
            return SCENARIOS_SCHEMA.empty_table()
        ids, group = np.unique(window[sel], return_inverse=True)
        g = ids.shape[0]
        agg = window_aggregates(group, g, {k: v[sel] for k, v in metrics.items()})
        seq = meta["seq"].to_numpy()[sel]
        # first and last frame of each window: order by (group, seq)
        order = np.lexsort((seq, group))
        starts = np.searchsorted(group[order], np.arange(g))
        ends = np.append(starts[1:], order.shape[0]) - 1
        first, last = sel[order[starts]], sel[order[ends]]
        conds = {k: dominant(group, g, conditions[k][sel], len(ENUMS[k][1])) for k in ("road_type", "lighting",
                                                                                     "weather")}
        tag_sets: list[set] = [set() for _ in range(g)]
        for gi, tags in zip(group.tolist(), meta["tags"].take(pa.array(sel)).to_pylist()):
            tag_sets[gi].update(tags)
        passed, failed = evaluate_windows({**agg, **conds}, self.criteria)
        fi, li = pa.array(first), pa.array(last)
        cols = {"drive_id": meta["drive_id"].take(fi), "vehicle_id": meta["vehicle_id"].take(fi),
                "window_start_seq": meta["seq"].take(fi), "window_end_seq": meta["seq"].take(li),
                "start_time": meta["timestamp"].take(fi), "end_time": meta["timestamp"].take(li),
                **self._pair_cols(g), **{k: _enum(v, k) for k, v in conds.items()},
                "tags": pa.array([sorted(s) for s in tag_sets], _STR_LIST),
                "frames": pa.array(agg["frames"], pa.int32()), "passed": pa.array(passed),
                "failed_criteria": pa.array(failed, _STR_LIST),
                "criteria_version": _const(self.criteria.version, g, pa.string()),
                "kafka_partition": meta["kafka_partition"].take(fi), "kafka_offset": meta["kafka_offset"].take(fi),
                **self._lineage(g, replay_id)}
        for k in WINDOW_METRICS[1:]:
            cols[k] = _f32(agg[k])
        return _build(SCENARIOS_SCHEMA, cols)


def offsets_in(t: pa.Table, lo: int, hi: int) -> pa.Table:
    """Rows of an output table whose kafka_offset lies in [lo, hi]."""
    off = t["kafka_offset"]
    return t.filter(pc.and_(pc.greater_equal(off, lo), pc.less_equal(off, hi)))
