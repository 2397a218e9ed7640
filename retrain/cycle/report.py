"""The per-job report: one self-contained HTML file (images embedded as base64 PNG, matplotlib's Agg backend).

    render_report(result_doc, "work/<job>/report.html", lake="data/lake", job=job.model_dump(mode="json"))

Sections: summary; divergence before and after per condition (bar chart); bird's-eye plots of the top divergent
scenarios (teacher, student before and after, the logged trajectory and the logged agents, read from the lake's
frames, decisions and divergences tables); per chip size, CPU latency (measured), on-chip latency (roofline
ESTIMATE) and divergence; the log-replay closed loop before and after, where mined and elsewhere, per sub-score; the
fleet's divergence (teacher vs the decisions the vehicles logged) beside the emulation's per condition, and chip
parity per vehicle and deployed model version (the fleet lake's onboard table, `report_fleet`); the gate decision with
its reasons; lineage. A section whose data is missing renders as "not available" with the reason, never an error:
`ReportData` (retrain/cycle/report_data.py) is the adapter from a cycle's result JSON (and the lake) to what the
sections draw, and documents the keys it reads.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ingest.lake import write_text_atomic
from retrain.cycle.report_data import ReportData, Scene, load_data

log = logging.getLogger(__name__)

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.na{color:#888;font-style:italic}.pass{color:#176d2c;font-weight:bold}
.fail{color:#b3261e;font-weight:bold}.est{color:#8a5a00}.scenes{display:flex;flex-wrap:wrap;gap:1em}
.scenes figure{margin:0}figcaption{font-size:.85em;color:#555}code{background:#f3f3f3;padding:0 .2em}"""
COLORS = {"logged": "#222222", "teacher": "#1f5fbf", "student_before": "#c0392b", "student_after": "#1e8449"}


def _e(x: Any) -> str:
    return html.escape(str(x))


def not_available(reason: str) -> str:
    return f'<p class="na">not available: {_e(reason)}</p>'


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return '<span class="na">n/a</span>'
    if isinstance(v, bool):
        return '<span class="pass">yes</span>' if v else '<span class="fail">no</span>'
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.{digits}g}"
    return _e(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)  # headers are ours and may carry markup (the estimate label)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


# ---------------------------------------------------------------------------------------------------- sections


def section_summary(d: ReportData) -> str:
    rows = [[k, v] for k, v in d.summary.items() if v not in (None, "")]
    return _table(["", ""], rows) if rows else not_available("the result names no student or job")


def section_conditions(d: ReportData) -> str:
    if not d.conditions:
        return not_available(d.missing.get("conditions", "no divergence per condition in the result or the lake"))
    import matplotlib.pyplot as plt

    labels = [c["condition"] for c in d.conditions]
    before = [c.get("before") for c in d.conditions]
    after = [c.get("after") for c in d.conditions]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.2))
    ax.bar(x - 0.2, [np.nan if v is None else v for v in before], 0.4, label="before", color=COLORS["student_before"])
    ax.bar(x + 0.2, [np.nan if v is None else v for v in after], 0.4, label="after", color=COLORS["student_after"])
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylabel(d.conditions_metric)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    rows = [[c["condition"], c.get("mined"), c.get("frames"), c.get("before"), c.get("after"), c.get("change")]
            for c in d.conditions]
    return (f"<p>{_e(d.conditions_source)}</p>" + _png(fig)
            + _table(["condition", "mined", "frames", "before", "after", "relative change"], rows))


def _box(x: float, y: float, heading: float, length: float, width: float) -> np.ndarray:
    c, s = np.cos(heading), np.sin(heading)
    corners = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * [length / 2, width / 2]
    return corners @ np.array([[c, s], [-s, c]]) + [x, y]


def plot_scene(scene: Scene) -> str:
    """Bird's-eye view of one frame in the ego's frame (ego at the origin driving along +x): the logged agents, the
    logged path and the planned trajectories."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    ox, oy, h = scene.ego
    rot = np.array([[np.cos(h), -np.sin(h)], [np.sin(h), np.cos(h)]])  # world = rot @ local, so local = world @ rot

    def local(xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, float) - [ox, oy]) @ rot

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for a in scene.agents:
        (ax_, ay_), = local([[a["x"], a["y"]]])
        ax.add_patch(Polygon(_box(ax_, ay_, a["heading"] - h, a["length"], a["width"]), closed=True,
                             fc="#bbbbbb", ec="#555555", lw=0.8))
    ax.add_patch(Polygon(_box(0, 0, 0, 5.0, 2.0), closed=True, fc="#f5c518", ec="#333333", lw=1.0, label="ego"))
    pts = [np.zeros((1, 2))]
    for name, xy in scene.paths.items():
        if xy is not None and len(xy):
            p = local(xy)
            pts.append(p)
            ax.plot(p[:, 0], p[:, 1], "--" if name == "logged" else "-", color=COLORS.get(name, "#777777"), lw=1.8,
                    marker=".", ms=3, label=name.replace("_", " "))
    pts = np.concatenate(pts)
    ax.set_xlim(min(-15.0, pts[:, 0].min() - 5), max(60.0, pts[:, 0].max() + 10))
    half = max(12.0, np.abs(pts[:, 1]).max() + 4)
    ax.set_ylim(-half, half)
    ax.set_aspect("equal")
    ax.set_xlabel("forward [m]")
    ax.set_ylabel("left [m]")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.2)
    return _png(fig)


def section_scenes(d: ReportData) -> str:
    if not d.scenes:
        return not_available(d.missing.get("scenes", "no divergent scenarios found"))
    figs = []
    for s in d.scenes:
        missing = [k.replace("_", " ") for k, v in s.paths.items() if v is None]
        caption = (f"{_e(s.drive_id)} seq {s.seq} — score {_fmt(s.score)} {_e(s.context)}"
                   + (f"<br><span class=na>not available: {_e(', '.join(missing))}</span>" if missing else ""))
        figs.append(f"<figure>{plot_scene(s)}<figcaption>{caption}</figcaption></figure>")
    return ('<p>Logged trajectory (dashed), planned trajectories of the teacher and of the student before and after '
            'retraining, and the logged agents at that frame.</p><div class="scenes">' + "".join(figs) + "</div>")


def section_targets(d: ReportData) -> str:
    if not d.targets:
        return not_available(d.missing.get("targets", "the result holds no per-chip artifacts"))
    rows = [[t.get("chip"), t.get("size_bytes"), t.get("precision"), t.get("cpu_latency_ms"),
             t.get("chip_latency_ms_estimate"), t.get("divergence"), t.get("max_abs_error"), t.get("budgets_met"),
             t.get("verified")] for t in d.targets]
    head = ["chip", "size [bytes]", "precision", "CPU latency [ms] (measured)",
            'on-chip latency [ms] <span class="est">(estimate, roofline)</span>', f"divergence ({d.target_metric})",
            "max |error| vs FP32 (measured)", "budgets met", "verified"]
    return (_table(head, rows) + "<p>CPU latency is measured on this machine with onnxruntime, batch 1. On-chip "
            "latency is an <b>estimate</b> from the chip's datasheet figures (roofline), not a measurement. "
            "Divergence is measured by shadow replay on held-out drives for the chip the candidate was verified "
            "with; every chip's artifact is checked numerically against its FP32 reference.</p>")


def section_gate(d: ReportData) -> str:
    if d.gate is None:
        return not_available(d.missing.get("gate", "the result holds no gate decision"))
    g = d.gate
    status = g.get("status") or ("promoted" if g["passed"] else "rejected")
    verdict = (f'<p class="pass">PASSED: {_e(status)}</p>' if g["passed"]
               else f'<p class="fail">REJECTED: not promoted ({_e(status)})</p>')
    reasons = "".join(f"<li>{_e(r)}</li>" for r in g["reasons"])
    checks = _table(["check", "value", "limit", "passed", "detail"],
                    [[c.get("name"), c.get("value"), c.get("limit"), c.get("passed"), c.get("detail")]
                     for c in g["checks"]])
    keys = ("episodes", "collisions", "mean_min_ttc_s", "min_ttc_s", "comfortable_rate", "progress_vs_expert")
    closed = _table(["closed loop", *keys], [[c["policy"], *(c.get(k) for k in keys)] for c in g["closed_loop"]])
    return (verdict + (f"<ul>{reasons}</ul>" if reasons else "") + (checks if g["checks"] else "")
            + (closed if g["closed_loop"] else ""))


def _signed(v: float | None) -> str | None:
    return None if v is None else f"{v:+.4f}"


def section_fleet(d: ReportData) -> str:
    f = d.fleet
    if f is None:
        return not_available(d.missing.get("fleet", "no onboard rows in the lake given"))
    cond = _table(["condition", "deployed model", "frames", "fleet divergence (mean score)",
                   "emulation divergence (mean score)", "fleet &minus; emulation"],
                  [[c["condition"], c["model"], c["frames"], c["fleet"], c["emulation"], _signed(c["gap"])]
                   for c in f["by_condition"]])
    intro = (f"<p>From the fleet lake's onboard table (pair {_e(f['pair'])}, {f['frames']} frames logging an on-board "
             "decision): the teacher against the decision the vehicles logged (the fleet's real divergence) and "
             "against the fleet-side emulation of the deployed artifact on the same frames.</p>")
    if not f["parity"]:
        return intro + cond + "<h3>Chip parity</h3>" + not_available(
            f"no logged decision names the replayed student ({f['unchecked']} frames name another model)")
    out = f["out_of_parity"]
    verdict = (f'<p class="fail">{len(out)} vehicle{"s" * (len(out) != 1)} out of parity: {_e(", ".join(out))}</p>'
               if out else '<p class="pass">every checked vehicle in parity</p>')
    parity = _table(["vehicle", "deployed model", "version", "frames checked", "out of parity", "share out",
                     "max error [m]", "mean error [m]", "in parity"],
                    [[v["vehicle"], v["model"], v["version"], v["checked"], v["failed"], v["fail_rate"],
                      v["max_err_m"], v["mean_err_m"], v["in_parity"]] for v in f["parity"]])
    note = (f"<p>{f['unchecked']} frames log another model's decision than the replayed student's: not checked."
            "</p>" if f["unchecked"] else "")
    return (intro + cond + "<h3>Chip parity</h3><p>The fleet-side emulation against the decision logged on board, "
            "per vehicle and deployed model version: a frame is out of parity when a waypoint lies farther than "
            "the tolerance or the maneuver differs.</p>" + verdict + parity + note)


def section_log_replay(d: ReportData) -> str:
    lr = d.log_replay
    if lr is None:
        return not_available(d.missing.get("log_replay", "the result records no log-replay closed loop"))
    head = ["figure"] + [f"{_e(label)} ({_fmt(n)} windows): {who}" for _, label, n in lr["sets"]
                         for who in ("before", "after", "change")]
    rows = [[r["label"]] + [x for key, _, _ in lr["sets"] for x in (r[key][0], r[key][1], _signed(r[key][2]))]
            for r in lr["rows"]]
    return ("<p>Each student's plans driven from every held-out window's first frame against the logged agents "
            "(non-reactive log replay, NAVSIM's PDM-score form): means over the windows, higher is better; before is "
            "the current student, after the candidate.</p>" + _table(head, rows))


def section_lineage(d: ReportData) -> str:
    if not d.lineage:
        return not_available(d.missing.get("lineage", "the result records no lineage"))
    return _table(["", ""], [[k, v] for k, v in d.lineage])


SECTIONS = [("Summary", section_summary), ("Divergence per condition, before and after", section_conditions),
            ("Top divergent scenarios (bird's-eye)", section_scenes), ("Per chip", section_targets),
            ("Log-replay closed loop", section_log_replay),
            ("Fleet divergence and chip parity", section_fleet), ("Gate decision", section_gate),
            ("Lineage", section_lineage)]


def render_html(d: ReportData) -> str:
    """The report page; a section that raises renders as not available with the error, the others still render."""
    parts = []
    for title, fn in SECTIONS:
        try:
            body = fn(d)
        except Exception as exc:  # one broken input must not cost the whole report
            log.exception("report section %r failed", title)
            body = not_available(f"could not be drawn: {type(exc).__name__}: {exc}")
        parts.append(f"<section><h2>{_e(title)}</h2>{body}</section>")
    title = f"Retraining report — {d.summary.get('student') or ''} {d.summary.get('job') or ''}".strip()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><p>generated {stamp}</p>"
            + "".join(parts) + "</body></html>")


def render_report(result: dict, out: Path, lake: Path | None = None, job: dict | None = None,
                  top_scenes: int = 4) -> Path:
    """Write the HTML report of a cycle result (see ReportData for the keys read) to `out`, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    data = load_data(result, lake, job, top_scenes)
    return write_text_atomic(Path(out), render_html(data))
