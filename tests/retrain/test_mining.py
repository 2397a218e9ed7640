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
    res = mine(lake, MiningConfig(pair=PAIR, max_windows=20, max_per_drive=3))
    assert len(res.items) == 20 and res.eligible == sum(v[0] for v in SKEW.values())
    per_drive = res.counts("drive_id")
    assert max(per_drive.values()) <= 3 and per_drive["hot"] == 3  # one drive cannot dominate
    # in turns over condition x scenario type: glare runs out at the drive cap (3), rain at its 6 windows,
    # nominal fills the rest
    assert res.counts("condition") == {"glare": 3, "nominal": 11, "rain": 6}
    assert res.threshold == pytest.approx(3.0 * np.quantile(np.random.default_rng(0).uniform(0, 0.01, 200), 0.99),
                                          rel=1e-3)
    unbalanced = mine(lake, MiningConfig(pair=PAIR, max_windows=20, max_per_drive=3, balance=False))
    assert unbalanced.counts("condition") == {"glare": 3, "nominal": 17}  # best first: rain never makes it
    for it in res.items:  # context: 9 frames of history, 40 of horizon, clipped to the drive
        assert it.context_start == max(0, it.start_seq - 9)
        n = SKEW[it.drive_id][0] * W
        assert it.context_end == min(n - 1, it.end_seq + 40)


def test_threshold_from_noise_floor_and_min_score(lake):
    res = mine(lake, MiningConfig(pair=PAIR, min_score=1.5, max_windows=500, max_per_drive=500))
    assert res.threshold == 1.5 and all(i.score > 1.5 for i in res.items)
    assert res.counts("condition") == {"glare": 20, "nominal": 20}
    with pytest.raises(MiningError, match="no window"):
        mine(lake, MiningConfig(pair=PAIR, min_score=100))


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
        mine(lake, MiningConfig(pair="teacher-v1__nobody-v9"))
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
    res = mine(lake, MiningConfig(pair=PAIR, max_windows=20, max_per_drive=3))
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
                    "--max-per-drive", "3", "--snapshots", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "glare" in res.output and "rain" in res.output and "total" in res.output
    snap = load_snapshot(res.output.strip().splitlines()[-1])
    assert snap.manifest["rule"]["windows"] == 20
    res = run(app, ["mine", "--sql", "DROP TABLE frames", "--lake", str(lake)])
    assert res.exit_code == 2 and "refused" in res.output
    res = run(app, ["mine", "--lake", str(lake)])
    assert res.exit_code == 2 and "exactly one of --sql, --file or --by-score" in res.output
