"""Importers of ROS 2 MCAP, Waymo TFRecord, Argoverse 2, nuPlan and the project's MCAP: round trips on files the test
writes in each published layout (several agents, missing observations, invalid states), and hostile inputs (a
truncated file, a wrong CRC, a bad record, impossible values): a clear error naming file and record, nothing of
the file written."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flywheel.cli.main import app
from ingest.importers import samples
from ingest.contract import frames_to_arrow
from ingest.importers import waymo
from ingest.importers.common import (ImportFailed, ImportOptions, ImportReport, PlanObs, SourceDrive, convert_file,
                                     plans_on_grid, with_source_tag)
from ingest.importers.mcap import export_mcap
from ingest.importers.ros2_samples import write_ros2
from ingest.importers.run import TABLE_GROUP, drive_tables, import_sources
from ingest.lake import DriveBatch, list_drive_files, read_drive, write_drive
from ingest.synth import synthetic_drive, synthetic_frames

SC = samples.scene(steps=91, agents=8, seed=1, missing=0.1)


def _write(fmt: str, root: Path, sc: samples.Scene = SC, name: str = "one") -> Path:
    if fmt == "waymo":
        return samples.write_waymo(root / f"{name}.tfrecord-00000-of-00001", [(f"{name}-a", sc),
                                                                                (f"{name}-b", samples.scene(seed=5))])
    if fmt == "av2":
        return samples.write_av2(root, sc, name)
    if fmt == "nuplan":
        return samples.write_nuplan(root / f"{name}.db", sc, f"2021.08.26.{name}")
    return write_ros2(root / f"{name}.mcap", sc)


def _first(report) -> tuple:
    d = read_drive(Path(report.drives[0].path))
    return d, d.frames.cols


@pytest.mark.parametrize("fmt", ["ros2", "waymo", "av2", "nuplan"])
def test_round_trip_resampled_onto_the_contract(tmp_path, fmt):
    src = _write(fmt, tmp_path / "src")
    report = import_sources(fmt, [src], tmp_path / "drives")
    drive, c = _first(report)
    n = drive.frames.num_frames
    assert n == 91 and report.frames == n * (2 if fmt == "waymo" else 1)
    # the ego where the scene put it, every 100 ms
    np.testing.assert_allclose(c["ego_x"], SC.ego["x"], atol=1e-6)
    np.testing.assert_allclose(c["ego_y"], SC.ego["y"], atol=1e-6)
    np.testing.assert_allclose(c["ego_speed"], SC.ego["speed"], rtol=1e-5)
    np.testing.assert_array_equal(np.diff(c["timestamp_ns"]), 100_000_000)
    # several agents; an observation missing once is interpolated across, where it is missing longer it is absent
    valid = SC.agents["valid"]
    bridged = _bridged(valid, max_gap_steps=3)  # ImportOptions.max_agent_gap_s 0.35 s at 10 Hz
    np.testing.assert_array_equal(c["agent_count"], bridged.sum(axis=0))
    scenes = [SC, samples.scene(seed=5)] if fmt == "waymo" else [SC]  # _write puts two scenarios into a TFRecord
    assert report.dropped["agent_missing"] == sum(int((~_bridged(s.agents["valid"], 3)).sum())
                                                  - _outside_first_last(s.agents["valid"]) for s in scenes)
    classes = set(np.unique(SC.agents["cls"]).tolist())
    if fmt in ("waymo", "nuplan"):  # these datasets have one vehicle type: trucks come back as cars
        classes = {1 if k == 2 else k for k in classes}
    assert set(np.unique(c["agent_class"]).tolist()) == classes
    # unknowns where the source has nothing; every frame says where it came from
    assert (c["ego_lane"] == -1).all() and (c["lighting"] == 0).all() and (c["road_type"] == 0).all()
    assert list(c["tag"]) == [f"source:{fmt}"] * n
    if fmt == "ros2":  # the Autoware trajectory became the on-board plan, in the ego frame
        assert c["plan_count"][0] == 8 and drive.frames.plan_dt_s == 0.5
        np.testing.assert_allclose(c["plan_x"][0], SC.ego["speed"][:6].mean() * 0.5, rtol=0.05)
        assert abs(c["plan_y"][0]) < 0.2
    else:
        assert (c["plan_count"] == 0).all()
    if fmt == "waymo":  # padding states (valid false) are reported as invalid
        assert report.dropped["agent_invalid_state"] > 0


def _bridged(valid: np.ndarray, max_gap_steps: int) -> np.ndarray:
    """Where an agent is in a frame: observed there, or between two observations at most max_gap_steps apart."""
    out = valid.copy()
    for a, row in enumerate(valid):
        idx = np.flatnonzero(row)
        for p, q in zip(idx[:-1], idx[1:]):
            if q - p <= max_gap_steps:
                out[a, p:q] = True
    return out


def _outside_first_last(valid: np.ndarray) -> int:
    """Missing steps of each agent before its first or after its last observation (not counted as missing)."""
    out = 0
    for row in valid:
        idx = np.flatnonzero(row)
        out += idx[0] + (row.shape[0] - 1 - idx[-1]) if idx.size else row.shape[0]
    return int(out)


def test_ros2_predicted_objects_and_configured_topics(tmp_path):
    topics = {"odometry": "/odom", "objects": "/objs", "trajectory": "/plan"}
    src = write_ros2(tmp_path / "p.mcap", SC, objects="predicted", trajectory=False, topics=topics)
    with pytest.raises(ImportFailed, match="no nav_msgs/msg/Odometry"):
        import_sources("ros2", [src], tmp_path / "drives")
    wrong = ImportOptions(odometry_topic="/objs", objects_topic="/odom", trajectory_topic="/plan")
    with pytest.raises(ImportFailed, match=r"p.mcap: message 0 on /odom at log time \d+: schema "
                                           r"'nav_msgs/msg/Odometry', expected one of"):
        import_sources("ros2", [src], tmp_path / "drives", wrong)
    opts = ImportOptions(odometry_topic="/odom", objects_topic="/objs", trajectory_topic="/plan", vehicle_id="car-7")
    _, c = _first(import_sources("ros2", [src], tmp_path / "drives", opts))
    assert c["agent_count"].sum() > 0 and (c["plan_count"] == 0).all()
    assert read_drive(list_drive_files(tmp_path / "drives")[0]).vehicle_id == "car-7"


def test_too_many_agents_keeps_the_nearest(tmp_path):
    sc = samples.scene(steps=30, agents=80, seed=3, missing=0.0)
    report = import_sources("av2", [samples.write_av2(tmp_path / "src", sc, "crowd")], tmp_path / "drives")
    _, c = _first(report)
    assert c["agent_count"].max() == 64 and report.dropped["agents_over_limit"] == 16 * 30


def test_invalid_states_are_dropped_and_counted(tmp_path):
    sc = samples.scene(steps=40, agents=4, seed=2, missing=0.0)
    sc.agents["vx"][1, 10] = np.nan          # not finite
    sc.agents["x"][2, 20] = 5e7               # outside the contract's range
    db = samples.write_nuplan(tmp_path / "l.db", sc, "log-x")
    report = import_sources("nuplan", [db], tmp_path / "drives")
    assert report.dropped["agent_invalid_state"] == 2
    _, c = _first(report)
    assert np.isfinite(c["agent_vx"]).all() and np.abs(c["agent_x"]).max() < 1e7


def test_waymo_truncated_and_wrong_crc(tmp_path):
    path = _write("waymo", tmp_path / "src")
    data = path.read_bytes()
    first_len = int.from_bytes(data[:8], "little") + 16
    (tmp_path / "cut.tfrecord").write_bytes(data[:-100])
    with pytest.raises(ImportFailed, match=r"cut.tfrecord: record 1 at byte \d+: truncated"):
        import_sources("waymo", [tmp_path / "cut.tfrecord"], tmp_path / "drives")
    bad = bytearray(data)
    bad[first_len + 40] ^= 0xFF  # a byte of the second record's data
    (tmp_path / "crc.tfrecord").write_bytes(bytes(bad))
    with pytest.raises(ImportFailed, match="record 1 at byte .*: wrong data CRC"):
        import_sources("waymo", [tmp_path / "crc.tfrecord"], tmp_path / "drives")
    bad = bytearray(data)
    bad[3] ^= 0x01  # the first record's length
    (tmp_path / "len.tfrecord").write_bytes(bytes(bad))
    with pytest.raises(ImportFailed, match="record 0 at byte 0: wrong length CRC"):
        import_sources("waymo", [tmp_path / "len.tfrecord"], tmp_path / "drives")
    # record 0 was fine in every case, but nothing of a failed file is written
    assert list_drive_files(tmp_path / "drives") == []


def test_waymo_record_that_is_not_a_scenario(tmp_path):
    good = samples.waymo_scenario_bytes(SC, "ok")
    (tmp_path / "x.tfrecord").write_bytes(samples.tfrecord(good) + samples.tfrecord(b"\x0a\xff\xff"))
    with pytest.raises(ImportFailed, match="record 1 at byte .*not a Scenario"):
        import_sources("waymo", [tmp_path / "x.tfrecord"], tmp_path / "drives")
    assert list_drive_files(tmp_path / "drives") == []
    sc = samples.scene(steps=20, agents=2, seed=4)
    sc.ego["speed"][5] = 300.0  # an impossible ego state: dropped, counted, and the frame interpolated across it
    report = import_sources("waymo", [samples.write_waymo(tmp_path / "y.tfrecord", [("fast", sc)])],
                            tmp_path / "drives")
    assert report.dropped["ego_invalid_state"] == 1 and report.frames == 20
    assert _first(report)[1]["ego_speed"].max() < 20


def test_values_the_contract_refuses_name_file_and_record(tmp_path):
    path = samples.write_av2(tmp_path / "src", SC, "secs", start_ns=1_650_000_000)  # seconds, not nanoseconds
    with pytest.raises(ImportFailed, match=r"scenario_secs.parquet: scenario secs: out_of_range: timestamp_ns"):
        import_sources("av2", [path], tmp_path / "drives")
    assert list_drive_files(tmp_path / "drives") == []


@pytest.mark.parametrize("fmt", ["ros2", "mcap"])
def test_mcap_truncated_and_wrong_crc(tmp_path, fmt):
    if fmt == "ros2":
        path = _write("ros2", tmp_path / "src")
    else:
        d = write_drive(tmp_path / "sim", synthetic_drive("drive-1", "veh-1", 50, agents=4))
        path = export_mcap([d], tmp_path / "src.mcap")
    data = path.read_bytes()
    (tmp_path / "cut.mcap").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportFailed, match="cut.mcap: .*unreadable MCAP"):
        import_sources(fmt, [tmp_path / "cut.mcap"], tmp_path / "drives")
    bad = bytearray(data)
    bad[len(data) // 3] ^= 0xFF  # inside the compressed chunk: its CRC no longer matches
    (tmp_path / "crc.mcap").write_bytes(bytes(bad))
    with pytest.raises(ImportFailed, match="crc.mcap: .*unreadable MCAP"):
        import_sources(fmt, [tmp_path / "crc.mcap"], tmp_path / "drives")
    assert list_drive_files(tmp_path / "drives") == []


def test_own_mcap_keeps_frames_and_adds_the_source(tmp_path):
    d = write_drive(tmp_path / "sim", synthetic_drive("drive-1", "veh-1", 50, agents=4))
    report = import_sources("mcap", [export_mcap([d], tmp_path / "f.mcap")], tmp_path / "drives")
    a, (b, c) = read_drive(d), _first(report)
    for name in ("ego_x", "agent_x", "plan_x", "maneuver"):
        np.testing.assert_array_equal(a.frames.cols[name], b.frames.cols[name])
    assert all(t.startswith("source:") for t in c["tag"]) and "source:mcap" in set(c["tag"])


def test_av2_and_nuplan_truncated_or_wrong_layout(tmp_path):
    path = _write("av2", tmp_path / "src")
    cut = tmp_path / "cut" / "scenario_cut.parquet"
    cut.parent.mkdir()
    cut.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImportFailed, match="scenario_cut.parquet: the file: not a readable Parquet"):
        import_sources("av2", [cut], tmp_path / "drives")
    t = pq.read_table(path).drop_columns(["heading"])
    pq.write_table(t, tmp_path / "scenario_nohead.parquet")
    with pytest.raises(ImportFailed, match=r"missing AV2 columns \['heading'\]"):
        import_sources("av2", [tmp_path / "scenario_nohead.parquet"], tmp_path / "drives")
    db = _write("nuplan", tmp_path / "src")
    (tmp_path / "cut.db").write_bytes(db.read_bytes()[:3000])
    with pytest.raises(ImportFailed, match="cut.db: .*not a nuPlan log database"):
        import_sources("nuplan", [tmp_path / "cut.db"], tmp_path / "drives")
    con = sqlite3.connect(db)
    con.execute("DROP TABLE lidar_box")
    con.commit()
    con.close()
    with pytest.raises(ImportFailed, match="tables lidar_box.*no such table: lidar_box"):
        import_sources("nuplan", [db], tmp_path / "drives")
    assert list_drive_files(tmp_path / "drives") == []


def test_cli_import_reports_and_fails_clearly(tmp_path):
    runner = CliRunner()
    src = _write("waymo", tmp_path / "src")
    res = runner.invoke(app, ["import", "--format", "waymo", str(tmp_path / "src"), "--out", str(tmp_path / "d"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert '"frames": 182' in res.stdout and '"agent_invalid_state"' in res.stdout
    (tmp_path / "bad.tfrecord").write_bytes(src.read_bytes()[:-5])
    res = runner.invoke(app, ["import", "--format", "waymo", str(tmp_path / "bad.tfrecord"), "--out",
                              str(tmp_path / "d2")])
    assert res.exit_code == 1 and "truncated" in res.output
    res = runner.invoke(app, ["import", "--format", "kitti", str(src)])
    assert res.exit_code != 0 and "--format must be one of" in res.output


def _plans_one_by_one(plan, grid, ex, ey, psi, opts):
    """The on-board plans frame by frame with np.interp: the reference the vectorised `plans_on_grid` must match."""
    n = grid.shape[0]
    which = np.searchsorted(plan.t_ns, grid, side="right") - 1
    counts, xs, ys = np.zeros(n, np.uint32), [np.zeros(0)], [np.zeros(0)]
    k = np.arange(1, opts.plan_waypoints + 1) * opts.plan_dt_s
    for i in range(n):
        m = which[i]
        if m < 0 or grid[i] - plan.t_ns[m] > 1e9:
            continue
        s, e = plan.off[m], plan.off[m + 1]
        tfs = plan.tfs_s[s:e]
        if tfs.size < 2 or np.any(np.diff(tfs) <= 0):
            continue
        want = k + (grid[i] - plan.t_ns[m]) * 1e-9
        want = want[want <= tfs[-1]]
        px = np.interp(want, tfs, plan.x[s:e]) - ex[i]
        py = np.interp(want, tfs, plan.y[s:e]) - ey[i]
        c, sn = np.cos(psi[i]), np.sin(psi[i])
        xs.append(c * px + sn * py)
        ys.append(-sn * px + c * py)
        counts[i] = want.shape[0]
    return counts, np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)


def test_plans_on_grid_equals_interpolating_frame_by_frame():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lens = rng.integers(0, 12, rng.integers(1, 30))
        tfs = np.concatenate([np.sort(rng.uniform(-0.5, 5, n)) if rng.random() > 0.1 else rng.uniform(0, 5, n)
                              for n in lens])
        if rng.random() < 0.2 and tfs.size > 3:
            tfs[rng.integers(0, tfs.size)] = tfs[0]  # a repeated waypoint time: that plan is not used
        x, y = rng.normal(0, 50, tfs.size), rng.normal(0, 50, tfs.size)
        if rng.random() < 0.2 and x.size:
            x[rng.integers(0, x.size)] = np.inf  # numpy's NaN fallbacks in np.interp, reproduced
        plan = PlanObs(np.sort(rng.integers(0, 20_000_000_000, lens.size)),
                       np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), tfs, x, y)
        grid = np.arange(0, 22_000_000_000, 100_000_000)
        ex, ey, psi = rng.normal(0, 10, grid.size), rng.normal(0, 10, grid.size), rng.uniform(-3, 3, grid.size)
        opts = ImportOptions(plan_waypoints=int(rng.integers(1, 12)), plan_dt_s=float(rng.choice([0.1, 0.5, 1.0])))
        with np.errstate(invalid="ignore"):
            expect = _plans_one_by_one(plan, grid, ex, ey, psi, opts)
        for got, want in zip(plans_on_grid(plan, grid, ex, ey, psi, opts), expect):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_drive_tables_equal_converting_each_drive(tmp_path):
    scenes = [(f"s{i}", samples.scene(steps=20 + i, agents=3 + i, seed=i)) for i in range(3)]
    path = samples.write_waymo(tmp_path / "w.tfrecord", scenes)
    opts = ImportOptions(plan_dt_s=0.25)
    converted = convert_file(path, "waymo", waymo.read(path, opts), opts, ImportReport("waymo"))
    synth = synthetic_frames(30, agents=2)
    synth.cols["decision_model"] = np.full(30, "m", dtype=object)  # a deployed model on the frames of one drive
    synth.cols["decision_model_version"] = np.full(30, "1", dtype=object)
    converted.append((SourceDrive("r", "drive-9", "veh-9", frames=synth), synth))
    tables = drive_tables(converted)
    assert len(tables) == 4
    for (src, frames), table in zip(converted, tables):
        expect = pa.Table.from_batches([frames_to_arrow(frames, src.drive_id, src.vehicle_id, 0)])
        assert table.schema == expect.schema and table.equals(expect), src.drive_id


def test_drive_batch_is_invisible_until_commit_and_writes_what_write_drive_writes(tmp_path):
    tables = [synthetic_drive(f"drive-{i}", f"veh-{i % 2}", 20 + i, agents=2) for i in range(5)]
    batch = DriveBatch()
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda t: batch.write(tmp_path / "b", t), tables))
    assert list_drive_files(tmp_path / "b") == [] and len(list((tmp_path / "b").rglob(".*.tmp"))) == 5
    DriveBatch.commit_all([batch])
    assert sorted(paths) == list_drive_files(tmp_path / "b") and not list((tmp_path / "b").rglob(".*.tmp"))
    for t, p in zip(tables, paths):
        assert p.read_bytes() == write_drive(tmp_path / "w", t).read_bytes()
    aborted = DriveBatch()
    aborted.write(tmp_path / "c", tables[0])
    aborted.abort()
    assert not list((tmp_path / "c").rglob("*.parquet*")) and not list((tmp_path / "c").rglob(".*"))


def test_a_bad_file_after_good_ones_leaves_the_good_ones_whole(tmp_path):
    good = _write("av2", tmp_path / "src", name="good")
    bad = tmp_path / "src2" / "scenario_bad.parquet"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ImportFailed, match="scenario_bad.parquet"):
        import_sources("av2", [good, bad], tmp_path / "drives")
    assert [p.name for p in list_drive_files(tmp_path / "drives")] == ["av2-good.drive.parquet"]
    assert not list((tmp_path / "drives").rglob(".*.tmp"))


def test_nuplan_nulls_are_invalid_states(tmp_path):
    db = samples.write_nuplan(tmp_path / "n.db", samples.scene(steps=30, agents=3, seed=4, missing=0.0), "log-n")
    con = sqlite3.connect(db)
    con.execute("UPDATE lidar_box SET vx = NULL WHERE rowid = (SELECT min(rowid) FROM lidar_box)")
    con.execute("UPDATE ego_pose SET x = NULL WHERE rowid = (SELECT min(rowid) + 7 FROM ego_pose)")
    con.commit()
    con.close()
    report = import_sources("nuplan", [db], tmp_path / "drives")
    assert report.dropped["agent_invalid_state"] == 1 and report.dropped["ego_invalid_state"] == 1


def test_nuplan_column_types_from_every_row(tmp_path):
    # more rows than the SQLite driver's default batch (1024), which it would infer the column types from
    sc = samples.scene(steps=300, agents=5, seed=6, missing=0.0)
    plain = samples.write_nuplan(tmp_path / "plain.db", sc, "log-t")
    want = import_sources("nuplan", [plain], tmp_path / "want")
    db = samples.write_nuplan(tmp_path / "src" / "t.db", sc, "log-t")
    con = sqlite3.connect(db)
    # integers in the first rows, reals after (the values the same): ego_pose's columns without a declared type
    cols = [r[1] for r in con.execute("PRAGMA table_info(ego_pose)")]
    con.execute("ALTER TABLE ego_pose RENAME TO e0")
    con.execute(f"CREATE TABLE ego_pose ({', '.join(cols)})")
    kinds = {"timestamp": "CASE WHEN rowid > 1100 THEN CAST(timestamp AS REAL) ELSE timestamp END",
             "qx": "CASE WHEN rowid > 1100 THEN qx ELSE CAST(qx AS INTEGER) END"}
    con.execute(f"INSERT INTO ego_pose SELECT {', '.join(kinds.get(c, c) for c in cols)} FROM e0")
    con.execute("DROP TABLE e0")
    # NULL in the first 1100 boxes, numbers after
    con.execute("UPDATE lidar_box SET vx = NULL WHERE rowid <= 1100")
    con.commit()
    con.close()
    assert sqlite3.connect(db).execute("SELECT typeof(timestamp), typeof(qx) FROM ego_pose WHERE rowid IN (1, 1200) "
                                       "ORDER BY rowid").fetchall() == [("integer", "integer"), ("real", "real")]
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    report = import_sources("nuplan", [db], tmp_path / "drives")
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before and [p.name for p in db.parent.iterdir()] == ["t.db"]
    assert report.dropped["agent_invalid_state"] == 1100
    got, w = _first(report)[1], _first(want)[1]
    for k in ("timestamp_ns", "ego_x", "ego_y", "ego_heading", "ego_speed"):
        np.testing.assert_array_equal(got[k], w[k])


def test_nuplan_box_of_a_track_without_category_is_left_out(tmp_path):
    db = _write("nuplan", tmp_path / "src")
    _, whole = _first(import_sources("nuplan", [db], tmp_path / "whole"))
    con = sqlite3.connect(db)
    con.execute("DELETE FROM category WHERE name = 'bicycle'")
    con.commit()
    con.close()
    _, c = _first(import_sources("nuplan", [db], tmp_path / "drives"))
    bicycle = whole["agent_class"] == 4
    assert bicycle.any() and not (c["agent_class"] == 4).any()
    np.testing.assert_array_equal(c["agent_x"], whole["agent_x"][~bicycle])


def test_nuplan_text_where_a_number_belongs(tmp_path):
    sc = samples.scene(steps=300, agents=5, seed=6, missing=0.0)
    for table, column, where in (("lidar_box", "yaw", "tables lidar_box, lidar_pc, track"),
                                 ("ego_pose", "x", "table ego_pose")):
        db = samples.write_nuplan(tmp_path / f"{table}.db", sc, "log-t")
        con = sqlite3.connect(db)
        con.execute(f"UPDATE {table} SET {column} = 'north' WHERE rowid = 1400")  # past the driver's default batch
        con.commit()
        con.close()
        with pytest.raises(ImportFailed, match=f"{table}.db: {where}: column {table}.{column} holds text "
                                               r"\('north'\), not a number"):
            import_sources("nuplan", [db], tmp_path / "drives")
    assert list_drive_files(tmp_path / "drives") == []


def test_a_bad_record_late_in_a_file_removes_what_its_file_had_written(tmp_path):
    good = [(f"g{i}", samples.scene(steps=12, agents=1, seed=i)) for i in range(TABLE_GROUP + 4)]
    bad = samples.scene(steps=12, agents=1, seed=99)
    bad.ego["speed"][:] = 500.0  # every ego state impossible: no frame
    first = _write("av2", tmp_path / "src", name="first")
    path = samples.write_waymo(tmp_path / "w.tfrecord", good + [("bad", bad)])
    import_sources("av2", [first], tmp_path / "drives")
    with pytest.raises(ImportFailed, match="scenario bad"):
        import_sources("waymo", [path], tmp_path / "drives")
    # the drives of the bad file's first records were being written when it failed: none is left, not even hidden
    assert [p.name for p in list_drive_files(tmp_path / "drives")] == ["av2-first.drive.parquet"]
    assert not [p for p in (tmp_path / "drives").rglob("*") if p.name.startswith(".")]


def test_with_source_tag_adds_the_tag_where_a_frame_has_none():
    rng = np.random.default_rng(0)
    pool = ["a", "source:fleet", "b", "source", "x-source:y"]
    for _ in range(100):
        n = int(rng.integers(2, 12))
        counts = rng.integers(0, 4, n).astype(np.uint32)
        tags = np.array([pool[int(k)] for k in rng.integers(0, len(pool), int(counts.sum()))], dtype=object)
        frames = synthetic_frames(n, agents=1)
        frames.cols["tag_count"], frames.cols["tag"] = counts, tags
        got = with_source_tag(frames, "mcap")
        want_counts, want_tags, at = [], [], 0
        for k in counts.tolist():  # the rule frame by frame
            mine = list(tags[at:at + k])
            at += k
            if not any(t.startswith("source:") for t in mine):
                mine.append("source:mcap")
            want_counts.append(len(mine))
            want_tags += mine
        assert got.cols["tag_count"].dtype == np.uint32 and got.cols["tag_count"].tolist() == want_counts
        assert got.cols["tag"].dtype == object and got.cols["tag"].tolist() == want_tags
