"""Mining: which scenario windows of the lake a fine-tune should learn from, by a user's SQL or by divergence score.

    from retrain.cycle.mining import MiningConfig, mine
    result = mine("data/lake", MiningConfig(pair="teacher-v1__student-v0"))            # by score
    result = mine("data/lake", MiningConfig(sql="SELECT drive_id, seq FROM divergences WHERE lighting = 'glare'"))

A mined item is a scenario window of one drive, frames [start_seq, end_seq], with its context: the ego history the
featurizer needs before it (`history_frames`) and the planning horizon after it (`horizon_frames`, the logged future
that gives the behaviour-cloning targets), clipped to the drive, as [context_start, context_end].

By SQL: any read-only query over the catalog (`shadow.catalog`: frames, decisions, divergences, scenarios,
noise_floor and the rollup views) that returns `drive_id` and `seq` (frames; consecutive seqs of a drive, up to
`merge_gap_frames` apart, become one window) or `drive_id`, `window_start_seq` and `window_end_seq` (windows). A
refused, failing or ill-shaped query raises `MiningError` saying what is wrong.

By score: scenario windows of the pair (teacher, current student) whose divergence lies above the noise floor: the
`noise_quantile` of the teacher-against-itself score (`noise_floor` table) times `noise_margin` (and at least
`min_score`), and in the tail of the pair's divergence: above the `tail_quantile` of the scores of all the pair's
windows judged by the same signal. The noise floor alone admits every window where the teacher is deterministic (its
score against itself is ~1e-5), and the balance then filled a stratum the student handles well (highway) with windows
below the fleet's median divergence, which a fine-tune cannot and need not lower. Among those, the selection is
balanced and diverse: windows are taken best first in turns over the
strata (source x condition x scenario type, and the signal that judged them), so every stratum with divergent windows
gets an equal share until it runs out, and no drive gives more than `max_per_drive` windows. A window's source is the
name of its frames' `source:<name>` tag (`flywheel import` writes one per format), else `fleet`.

A window's divergence (`window_statistic`: the mean or the max over its frames of the per-frame score of
`shadow.metrics`, the same scale for both signals) comes from one of two signals (`MiningConfig.signal`):

- **fleet**: the teacher against the on-board decision the vehicle logged (`onboard.fleet_score`), the fleet's real
  divergence, over the window's frames [window_start_seq, window_end_seq] of that drive whose logged decision was made
  by the pair's student itself (`onboard.parity_checked`: the frame names the replayed student's id and version; a
  frame logging another deployed model's decision says nothing of this student). The window needs
  `min_window_frames` such frames;
- **emulation**: the teacher against the fleet-side emulation of the student (`scenarios.mean_score` / `max_score`),
  over the window's replayed frames (at least `min_window_frames`).

`auto` (the default) judges a window by the fleet signal where it has `min_window_frames` frames that log the pair's
student's decision, and by the emulation elsewhere: a lake whose frames log no on-board decision (older vehicles,
imported logs, a fleet running another model) mines as before, and a mixed lake keeps its windows without logged
decisions eligible, judged by the best estimate there is of what the car would have computed. The two signals are not
ranked against each other (the logged plan carries no maneuver probabilities and its headings are its waypoints'
directions, so the fleet score runs higher than the emulation's on the same frames): the signal is part of the
stratum. `fleet` mines only windows the fleet signal covers and refuses a pair with no such frames (`MiningError`);
`emulation` ignores the logged decisions. Each mined item records its signal (`MinedItem.signal`), the result the
signals used (`MiningResult.signal`: fleet, emulation or fleet+emulation).

Conditions: a frame's condition is its lighting when that is not day (night, glare, dusk), else its weather when
that is not clear (rain, fog, snow), else nominal; scenario type is the road type (highway, merge, ...).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shadow import featurize as fz
from shadow.catalog import Catalog, QueryError, QueryRefused

log = logging.getLogger(__name__)

NOMINAL = "nominal"
FLEET = "fleet"
# a frame's or window's source: the name of its `source:<name>` tag (`flywheel import` writes one), else "fleet"
SOURCE_SQL = ("coalesce(regexp_replace(list_filter(tags, lambda t: starts_with(t, 'source:'))[1], '^source:', ''), "
              f"'{FLEET}')")
_NOT_DEGRADED = {"day", "clear", "unknown", "", None}


class MiningError(ValueError):
    """A mining request that cannot be answered: a refused or failing query, wrong columns, nothing to mine."""


class MiningConfig(BaseModel):
    """What to mine and how much; by SQL when `sql` is given, else by score."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sql: str | None = Field(None, description="read-only SQL over the lake catalog returning drive_id and seq, or "
                            "drive_id, window_start_seq and window_end_seq; None: mine by score")
    pair: str | None = Field(None, description="pair id (<teacher>__<student>) whose divergences are mined by "
                             "score; None: the only pair in the lake (the cycle sets it)")
    noise_quantile: float = Field(0.99, gt=0, lt=1, description="quantile of the teacher-vs-itself score taken "
                                  "as the noise floor")
    noise_margin: float = Field(3.0, ge=1, description="a window is divergent when its score exceeds the noise "
                                "floor times this")
    min_score: float = Field(0.0, ge=0, description="and at least this score (absolute floor, score units)")
    tail_quantile: float = Field(0.75, ge=0, lt=1, description="and above this quantile of the scores of all the "
                                 "pair's windows judged by the same signal: only the tail of the fleet's divergence "
                                 "is mined (0: any window above the noise floor)")
    require_noise_floor: bool = Field(True, description="refuse to mine by score when the lake holds no noise "
                                      "floor for the teacher (else only min_score applies)")
    window_statistic: Literal["mean_score", "max_score"] = Field(
        "mean_score", description="window aggregate of the per-frame score that is ranked and thresholded")
    signal: Literal["auto", "fleet", "emulation"] = Field(
        "auto", description="which divergence is mined by score: 'fleet' the teacher vs the on-board decision the "
        "vehicles logged (onboard.fleet_score, frames that log the pair's student), 'emulation' the teacher vs the "
        "fleet-side emulation of the student (scenarios), 'auto' fleet for the windows it covers, else emulation")
    min_window_frames: int = Field(10, ge=1, description="windows with fewer replayed frames (fleet signal: frames "
                                   "logging the student's decision) are not mined")
    max_windows: int = Field(200, ge=1, description="mined windows at most")
    max_per_drive: int = Field(4, ge=1, description="windows from one drive at most (by score): no drive dominates")
    balance: bool = Field(True, description="take windows in turns over the strata condition x scenario type "
                          "(else best first overall)")
    merge_gap_frames: int = Field(5, ge=1, description="SQL frame results: seqs of a drive at most this far apart "
                                  "join one window")
    history_frames: int = Field(fz.HISTORY - 1, ge=0, description="context frames before a window (ego history)")
    horizon_frames: int = Field(int(round(fz.HORIZON * fz.HORIZON_DT_S * 10)), ge=0,
                                description="context frames after a window (the planning horizon at 10 Hz)")

    @model_validator(mode="after")
    def _sql_not_blank(self) -> "MiningConfig":
        if self.sql is not None and not self.sql.strip():
            raise ValueError("sql is empty; give a query or leave it out to mine by score")
        return self

    @property
    def rule(self) -> str:
        return "sql" if self.sql is not None else "score"


@dataclass(frozen=True)
class MinedItem:
    """One mined scenario window: frames [start_seq, end_seq] of a drive, context [context_start, context_end]."""

    drive_id: str
    start_seq: int
    end_seq: int
    context_start: int
    context_end: int
    score: float | None = None
    condition: str = ""
    road_type: str = ""
    source: str = ""  # where its frames came from: a `source:` tag's name (imports), else "fleet"
    signal: str = ""  # by score: "fleet" or "emulation", the divergence that judged it; "" for SQL and older records

    @property
    def frames(self) -> int:
        return self.end_seq - self.start_seq + 1


@dataclass
class MiningResult:
    """Mined items and how they were chosen (plain data: `to_dict` for JSON records)."""

    rule: str
    items: list[MinedItem]
    sql: str | None = None
    pair: str | None = None
    threshold: float | None = None
    noise_floor: dict = field(default_factory=dict)
    tail: dict = field(default_factory=dict)  # by score: signal -> its tail_quantile of the pair's window scores
    eligible: int = 0
    config: dict = field(default_factory=dict)

    @property
    def signal(self) -> str | None:
        """By score: the divergence signals that judged the mined windows, "fleet", "emulation" or
        "fleet+emulation" (records made before the fleet signal: "emulation"); None for SQL mining."""
        if self.rule != "score":
            return None
        return "+".join(sorted({i.signal or "emulation" for i in self.items}, key=("fleet", "emulation").index)) \
            or None

    def counts(self, key: str) -> dict[str, int]:
        """Mined windows per value of an item field ("condition", "road_type", "source", "drive_id", "signal")."""
        out: dict[str, int] = {}
        for it in self.items:
            out[getattr(it, key)] = out.get(getattr(it, key), 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"rule": self.rule, "sql": self.sql, "pair": self.pair, "threshold": self.threshold,
                "noise_floor": self.noise_floor, "tail": self.tail, "eligible": self.eligible, "config": self.config,
                "windows": len(self.items), "frames": sum(i.frames for i in self.items),
                "by_condition": self.counts("condition"), "by_road_type": self.counts("road_type"),
                "by_source": self.counts("source"), "signal": self.signal,
                "by_signal": self.counts("signal") if self.rule == "score" else {},
                "drives": len({i.drive_id for i in self.items}), "items": [asdict(i) for i in self.items]}

    @classmethod
    def from_dict(cls, d: dict) -> "MiningResult":
        return cls(rule=d["rule"], items=[MinedItem(**i) for i in d["items"]], sql=d.get("sql"), pair=d.get("pair"),
                   threshold=d.get("threshold"), noise_floor=d.get("noise_floor", {}),
                   tail=d.get("tail", {}), eligible=d.get("eligible", 0), config=d.get("config", {}))


def condition_of(lighting: str | None, weather: str | None) -> str:
    """The condition label of a frame or window: degraded lighting first, then degraded weather, else nominal."""
    if lighting not in _NOT_DEGRADED:
        return str(lighting)
    if weather not in _NOT_DEGRADED:
        return str(weather)
    return NOMINAL


def _run(catalog: Catalog, sql: str, params: dict | None = None, what: str = "query") -> pa.Table:
    try:
        return catalog.arrow(sql, params)
    except QueryRefused as exc:
        raise MiningError(f"mining {what} refused: {exc}") from None
    except QueryError as exc:
        raise MiningError(f"mining {what} failed: {exc}") from None


def drive_bounds(catalog: Catalog, drives: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """(first seq, last seq) stored in the lake per drive (all drives, or the given ones)."""
    where = "WHERE drive_id IN (SELECT unnest($drives))" if drives is not None else ""
    t = _run(catalog, f"SELECT drive_id, min(seq) AS lo, max(seq) AS hi FROM frames {where} GROUP BY drive_id",
             {"drives": drives} if drives is not None else None, "drive lookup")
    return {d: (int(lo), int(hi)) for d, lo, hi in zip(*(t[c].to_pylist() for c in ("drive_id", "lo", "hi")))}


def _with_context(drive: str, lo: int, hi: int, bounds: tuple[int, int], cfg: MiningConfig, **kw) -> MinedItem:
    return MinedItem(drive, lo, hi, max(bounds[0], lo - cfg.history_frames), min(bounds[1], hi + cfg.horizon_frames),
                     **kw)


# ------------------------------------------------------------------------------------------------------------- SQL


def _windows_from_sql(table: pa.Table, cfg: MiningConfig) -> list[tuple[str, int, int, float | None]]:
    """(drive, start, end, score) from a SQL result of frames or windows; MiningError on the wrong shape."""
    cols = set(table.column_names)
    score = table["score"].to_pylist() if "score" in cols else [None] * table.num_rows
    if "drive_id" not in cols or not ({"seq"} <= cols or {"window_start_seq", "window_end_seq"} <= cols):
        raise MiningError("a mining query must return drive_id and seq (frames), or drive_id, window_start_seq and "
                          f"window_end_seq (windows); it returned {sorted(cols) or 'no columns'}")

    def ints(name: str) -> np.ndarray:
        col = table[name]
        if not (pa.types.is_integer(col.type)) or col.null_count:
            raise MiningError(f"column {name} of the mining query must be non-null integers, got {col.type}"
                              + (f" with {col.null_count} nulls" if col.null_count else ""))
        return col.to_numpy()

    if not pa.types.is_string(table["drive_id"].type) or table["drive_id"].null_count:
        raise MiningError(f"column drive_id of the mining query must be non-null text, got {table['drive_id'].type}")
    drives = table["drive_id"].to_pylist()
    if {"window_start_seq", "window_end_seq"} <= cols:
        lo, hi = ints("window_start_seq"), ints("window_end_seq")
        bad = np.flatnonzero((lo > hi) | (lo < 0))
        if bad.size:
            i = int(bad[0])
            raise MiningError(f"mining query row {i}: window [{lo[i]}, {hi[i]}] of {drives[i]} is not a window")
        best: dict[tuple, float | None] = {}
        for d, a, b, s in zip(drives, lo.tolist(), hi.tolist(), score):
            key = (d, a, b)
            if key not in best or (s is not None and (best[key] is None or s > best[key])):
                best[key] = s
        return [(d, a, b, s) for (d, a, b), s in best.items()]
    seq = ints("seq")
    if (seq < 0).any():
        raise MiningError("column seq of the mining query holds negative values")
    per_drive: dict[str, dict[int, float | None]] = {}
    for d, q, s in zip(drives, seq.tolist(), score):
        cur = per_drive.setdefault(d, {})
        old = cur.get(q)
        cur[q] = s if old is None else (old if s is None else max(s, old))
    out = []
    for d, seqs in per_drive.items():
        qs = sorted(seqs)
        start = prev = qs[0]
        best = seqs[start]
        for q in qs[1:] + [None]:
            if q is not None and q - prev <= cfg.merge_gap_frames:
                prev = q
                if seqs[q] is not None:
                    best = seqs[q] if best is None else max(best, seqs[q])
                continue
            out.append((d, start, prev, best))
            if q is not None:
                start = prev = q
                best = seqs[q]
    return out


def mine_sql(catalog: Catalog, cfg: MiningConfig) -> MiningResult:
    """Items of a user's query (see the module docstring); taken as the user asked, at most `max_windows`."""
    table = _run(catalog, cfg.sql)
    windows = _windows_from_sql(table, cfg)
    if not windows:
        raise MiningError("the mining query returned no rows: nothing to mine")
    bounds = drive_bounds(catalog, sorted({w[0] for w in windows}))
    missing = sorted({w[0] for w in windows} - set(bounds))
    if missing:
        raise MiningError(f"the mining query names drives the lake has no frames of: {missing[:5]}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    windows.sort(key=lambda w: (-(w[3] if w[3] is not None else -np.inf), w[0], w[1]))
    if len(windows) > cfg.max_windows:
        log.warning("mining query returned %d windows; keeping the first %d (highest score first when the query "
                    "returns one)", len(windows), cfg.max_windows)
        windows = windows[:cfg.max_windows]
    conds = _window_conditions(catalog, windows)
    items = []
    for d, lo, hi, s in windows:
        b = bounds[d]
        lo, hi = max(lo, b[0]), min(hi, b[1])
        if lo > hi:
            raise MiningError(f"mined window of {d} lies outside its stored frames {list(b)}")
        items.append(_with_context(d, lo, hi, b, cfg, score=s, condition=conds[(d, lo)][0],
                                   road_type=conds[(d, lo)][1], source=conds[(d, lo)][2]))
    items.sort(key=lambda i: (i.drive_id, i.start_seq))
    return MiningResult("sql", items, sql=cfg.sql, eligible=len(windows), config=cfg.model_dump(mode="json"))


def _window_conditions(catalog: Catalog, windows: list[tuple]) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(condition, road type, source) of each window: the most frequent values of its frames."""
    spec = pa.table({"w_drive": [w[0] for w in windows], "w_lo": [int(w[1]) for w in windows],
                     "w_hi": [int(w[2]) for w in windows]})
    # The catalog cannot see Python objects (replacement scans are off): pass the windows as list parameters.
    t = _run(catalog, f"""
        WITH w AS (SELECT unnest($d) AS w_drive, unnest($lo) AS w_lo, unnest($hi) AS w_hi)
        SELECT w_drive, w_lo, mode(lighting::VARCHAR) AS lighting, mode(weather::VARCHAR) AS weather,
               mode(road_type::VARCHAR) AS road_type, mode({SOURCE_SQL}) AS source
        FROM w JOIN frames f ON f.drive_id = w.w_drive AND f.seq BETWEEN w.w_lo AND w.w_hi
        GROUP BY w_drive, w_lo""", {"d": spec["w_drive"].to_pylist(), "lo": spec["w_lo"].to_pylist(),
                                    "hi": spec["w_hi"].to_pylist()}, "condition lookup")
    out = {(d, int(lo)): (condition_of(li, we), rt or "", src or FLEET) for d, lo, li, we, rt, src in
           zip(*(t[c].to_pylist() for c in ("w_drive", "w_lo", "lighting", "weather", "road_type", "source")))}
    for w in windows:
        out.setdefault((w[0], int(w[1])), (NOMINAL, "", FLEET))
    return out


# ----------------------------------------------------------------------------------------------------------- score


def pairs(catalog: Catalog) -> list[str]:
    """Pair ids that have scenario windows in the lake."""
    return sorted(_run(catalog, "SELECT DISTINCT pair FROM scenarios", what="pair lookup")["pair"].to_pylist())


def noise_floor(catalog: Catalog, teacher_model: str, quantile: float) -> dict:
    """The teacher-vs-itself score quantile from the noise_floor table: {frames, quantile, score_q, max}."""
    t = _run(catalog, "SELECT count(*) AS n, quantile_cont(score, $q) AS q, max(score) AS mx FROM noise_floor "
                      "WHERE model = $m", {"q": quantile, "m": teacher_model}, "noise floor lookup")
    n = int(t["n"][0].as_py())
    return {"model": teacher_model, "frames": n, "quantile": quantile,
            "score_q": float(t["q"][0].as_py()) if n else None, "max": float(t["mx"][0].as_py()) if n else None}


def select_balanced(cands: list[dict], cfg: MiningConfig) -> list[dict]:
    """Windows (dicts with drive_id, score, source, condition, road_type and optionally signal) chosen best first, in
    turns over the strata when `cfg.balance`, with at most `max_per_drive` per drive and `max_windows` in all."""
    ordered = sorted(cands, key=lambda c: (-c["score"], c["drive_id"], c["start"]))
    strata: dict[tuple[str, ...], list[dict]] = {}
    for c in ordered:
        # the signal is part of the stratum: fleet and emulation scores are not ranked against each other
        key = (c["source"], c["condition"], c["road_type"], c.get("signal", "")) if cfg.balance else ("",)
        strata.setdefault(key, []).append(c)
    per_drive: dict[str, int] = {}
    pos = {k: 0 for k in strata}
    chosen: list[dict] = []
    while len(chosen) < cfg.max_windows:
        took = False
        # strata whose best remaining window scores highest go first in each turn
        turn = sorted((k for k in strata if pos[k] < len(strata[k])), key=lambda k: -strata[k][pos[k]]["score"])
        for k in turn:
            lst = strata[k]
            while pos[k] < len(lst) and per_drive.get(lst[pos[k]]["drive_id"], 0) >= cfg.max_per_drive:
                pos[k] += 1  # that drive is full: its other windows are skipped for diversity
            if pos[k] >= len(lst):
                continue
            c = lst[pos[k]]
            pos[k] += 1
            chosen.append(c)
            per_drive[c["drive_id"]] = per_drive.get(c["drive_id"], 0) + 1
            took = True
            if len(chosen) >= cfg.max_windows:
                break
        if not took:
            break
    return chosen


def fleet_coverage(catalog: Catalog, pair: str) -> dict:
    """The pair's onboard rows: {rows: frames logging a whole on-board plan, student: those whose decision the pair's
    student made (parity_checked), models: the deployed models they name, "<name> <version>", most frames first}."""
    t = _run(catalog, "SELECT decision_model AS m, decision_model_version AS v, count(*) AS n, "
                      "count(*) FILTER (WHERE parity_checked) AS own FROM onboard WHERE pair = $pair GROUP BY ALL "
                      "ORDER BY n DESC, m, v", {"pair": pair}, "onboard lookup")
    rows = t.to_pylist()
    return {"rows": sum(int(r["n"]) for r in rows), "student": sum(int(r["own"] or 0) for r in rows),
            "models": [f"{r['m']} {r['v']}".strip() or "none named" for r in rows]}


_WINDOW_COLS = (f"""drive_id, window_start_seq AS start, window_end_seq AS "end", frames,
    lighting::VARCHAR AS lighting, weather::VARCHAR AS weather, road_type::VARCHAR AS road_type,
    {SOURCE_SQL} AS source""")


def _score_sql(stat: str, signal: str) -> str:
    """The candidate windows' query: drive_id, start, end, lighting, weather, road_type, source, score, signal; with
    $pair, $threshold, $min_frames. Fleet and auto join the window's frames [start, end] of its drive in `onboard`."""
    if signal == "emulation":
        return (f"SELECT {_WINDOW_COLS}, {stat} AS score, 'emulation' AS signal FROM scenarios "
                f"WHERE pair = $pair AND {stat} > $threshold AND frames >= $min_frames")
    agg = {"mean_score": "avg", "max_score": "max"}[stat]
    fallback = "emulation > $threshold AND frames >= $min_frames" if signal == "auto" else "false"
    return f"""
        WITH w AS (SELECT row_number() OVER () AS wid, {_WINDOW_COLS}, {stat} AS emulation
                   FROM scenarios WHERE pair = $pair),
        f AS (SELECT w.wid, count(*) AS fleet_frames, {agg}(o.fleet_score) AS fleet
              FROM w JOIN onboard o ON o.pair = $pair AND o.parity_checked AND o.drive_id = w.drive_id
                                    AND o.seq BETWEEN w.start AND w."end"
              GROUP BY w.wid),
        s AS (SELECT w.*, coalesce(f.fleet_frames, 0) >= $min_frames AS by_fleet, f.fleet
              FROM w LEFT JOIN f USING (wid))
        SELECT drive_id, start, "end", lighting, weather, road_type, source,
               CASE WHEN by_fleet THEN fleet ELSE emulation END AS score,
               CASE WHEN by_fleet THEN 'fleet' ELSE 'emulation' END AS signal
        FROM s WHERE CASE WHEN by_fleet THEN fleet > $threshold ELSE {fallback} END"""


def mine_score(catalog: Catalog, cfg: MiningConfig) -> MiningResult:
    """Divergent windows above the noise floor, balanced and capped per drive (see the module docstring)."""
    pair = cfg.pair
    known = pairs(catalog)
    if pair is None:
        if len(known) != 1:
            raise MiningError(f"name the pair to mine (MiningConfig.pair); the lake has scenario windows of "
                              f"{known or 'no pair: run shadow replay first'}")
        pair = known[0]
    elif pair not in known:
        raise MiningError(f"the lake has no scenario windows of pair {pair!r} (run shadow replay for it first); "
                          f"pairs with windows: {known or 'none'}")
    teacher = pair.split("__", 1)[0]
    floor = noise_floor(catalog, teacher, cfg.noise_quantile)
    if floor["frames"] == 0 and cfg.require_noise_floor:
        raise MiningError(f"no noise floor of teacher {teacher} in the lake: replay with a noise sample first, or "
                          "set require_noise_floor=false to mine above min_score alone")
    threshold = max(cfg.min_score, (floor["score_q"] or 0.0) * cfg.noise_margin)
    signal = cfg.signal
    if signal != "emulation":
        cover = fleet_coverage(catalog, pair)
        if cover["student"] == 0:
            why = (f"the lake's onboard rows of pair {pair} log decisions of {', '.join(cover['models'][:5])}, not "
                   f"of the pair's student" if cover["rows"] else
                   f"the lake holds no onboard rows of pair {pair}: no replayed frame logs a whole on-board plan")
            if signal == "fleet":
                raise MiningError(f"cannot mine by the fleet's divergence: {why}; mine with signal 'emulation' (or "
                                  "'auto'), or replay frames that log the deployed student's decision (shadow mode)")
            log.info("mining by the emulation's divergence: %s", why)
            signal = "emulation"  # auto with nothing to join: the plain query
    stat = cfg.window_statistic
    # every window of the pair (threshold below any score): the tail's quantile is taken over all of them
    t = _run(catalog, _score_sql(stat, signal),
             {"pair": pair, "threshold": -1.0, "min_frames": cfg.min_window_frames}, "score query")
    windows = [{"drive_id": d, "start": int(a), "end": int(b), "score": float(s), "condition": condition_of(li, we),
              "road_type": rt or "", "source": src, "signal": sig}
             for d, a, b, s, li, we, rt, src, sig in zip(*(t[c].to_pylist() for c in (
                 "drive_id", "start", "end", "score", "lighting", "weather", "road_type", "source", "signal")))]
    tail = {sig: float(np.quantile([w["score"] for w in windows if w["signal"] == sig], cfg.tail_quantile))
            for sig in sorted({w["signal"] for w in windows})} if cfg.tail_quantile > 0 else {}
    cands = [w for w in windows if w["score"] > max(threshold, tail.get(w["signal"], threshold))]
    if not cands:
        what = {"fleet": f"judged by the fleet's logged decisions (at least {cfg.min_window_frames} frames of the "
                         "pair's student)", "emulation": "judged by the emulation",
                "auto": "by either signal"}[signal]
        tails = ", ".join(f"{k} {v:.4g}" for k, v in tail.items())
        raise MiningError(f"no window of pair {pair} {what} scores above the threshold {threshold:.4g} "
                          f"(noise floor p{cfg.noise_quantile * 100:g} {floor['score_q']} x {cfg.noise_margin})"
                          + (f" and the tail's p{cfg.tail_quantile * 100:g} of its {len(windows)} windows ({tails})"
                             if tail else ""))
    chosen = select_balanced(cands, cfg)
    bounds = drive_bounds(catalog, sorted({c["drive_id"] for c in chosen}))
    items = [_with_context(c["drive_id"], c["start"], c["end"], bounds[c["drive_id"]], cfg, score=c["score"],
                           condition=c["condition"], road_type=c["road_type"], source=c["source"],
                           signal=c["signal"])
             for c in chosen if c["drive_id"] in bounds]
    items.sort(key=lambda i: (i.drive_id, i.start_seq))
    res = MiningResult("score", items, pair=pair, threshold=threshold, noise_floor=floor, tail=tail, eligible=len(cands),
                       config=cfg.model_dump(mode="json"))
    log.info("mined %d of %d windows (%d in all) above %.4g and the tail %s (pair %s, signal %s -> %s: %s) over "
             "%d drives", len(items), len(cands), len(windows), threshold, tail, pair, cfg.signal, res.signal,
             ", ".join(f"{n} by {k}" for k, n in res.counts("signal").items()), len({i.drive_id for i in items}))
    return res


def mine(lake: Path | Catalog, config: MiningConfig) -> MiningResult:
    """Mine the lake by `config.sql` or by score; raises MiningError with the reason when nothing can be mined."""
    catalog = lake if isinstance(lake, Catalog) else Catalog(Path(lake))
    try:
        return mine_sql(catalog, config) if config.sql is not None else mine_score(catalog, config)
    finally:
        if catalog is not lake:
            catalog.close()
