"""The report's fleet sections' data: the fleet's divergence and chip parity (from the fleet lake's `onboard` table),
and the log-replay closed loop (from the cycle's figures).

- `fleet_of(lake, pair)`: the saved queries `fleet_divergence_by_condition` and `chip_parity` over the lake given to the
  report (the fleet lake, not the verification lake), for the mined pair (else the before pair, else every pair):
  per condition and deployed model, the teacher's mean divergence from the decision the vehicles logged (fleet) beside
  its divergence from the fleet-side emulation of the same frames (emulation); per vehicle and deployed model version,
  the frames whose logged decision was checked against the emulation, those out of parity and the largest error.
  Returns (data, None) or (None, the reason it is not available).
- `log_replay_of(figures)`: `retrain.cycle.verify.log_replay_figures` ({"mined" | "elsewhere": {windows, before,
  after, change}}) as rows figure x (before, after, change) per set. Returns (data, None) or (None, the reason).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from retrain.cycle.mining import condition_of
from shadow.catalog import Catalog, QueryError

log = logging.getLogger(__name__)

LOG_REPLAY_SETS = (("mined", "where mined"), ("elsewhere", "elsewhere"))
LOG_REPLAY_LABELS = {"score": "score (PDM form)", "no_at_fault_collision": "no at-fault collision",
                     "drivable_area_compliance": "drivable area compliance", "ttc_within_bound": "TTC within bound",
                     "ego_progress": "ego progress", "comfort": "comfort"}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _model(name: Any, version: Any) -> str:
    return f"{name or ''} {version or ''}".strip() or "none named"


def fleet_of(lake: Path | str | None, pair: str | None) -> tuple[dict | None, str | None]:
    """{pair, by_condition: [{condition, model, frames, fleet, emulation, gap}], parity: [{vehicle, model, version,
    checked, failed, fail_rate, max_err_m, mean_err_m, in_parity}], out_of_parity: [vehicle ids], unchecked: frames
    whose logged decision names another model than the replayed student} from the fleet lake, or (None, reason)."""
    if lake is None or not Path(lake).is_dir():
        return None, "no fleet lake given to read the onboard table from"
    with Catalog(Path(lake)) as catalog:
        counts = catalog.arrow("SELECT pair, count(*) AS n, count(*) FILTER (WHERE NOT parity_checked) AS unchecked "
                               "FROM onboard GROUP BY pair ORDER BY pair").to_pylist()
        if not counts:
            return None, ("the lake holds no onboard rows: no replayed frame logs a whole on-board decision (frames "
                          "of vehicles in shadow mode name their deployed model, schema v2)")
        if pair is not None and pair not in {r["pair"] for r in counts}:
            return None, (f"the lake holds no onboard rows of pair {pair} (onboard rows of "
                          f"{', '.join(r['pair'] for r in counts)})")
        rows = [r for r in counts if pair is None or r["pair"] == pair]
        by_cond = catalog.saved("fleet_divergence_by_condition", pair=pair or "").to_pylist()
        parity = catalog.saved("chip_parity", pair=pair or "").to_pylist()
    several = pair is None and len(rows) > 1
    acc: dict[tuple[str, str], list[float]] = {}
    for r in by_cond:
        key = (condition_of(r["lighting"], r["weather"]),
               (f"{r['pair']}: " if several else "") + _model(r["decision_model"], r["decision_model_version"]))
        n = int(r["frames"])
        slot = acc.setdefault(key, [0, 0.0, 0.0])
        slot[0] += n
        slot[1] += n * (_num(r["mean_fleet_score"]) or 0.0)
        slot[2] += n * (_num(r["mean_emulation_score"]) or 0.0)
    conditions = []
    for (cond, model), (n, fleet, emu) in sorted(acc.items(), key=lambda kv: (-kv[1][1] / max(kv[1][0], 1), kv[0])):
        f, e = (fleet / n, emu / n) if n else (None, None)
        conditions.append({"condition": cond, "model": model, "frames": n, "fleet": f, "emulation": e,
                           "gap": None if f is None else f - e})
    vehicles = [{"vehicle": (f"{r['pair']}: " if several else "") + str(r["vehicle_id"]),
                 "model": r["decision_model"] or "none named", "version": r["decision_model_version"],
                 "checked": int(r["frames_checked"]), "failed": int(r["frames_failed"]),
                 "fail_rate": _num(r["fail_rate"]), "max_err_m": _num(r["max_err_m"]),
                 "mean_err_m": _num(r["mean_err_m"]), "in_parity": int(r["frames_failed"]) == 0} for r in parity]
    return {"pair": pair if pair is not None else ", ".join(r["pair"] for r in rows), "by_condition": conditions,
            "parity": vehicles, "out_of_parity": sorted({v["vehicle"] for v in vehicles if not v["in_parity"]}),
            "frames": sum(int(r["n"]) for r in rows), "unchecked": sum(int(r["unchecked"] or 0) for r in rows)}, None


def safe_fleet_of(lake: Path | str | None, pair: str | None) -> tuple[dict | None, str | None]:
    """`fleet_of`, a lake that cannot be read (a file of another schema version, a failing query) named as the
    reason, so the section renders "not available" and the rest of the report still renders."""
    try:
        return fleet_of(lake, pair)
    except (QueryError, OSError, ValueError, TypeError) as exc:
        log.warning("report: fleet divergence and chip parity not available: %s", exc)
        return None, f"the lake's onboard table could not be read: {type(exc).__name__}: {exc}"


def signal_of(rule: Any, requested: Any, items: Any) -> str | None:
    """The divergence signals mining by score judged its windows by ("fleet: 130 windows, emulation: 14 (requested
    auto)"), from the mined items (`retrain.cycle.mining.MinedItem.signal`); None for SQL mining or no items."""
    if rule != "score" or not isinstance(items, list) or not items:
        return None
    counts: dict[str, int] = {}
    for it in items:
        if isinstance(it, dict):
            counts[it.get("signal") or "emulation"] = counts.get(it.get("signal") or "emulation", 0) + 1
    text = ", ".join(f"{k}: {n} window{'s' * (n != 1)}" for k, n in sorted(counts.items()))
    return text + (f" (requested {requested})" if isinstance(requested, str) else "") if text else None


def log_replay_of(figures: Any) -> tuple[dict | None, str | None]:
    """{sets: [(key, label, windows)], rows: [{figure, label, <set>: (before, after, change)}]} from the cycle's
    log-replay figures, or (None, reason)."""
    if not isinstance(figures, dict) or not any(isinstance(figures.get(k), dict) for k, _ in LOG_REPLAY_SETS):
        return None, ("the result records no log-replay closed loop (made before it, or its verification did not "
                      "drive the held-out windows)")
    sets, names = [], []
    for key, label in LOG_REPLAY_SETS:
        rec = figures.get(key)
        if not isinstance(rec, dict):
            continue
        sets.append((key, label, rec.get("windows")))
        for who in ("before", "after"):
            figs = rec.get(who) if isinstance(rec.get(who), dict) else {}
            names += [name for name in figs if name not in names]
    names.sort(key=lambda n: (n != "score", list(LOG_REPLAY_LABELS).index(n) if n in LOG_REPLAY_LABELS else 99, n))
    rows = []
    for name in names:
        row: dict[str, Any] = {"figure": name, "label": LOG_REPLAY_LABELS.get(name, name.replace("_", " "))}
        for key, _, _ in sets:
            b, a = (_num(figures[key][who].get(name)) if isinstance(figures[key].get(who), dict) else None
                    for who in ("before", "after"))
            row[key] = (b, a, None if a is None or b is None else a - b)
        rows.append(row)
    if not rows:
        return None, "the result's log-replay closed loop holds no figures"
    return {"sets": sets, "rows": rows}, None
