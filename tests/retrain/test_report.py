"""The per-job HTML report from a hand-made cycle result and a tiny lake written with the lake's real schemas:
sections, embedded images, scenes read from frames/decisions/divergences, and "not available" for what is missing."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ingest.contract import ENUMS, SCHEMA_VERSION
from ingest.lake import file_name, partition_dir, write_parquet_atomic
from ingest.lake import to_lake_batch
from ingest.synth import synthetic_frames
from tests.lake_rows import rows

DAY = "2026-01-02"
TEACHER, BEFORE, AFTER = "teacher-1.0", "student-1.0", "student-1.1"
PAIR_BEFORE, PAIR_AFTER = f"{TEACHER}__{BEFORE}", f"{TEACHER}__{AFTER}"
# drive d1 (night merge for seq >= 30) and d2 (rain highway), 60 frames each
DRIVES = {"d1": ("merge", "night", "clear"), "d2": ("highway", "day", "rain")}
N = 60


def write(lake: Path, table: str, data: pa.Table, offset: int, date: str = DAY, **keys: str) -> Path:
    path = partition_dir(lake, table, date, **keys) / file_name("flywheel.frames", 0, offset, offset)
    return write_parquet_atomic(data, path)


def condition(drive: str, seq: int) -> tuple[str, str, str]:
    road, light, weather = DRIVES[drive]
    return road, (light if seq >= 30 or drive != "d1" else "day"), weather


def divergence_records(pair: str, scale: float, student: str = "student") -> list[dict]:
    teacher, stud = pair.split("__")
    out = []
    for drive in DRIVES:
        for s in range(N):
            road, light, weather = condition(drive, s)
            score = scale * (3.0 if light == "night" else 1.0) * (1 + 0.01 * s)
            out.append({"drive_id": drive, "vehicle_id": "v1", "seq": s, "teacher_name": "teacher",
                        "teacher_version": teacher.split("-")[1], "student_name": student,
                        "student_version": stud.split("-")[1], "road_type": road, "lighting": light,
                        "weather": weather, "score": score, "ade_4s": score / 2, "miss_4s": score > 2.5,
                        "maneuver_disagree": False})
    return out


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    lake = tmp_path / "lake"
    for k, drive in enumerate(DRIVES):
        f = synthetic_frames(N, agents=3, waypoints=4, seed=k)
        for i, enum in enumerate(("road_type", "lighting", "weather")):
            f.cols[enum][:] = [ENUMS[enum][1].index(condition(drive, s)[i]) for s in range(N)]
        batch = to_lake_batch(f, drive, "v1", 0, SCHEMA_VERSION, 1_767_312_000_000, 0, k)
        write(lake, "frames", pa.Table.from_batches([batch]), k)
    for pair, scale in ((PAIR_BEFORE, 1.0), (PAIR_AFTER, 0.4)):
        write(lake, "divergences", rows("divergences", divergence_records(pair, scale)), 0, pair=pair)
    t = np.arange(1, 9) * 0.5
    for model, bend in ((TEACHER, 0.0), (BEFORE, 0.4), (AFTER, 0.05)):
        recs = [{"drive_id": d, "vehicle_id": "v1", "seq": s, "model_name": model.split("-")[0],
                 "model_version": model.split("-")[1], "traj_x": (25 * t).tolist(),
                 "traj_y": (bend * t ** 2).tolist(), "traj_yaw": [0.0] * 8} for d in DRIVES for s in range(N)]
        write(lake, "decisions", rows("decisions", recs), 0, model=model)
    write(lake, "onboard", rows("onboard", onboard_records()), 0, pair=PAIR_BEFORE)
    return lake


def onboard_records() -> list[dict]:
    """The before student's logged decisions: d1 on veh-a (in parity), d2 on veh-b (6 frames out of parity, 0.9 m);
    fleet scores: night 2.0 (emulation 1.5), rain 1.0 (1.0), nominal 0.5 (0.25)."""
    fleet = {"night": (2.0, 1.5), "rain": (1.0, 1.0), "nominal": (0.5, 0.25)}
    out = []
    for drive, vehicle in (("d1", "veh-a"), ("d2", "veh-b")):
        for s in range(N):
            road, light, weather = condition(drive, s)
            f, e = fleet["night" if light == "night" else "rain" if weather == "rain" else "nominal"]
            bad = vehicle == "veh-b" and s < 6
            out.append({"drive_id": drive, "vehicle_id": vehicle, "seq": s, "road_type": road, "lighting": light,
                        "weather": weather, "decision_model": "student", "decision_model_version": "1.0",
                        "fleet_score": f, "emulation_score": e, "parity_checked": True,
                        "parity_max_err_m": 0.9 if bad else 0.004, "parity_maneuver_agree": True,
                        "parity_ok": not bad})
    return out


LOG_REPLAY = {s: {"windows": w, "before": {"score": b, "comfort": 0.6, "ego_progress": 0.9},
                  "after": {"score": a, "comfort": 0.7, "ego_progress": 0.88}, "change": a - b}
              for s, w, b, a in (("mined", 120, 0.39, 0.41), ("elsewhere", 300, 0.69, 0.68))}


def cycle_result(**overrides) -> dict:
    doc = {
        "student": "student", "base_version": "1.0", "new_version": "1.1",
        "pairs": {"before": PAIR_BEFORE, "after": PAIR_AFTER}, "promoted": False,
        "mining": {"rule": "sql", "sql": "SELECT drive_id, seq FROM divergences WHERE lighting = 'night'",
                   "windows": 1, "items": [{"drive_id": "d1", "start_seq": 30, "end_seq": 50, "score": 4.4}]},
        "divergence_by_condition": {"night": {"before": 3.1, "after": 1.2, "frames": 300, "mined": 1},
                                    "rain": {"before": 1.1, "after": 1.15, "frames": 600, "mined": 0}},
        "targets": [{"chip": "orin", "bytes": 412_000, "precision_mix": {"int8": 12, "fp16": 30},
                     "cpu_latency_ms_measured": 0.81, "latency_ms_estimate": 0.052, "size_budget_met": True,
                     "latency_budget_met": True, "verified": True, "divergence": 0.31},
                    {"chip": "journey6", "bytes": 405_000, "precision_mix": {"int8": 40},
                     "cpu_latency_ms_measured": 0.77, "latency_ms_estimate": 0.071, "size_budget_met": True,
                     "latency_budget_met": False, "verified": True, "divergence": 0.35}],
        "gate": {"passed": False, "reasons": ["rain: divergence up 4.5% (limit 10%) ok",
                                              "closed loop: collisions 2 > 1 <script>"],
                 "checks": [{"name": "mined_reduction", "value": 0.61, "limit": 0.5, "passed": True},
                            {"name": "collisions", "value": 2, "limit": 1, "passed": False}]},
        "lineage": {"parents": ["student:1.0", "teacher:1.0"], "dataset_sha256": "ab" * 32},
        "log_replay": LOG_REPLAY,
    }
    doc.update(overrides)
    return doc


def sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", text, re.S))


def png_count(text: str) -> int:
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    return len(images)


def test_full_report_from_result_and_lake(tmp_path, lake):
    from retrain.cycle.report import render_report
    from retrain.cycle.report_data import load_data

    job = {"id": "20260102-000000-abcd", "state": "rejected", "spec": {"student": "student", "targets": ["orin"]}}
    out = render_report(cycle_result(), tmp_path / "r" / "report.html", lake=lake, job=job)
    text = out.read_text()
    s = sections(text)
    assert list(s) == ["Summary", "Divergence per condition, before and after", "Top divergent scenarios (bird&#x27;s-eye)",
                       "Per chip", "Log-replay closed loop", "Fleet divergence and chip parity", "Gate decision",
                       "Lineage"]
    assert "not available" not in text
    assert "20260102-000000-abcd" in s["Summary"] and PAIR_AFTER in s["Summary"]
    assert png_count(s["Divergence per condition, before and after"]) == 1 and "night" in text
    assert "estimate" in s["Per chip"] and "measured" in s["Per chip"] and "journey6" in s["Per chip"]
    assert "REJECTED" in s["Gate decision"] and "collisions 2 &gt; 1 &lt;script&gt;" in s["Gate decision"]
    assert "<script>" not in text  # result text is escaped
    assert "student:1.0, teacher:1.0" in s["Lineage"]
    scenes = s["Top divergent scenarios (bird&#x27;s-eye)"]
    assert png_count(scenes) == 1 and "d1 seq 50" in scenes  # the best frame of the mined window
    # the scene was read from the lake: ego, 3 agents, logged future and the three planners
    scene = load_data(cycle_result(), lake).scenes[0]
    assert len(scene.agents) == 3 and scene.paths["logged"].shape == (10, 2)  # seq 50..59
    assert all(scene.paths[k].shape == (9, 2) for k in ("teacher", "student_before", "student_after"))
    assert np.allclose(scene.paths["teacher"][0], scene.ego[:2])
    # the teacher drives straight ahead along the ego heading, 25 m/s over 4 s
    step = scene.paths["teacher"][-1] - scene.paths["teacher"][0]
    assert np.allclose(step, 100 * np.array([np.cos(scene.ego[2]), np.sin(scene.ego[2])]), atol=1e-3)


def test_conditions_and_scenes_come_from_the_lake_when_the_result_lacks_them(tmp_path, lake):
    from retrain.cycle.report import render_report

    doc = cycle_result(divergence_by_condition=None, mining=None)
    text = render_report(doc, tmp_path / "report.html", lake=lake).read_text()
    s = sections(text)
    cond = s["Divergence per condition, before and after"]
    assert "from the lake" in cond and "night" in cond and "rain" in cond and png_count(cond) == 1
    assert png_count(s["Top divergent scenarios (bird&#x27;s-eye)"]) == 2  # top frame of each drive


def test_missing_sections_render_not_available(tmp_path):
    from retrain.cycle.report import render_report

    doc = {"student": "student", "promoted": True, "gate": {"passed": True, "reasons": []}}
    text = render_report(doc, tmp_path / "report.html", lake=None).read_text()
    s = sections(text)
    assert "PASSED" in s["Gate decision"]
    for title in ("Divergence per condition, before and after", "Top divergent scenarios (bird&#x27;s-eye)",
                  "Per chip", "Log-replay closed loop", "Fleet divergence and chip parity", "Lineage"):
        assert "not available" in s[title], title
    assert png_count(text) == 0
    # garbage in every key still renders a page
    junk = {"targets": "x", "gate": [1], "lineage": 5, "divergence_by_condition": [1, None], "pairs": 3}
    text = render_report(junk, tmp_path / "junk.html", lake=tmp_path / "no-lake").read_text()
    assert text.count("not available") >= 6 and text.endswith("</html>")
    # a broken section does not take the others with it
    doc = cycle_result(targets=[{"chip": "orin", "precision_mix": {"int8": 1}, "bytes": object()}])
    text = render_report(json.loads(json.dumps(doc, default=str)), tmp_path / "b.html", lake=None).read_text()
    assert "Gate decision" in text and "REJECTED" in text


def test_report_of_a_cycle_result_with_its_step_records(tmp_path, lake):
    """The shape of retrain.cycle.cycle.CycleResult: scenes from the verification lake named by work_dir/verify.json,
    mined windows from work_dir/mine.json, conditions from divergence.by_condition."""
    from retrain.cycle.report import render_report

    work = tmp_path / "work"
    work.mkdir()
    (work / "verify.json").write_text(json.dumps({"step": "verify", "output": {
        "lake": str(lake), "pairs": {"before": PAIR_BEFORE, "after": PAIR_AFTER}}}))
    (work / "mine.json").write_text(json.dumps({"step": "mine", "output": {"items": [
        {"drive_id": "train-drive", "start_seq": 0, "end_seq": 9, "score": 9.0,  # not in the verification lake
         "signal": "fleet"},
        {"drive_id": "d2", "start_seq": 10, "end_seq": 20, "score": 2.0, "signal": "emulation"}]}}))
    row = lambda s, c, b, a: {"set": s, "condition": c, "before": {"frames": 40, "mean_score": b},  # noqa: E731
                              "after": {"frames": 40, "mean_score": a}, "change": {"mean_score": (a - b) / b}}
    doc = {"cycle_id": "c0ffee", "work_dir": str(work), "status": "promoted", "passed": True, "reasons": [],
           "teacher": {"ref": "teacher:1.0"}, "parent": {"ref": "student:1.0", "checkpoint_source": "config"},
           "candidate": {"name": "student", "version": "1.1", "verified_chip": "cpu"},
           "mining": {"rule": "score", "threshold": 0.7, "windows": 2, "config": {"signal": "auto"}},
           "snapshot": {"id": "5a5a", "content_sha256": "cd" * 32},
           "divergence": {"mined": {"before": {"mean_score": 3.0}, "after": {"mean_score": 1.0}},
                          "by_condition": [row("mined", "night", 3.0, 1.0), row("elsewhere", "nominal", 1.0, 1.05)]},
           "closed_loop": {"before": {"episodes": 2, "collisions": 0}, "after": {"episodes": 2, "collisions": 0}},
           "log_replay": LOG_REPLAY,
           "targets": [{"chip": "cpu", "bytes": 300_000, "cpu_latency_ms_measured": 0.5, "latency_ms_estimate": 0.5,
                        "max_abs_error": 0.01, "size_budget_met": True, "latency_budget_met": True,
                        "verified": True, "precision_mix": {"int8": 3}}],
           "gate": {"passed": True, "status": "promoted", "reasons": [],
                    "checks": [{"name": "divergence_mined", "passed": True, "value": -0.66, "limit": -0.5,
                                "detail": "mean_score where mined 3 -> 1 (-66.7%)"}]},
           "registry": {"status": "promoted", "entries": [{"ref": "student:1.1", "status": "promoted",
                                                          "parents": ["student:1.0", "teacher:1.0"]}]}}
    text = render_report(doc, tmp_path / "report.html", lake=lake).read_text()
    s = sections(text)
    assert "not available" not in text
    assert "student:1.0" in s["Summary"] and "1.1" in s["Summary"] and "promoted" in s["Summary"]
    assert "night (mined)" in s["Divergence per condition, before and after"]
    scenes = s["Top divergent scenarios (bird&#x27;s-eye)"]
    assert png_count(scenes) == 1 and "d2 seq 20" in scenes  # the window the lake has, its best frame
    assert "PASSED" in s["Gate decision"] and "-66.7%" in s["Gate decision"] and "closed loop" in s["Gate decision"]
    per_chip = s["Per chip"]
    assert "held-out" in per_chip and ">1</td>" in per_chip  # the verified chip's held-out divergence
    assert "registered student:1.1" in s["Lineage"] and "cdcd" in s["Lineage"]
    assert "emulation: 1 window, fleet: 1 window (requested auto)" in s["Lineage"]
    assert "every checked vehicle in parity" not in s["Fleet divergence and chip parity"]  # veh-b is not
    assert "+0.0200" in s["Log-replay closed loop"]


def test_fleet_divergence_chip_parity_and_log_replay_sections(tmp_path, lake):
    from retrain.cycle.report import render_report
    from retrain.cycle.report_data import load_data

    d = load_data(cycle_result(), lake)
    by = {c["condition"]: c for c in d.fleet["by_condition"]}
    assert d.fleet["pair"] == PAIR_BEFORE and d.fleet["frames"] == 2 * N and d.fleet["unchecked"] == 0
    assert by["night"] == {"condition": "night", "model": "student 1.0", "frames": 30, "fleet": 2.0,
                           "emulation": 1.5, "gap": 0.5}
    assert (by["nominal"]["frames"], by["nominal"]["gap"], by["rain"]["frames"], by["rain"]["gap"]) == (30, 0.25, 60, 0)
    assert [c["condition"] for c in d.fleet["by_condition"]] == ["night", "rain", "nominal"]  # most divergent first
    veh = {v["vehicle"]: v for v in d.fleet["parity"]}
    assert d.fleet["out_of_parity"] == ["veh-b"] and veh["veh-a"]["in_parity"] and veh["veh-a"]["failed"] == 0
    assert (veh["veh-b"]["checked"], veh["veh-b"]["failed"], veh["veh-b"]["version"]) == (60, 6, "1.0")
    assert veh["veh-b"]["fail_rate"] == pytest.approx(0.1) and veh["veh-b"]["max_err_m"] == pytest.approx(0.9)

    s = sections(render_report(cycle_result(), tmp_path / "report.html", lake=lake).read_text())
    fleet = s["Fleet divergence and chip parity"]
    assert "1 vehicle out of parity: veh-b" in fleet and PAIR_BEFORE in fleet
    assert "<td>night</td><td>student 1.0</td><td>30</td><td>2</td><td>1.5</td><td>+0.5000</td>" in fleet
    assert re.search(r"<td>veh-b</td><td>student</td><td>1.0</td><td>60</td><td>6</td><td>0.1</td><td>0.9</td>",
                     fleet)
    replay = s["Log-replay closed loop"]
    assert "where mined (120 windows): before" in replay and "elsewhere (300 windows): change" in replay
    rows = re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", replay)
    # the score first, then verify's order
    assert [r[0] for r in rows] == ["score (PDM form)", "ego progress", "comfort"]
    assert re.findall(r"<td>(.*?)</td>", rows[0][1]) == ["0.39", "0.41", "+0.0200", "0.69", "0.68", "-0.0100"]
    assert re.findall(r"<td>(.*?)</td>", rows[2][1])[2] == "+0.1000"


def test_fleet_and_log_replay_sections_not_available(tmp_path, lake):
    import shutil

    from retrain.cycle.report import render_report

    other = cycle_result(mining={"rule": "score", "pair": f"{TEACHER}__student-9.9", "windows": 1, "items": []})
    s = sections(render_report(other, tmp_path / "other.html", lake=lake).read_text())
    assert f"not available: the lake holds no onboard rows of pair {TEACHER}__student-9.9" in \
        s["Fleet divergence and chip parity"]
    shutil.rmtree(lake / "onboard")  # a lake replayed from frames that log no on-board decision
    s = sections(render_report(cycle_result(log_replay={}), tmp_path / "r.html", lake=lake).read_text())
    assert "not available: the lake holds no onboard rows" in s["Fleet divergence and chip parity"]
    assert "not available: the result records no log-replay closed loop" in s["Log-replay closed loop"]
    assert "Gate decision" in s and "not available" not in s["Per chip"]
    # a lake the catalog cannot read is named as the reason, the report still renders
    (lake / "onboard" / f"pair={PAIR_BEFORE}" / f"date={DAY}").mkdir(parents=True)
    write(lake, "onboard", rows("onboard", onboard_records()).replace_schema_metadata(
        {b"flywheel.schema_version": b"99"}), 0, pair=PAIR_BEFORE)
    s = sections(render_report(cycle_result(), tmp_path / "v.html", lake=lake).read_text())
    assert "not available: the lake&#x27;s onboard table could not be read" in s["Fleet divergence and chip parity"]
    assert "not available: the lake could not be read: UnknownVersion" in s["Top divergent scenarios (bird&#x27;s-eye)"]
    assert "REJECTED" in s["Gate decision"] and "not available" not in s["Log-replay closed loop"]
