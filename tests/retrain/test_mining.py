"""Mining on a real (hand-made, skewed) lake through the real catalog: balance, per-drive cap, noise floor, SQL
mining and its errors, and the snapshot it becomes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from ingest.contract import frames_to_arrow
from ingest.tables import TABLES
from ingest.lake import file_name, partition_dir, write_parquet_atomic
from ingest.synth import EPOCH_NS, synthetic_frames
from retrain.cycle.dataset import (DatasetConfig, SnapshotError, create_snapshot, load_snapshot, split_drives,
                                   write_frames_lake)
from retrain.cycle.mining import MiningConfig, MiningError, condition_of, mine

PAIR = "teacher-v1__student-v0"
W = 50
# drive -> (windows, lighting, weather, road type, scores of its windows, highest first)
SKEW = {"hot": (20, "glare", "clear", "highway", np.linspace(10, 9, 20)),
        **{f"n{i}": (5, "day", "clear", "highway", np.linspace(2, 1, 5) - i * 0.01) for i in range(10)},
        **{f"r{i}": (2, "day", "rain", "merge", np.linspace(0.8, 0.5, 2) - i * 0.01) for i in range(3)}}


def _table(table: str, n: int, **cols) -> pa.Table:
    """Rows of a lake table's fixed schema: the given columns, every other one a neutral value of its type."""
    out = []
    for f in TABLES[table].schema:
        if f.name in cols:
            t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            out.append(pa.array(cols[f.name], t).cast(f.type))
        elif pa.types.is_dictionary(f.type):
            out.append(pa.array(["unknown"] * n).cast(f.type))
        elif pa.types.is_list(f.type):
            out.append(pa.array([[]] * n, f.type))
        elif pa.types.is_string(f.type):
            out.append(pa.array(["x"] * n, f.type))
        elif pa.types.is_timestamp(f.type):
            out.append(pa.array(np.zeros(n, np.int64)).cast(f.type))
        else:
            out.append(pa.array(np.zeros(n)).cast(f.type))
    return pa.Table.from_arrays(out, schema=TABLES[table].schema)


def _write(lake, table: str, key: str, rows: pa.Table) -> None:
    path = partition_dir(lake, table, "2026-01-01", **{TABLES[table].partitioning[0]: key}) / file_name("t", 0, 0, 0)
    write_parquet_atomic(rows, path)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Frames of every drive; scenario windows of the pair with the scores of SKEW; a noise floor around 0.01."""
    lake = tmp_path_factory.mktemp("skewed") / "lake"
    frames, scen = [], {k: [] for k in ("drive_id", "window_start_seq", "window_end_seq", "lighting", "weather",
                                        "road_type", "mean_score", "max_score", "frames")}
    for i, (d, (n, light, weather, road, scores)) in enumerate(SKEW.items()):
        f = synthetic_frames(n * W, agents=3, waypoints=3, seed=i, start_ns=EPOCH_NS + i * 10**12)
        f.cols["lighting"][:] = {"day": 1, "glare": 3}[light]
        f.cols["weather"][:] = {"clear": 1, "rain": 2}[weather]
        f.cols["road_type"][:] = {"highway": 1, "merge": 2}[road]
        frames.append(pa.Table.from_batches([frames_to_arrow(f, d, "veh-1", 0)]))
        for k in range(n):
            for col, v in (("drive_id", d), ("window_start_seq", k * W), ("window_end_seq", k * W + W - 1),
                           ("lighting", light), ("weather", weather), ("road_type", road),
                           ("mean_score", scores[k]), ("max_score", scores[k] + 1), ("frames", W)):
                scen[col].append(v)
    write_frames_lake(lake, pa.concat_tables(frames), partitions=2)
    _write(lake, "scenarios", PAIR, _table("scenarios", len(scen["drive_id"]), **scen))
    noise = np.random.default_rng(0).uniform(0, 0.01, 200)
    _write(lake, "noise_floor", "teacher-v1", _table("noise_floor", 200, drive_id=["hot"] * 200,
                                                      seq=np.arange(200), score=noise))
    return lake


def test_balanced_mining_holds_the_caps(lake):
    res = mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, max_windows=20, max_per_drive=3))
    assert len(res.items) == 20 and res.eligible == sum(v[0] for v in SKEW.values())
    per_drive = res.counts("drive_id")
    assert max(per_drive.values()) <= 3 and per_drive["hot"] == 3  # one drive cannot dominate
    # in turns over condition x scenario type: glare runs out at the drive cap (3), rain at its 6 windows,
    # nominal fills the rest
    assert res.counts("condition") == {"glare": 3, "nominal": 11, "rain": 6}
    assert res.threshold == pytest.approx(3.0 * np.quantile(np.random.default_rng(0).uniform(0, 0.01, 200), 0.99),
                                          rel=1e-3)
    unbalanced = mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, max_windows=20, max_per_drive=3, balance=False))
    assert unbalanced.counts("condition") == {"glare": 3, "nominal": 17}  # best first: rain never makes it
    for it in res.items:  # context: 9 frames of history, 40 of horizon, clipped to the drive
        assert it.context_start == max(0, it.start_seq - 9)
        n = SKEW[it.drive_id][0] * W
        assert it.context_end == min(n - 1, it.end_seq + 40)


def test_only_the_tail_of_the_pairs_divergence_is_mined(lake):
    # the noise floor (~0.01) admits every window; the tail's quantile is taken over all the pair's windows
    scores = np.concatenate([v[4] for v in SKEW.values()])
    q = float(np.quantile(scores, 0.75))
    res = mine(lake, MiningConfig(pair=PAIR, max_windows=500, max_per_drive=500))
    assert res.tail == {"emulation": pytest.approx(q)} and res.eligible == int((scores > q).sum())
    assert len(res.items) == res.eligible and all(i.score > q for i in res.items)
    # the balance no longer fills a stratum with windows below the fleet's typical divergence: rain's (0.5-0.8)
    # and the nominal drives' lower windows are out, though the caps leave room
    assert "rain" not in res.counts("condition") and min(i.score for i in res.items) > np.median(scores)
    off = mine(lake, MiningConfig(pair=PAIR, max_windows=500, max_per_drive=500, tail_quantile=0))
    assert off.tail == {} and off.eligible == len(scores) and off.counts("condition")["rain"] == 6
    assert mine(lake, MiningConfig(pair=PAIR, tail_quantile=0.5, max_windows=500,
                                   max_per_drive=500)).eligible == int((scores > np.median(scores)).sum())
    with pytest.raises(MiningError, match="tail's p75 of its 76 windows"):
        mine(lake, MiningConfig(pair=PAIR, min_score=20, max_windows=500))
    with pytest.raises(ValidationError, match="tail_quantile"):
        MiningConfig(tail_quantile=1.0)


def test_threshold_from_noise_floor_and_min_score(lake):
    res = mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, min_score=1.5, max_windows=500, max_per_drive=500))
    assert res.threshold == 1.5 and all(i.score > 1.5 for i in res.items)
    assert res.counts("condition") == {"glare": 20, "nominal": 20}
    with pytest.raises(MiningError, match="no window"):
        mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, min_score=100))


def test_sql_mining_frames_and_windows(lake):
    res = mine(lake, MiningConfig(sql="SELECT drive_id, seq FROM frames WHERE drive_id = 'n0' AND "
                                      "(seq BETWEEN 60 AND 69 OR seq BETWEEN 71 AND 75 OR seq = 200)"))
    assert [(i.drive_id, i.start_seq, i.end_seq) for i in res.items] == [("n0", 60, 75), ("n0", 200, 200)]
    assert res.items[0].context_start == 51 and res.items[1].context_end == 240
    assert res.items[0].condition == "nominal" and res.items[0].road_type == "highway" and res.rule == "sql"
    res = mine(lake, MiningConfig(sql="SELECT drive_id, window_start_seq, window_end_seq, mean_score AS score "
                                      "FROM scenarios WHERE lighting = 'glare'"))
    assert len(res.items) == 20 and res.counts("condition") == {"glare": 20}


@pytest.mark.parametrize("sql, match", [
    ("DELETE FROM frames", "refused"),
    ("COPY frames TO '/tmp/x.parquet'", "refused"),
    ("SELECT 1 AS x", "must return drive_id and seq"),
    ("SELECT drive_id FROM frames", "must return drive_id and seq"),
    ("SELECT drive_id, 'a' AS seq FROM frames", "seq of the mining query must be non-null integers"),
    ("SELEC drive_id, seq FROM frames", "failed"),
    ("SELECT drive_id, seq FROM no_such_table", "failed"),
    ("SELECT drive_id, seq FROM frames WHERE false", "no rows"),
    ("SELECT 'ghost' AS drive_id, 1 AS seq", "no frames of"),
    ("SELECT drive_id, 5 AS window_start_seq, 1 AS window_end_seq FROM frames", "is not a window"),
])
def test_bad_mining_queries(lake, sql, match):
    with pytest.raises(MiningError, match=match):
        mine(lake, MiningConfig(sql=sql))


def test_bad_mining_requests(lake, tmp_path):
    with pytest.raises(MiningError, match="no scenario windows of pair"):
        mine(lake, MiningConfig(tail_quantile=0, pair="teacher-v1__nobody-v9"))
    with pytest.raises(ValidationError, match="extra"):
        MiningConfig(sqll="SELECT 1")
    with pytest.raises(ValidationError, match="empty"):
        MiningConfig(sql="  ")
    with pytest.raises(ValidationError):
        MiningConfig(noise_quantile=1.5)
    empty = tmp_path / "empty"
    write_frames_lake(empty, pa.Table.from_batches([frames_to_arrow(synthetic_frames(60, agents=2), "d", "v", 0)]))
    with pytest.raises(MiningError, match="run shadow replay first"):
        mine(empty, MiningConfig())


def test_snapshot_of_mined_windows(lake, tmp_path):
    res = mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, max_windows=20, max_per_drive=3))
    snap = create_snapshot(lake, res, DatasetConfig(seed=1), tmp_path, {"pair": PAIR})
    m = snap.manifest
    assert m["rule"]["rule"] == "score" and m["rule"]["threshold"] == res.threshold and m["sources"]["pair"] == PAIR
    drives = m["split"]["drives"]
    assert set(drives["train"]).isdisjoint(drives["test"]) and set(drives["val"]).isdisjoint(drives["test"])
    assert sum(len(v) for v in drives.values()) == len(SKEW)
    mined_counts = m["counts"]["mined_windows"]
    assert sum(v["windows"] for v in mined_counts.values()) == 20 and mined_counts["test"]["windows"] > 0
    t = snap.table()
    role = np.array(t["role"].to_pylist())
    assert (role == "mined").sum() == sum(i.frames for i in res.items)
    assert m["counts"]["frames"]["train"]["ordinary"] > 0
    # same content -> same snapshot, never rewritten; a changed file is refused
    again = create_snapshot(lake, res, DatasetConfig(seed=1), tmp_path)
    assert again.id == snap.id and again.manifest["created_at"] == m["created_at"]
    with open(snap.path / "frames.parquet", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0\1\2")
    with pytest.raises(SnapshotError, match="changed"):
        load_snapshot(snap.path)


def test_split_by_drive_is_stable_and_covers_mined_drives():
    drives = [f"d{i:02d}" for i in range(40)]
    mined = set(drives[:12])
    cfg = DatasetConfig(seed=3)
    a = split_drives(drives, mined, cfg)
    assert a == split_drives(list(reversed(drives)), mined, cfg)
    for group in (mined, set(drives) - mined):
        got = {s: sum(a[d] == s for d in group) for s in ("train", "val", "test")}
        assert got["test"] == round(0.25 * len(group)) and got["val"] == round(0.15 * len(group))
    assert condition_of("glare", "rain") == "glare" and condition_of("day", "rain") == "rain"
    assert condition_of("day", "clear") == "nominal"


def test_flywheel_mine_command(lake, tmp_path):
    from typer.testing import CliRunner

    from flywheel.cli.main import app

    run = CliRunner().invoke
    res = run(app, ["mine", "--by-score", "--pair", PAIR, "--lake", str(lake), "--max-windows", "20",
                    "--max-per-drive", "3", "--tail-quantile", "0", "--snapshots", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "glare" in res.output and "rain" in res.output and "total" in res.output
    snap = load_snapshot(res.output.strip().splitlines()[-1])
    assert snap.manifest["rule"]["windows"] == 20
    res = run(app, ["mine", "--sql", "DROP TABLE frames", "--lake", str(lake)])
    assert res.exit_code == 2 and "refused" in res.output
    res = run(app, ["mine", "--lake", str(lake)])
    assert res.exit_code == 2 and "exactly one of --sql, --file or --by-score" in res.output


# ------------------------------------------------------------------------------------- fleet divergence (onboard)

FLEET_PAIR, COVERED_PAIR, OTHER_PAIR = PAIR, "teacher-v1__student-v1", "teacher-v1__student-v2"
# drive -> (emulation score of its windows, fleet score of their frames or None: no onboard rows, onboard frames per
# window, whether those frames log the pair's student's decision); 2 windows of W frames each, all nominal highway
SHADOW = {"a0": (5.0, 1.0, W, True), "a1": (4.9, 1.1, W, True),   # the emulation ranks them first, the fleet last
          "b0": (1.0, 5.0, W, True), "b1": (1.1, 4.9, W, True),   # and these the other way round
          "c0": (3.0, None, 0, True),                              # no logged decision: the emulation's score
          "p0": (2.0, 9.0, 5, True),                               # 5 logged frames per window: below min_window_frames
          "o0": (2.5, 8.0, W, False)}                              # another deployed model's decisions


@pytest.fixture(scope="module")
def shadow_lake(tmp_path_factory):
    """Scenario windows (emulation scores) and onboard rows (fleet scores) of the drives of SHADOW, for FLEET_PAIR;
    COVERED_PAIR: the a and b drives alone, every window covered; OTHER_PAIR: o0 alone, another model's decisions."""
    from tests.lake_rows import rows

    lake = tmp_path_factory.mktemp("shadow") / "lake"
    frames = []
    for i, d in enumerate(SHADOW):
        f = synthetic_frames(2 * W, agents=2, waypoints=3, seed=i, start_ns=EPOCH_NS + i * 10**12)
        f.cols["lighting"][:], f.cols["weather"][:], f.cols["road_type"][:] = 1, 1, 1
        frames.append(pa.Table.from_batches([frames_to_arrow(f, d, "veh-1", 0)]))
    write_frames_lake(lake, pa.concat_tables(frames), partitions=1)
    for pair, drives in ((FLEET_PAIR, list(SHADOW)), (COVERED_PAIR, ["a0", "a1", "b0", "b1"]), (OTHER_PAIR, ["o0"])):
        scen, onboard = [], []
        for d in drives:
            emu, fleet, logged, own = SHADOW[d]
            for k in range(2):
                lo = k * W
                scen.append({"drive_id": d, "window_start_seq": lo, "window_end_seq": lo + W - 1, "frames": W,
                             "lighting": "day", "weather": "clear", "road_type": "highway",
                             "mean_score": emu - 0.5 * k, "max_score": emu - 0.5 * k + 0.1})
                for j in range(logged if fleet is not None else 0):
                    # a spike at the first frame of b1's second window: the top window by max, not by mean
                    score = 8.0 if (d, k, j) == ("b1", 1, 0) else fleet - 0.5 * k
                    onboard.append({"drive_id": d, "seq": lo + j, "fleet_score": score, "emulation_score": emu,
                                    "parity_checked": own, "decision_model": "student",
                                    "decision_model_version": "v0" if own else "v9", "road_type": "highway",
                                    "lighting": "day", "weather": "clear"})
        _write(lake, "scenarios", pair, rows("scenarios", scen))
        if onboard:
            _write(lake, "onboard", pair, rows("onboard", onboard))
    noise = np.random.default_rng(0).uniform(0, 0.01, 200)
    _write(lake, "noise_floor", "teacher-v1", _table("noise_floor", 200, drive_id=["a0"] * 200,
                                                      seq=np.arange(200), score=noise))
    return lake


def _picked(res) -> list[tuple[str, int, str]]:
    return [(i.drive_id, i.start_seq, i.signal) for i in sorted(res.items, key=lambda i: (-i.score, i.drive_id))]


def test_auto_mines_the_fleet_divergence_where_the_decision_is_logged(shadow_lake):
    cfg = dict(pair=FLEET_PAIR, tail_quantile=0, balance=False, max_per_drive=10)
    fleet = mine(shadow_lake, MiningConfig(signal="fleet", max_windows=4, **cfg))
    emulation = mine(shadow_lake, MiningConfig(signal="emulation", max_windows=4, **cfg))
    # the ranking follows the signal: the fleet's logged decisions put b first, the emulation a
    assert _picked(fleet) == [("b0", 0, "fleet"), ("b1", 0, "fleet"), ("b0", 50, "fleet"), ("b1", 50, "fleet")]
    assert [i.score for i in sorted(fleet.items, key=lambda i: -i.score)] == pytest.approx([5.0, 4.9, 4.5, 4.472])
    assert _picked(emulation) == [("a0", 0, "emulation"), ("a1", 0, "emulation"), ("a0", 50, "emulation"),
                                  ("a1", 50, "emulation")]
    assert fleet.signal == "fleet" and emulation.signal == "emulation" and fleet.config["signal"] == "fleet"
    # fleet: only windows with min_window_frames frames logging the pair's student (not c0, p0, o0)
    assert fleet.eligible == 8 and emulation.eligible == 14
    # auto: the fleet where it covers a window, the emulation elsewhere (c0 unlogged, p0 too few, o0 another model)
    auto = mine(shadow_lake, MiningConfig(max_windows=20, **cfg))
    got = {(i.drive_id, i.start_seq): (i.signal, i.score) for i in auto.items}
    assert auto.signal == "fleet+emulation" and auto.eligible == 14 and auto.counts("signal") == {"emulation": 6,
                                                                                                  "fleet": 8}
    assert got[("a0", 0)] == ("fleet", pytest.approx(1.0)) and got[("b1", 50)] == ("fleet", pytest.approx(4.472))
    assert got[("c0", 0)] == ("emulation", 3.0) and got[("p0", 0)] == ("emulation", 2.0)
    assert got[("o0", 50)] == ("emulation", 2.0)
    # balanced over the strata, the signal one of them: the two signals take turns, never ranked against each other
    balanced = mine(shadow_lake, MiningConfig(tail_quantile=0, pair=FLEET_PAIR, max_windows=4, max_per_drive=10))
    assert balanced.counts("signal") == {"emulation": 2, "fleet": 2}
    assert {(i.drive_id, i.start_seq) for i in balanced.items} == {("b0", 0), ("b1", 0), ("c0", 0), ("c0", 50)}
    # the window statistic applies to the fleet score: b1's second window holds a spike frame
    top = mine(shadow_lake, MiningConfig(signal="fleet", window_statistic="max_score", max_windows=1, **cfg))
    assert _picked(top) == [("b1", 50, "fleet")] and top.items[0].score == 8.0
    # every window covered: auto is the fleet alone
    covered = mine(shadow_lake, MiningConfig(tail_quantile=0, pair=COVERED_PAIR, max_windows=4, balance=False, max_per_drive=10))
    assert covered.signal == "fleet" and {i.drive_id for i in covered.items} == {"b0", "b1"}


def test_fleet_signal_needs_the_students_logged_decisions(lake, shadow_lake):
    # a lake without onboard rows: auto is the emulation, window for window; fleet is refused, saying why
    auto, emulation = (mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, max_windows=20, max_per_drive=3, signal=s))
                       for s in ("auto", "emulation"))
    assert auto.signal == "emulation" and auto.to_dict()["items"] == emulation.to_dict()["items"]
    with pytest.raises(MiningError, match="fleet's divergence: the lake holds no onboard rows of pair"):
        mine(lake, MiningConfig(tail_quantile=0, pair=PAIR, signal="fleet"))
    with pytest.raises(MiningError, match="log decisions of student v9, not of the pair's student"):
        mine(shadow_lake, MiningConfig(tail_quantile=0, pair=OTHER_PAIR, signal="fleet"))
    assert mine(shadow_lake, MiningConfig(tail_quantile=0, pair=OTHER_PAIR)).signal == "emulation"
    with pytest.raises(MiningError, match="judged by the fleet's logged decisions"):
        mine(shadow_lake, MiningConfig(tail_quantile=0, pair=FLEET_PAIR, signal="fleet", min_score=6.0))
    with pytest.raises(ValidationError, match="signal"):
        MiningConfig(signal="logged")


def test_mining_result_records_its_signal(shadow_lake):
    from retrain.cycle.mining import MiningResult
    from retrain.cycle.results import MiningSummary

    res = mine(shadow_lake, MiningConfig(tail_quantile=0, pair=FLEET_PAIR, max_windows=20, max_per_drive=10))
    d = res.to_dict()
    back = MiningResult.from_dict(d)
    assert back.signal == "fleet+emulation" and back.items == res.items and back.to_dict() == d
    # the cycle's summary of it carries the signals
    summary = MiningSummary(**{k: v for k, v in d.items() if k != "items"})
    assert summary.signal == "fleet+emulation" and sum(summary.by_signal.values()) == len(res.items)
    assert set(summary.by_signal) == {"fleet", "emulation"}
    # a record made before the fleet signal: its items name none, it mined by the emulation
    for it in d["items"]:
        del it["signal"]
    del d["config"]["signal"]
    old = MiningResult.from_dict(d)
    assert old.signal == "emulation" and old.counts("signal") == {"": 14}
    sql = mine(shadow_lake, MiningConfig(sql="SELECT drive_id, seq FROM frames WHERE drive_id = 'a0' AND seq < 5"))
    assert sql.signal is None and sql.items[0].signal == ""
