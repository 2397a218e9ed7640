"""Verification of a candidate against the current student: the figures the gates (`retrain.cycle.gates`) judge.

    figures = verify(VerificationConfig(), snapshot, teacher_dir, student_dir, candidate_dir, out_dir)

Shadow replay (`shadow.batch.replay`) of the current student ("before") and the candidate ("after") on the
snapshot's test drives, written as a lake of their own under `out`: the divergence where mined (test mined windows)
and elsewhere (test ordinary windows), overall, per condition and per road type; the FP32 models too when given (the
fine-tune's effect without the compression's, for attribution); the pass rate of every acceptance criterion
(`shadow.criteria`, the file the replay judged with) on the held-out scenario windows, overall, where mined and
elsewhere. Both students are also driven through every
held-out mined and ordinary window in the log-replay closed loop (`shadow.log_replay`: their plans followed for 4 s
while the logged agents replay; NAVSIM's PDM score and its sub-scores). Then the same seeded closed-loop episodes in
highway-env (`retrain.cycle.closed_loop`) for both, with the expert as reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrain.cycle.closed_loop import EXPERT, ClosedLoopConfig, OnnxPlanner, evaluate
from retrain.cycle.dataset import Snapshot, write_frames_lake
from retrain.cycle.gates import relative_change
from retrain.cycle.mining import condition_of
from shadow.batch.replay import replay
from ingest.contract import FRAME_SCHEMA, arrow_to_frames
from shadow.catalog import Catalog
from shadow.config import ReplayConfig
from shadow.criteria import CONDITION_COLUMNS, Criteria, criterion_pass_rates, load_criteria
from shadow.featurize import segments_of
from shadow.log_replay import LogReplayConfig, log_replay
from shadow.models import load_model
from shadow.plugins import FeatureCache
from shadow.spec import MODEL_FILE
from sim.config import CONDITIONS


class VerificationError(RuntimeError):
    """A candidate that cannot be verified: no test drives in the snapshot, the same model id as the student."""


class VerificationConfig(BaseModel):
    """How a candidate is verified against the current student."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chip: str = Field("cpu", description="target whose artifact is replayed and driven (the others are checked "
                      "numerically against their FP32 reference by the compression)")
    replay: ReplayConfig = Field(default_factory=lambda: ReplayConfig(drive_end_idle_s=0.0, noise_every=1_000_000),
                                 description="shadow replay of both students on the test drives (their drives have "
                                 "ended: no idle wait; the noise floor is not needed here)")
    closed_loop: ClosedLoopConfig = Field(default_factory=lambda: ClosedLoopConfig(episodes=2),
                                          description="episodes per scenario and their length")
    conditions: list[str] = Field(default_factory=lambda: ["nominal", "glare"], min_length=1,
                                  description="perception conditions the closed loop runs under, each in turn")
    expert: bool = Field(True, description="also drive the expert on the same episodes (reference)")
    fp32_reference: bool = Field(True, description="also replay both students' FP32 models (when both exist): "
                                 "the fine-tune's effect without the compression's, for attribution (not gated)")
    log_replay: LogReplayConfig = Field(default_factory=LogReplayConfig, description="the log-replay closed loop "
                                        "both students are driven through on every held-out window")

    @model_validator(mode="after")
    def _known(self) -> "VerificationConfig":
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown closed-loop conditions {bad}; known: {list(CONDITIONS)}")
        return self


# ------------------------------------------------------------------------------------------------ figures judged

DIVERGENCE_COLUMNS = ("score", "ade_4s", "fde_4s", "miss_4s", "maneuver_disagree")
SETS = {"mined": "mined", "ordinary": "elsewhere"}


def divergence_summary(cols: dict[str, np.ndarray]) -> dict:
    """frames, mean_score, mean_ade_4s [m], mean_fde_4s [m], miss_rate_4s, disagree_rate of per-frame divergence
    columns (shadow's divergences table); None figures for no frames."""
    n = int(cols["score"].shape[0])
    mean = (lambda x: float(np.mean(x)) if n else None)  # noqa: E731
    return {"frames": n, "mean_score": mean(cols["score"]), "mean_ade_4s": mean(cols["ade_4s"]),
            "mean_fde_4s": mean(cols["fde_4s"]), "miss_rate_4s": mean(cols["miss_4s"]),
            "disagree_rate": mean(cols["maneuver_disagree"])}


def divergence_figures(before: pa.Table, after: pa.Table, roles: pa.Table) -> dict:
    """Divergence of two students (rows of the divergences table: drive_id, seq, DIVERGENCE_COLUMNS, lighting,
    weather, road_type) on the same frames, where mined and elsewhere (`roles`: drive_id, seq, role = mined |
    ordinary), overall, per condition and per road type. Only frames both students were replayed on count."""
    keys = ["drive_id", "seq"]
    b = before.select([*keys, *DIVERGENCE_COLUMNS, "lighting", "weather", "road_type"])
    a = after.select([*keys, *DIVERGENCE_COLUMNS]).rename_columns(keys + [f"a_{c}" for c in DIVERGENCE_COLUMNS])
    t = roles.select([*keys, "role"]).join(b, keys, join_type="inner").join(a, keys, join_type="inner")
    t = t.sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    role = t["role"].to_numpy(zero_copy_only=False)
    cond = np.array([condition_of(li, we) for li, we in zip(t["lighting"].to_pylist(), t["weather"].to_pylist())],
                    object)
    road = np.array(t["road_type"].to_pylist(), object)
    num = (lambda name: pc.fill_null(t[name].cast(pa.float64()), 0.0).to_numpy())  # noqa: E731
    col = {c: num(c) for c in DIVERGENCE_COLUMNS}
    acol = {c: num(f"a_{c}") for c in DIVERGENCE_COLUMNS}

    def pair(sel: np.ndarray) -> dict:
        bs = divergence_summary({c: v[sel] for c, v in col.items()})
        af = divergence_summary({c: v[sel] for c, v in acol.items()})
        change = {k: relative_change(bs[k], af[k]) for k in bs if k != "frames"}
        return {"before": bs, "after": af, "change": change}

    out: dict = {"frames": int(t.num_rows), "by_condition": [], "by_road_type": []}
    for r, name in SETS.items():
        in_set = role == r
        out[name] = pair(in_set)
        for key, values in (("by_condition", cond), ("by_road_type", road)):
            for v in sorted(set(values[in_set].tolist())):
                out[key].append({"set": name, key[3:]: v, **pair(in_set & (values == v))})
    return out


def criteria_figures(windows: pa.Table, mined: pa.Table, criteria: Criteria) -> dict:
    """Pass rates of two students on the same G scenario windows, per criterion `criteria` evaluates and overall.

    `windows`: one row per window both were judged on: drive_id, window_start_seq, window_end_seq, road_type,
    lighting, weather, b_passed, b_failed, a_passed, a_failed (before / after: the scenarios table's `passed` and
    `failed_criteria`); `mined`: drive_id, seq of the held-out mined frames. A window is "mined" when it holds one.
    Returns {"version", "path", "overall" | criterion name: {"required", "all" | "mined" | "elsewhere": {"windows",
    "before" | "after": {"passed", "pass_rate"}, "change": after - before pass rate}}}; overall counts the windows
    passing every criterion against `pass_rates.default`. Pass rates are None on no windows.
    """
    by_drive: dict[str, list[int]] = {}
    for d, q in zip(mined["drive_id"].to_pylist(), mined["seq"].to_pylist()):
        by_drive.setdefault(d, []).append(q)
    seqs = {d: np.sort(np.asarray(q, np.int64)) for d, q in by_drive.items()}
    in_mined = np.zeros(windows.num_rows, bool)
    for i, (d, lo, hi) in enumerate(zip(windows["drive_id"].to_pylist(), windows["window_start_seq"].to_pylist(),
                                        windows["window_end_seq"].to_pylist())):
        q = seqs.get(d)
        j = 0 if q is None else int(np.searchsorted(q, lo))  # first mined seq >= the window's start
        in_mined[i] = q is not None and j < q.size and q[j] <= hi
    sets = {"all": np.ones(windows.num_rows, bool), "mined": in_mined, "elsewhere": ~in_mined}
    cond = {k: np.asarray(windows[k].to_pylist(), object) for k in CONDITION_COLUMNS}
    failed = {w: [list(f or ()) for f in windows[f"{w[0]}_failed"].to_pylist()] for w in ("before", "after")}
    passed = {w: np.asarray(windows[f"{w[0]}_passed"].to_pylist(), bool) for w in ("before", "after")}
    names = criteria.spec.evaluated()

    def pair(rec: dict[str, dict]) -> dict:
        b, a = rec["before"], rec["after"]
        change = None if b["pass_rate"] is None else a["pass_rate"] - b["pass_rate"]
        return {"windows": b["windows"], **{w: {"passed": r["passed"], "pass_rate": r["pass_rate"]}
                                            for w, r in rec.items()}, "change": change}

    out: dict = {"version": criteria.version, "path": None if criteria.path is None else str(criteria.path),
                 "overall": {"required": criteria.spec.pass_rates.default}, "criteria": {n: {} for n in names}}
    for where, sel in sets.items():
        per = {w: criterion_pass_rates(cond, failed[w], criteria, sel) for w in ("before", "after")}
        for n in names:
            out["criteria"][n]["required"] = per["before"][n]["required"]
            out["criteria"][n][where] = pair({w: per[w][n] for w in per})
        n_all = int(sel.sum())
        out["overall"][where] = pair({w: {"windows": n_all, "passed": int(passed[w][sel].sum()),
                                          "pass_rate": float(passed[w][sel].mean()) if n_all else None}
                                      for w in passed})
    return out


def scenario_windows(cat: Catalog, before: str, after: str, criteria: Criteria) -> pa.Table:
    """The scenario windows both pairs were judged on, joined (the `windows` of `criteria_figures`); raises
    VerificationError when a pair's windows were judged with another criteria file than `criteria`."""
    versions = cat.arrow("SELECT DISTINCT pair, criteria_version FROM scenarios WHERE pair IN ($b, $a)",
                         {"b": before, "a": after}).to_pylist()
    other = [r for r in versions if r["criteria_version"] != criteria.version]
    if other:
        raise VerificationError(f"the verification lake's scenario windows were judged with another criteria file "
                                f"({other}) than {criteria.path or 'the default'} (version {criteria.version})")
    return cat.arrow(
        "SELECT b.drive_id, b.window_start_seq, b.window_end_seq, b.road_type::VARCHAR AS road_type, "
        "b.lighting::VARCHAR AS lighting, b.weather::VARCHAR AS weather, b.passed AS b_passed, "
        "b.failed_criteria AS b_failed, a.passed AS a_passed, a.failed_criteria AS a_failed "
        "FROM scenarios b JOIN scenarios a USING (drive_id, window_start_seq) WHERE b.pair = $b AND a.pair = $a "
        "ORDER BY b.drive_id, b.window_start_seq", {"b": before, "a": after})


def closed_loop_figures(records: list[dict]) -> dict:
    """Per policy, over every scenario and condition: episodes, collisions, collision_rate, mean and smallest
    minimum TTC [s], ttc_unsafe_rate, comfortable_rate, mean_speed_mps, progress_vs_expert (episode-weighted), from
    `retrain.cycle.closed_loop.evaluate` records (each tagged with its condition)."""
    out: dict[str, dict] = {}
    for policy in dict.fromkeys(r["policy"] for r in records):
        rs = [r for r in records if r["policy"] == policy]
        n = sum(r["episodes"] for r in rs)
        w = (lambda k: float(sum(r[k] * r["episodes"] for r in rs) / n) if all(k in r for r in rs) else None)  # noqa
        out[policy] = {"episodes": n, "collisions": int(sum(r["collisions"] for r in rs)),
                       "collision_rate": sum(r["collisions"] for r in rs) / n, "mean_min_ttc_s": w("mean_min_ttc_s"),
                       "min_ttc_s": float(min(r["min_ttc_s"] for r in rs)), "ttc_unsafe_rate": w("ttc_unsafe_rate"),
                       "comfortable_rate": w("comfortable_rate"), "mean_speed_mps": w("mean_speed_mps"),
                       "progress_vs_expert": w("progress_vs_expert")}
    return out


# ------------------------------------------------------------------------------------------- verification


def verify(cfg: VerificationConfig, snap: Snapshot, teacher: Path, parent: Path, candidate: Path, out: Path,
           progress: Callable[[str, int, int, dict], None] | None = None,
           fp32: tuple[Path, Path] | None = None) -> dict:
    """Shadow replay of the current student ("before") and the candidate ("after") (model directories) on the
    snapshot's test drives in a lake of its own under `out`, and both in the same closed-loop episodes. `fp32`:
    (student FP32, candidate FP32) directories with distinct model ids, replayed too (divergence["fp32"]). The
    record is a `retrain.cycle.results.VerifyRecord`: the replay lake, the pair and model ids, the figures."""
    test = _test_rows(snap)
    lake = out / "lake"
    write_frames_lake(lake, test, topic="flywheel.verify")  # same names on a rerun: idempotent
    tell = progress or (lambda *a: None)
    models = {"before": parent, "after": candidate}
    if cfg.fp32_reference and fp32 is not None:
        models.update(before_fp32=fp32[0], after_fp32=fp32[1])
    pairs, model_ids, execution = {}, {}, {}
    for who, model in models.items():
        rep = replay(lake, teacher, model, cfg.replay, progress=lambda d, n, w=who: tell(f"replay {w}", d, n, {}))
        pairs[who] = rep.pair
        model_ids.update({"teacher": rep.teacher, who: rep.student})
        execution.update({"teacher": rep.execution["teacher"], who: rep.execution["student"]})  # providers that ran
    if len(set(pairs.values())) < len(pairs):
        raise VerificationError(f"two of the replayed models have the same model id: {pairs}")
    cols = ("drive_id, seq, score, ade_4s, fde_4s, miss_4s, maneuver_disagree, lighting::VARCHAR AS lighting, "
            "weather::VARCHAR AS weather, road_type::VARCHAR AS road_type")
    criteria = load_criteria(cfg.replay.criteria)  # the file the replay judged the windows with
    with Catalog(lake) as cat:
        rows = {w: cat.arrow(f"SELECT {cols} FROM divergences WHERE pair = $p", {"p": p}) for w, p in pairs.items()}
        windows = scenario_windows(cat, pairs["before"], pairs["after"], criteria)
    roles = test.select(["drive_id", "seq", "role"])
    roles = roles.filter(pc.not_equal(roles["role"], "context"))
    divergence = divergence_figures(rows["before"], rows["after"], roles)
    criteria_rates = criteria_figures(windows, roles.filter(pc.equal(roles["role"], "mined")), criteria)
    if "after_fp32" in rows:  # the same figures for the FP32 models: what the fine-tune did before compression
        fp = divergence_figures(rows["before_fp32"], rows["after_fp32"], roles)
        divergence["fp32"] = {k: fp[k] for k in ("mined", "elsewhere", "by_condition")}
    replayed = log_replay_figures(test, {"before": parent, "after": candidate}, cfg)
    policies = {**({"expert": EXPERT} if cfg.expert else {}), "before": OnnxPlanner(parent / MODEL_FILE, "before"),
                "after": OnnxPlanner(candidate / MODEL_FILE, "after")}
    records = []
    for i, cond in enumerate(cfg.conditions):
        recs = evaluate(policies, cfg.closed_loop.model_copy(update={"condition": cond}))
        records += [{**r, "condition": cond} for r in recs]
        tell("closed loop", i + 1, len(cfg.conditions), {"condition": cond})
    agg = closed_loop_figures(records)
    return {"lake": str(lake), "pairs": pairs, "models": model_ids, "execution": execution, "divergence": divergence,
            "log_replay": replayed, "criteria": criteria_rates,
            "closed_loop": {"before": agg["before"], "after": agg["after"], "expert": agg.get("expert", {}),
                            "conditions": cfg.conditions, "records": records}}


LOG_REPLAY_FIGURES = ("score", "no_at_fault_collision", "drivable_area_compliance", "ttc_within_bound", "ego_progress",
                      "comfort")


def log_replay_figures(test: pa.Table, models: dict[str, Path], cfg: VerificationConfig) -> dict:
    """Each model (directory) driven through every held-out mined and ordinary window of `test` (snapshot rows of
    the test drives, context included) in the log-replay closed loop, its plans computed as the replay computes
    them (`shadow.models`, the same integer kernel): {"mined" | "elsewhere": {"windows": n, "before" | "after":
    {mean of each LOG_REPLAY_FIGURES}, "change": after - before of the score}}."""
    t = test.sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    frames, segments = arrow_to_frames(t.select(FRAME_SCHEMA.names)), segments_of(t)  # converted once, used 5 times
    role = t["role"].to_numpy(zero_copy_only=False)
    cache = FeatureCache(frames, segments)
    plans = {}
    for who, path in models.items():
        model = load_model(path, cfg.replay.runtime)
        plans[who] = (model.predict(cache.inputs(model.featurizer))[0], model.spec.horizon_dt_s)
    out = {}
    for r, name in SETS.items():
        rows = np.flatnonzero(role == r)
        rec: dict = {"windows": int(rows.size)}
        for who, (traj, dt) in plans.items():
            cols = log_replay(frames, rows, traj[rows], dt, segments, cfg.log_replay).columns
            rec[who] = {k: float(np.mean(cols[k])) if rows.size else None for k in LOG_REPLAY_FIGURES}
        b, a = rec["before"]["score"], rec["after"]["score"]
        rec["change"] = None if b is None or a is None else a - b
        out[name] = rec
    return out


def _test_rows(snap: Snapshot) -> pa.Table:
    t = snap.table()
    test = t.filter(pc.equal(t["split"], "test"))
    if test.num_rows == 0:
        raise VerificationError(f"snapshot {snap.id} has no test drives to verify on")
    return test
