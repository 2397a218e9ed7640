"""Batch shadow replay on a real Parquet lake with real ONNX models: tables, windows, incrementality, crashes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ingest.contract import Frames
from ingest.lake import DRIVE_FINAL_KEY, DRIVE_SEQ_KEY, file_name, live_files, partition_dir, write_parquet_atomic
from ingest.tables import TABLES
from ingest.lake_index import SeqRanges, encode_drive_final, encode_drive_seq
from ingest.lake import ingest_date, to_lake_batch
from ingest.synth import EPOCH_NS, synthetic_frames
from retrain.models.architectures import Planner, PlannerConfig, export_onnx
from shadow.config import ReplayConfig
from shadow.batch.replay import replay
from shadow.catalog import Catalog
from shadow.log_replay import log_replay
from shadow.spec import ModelSpec, write_spec

REPO = Path(__file__).resolve().parents[2]
TOPIC = "flywheel.frames"
T0_MS = EPOCH_NS // 1_000_000  # long ago: every drive in these lakes has ended
TEACHER_CFG = PlannerConfig(width=32, depth=1, heads=2, head_dim=16, ffn=64)
STUDENT_CFG = PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)


# ------------------------------------------------------------------------------------------------------------ helpers


def make_model(root: Path, name: str, version: str, seed: int, cfg: PlannerConfig) -> Path:
    """A random-weight planner exported to ONNX with its spec: <root>/<name>-<version>/model.onnx."""
    torch.manual_seed(seed)
    path = export_onnx(Planner(cfg), root / f"{name}-{version}" / "model.onnx")
    write_spec(ModelSpec(name=name, version=version), path)
    return path.parent


def drive(i: int, n: int, lighting: int = 1, road: int = 1, waypoints: int = 3) -> Frames:
    f = synthetic_frames(n, agents=5, waypoints=waypoints, seed=i, start_ns=EPOCH_NS + i * 10**12)
    f.cols["lighting"][:] = lighting
    f.cols["road_type"][:] = road
    return f


def records(drives: dict[str, Frames], chunk: int, partitions: int) -> list[tuple]:
    """(partition, offset, drive_id, first_seq, frames) of chunked drives, round-robin over the drives as a fleet
    streams them, drive i in partition i % partitions, offsets counted per partition."""
    todo = {d: list(range(0, f.num_frames, chunk)) for d, f in drives.items()}
    nxt = [0] * partitions
    out = []
    while any(todo.values()):
        for i, (d, starts) in enumerate(todo.items()):
            if starts:
                s = starts.pop(0)
                p = i % partitions
                f = drives[d]
                out.append((p, nxt[p], d, s, f.slice(s, min(s + chunk, f.num_frames))))
                nxt[p] += 1
    return out


def write_frames(lake: Path, recs: list[tuple], per_file: int, ingest_ms: int = T0_MS,
                 finals: dict[str, int] | None = None) -> list[Path]:
    """Frames files as the sink writes them: `per_file` consecutive records of a partition per file; `finals`
    {drive: last seq}: the file holding that seq gets the drive-final footer (the vehicle's final chunk)."""
    paths = []
    for p in sorted({r[0] for r in recs}):
        mine = sorted((r for r in recs if r[0] == p), key=lambda r: r[1])
        for k in range(0, len(mine), per_file):
            group = mine[k:k + per_file]
            batches = [to_lake_batch(f, d, "veh-1", s, 1, ingest_ms, p, o) for p_, o, d, s, f in group]
            seqs: dict[str, SeqRanges] = {}
            for _, _, d, s, f in group:
                seqs.setdefault(d, SeqRanges()).add(s, s + f.num_frames - 1)
            path = partition_dir(lake, "frames", ingest_date(ingest_ms)) / file_name(TOPIC, p, group[0][1],
                                                                                     group[-1][1])
            meta = {DRIVE_SEQ_KEY: encode_drive_seq(seqs)}
            ends = {d: s for d, s in (finals or {}).items() if d in seqs and seqs[d].missing(s, s) == []}
            if ends:
                meta[DRIVE_FINAL_KEY] = encode_drive_final(ends)
            write_parquet_atomic(pa.Table.from_batches(batches), path, metadata=meta)
            paths.append(path)
    return paths


def read(lake: Path, table: str, key: str | None = None) -> pa.Table:
    files = [f for f in live_files(lake, table) if key is None or f"={key}" in str(f.path.parent.parent.name)]
    if not files:
        return TABLES[table].schema.empty_table()
    return pa.concat_tables([pq.read_table(f.path) for f in files])


def keys(t: pa.Table, *cols: str) -> list[tuple]:
    return sorted(zip(*(t[c].to_pylist() for c in cols)))


def expected_windows(lengths: dict[str, int], w: int = 50) -> list[tuple]:
    """(drive, start seq, end seq, frames) of every scenario window of complete drives."""
    return sorted((d, s, min(s + w, n) - 1, min(s + w, n) - s) for d, n in lengths.items() for s in range(0, n, w))


def check_exactly_once(lake: Path, lengths: dict[str, int], teacher: str, student: str, pair: str) -> None:
    want = sorted((d, s) for d, n in lengths.items() for s in range(n))
    for table, key in (("decisions", teacher), ("decisions", student), ("divergences", pair)):
        assert keys(read(lake, table, key), "drive_id", "seq") == want, f"{table} {key}"
    scen = read(lake, "scenarios", pair)
    assert keys(scen, "drive_id", "window_start_seq", "window_end_seq", "frames") == expected_windows(lengths)
    noise = read(lake, "noise_floor", teacher)
    assert keys(noise, "drive_id", "seq") == [k for k in want if k[1] % 20 == 0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"teacher": make_model(root, "teacher", "v1", 0, TEACHER_CFG),
            "student": make_model(root, "student", "v1", 1, STUDENT_CFG),
            "student2": make_model(root, "student", "v2", 2, STUDENT_CFG),
            "student3": make_model(root, "student", "v3", 3, STUDENT_CFG),
            "student4": make_model(root, "student", "v4", 4, STUDENT_CFG)}


LENGTHS = {"d0": 230, "d1": 170, "d2": 120, "d3": 95}
IDS = ("teacher-v1", "student-v1", "teacher-v1__student-v1")


def small_lake(lake: Path, lengths: dict[str, int] = LENGTHS, chunk: int = 30, per_file: int = 3) -> list[Path]:
    drives = {d: drive(i, n, lighting=[1, 2, 1, 3][i % 4], road=[1, 1, 4, 3][i % 4])
              for i, (d, n) in enumerate(lengths.items())}
    return write_frames(lake, records(drives, chunk, 2), per_file)


# ---------------------------------------------------------------------------------------------------------- tests


def test_tables_rows_and_windows(models, tmp_path):
    lake = tmp_path / "lake"
    small_lake(lake)
    report = replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=200))
    assert report.frames_replayed == sum(LENGTHS.values()) and report.units_deferred == 0
    for table in ("decisions", "divergences", "scenarios", "noise_floor", "log_replay"):
        assert live_files(lake, table), table
        for f in live_files(lake, table):
            schema = pq.read_schema(f.path)
            assert schema.equals(TABLES[table].schema, check_metadata=False), (table, f.path)
            assert (f.topic, f.partition) in {(TOPIC, 0), (TOPIC, 1)}
    check_exactly_once(lake, LENGTHS, *IDS)
    div = read(lake, "divergences").sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    assert set(div["replay_id"].to_pylist()) == {report.replay_id}
    # driver metrics: null exactly where the 4 s future leaves the drive
    for d, n in LENGTHS.items():
        rows = div.filter(pa.compute.equal(div["drive_id"], d))
        null = np.isnan(rows["teacher_ade_driver"].to_numpy(zero_copy_only=False))
        assert null.tolist() == [s > n - 1 - 40 for s in range(n)], d
    # window aggregates = the divergence rows of their frames; condition of the window is its drive's
    scen = read(lake, "scenarios")
    for r in scen.to_pylist():
        rows = div.filter(pa.compute.and_(pa.compute.equal(div["drive_id"], r["drive_id"]),
                                          pa.compute.is_in(div["seq"], pa.array(range(r["window_start_seq"],
                                                                                        r["window_end_seq"] + 1)))))
        assert r["mean_ade_4s"] == pytest.approx(float(np.mean(rows["ade_4s"].to_numpy())), rel=1e-5)
        assert r["max_score"] == pytest.approx(float(np.max(rows["score"].to_numpy())), rel=1e-6)
        assert r["lighting"] == rows["lighting"][0].as_py() and r["criteria_version"]
        assert r["passed"] == (r["failed_criteria"] == [])
    # the noise floor: the teacher against itself on another runtime differs by float noise only
    noise = read(lake, "noise_floor")
    assert noise.num_rows > 0 and float(pa.compute.max(noise["fde_4s"]).as_py()) < 1e-3
    assert noise["runtime_a"][0].as_py() != noise["runtime_b"][0].as_py()
    assert report.noise_floor["frames"] == noise.num_rows


def test_every_models_plan_is_driven_in_the_log_replay(models, tmp_path):
    """The log_replay table: one row per frame and model, teacher included, each the log-replay closed loop of that
    model's stored plan from that frame over the drive's logged future."""
    lake = tmp_path / "lake"
    small_lake(lake)
    replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=200))
    frames = read(lake, "frames").sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    scores = {}
    for which in ("teacher", "student"):
        mid = IDS[0] if which == "teacher" else IDS[1]
        lr = read(lake, "log_replay", mid).sort_by([("drive_id", "ascending"), ("seq", "ascending")])
        dec = read(lake, "decisions", mid).sort_by([("drive_id", "ascending"), ("seq", "ascending")])
        assert keys(lr, "drive_id", "seq") == keys(frames, "drive_id", "seq") == keys(dec, "drive_id", "seq")
        assert set(lr["model_name"].to_pylist()) == {which}
        traj = np.stack([np.stack(dec[c].to_pylist()) for c in ("traj_x", "traj_y")], axis=-1)
        want = log_replay(frames, np.arange(frames.num_rows), traj,
                          plan_dt_s=0.5)
        assert np.unique(np.round(want.columns["score"], 3)).size > 1  # not a constant that any code would match
        for col in ("score", "ego_progress", "progress_m", "max_abs_jerk_mps3", "horizon_s"):
            np.testing.assert_allclose(lr[col].to_numpy(zero_copy_only=False), want.columns[col], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{which} {col}")
        # the log covers 4 s after a frame except within 4 s of its drive's end
        seq = lr["seq"].to_numpy()
        last = np.array([LENGTHS[d] - 1 for d in lr["drive_id"].to_pylist()])
        np.testing.assert_allclose(lr["horizon_s"].to_numpy(), np.minimum(4.0, (last - seq) * 0.1), atol=1e-5)
        assert lr["lighting"].to_pylist() == frames["lighting"].cast(pa.string()).to_pylist()
        scores[which] = lr
    # the saved queries over it: per model and condition, and the frames where the student falls furthest behind
    with Catalog(lake) as cat:
        by_cond = cat.saved("closed_loop_by_condition", min_horizon_s=0).to_pylist()
        for which, mid in (("teacher", IDS[0]), ("student", IDS[1])):
            rows = [r for r in by_cond if r["model"] == mid]
            assert sum(r["frames"] for r in rows) == scores[which].num_rows
            night = [r for r in rows if r["lighting"] == "night"]
            sel = np.array(scores[which]["lighting"].to_pylist()) == "night"
            assert len(night) == 1 and night[0]["mean_score"] == pytest.approx(
                float(scores[which]["score"].to_numpy()[sel].mean()), rel=1e-5)
        gap = cat.saved("closed_loop_gap", limit=5).to_pylist()
        diff = scores["teacher"]["score"].to_numpy() - scores["student"]["score"].to_numpy()
        assert [r["gap"] for r in gap] == pytest.approx(np.sort(diff[diff > 0])[::-1][:5].tolist(), rel=1e-5)
        assert all(r["pair"] == IDS[2] for r in gap)


def test_incremental_replay_never_duplicates(models, tmp_path):
    lake = tmp_path / "lake"
    small_lake(lake)
    cfg = ReplayConfig(group_frames=300)
    first = replay(lake, models["teacher"], models["student"], cfg)
    files = {f.path: f.path.stat().st_mtime_ns for t in ("decisions", "divergences") for f in live_files(lake, t)}
    again = replay(lake, models["teacher"], models["student"], cfg)
    assert again.units == 0 and again.frames_replayed == 0 and again.files_covered == first.files_covered + first.units
    # new frames files: a new drive in partition 1, offsets after the existing ones
    more = {"d9": drive(9, 80, lighting=2)}
    last = max(f.last for f in live_files(lake, "frames", partition=1))
    recs = [(1, last + 1 + k, d, s, f) for k, (_, _, d, s, f) in enumerate(records(more, 40, 1))]
    write_frames(lake, recs, per_file=1)
    added = replay(lake, models["teacher"], models["student"], cfg)
    assert added.frames_replayed == 80 and added.units == 2
    assert {p: p.stat().st_mtime_ns for p in files} == files, "old outputs were rewritten"
    check_exactly_once(lake, {**LENGTHS, "d9": 80}, *IDS)
    # a new student version replays the whole history; the teacher keeps one decision row per frame
    v2 = replay(lake, models["teacher"], models["student2"], cfg)
    assert v2.frames_replayed == sum(LENGTHS.values()) + 80
    assert first.teacher_reused == 0 and v2.teacher_reused == v2.frames_computed  # the teacher ran on none
    check_exactly_once(lake, {**LENGTHS, "d9": 80}, "teacher-v1", "student-v2", "teacher-v1__student-v2")
    check_exactly_once(lake, {**LENGTHS, "d9": 80}, *IDS)


def test_a_new_student_reuses_the_teachers_stored_decisions(models, tmp_path):
    """Replaying a second student over frames the teacher has decisions for takes them instead of running the
    teacher: the divergences equal those of a replay that runs the teacher again."""
    import shutil

    lake = tmp_path / "lake"
    small_lake(lake)
    replay(lake, models["teacher"], models["student"], ReplayConfig())
    shutil.copytree(lake, tmp_path / "copy")
    teacher_lr_mtimes = {f.path.stat().st_mtime_ns for f in live_files(lake, "log_replay")
                         if "teacher-v1" in str(f.path)}
    reused = replay(lake, models["teacher"], models["student2"], ReplayConfig())
    rerun = replay(tmp_path / "copy", models["teacher"], models["student2"], ReplayConfig(reuse_teacher=False))
    assert reused.teacher_reused == reused.frames_computed == rerun.frames_computed > 0
    assert rerun.teacher_reused == 0 and reused.noise_frames == 0 and rerun.noise_frames > 0
    pair = "teacher-v1__student-v2"
    a = read(lake, "divergences", pair).sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    b = read(tmp_path / "copy", "divergences", pair).sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    assert a.num_rows == b.num_rows == sum(LENGTHS.values())
    assert a["maneuver_teacher"].to_pylist() == b["maneuver_teacher"].to_pylist()
    for col in ("ade_4s", "fde_4s", "ahe_4s", "maneuver_jsd", "teacher_ade_driver", "score"):
        x, y = (t[col].to_numpy(zero_copy_only=False).astype(np.float64) for t in (a, b))
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=col)
    x, y = (t["ttc_teacher"].to_numpy(zero_copy_only=False).astype(np.float64) for t in (a, b))
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)  # NaN where no collision, in both
    check_exactly_once(lake, LENGTHS, "teacher-v1", "student-v2", pair)
    # frames whose noise floor is not stored get it when a later replay reuses their teacher decisions
    shutil.rmtree(tmp_path / "copy" / "noise_floor")
    later = replay(tmp_path / "copy", models["teacher"], models["student3"], ReplayConfig())
    assert later.teacher_reused == later.frames_computed and later.noise_frames > 0
    check_exactly_once(tmp_path / "copy", LENGTHS, "teacher-v1", "student-v3", "teacher-v1__student-v3")
    # the teacher's log-replay rows: written once, by the first replay (its files untouched since), and a lake whose
    # teacher decisions are stored without them (made before the table) gets them from the reused decisions
    n = sum(LENGTHS.values())
    assert read(lake, "log_replay", "teacher-v1").num_rows == n
    assert {f.path.stat().st_mtime_ns for f in live_files(lake, "log_replay") if "teacher-v1" in str(f.path)} == \
        teacher_lr_mtimes
    assert read(lake, "log_replay", "student-v2").num_rows == n
    shutil.rmtree(tmp_path / "copy" / "log_replay")
    again = replay(tmp_path / "copy", models["teacher"], models["student4"], ReplayConfig())
    assert again.teacher_reused == again.frames_computed == n
    lr = read(tmp_path / "copy", "log_replay", "teacher-v1").sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    first = read(lake, "log_replay", "teacher-v1").sort_by([("drive_id", "ascending"), ("seq", "ascending")])
    assert lr.num_rows == n and np.allclose(lr["score"].to_numpy(), first["score"].to_numpy(), atol=1e-5)


def test_compacted_frames_files_replay_only_uncovered_offsets(models, tmp_path):
    lake = tmp_path / "lake"
    first = {"d0": drive(0, 60), "d1": drive(1, 60)}
    later = {"d2": drive(2, 60), "d3": drive(3, 60)}
    recs = records(first, 30, 1)  # offsets 0..3
    recs += [(0, 4 + k, d, s, f) for k, (_, _, d, s, f) in enumerate(records(later, 30, 1))]  # offsets 4..7
    paths = write_frames(lake, recs[:4], per_file=2)
    replay(lake, models["teacher"], models["student"], ReplayConfig())
    check_exactly_once(lake, {"d0": 60, "d1": 60}, *IDS)
    # the later drives arrive, and compaction merges everything into one file covering offsets 0..7
    write_frames(lake, recs, per_file=8)
    for p in paths:
        p.unlink()
    report = replay(lake, models["teacher"], models["student"], ReplayConfig())
    assert report.frames_replayed == 120 and report.units == 1
    names = sorted(f.path.name for f in live_files(lake, "divergences"))
    assert names == sorted([file_name(TOPIC, 0, 0, 1), file_name(TOPIC, 0, 2, 3), file_name(TOPIC, 0, 4, 7)])
    check_exactly_once(lake, {d: 60 for d in ("d0", "d1", "d2", "d3")}, *IDS)


def test_units_wait_for_their_context(models, tmp_path):
    """A drive still streaming (recent ingest time, future not stored) is deferred, then replayed with its future."""
    import time

    lake = tmp_path / "lake"
    now_ms = int(time.time() * 1000)
    drives = {"d0": drive(0, 150)}
    recs = records(drives, 50, 1)
    write_frames(lake, recs[:2], per_file=1, ingest_ms=now_ms)
    report = replay(lake, models["teacher"], models["student"], ReplayConfig())
    # seq 0..49 has its 49 frames of context stored (up to 99); seq 50..99 does not
    assert report.frames_replayed == 50 and report.units_deferred == 1
    write_frames(lake, recs[2:], per_file=1, ingest_ms=now_ms)
    report = replay(lake, models["teacher"], models["student"], ReplayConfig(drive_end_idle_s=0))
    assert report.frames_replayed == 100
    check_exactly_once(lake, {"d0": 150}, *IDS)
    div = read(lake, "divergences")
    null = np.isnan(div.sort_by("seq")["student_ade_driver"].to_numpy(zero_copy_only=False))
    assert null.tolist() == [s > 109 for s in range(150)], "driver metrics of 50..99 saw their future"


def test_a_drive_whose_final_chunk_is_stored_is_replayed_to_its_end_at_once(models, tmp_path):
    """A drive's final chunk in the lake ends it: its last frames are replayed without waiting for it to go quiet;
    with a frame before the final one missing, the drive has not ended."""
    import time

    now_ms = int(time.time() * 1000)
    recs = records({"d0": drive(0, 150)}, 50, 1)
    lake = tmp_path / "open"
    write_frames(lake, recs, per_file=1, ingest_ms=now_ms)  # no final chunk: seq 100..149 wait for future or idle
    report = replay(lake, models["teacher"], models["student"], ReplayConfig())
    assert report.frames_replayed == 100 and report.units_deferred == 1

    lake = tmp_path / "ended"
    write_frames(lake, recs, per_file=1, ingest_ms=now_ms, finals={"d0": 149})
    report = replay(lake, models["teacher"], models["student"], ReplayConfig())
    assert report.frames_replayed == 150 and report.units_deferred == 0
    check_exactly_once(lake, {"d0": 150}, *IDS)
    null = np.isnan(read(lake, "divergences").sort_by("seq")["student_ade_driver"].to_numpy(zero_copy_only=False))
    assert null.tolist() == [s > 109 for s in range(150)]

    lake = tmp_path / "gap"
    write_frames(lake, [recs[0], recs[2]], per_file=1, ingest_ms=now_ms, finals={"d0": 149})
    report = replay(lake, models["teacher"], models["student"], ReplayConfig())
    assert report.frames_replayed == 0 and report.units_deferred == 2


def test_exception_after_the_first_output_file_then_rerun(models, tmp_path, monkeypatch):
    import shadow.outputs as outputs

    lake = tmp_path / "lake"
    small_lake(lake)
    real, calls = outputs.write_parquet_atomic, []

    def failing(*a, **kw):
        calls.append(a[1])
        if len(calls) == 4:  # mid-unit: decisions and noise floor written, the divergences marker not
            raise OSError("disk full (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(outputs, "write_parquet_atomic", failing)
    with pytest.raises(OSError, match="injected"):
        replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=100))
    monkeypatch.setattr(outputs, "write_parquet_atomic", real)
    assert not live_files(lake, "divergences") and live_files(lake, "decisions")
    replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=100))
    check_exactly_once(lake, LENGTHS, *IDS)


KILL_SCRIPT = """
import os, sys
from shadow.batch.replay import replay
from shadow.catalog import Catalog
from shadow.log_replay import log_replay
from shadow.config import ReplayConfig
replay(sys.argv[1], sys.argv[2], sys.argv[3], ReplayConfig(group_frames=100),
       progress=lambda done, total: os.kill(os.getpid(), 9) if done > 150 else None)
"""


def test_killed_mid_replay_then_rerun_writes_each_frame_once(models, tmp_path):
    lake = tmp_path / "lake"
    small_lake(lake)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(lake), str(models["teacher"]),
                           str(models["student"])], cwd=REPO, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = read(lake, "divergences").num_rows
    assert 0 < partial < sum(LENGTHS.values())
    report = replay(lake, models["teacher"], models["student"], ReplayConfig(group_frames=100))
    assert report.frames_replayed == sum(LENGTHS.values()) - partial
    check_exactly_once(lake, LENGTHS, *IDS)


def test_models_with_another_featurizer_are_refused(models, tmp_path):
    from shadow.models import ModelError, load_model
    from shadow.spec import read_spec

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((models["student"] / "model.onnx").read_bytes())
    write_spec(read_spec(models["student"]).model_copy(update={"featurizer_version": "feat-v0"}), bad / "model.onnx")
    with pytest.raises(ModelError, match="feat-v0"):
        load_model(bad)
    m = load_model(models["student"])
    x = {"ego_hist": np.zeros((3, 10, 9), np.float32), "agents": np.zeros((3, 16, 16), np.float32),
         "agent_mask": np.zeros((3, 16), np.float32), "lane": np.zeros((3, 17), np.float32)}
    traj, logits = m.predict(x, batch_size=2)
    assert traj.shape == (3, 8, 3) and logits.shape == (3, 6)


def test_cli_run_prints_the_summary_and_json(models, tmp_path):
    import json

    from typer.testing import CliRunner

    from flywheel.cli.main import app

    lake = tmp_path / "lake"
    small_lake(lake, {"d0": 120, "d1": 60})
    args = ["shadow", "run", "--lake", str(lake), "--teacher", str(models["teacher"]), "--student",
            str(models["student"])]
    out = CliRunner().invoke(app, args, terminal_width=160)
    assert out.exit_code == 0, out.output
    assert "frames replayed" in out.output and "pass rate" in out.output and "noise floor" in out.output
    again = CliRunner().invoke(app, [*args, "--json"])
    assert again.exit_code == 0
    report = json.loads(again.output[again.output.index("{"):])
    assert report["frames_replayed"] == 0 and report["files_covered"] > 0
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no model file" in bad.output


def test_graph_flops_match_the_architecture(models):
    from shadow.flops import graph_flops

    def macs(c: PlannerConfig) -> int:
        s, d = 18, c.width  # tokens: ego, 16 agents, lane
        layer = s * d * 3 * c.heads * c.head_dim + s * c.heads * c.head_dim * d + 2 * s * d * c.ffn \
            + 2 * c.heads * s * s * c.head_dim
        embed = (90 * d + d * d) + 16 * (16 * d + d * d) + (17 * d + d * d)
        heads = d * d + d * 24 + d * 6
        return c.depth * layer + embed + heads

    assert graph_flops(models["teacher"])["total"] == 2 * macs(TEACHER_CFG)
    assert graph_flops(models["student"])["total"] == 2 * macs(STUDENT_CFG)
