"""The report's adapter: from a cycle's result (and the lake) to what each report section draws.

A `retrain.cycle.results.CycleResult` is read as the typed record it is (`from_cycle`), with the step records of its
`work_dir`: `mine.json` for the mined windows, `verify.json` (a `VerifyRecord`) for the verification lake, its pairs
and the model ids replayed. Any other document (a hand-made or foreign result) is read by generic keys
(`from_document`). Every key is optional; a section without data gets a reason in `ReportData.missing` and renders
"not available". Keys read (the first present wins; `a.b` is a nested key):

- student and outcome: `candidate.name` / `student` (a name or {name, version}); before: `parent.ref` /
  `base_version`; after: `candidate.version` / `new_version`; `status` / `decision` / `promoted`;
- pairs: `verify.json` `pairs.before|after`, else `pairs.before|after` / `before_pair` / `after_pair` (pair ids,
  `ingest.lake.split_pair_id`); their model ids name the `decisions` partitions the plots read;
- lake of the scenes: the verification lake (`verify.json` `lake`: the held-out test drives replayed with both
  students), else the lake given;
- conditions: `divergence.by_condition` (CycleResult: rows {set, condition, before: {frames, mean_score}, after,
  change}), else `divergence_by_condition` (list of {condition, before, after} or dict condition -> that); else
  computed from the divergences of both pairs in the lake;
- scenes: the mined windows (`mine.json` / `mining.items`: {drive_id, start_seq, end_seq, score}) that the lake
  has, their frame of highest score; else the top frames of the before pair, one per drive;
- targets: `targets` (a list of `retrain.compress.workflow.TargetResult` / `retrain.cycle.gates.target_summary` dicts, or a dict
  chip -> that); the held-out divergence of the verified chip (`candidate.verified_chip`) from `divergence`;
- gate: `gate` = {passed, reasons, checks: [{name, value, limit, passed, detail}]}; `closed_loop` before/after;
- fleet divergence and chip parity: the lake given (the fleet lake), its `onboard` rows of the mined pair
  (`mining.pair`, else the before pair, else every pair), through the saved queries (`report_fleet.fleet_of`);
- log-replay closed loop: `log_replay` (CycleResult; else `verify.json` `log_replay`), the figures of
  `retrain.cycle.verify.log_replay_figures`;
- lineage: `lineage`, `teacher.ref`, `parent.ref`, `registry.entries`, `snapshot`, `mining`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ingest.lake import split_pair_id
from ingest.versions import check_version
from retrain.cycle.mining import condition_of
from retrain.cycle.report_fleet import _num, log_replay_of, safe_fleet_of, signal_of
from retrain.cycle.results import RESULT_FORMAT_VERSION, CycleResult, VerifyRecord
from shadow.catalog import Catalog, QueryError

log = logging.getLogger(__name__)

LOGGED_FRAMES = 40  # the logged future drawn after a frame: 4 s at 10 Hz, the planning horizon


@dataclass
class Scene:
    """One frame to draw: ego pose (x, y, heading), agents, and world-frame paths (None when not available)."""

    drive_id: str
    seq: int
    score: float | None
    context: str
    ego: tuple[float, float, float]
    agents: list[dict]
    paths: dict[str, np.ndarray | None]


@dataclass
class ReportData:
    summary: dict[str, Any] = field(default_factory=dict)
    conditions: list[dict] = field(default_factory=list)
    conditions_metric: str = "mean divergence score"
    conditions_source: str = ""
    scenes: list[Scene] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    target_metric: str = "held-out mean score where mined"
    gate: dict | None = None
    fleet: dict | None = None  # report_fleet.fleet_of: the fleet's divergence and chip parity
    log_replay: dict | None = None  # report_fleet.log_replay_of: the log-replay closed loop before/after
    lineage: list[tuple[str, Any]] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def get(doc: Any, *paths: str, default: Any = None) -> Any:
    """The value at the first dotted path present in `doc`."""
    for path in paths:
        cur = doc
        for key in path.split("."):
            if not isinstance(cur, dict) or key not in cur:
                break
            cur = cur[key]
        else:
            if cur is not None:
                return cur
    return default


def step_output(doc: dict, step: str) -> dict:
    """The output of a cycle step's record `<work_dir>/<step>.json` ({} when there is none)."""
    work = get(doc, "work_dir")
    if not isinstance(work, str):
        return {}
    try:
        out = json.loads((Path(work) / f"{step}.json").read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        return {}
    return out if isinstance(out, dict) else {}


def _student(doc: dict) -> tuple[str | None, str | None, str | None]:
    s = get(doc, "student")
    name = s.get("name") if isinstance(s, dict) else s
    name = get(doc, "candidate.name") or name or get(doc, "student_name")
    base = get(doc, "parent.ref", "base_version", "parent_version", "student.version")
    new = get(doc, "candidate.version", "new_version", "candidate_version", "version")
    return name, base, new


def pairs_of(doc: dict, verified: dict) -> tuple[str | None, str | None]:
    return (get(verified, "pairs.before") or get(doc, "pairs.before", "before_pair", "base_pair", "verify.pairs.before"),
            get(verified, "pairs.after") or get(doc, "pairs.after", "after_pair", "candidate_pair", "verify.pairs.after"))


def _models(before: str | None, after: str | None) -> dict[str, str | None]:
    """Decisions partitions (model ids) of teacher, student before and after, from the pair ids."""
    t, b = _split(before)
    t2, a = _split(after)
    return {"teacher": t or t2, "student_before": b, "student_after": a}


def _split(pair: str | None) -> tuple[str | None, str | None]:
    try:
        return split_pair_id(pair) if isinstance(pair, str) else (None, None)
    except ValueError:
        return None, None


# --------------------------------------------------------------------------------------------------- sections


def conditions_from_cycle(rows: Any) -> list[dict]:
    """CycleResult.divergence.by_condition rows -> one bar pair per (condition, set)."""
    out = []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict) or not isinstance(r.get("before"), dict):
            continue
        b, a = _num(get(r, "before.mean_score")), _num(get(r, "after.mean_score"))
        out.append({"condition": f"{r.get('condition')} ({r.get('set', '?')})", "before": b, "after": a,
                    "frames": get(r, "before.frames"), "mined": r.get("set") == "mined",
                    "change": None if b in (None, 0) or a is None else (a - b) / b})
    return sorted(out, key=lambda c: (not c["mined"], c["condition"]))


def conditions_from_doc(raw: Any) -> list[dict]:
    items = [{"condition": k, **v} for k, v in raw.items() if isinstance(v, dict)] if isinstance(raw, dict) else \
        [dict(v) for v in raw if isinstance(v, dict)] if isinstance(raw, list) else []
    out = []
    for it in items:
        b, a = _num(it.get("before")), _num(it.get("after"))
        out.append({"condition": str(it.get("condition", "?")), "before": b, "after": a,
                    "frames": it.get("frames"), "mined": it.get("mined"),
                    "change": None if b in (None, 0) or a is None else (a - b) / b})
    return out


def conditions_from_lake(catalog, before: str, after: str) -> list[dict]:
    rows = catalog.arrow("SELECT pair, lighting::VARCHAR AS l, weather::VARCHAR AS w, count(*)::BIGINT AS n, "
                         "sum(score) AS s FROM divergences WHERE pair IN ($b, $a) GROUP BY ALL",
                         {"b": before, "a": after}).to_pylist()
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        slot = acc.setdefault(condition_of(r["l"], r["w"]), {}).setdefault(r["pair"], [0, 0.0])
        slot[0] += r["n"]
        slot[1] += r["s"] or 0.0
    out = []
    for cond, by_pair in sorted(acc.items()):
        b = by_pair.get(before, [0, 0.0])
        a = by_pair.get(after, [0, 0.0])
        out.append({"condition": cond, "before": b[1] / b[0] if b[0] else None, "after": a[1] / a[0] if a[0] else None,
                    "frames": b[0], "mined": None})
        out[-1]["change"] = (None if not out[-1]["before"] or out[-1]["after"] is None
                             else (out[-1]["after"] - out[-1]["before"]) / out[-1]["before"])
    return out


def _to_world(ego: tuple[float, float, float], tx: list, ty: list) -> np.ndarray:
    x, y, h = ego
    tx, ty = np.asarray(tx, float), np.asarray(ty, float)
    return np.stack([x + np.cos(h) * tx - np.sin(h) * ty, y + np.sin(h) * tx + np.cos(h) * ty], axis=1)


def scene_frames(catalog, items: list, before: str | None, top: int) -> list[tuple[str, int, float | None]]:
    """(drive, seq, score) of the frames to draw: the best frame of each of the best mined windows (`items`: dicts
    of drive_id, start_seq, end_seq, score), else the top frames of the before pair, one per drive."""
    items = sorted((i for i in items if isinstance(i, dict) and "drive_id" in i),
                   key=lambda i: -(_num(i.get("score")) or 0.0))
    where, params = ("pair = $pair", {"pair": before}) if before else ("true", {})
    out: list[tuple[str, int, float | None]] = []
    for it in items:
        lo, hi = int(it.get("start_seq", 0)), int(it.get("end_seq", it.get("start_seq", 0)))
        r = catalog.arrow(f"SELECT seq, score FROM divergences WHERE {where} AND drive_id = $d AND seq BETWEEN $lo "
                          "AND $hi ORDER BY score DESC LIMIT 1", {**params, "d": it["drive_id"], "lo": lo,
                                                                  "hi": hi}).to_pylist()
        if r:
            out.append((it["drive_id"], r[0]["seq"], r[0]["score"]))
        if len(out) >= top:
            break
    if not out:
        rows = catalog.arrow(f"SELECT drive_id, arg_max(seq, score) AS seq, max(score) AS score FROM divergences "
                             f"WHERE {where} GROUP BY drive_id ORDER BY score DESC, drive_id LIMIT {int(top)}",
                             params).to_pylist()
        out = [(r["drive_id"], r["seq"], r["score"]) for r in rows]
    return out


def load_scene(catalog, drive: str, seq: int, score: float | None, models: dict[str, str | None]) -> Scene | None:
    f = catalog.arrow("SELECT seq, ego_x, ego_y, ego_heading, agents, lighting::VARCHAR AS l, "
                      "weather::VARCHAR AS w, road_type::VARCHAR AS r FROM frames WHERE drive_id = $d AND seq "
                      "BETWEEN $lo AND $hi ORDER BY seq", {"d": drive, "lo": seq, "hi": seq + LOGGED_FRAMES}).to_pylist()
    if not f or f[0]["seq"] != seq:
        return None
    ego = (f[0]["ego_x"], f[0]["ego_y"], f[0]["ego_heading"])
    paths: dict[str, np.ndarray | None] = {"logged": np.array([[r["ego_x"], r["ego_y"]] for r in f])}
    for role, model in models.items():
        rows = catalog.arrow("SELECT traj_x, traj_y FROM decisions WHERE model = $m AND drive_id = $d AND seq = $s "
                             "LIMIT 1", {"m": model or "", "d": drive, "s": seq}).to_pylist() if model else []
        # waypoints start at dt ahead: prepend the ego position so the line leaves the car
        paths[role] = np.vstack([[ego[0], ego[1]], _to_world(ego, rows[0]["traj_x"], rows[0]["traj_y"])]) \
            if rows else None
    context = f"({f[0]['r']}, {f[0]['l']}, {f[0]['w']})"
    return Scene(drive, seq, score, context, ego, list(f[0]["agents"] or []), paths)


def targets_of(doc: dict) -> list[dict]:
    raw = get(doc, "targets", "compress.targets", "artifacts", default=[])
    if isinstance(raw, dict):
        raw = [{"chip": k, **v} for k, v in raw.items() if isinstance(v, dict)]
    out = []
    for t in raw if isinstance(raw, list) else []:
        if not isinstance(t, dict):
            continue
        chip = t.get("chip") or t.get("name")
        mix = t.get("precision_mix")
        budgets = [t[k] for k in ("size_budget_met", "latency_budget_met") if k in t]
        held_out = None
        if chip is not None and chip == get(doc, "candidate.verified_chip"):
            held_out = _num(get(doc, "divergence.mined.after.mean_score"))
        out.append({"chip": chip, "size_bytes": t.get("bytes", t.get("size_bytes")),
                    "max_abs_error": _num(t.get("max_abs_error")),
                    "precision": ", ".join(f"{k}:{v}" for k, v in mix.items()) if isinstance(mix, dict) else mix,
                    "cpu_latency_ms": _num(t.get("cpu_latency_ms_measured", t.get("cpu_latency_ms"))),
                    "chip_latency_ms_estimate": _num(t.get("latency_ms_estimate")),
                    "divergence": held_out if held_out is not None else _num(get(t, "divergence", "mean_score")),
                    "budgets_met": all(budgets) if budgets else None, "verified": t.get("verified")})
    return out


def gate_of(doc: dict) -> dict | None:
    g = get(doc, "gate", "gates")
    if not isinstance(g, dict):
        return None
    passed = g.get("passed", get(doc, "promoted"))
    reasons = g.get("reasons") or []
    checks = g.get("checks") or []
    if isinstance(checks, dict):
        checks = [{"name": k, **v} if isinstance(v, dict) else {"name": k, "passed": v} for k, v in checks.items()]
    cl = get(doc, "closed_loop", default={})
    closed = [{"policy": k, **v} for k, v in cl.items() if k in ("before", "after", "expert") and isinstance(v, dict)
              and v] if isinstance(cl, dict) else []
    return {"passed": bool(passed), "status": get(doc, "status"), "reasons": [str(r) for r in (reasons if isinstance(reasons, list) else [reasons])],
            "checks": [c for c in checks if isinstance(c, dict)], "closed_loop": closed}


def lineage_of(doc: dict) -> list[tuple[str, Any]]:
    raw = get(doc, "lineage")
    out: list[tuple[str, Any]] = []
    if isinstance(raw, dict):
        out += [(str(k), v if not isinstance(v, (list, tuple)) else ", ".join(map(str, v))) for k, v in raw.items()]
    elif isinstance(raw, list):
        out += [("parent", v) for v in raw]
    for e in get(doc, "registry.entries", default=[]) if isinstance(get(doc, "registry.entries"), list) else []:
        if isinstance(e, dict) and e.get("ref"):
            out.append((f"registered {e['ref']}", f"{e.get('status')}; parents: {', '.join(e.get('parents') or [])}"))
    for key, path in (("cycle", "cycle_id"), ("teacher", "teacher.ref"), ("student before", "parent.ref"),
                      ("student checkpoint", "parent.checkpoint_source"), ("snapshot", "snapshot.id"),
                      ("dataset sha256", "snapshot.content_sha256"), ("dataset sha256", "dataset.sha256"),
                      ("mining rule", "mining.rule"), ("mining query", "mining.sql"),
                      ("mining threshold", "mining.threshold"), ("registered", "registry.ref"),
                      ("parents", "registry.parents")):
        v = get(doc, path)
        if v is not None and not isinstance(v, dict) and key not in dict(out):
            out.append((key, ", ".join(map(str, v)) if isinstance(v, list) else v))
    return out


def load_data(doc: dict, lake: Path | None, job: dict | None = None, top_scenes: int = 4) -> ReportData:
    """Everything the report draws; what cannot be found is named in `missing`. A `CycleResult` is read as the typed
    record it is (`from_cycle`); any other document by the keys of the module docstring (`from_document`)."""
    doc = doc if isinstance(doc, dict) else {}
    if "format_version" in doc:  # a cycle result of another format is refused, not misread
        check_version(doc.get("work_dir", "cycle result"), "cycle result", doc["format_version"], RESULT_FORMAT_VERSION)
    try:
        result = CycleResult.model_validate(doc)
    except ValidationError:
        return from_document(doc, lake, job or {}, top_scenes)
    return from_cycle(result, lake, job or {}, top_scenes)


def from_cycle(result: CycleResult, lake: Path | None, job: dict, top_scenes: int = 4) -> ReportData:
    """The report of a cycle, from its typed result and its step records (`verify.json`: the verification lake and
    the model ids replayed; `mine.json`: the mined windows)."""
    d = ReportData()
    try:
        verified = VerifyRecord.model_validate(step_output(result.model_dump(), "verify"))
    except ValidationError:
        verified = None
    pairs = verified.pairs if verified else {}
    d.summary = {"job": job.get("id"), "student": result.candidate.name, "state": job.get("state"),
                 "outcome": result.status, "student before": result.parent.ref,
                 "student after": result.candidate.version, "pair before": pairs.get("before"),
                 "pair after": pairs.get("after"), "targets": ", ".join(get(job, "spec.targets", default=[])) or None,
                 "mined windows": result.mining.windows, "error": job.get("error") or None}
    d.conditions = conditions_from_cycle(result.divergence.model_dump()["by_condition"])
    d.conditions_source = "from the cycle's verification (held-out drives)" if d.conditions else ""
    d.targets, d.gate, d.lineage = _cycle_targets(result), _cycle_gate(result), _cycle_lineage(result)
    doc = result.model_dump(mode="json")
    models = verified.models if verified else {}
    scene_lake = Path(verified.lake) if verified and Path(verified.lake).is_dir() else lake
    items = step_output(doc, "mine").get("items") or []
    _add_scenes(d, scene_lake, items, pairs.get("before"), pairs.get("after"),
                {"teacher": models.get("teacher"), "student_before": models.get("before"),
                 "student_after": models.get("after")}, top_scenes)
    _add_fleet(d, lake, result.mining.pair or pairs.get("before"),
               result.log_replay or (verified.log_replay if verified else {}),
               signal_of(result.mining.rule, result.mining.config.get("signal"), items))
    return d


def _add_fleet(d: ReportData, lake: Path | None, pair: str | None, log_replay: Any, signal: str | None) -> None:
    """The fleet's divergence and chip parity from the fleet lake, the log-replay closed loop from the result's
    figures, and the mining signal in the lineage."""
    d.fleet, why = safe_fleet_of(lake, pair if isinstance(pair, str) else None)
    d.log_replay, why_not = log_replay_of(log_replay)
    d.missing.update({k: v for k, v in (("fleet", why), ("log_replay", why_not)) if v is not None})
    if signal is not None:
        d.lineage.append(("mining signal", signal))


def _cycle_targets(result: CycleResult) -> list[dict]:
    out = []
    for t in result.targets:
        held_out = result.divergence.mined.after.mean_score if t.chip == result.candidate.verified_chip else None
        budgets = [b for b in (t.size_budget_met, t.latency_budget_met) if b is not None]
        out.append({"chip": t.chip, "size_bytes": t.bytes, "max_abs_error": _num(t.max_abs_error),
                    "precision": ", ".join(f"{k}:{v}" for k, v in t.precision_mix.items()) if t.precision_mix
                    else None, "cpu_latency_ms": _num(t.cpu_latency_ms_measured),
                    "chip_latency_ms_estimate": _num(t.latency_ms_estimate), "divergence": _num(held_out),
                    "budgets_met": all(budgets) if budgets else None, "verified": t.verified})
    return out


def _cycle_gate(result: CycleResult) -> dict:
    cl = result.closed_loop
    return {"passed": result.gate.passed, "status": result.status, "reasons": list(result.gate.reasons),
            "checks": [c.model_dump() for c in result.gate.checks],
            "closed_loop": [{"policy": who, **fig.model_dump()} for who, fig in
                            (("before", cl.before), ("after", cl.after), ("expert", cl.expert)) if fig is not None]}


def _cycle_lineage(result: CycleResult) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [(f"registered {e.ref}", f"{e.status}; parents: {', '.join(e.parents)}")
                                  for e in result.registry.entries]
    facts = (("cycle", result.cycle_id), ("teacher", result.teacher.ref), ("student before", result.parent.ref),
             ("student checkpoint", result.parent.checkpoint_source), ("snapshot", result.snapshot.id),
             ("dataset sha256", result.snapshot.content_sha256), ("mining rule", result.mining.rule),
             ("mining query", result.mining.sql), ("mining threshold", result.mining.threshold),
             ("registered", result.registry.ref))
    return out + [(k, v) for k, v in facts if v is not None]


def from_document(doc: dict, lake: Path | None, job: dict, top_scenes: int = 4) -> ReportData:
    """The report of any other result document, read by the keys of the module docstring."""
    d = ReportData()
    name, base, new = _student(doc)
    verified = step_output(doc, "verify")
    before, after = pairs_of(doc, verified)
    outcome = get(doc, "status", "decision") or ({True: "promoted", False: "rejected"}.get(get(doc, "promoted")))
    d.summary = {"job": job.get("id"), "student": name or get(job, "spec.student"), "state": job.get("state"),
                 "outcome": outcome, "student before": base, "student after": new, "pair before": before,
                 "pair after": after, "targets": ", ".join(get(job, "spec.targets", default=[])) or None,
                 "mined windows": get(doc, "mining.windows"), "error": job.get("error") or None}
    d.conditions = conditions_from_cycle(get(doc, "divergence.by_condition")) or conditions_from_doc(
        get(doc, "divergence_by_condition", default=[]))
    d.conditions_metric = get(doc, "conditions_metric", "verify.conditions_metric", default=d.conditions_metric)
    d.conditions_source = "from the cycle's verification (held-out drives)" if d.conditions else ""
    d.targets, d.gate, d.lineage = targets_of(doc), gate_of(doc), lineage_of(doc)
    verify_lake = get(verified, "lake")
    scene_lake = verify_lake if isinstance(verify_lake, str) and Path(verify_lake).is_dir() else lake
    items = get(doc, "mining.items", "mined.items", default=None) or step_output(doc, "mine").get("items") or []
    _add_scenes(d, scene_lake, items, before, after, _models(before, after), top_scenes)
    mining = get(doc, "mining") if isinstance(get(doc, "mining"), dict) else {}
    _add_fleet(d, lake, get(mining, "pair") or before,
               get(doc, "log_replay") or get(verified, "log_replay"),
               signal_of(mining.get("rule"), get(mining, "config.signal"), items))
    return d


def _add_scenes(d: ReportData, scene_lake: Path | str | None, items: list, before: str | None, after: str | None,
                models: dict[str, str | None], top_scenes: int) -> None:
    """Scenes (and, when the result has none, conditions) from the lake the students were replayed in."""
    if scene_lake is None or not Path(scene_lake).is_dir():
        d.missing["scenes"] = d.missing.setdefault("conditions", "no lake given to read scenarios from")
        return
    try:
        _read_scenes(d, Path(scene_lake), items, before, after, models, top_scenes)
    except (QueryError, OSError, ValueError) as exc:  # a lake it cannot read costs these sections, not the report
        log.warning("report: scenes not available: %s", exc)
        d.missing["scenes"] = f"the lake could not be read: {type(exc).__name__}: {exc}"
        d.missing.setdefault("conditions", d.missing["scenes"])


def _read_scenes(d: ReportData, scene_lake: Path, items: list, before: str | None, after: str | None,
                 models: dict[str, str | None], top_scenes: int) -> None:
    with Catalog(scene_lake) as catalog:
        if not d.conditions:
            if before and after:
                d.conditions = conditions_from_lake(catalog, before, after)
                d.conditions_source = "from the lake: every frame replayed for each pair"
            d.missing["conditions"] = ("the result names no before/after pairs" if not (before and after)
                                       else "the lake holds no divergences of the two pairs")
        for drive, seq, score in scene_frames(catalog, items, before, top_scenes):
            scene = load_scene(catalog, drive, int(seq), score, models)
            if scene is not None:
                d.scenes.append(scene)
        d.missing["scenes"] = "the lake holds no divergent frames with their logged frames"
