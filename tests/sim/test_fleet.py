"""The reference fleet on the real highway-env simulator, with tiny drives (a few seconds each)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from highway_env.vehicle.behavior import IDMVehicle
from pydantic import ValidationError

from ingest.contract import ENUMS, arrow_to_frames, validate
from sim.config import (CONDITIONS, SCENARIOS, ConditionRates, FleetConfig, PerceptionConditions, PerceptionParams,
                        ScenarioMix)
from sim.env import make_env, step_env
from sim.truth import read_truth, truth_path
from sim.fleet import simulate_drive, simulate_fleet
from ingest.lake import list_drive_files, read_drive


def only(scenario: str, **kw) -> FleetConfig:
    """A config whose drives are all of one scenario type."""
    mix = ScenarioMix(**{s: float(s == scenario) for s in SCENARIOS})
    return FleetConfig(scenario_mix=mix, **kw)


def name_of(enum: str, codes: np.ndarray) -> list[str]:
    return [ENUMS[enum][1][c] for c in codes]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_yields_valid_contiguous_frames(scenario):
    cfg = only(scenario, drive_duration_s=6.0)
    drive, truth = simulate_drive(cfg, 0, 0)
    frames = arrow_to_frames(drive)
    validate(frames)
    n = frames.num_frames
    assert n == 60
    assert drive["seq"].to_pylist() == list(range(n))
    assert set(name_of("road_type", frames.cols["road_type"])) == {scenario}
    assert set(drive["drive_id"].to_pylist()) == {f"drive-0000-0000-{scenario}-s0"}
    assert set(drive["vehicle_id"].to_pylist()) == {"veh-0000"}
    assert np.all(np.diff(frames.cols["timestamp_ns"]) == 100_000_000)
    assert frames.plan_dt_s == 0.5 and frames.cols["plan_count"].max() == 8
    assert frames.cols["agent_count"].max() <= 64 and frames.cols["agent_count"].sum() > 0
    assert frames.cols["ego_speed"].min() >= 0 and frames.cols["ego_speed"].max() > 1
    assert truth.num_rows == n and truth["seq"].to_pylist() == list(range(n))
    meta = truth.schema.metadata
    assert meta[b"flywheel.format"] == b"truth" and meta[b"flywheel.format_version"] == b"1"
    assert json.loads(meta[b"flywheel.drive_stats"])["scenario"] == scenario


def test_ego_path_is_continuous_across_scenes():
    # roundabout scenes last ~20 s, so a 40 s drive chains several; the ego must not jump between them
    drive, truth = simulate_drive(only("roundabout", drive_duration_s=40.0), 0, 1)
    c = arrow_to_frames(drive).cols
    assert truth["scene"].to_numpy().max() >= 1
    step = np.hypot(np.diff(c["ego_x"]), np.diff(c["ego_y"]))
    assert np.all(step <= 0.1 * np.maximum(c["ego_speed"][:-1], c["ego_speed"][1:]) + 0.2)


def test_same_seed_same_tables_other_seed_other_tables():
    cfg = only("highway", drive_duration_s=5.0, seed=7)
    a = simulate_drive(cfg, 1, 2)
    b = simulate_drive(cfg, 1, 2)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    other = simulate_drive(cfg.model_copy(update={"seed": 8}), 1, 2)[0]
    assert not np.array_equal(a[0]["ego_x"].to_numpy(), other["ego_x"].to_numpy())
    assert a[0]["drive_id"][0].as_py() != other["drive_id"][0].as_py()


def test_fleet_is_cached_and_identical_across_worker_counts(tmp_path):
    cfg = FleetConfig(vehicles=2, drives_per_vehicle=2, drive_duration_s=3.0, workers=2)
    seen = []
    first = simulate_fleet(cfg, tmp_path / "a", progress=lambda done, total: seen.append((done, total)))
    assert (first.drives, first.simulated, first.cached, first.frames) == (4, 4, 0, 120)
    assert seen[-1] == (4, 4) and sum(first.drives_by_scenario.values()) == 4
    assert sum(first.frames_by_condition.values()) == 120
    files = list_drive_files(tmp_path / "a")
    assert len(files) == 4 and all(truth_path(f).exists() for f in files)
    for f in files:
        read_drive(f)  # the lake's reader accepts what the fleet wrote
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    again = simulate_fleet(cfg.model_copy(update={"workers": 1}), tmp_path / "a")
    assert (again.simulated, again.cached, again.frames) == (0, 4, 120)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes

    truth_path(files[0]).unlink()  # a drive without its truth is simulated again
    grown = simulate_fleet(cfg.model_copy(update={"vehicles": 3, "workers": 1}), tmp_path / "a")
    assert (grown.simulated, grown.cached) == (3, 3)
    manifest = json.loads((tmp_path / "a" / "fleet.json").read_text())
    assert len(manifest["drives"]) == 6 and manifest["config_hash"] == cfg.drive_hash()

    # a pool of two processes writes exactly what one process writes
    single = simulate_fleet(cfg.model_copy(update={"workers": 1}), tmp_path / "b")
    assert single.simulated == 4
    for f in files:
        twin = tmp_path / "b" / f.relative_to(tmp_path / "a")
        assert pq.read_table(twin).equals(pq.read_table(f))
        assert read_truth(truth_path(twin)).equals(read_truth(truth_path(f)))

    # a setting that shapes the drives invalidates them
    changed = cfg.model_copy(update={"condition_rates": ConditionRates(night=0.5, rain=0.1, glare=0.1), "workers": 1})
    assert simulate_fleet(changed, tmp_path / "a").simulated == 4


def _match(drive, truth):
    """Pair every reported agent with the true agent of the same id at the reported (source) frame.

    Returns (reported agents as dict of arrays with their frame, truth rows at the source frame with their frame,
    and per true candidate whether it was reported), plus the false positives' frame count.
    """
    c = arrow_to_frames(drive).cols
    n = drive.num_rows
    ego = np.stack([truth["ego_x"].to_numpy(), truth["ego_y"].to_numpy()], 1)
    src = truth["source_seq"].to_numpy()
    true_agents = truth["agents"].to_pylist()
    fps = truth["false_positive_ids"].to_pylist()
    off = np.concatenate([[0], np.cumsum(c["agent_count"])]).astype(int)
    errors, dists, detected, fp_count, fp_conf, tp_conf, stale_err = [], [], [], 0, [], [], []
    for i in range(n):
        reported = {int(c["agent_id"][k]): k for k in range(off[i], off[i + 1])}
        fp = set(fps[i])
        fp_count += len(fp)
        fp_conf += [c["agent_confidence"][reported[a]] for a in fp]
        for a in true_agents[src[i]]:
            d = float(np.hypot(a["x"] - ego[src[i], 0], a["y"] - ego[src[i], 1]))
            dists.append(d)
            k = reported.get(a["id"])
            detected.append(k is not None)
            if k is not None:
                errors.append((c["agent_x"][k] - a["x"], c["agent_y"][k] - a["y"]))
                tp_conf.append(c["agent_confidence"][k])
                now = {b["id"]: b for b in true_agents[i]}
                if a["id"] in now and src[i] != i:
                    stale_err.append(np.hypot(c["agent_x"][k] - now[a["id"]]["x"], c["agent_y"][k] - now[a["id"]]["y"]))
        assert set(reported) - {a["id"] for a in true_agents[src[i]]} == fp  # every other report is spurious
    return (np.array(errors), np.array(dists), np.array(detected), fp_count / n, np.array(fp_conf),
            np.array(tp_conf), np.array(stale_err))


def test_perception_degrades_as_configured_at_night():
    night = PerceptionParams(position_noise_std_m=0.5, velocity_noise_std_mps=0.5, heading_noise_std_rad=0.05,
                             drop_prob=0.2, latency_frames=2, max_range_m=60.0, false_positive_rate=1.0,
                             confidence_scale=0.6)
    cfg = only("highway", drive_duration_s=20.0, condition_rates=ConditionRates.only("night"),
               perception=PerceptionConditions(night=night))
    drive, truth = simulate_drive(cfg, 0, 3)
    c = arrow_to_frames(drive).cols
    assert set(name_of("lighting", c["lighting"])) == {"night"} and set(truth["condition"].to_pylist()) == {"night"}
    src = truth["source_seq"].to_numpy()
    assert np.all(src[2:] == np.arange(2, drive.num_rows) - 2)  # two frames stale (the scene starts at frame 0)

    errors, dists, detected, fp_rate, fp_conf, tp_conf, stale = _match(drive, truth)
    in_range = dists <= night.max_range_m
    assert in_range.sum() > 300 and (~in_range).sum() > 100  # enough agents on both sides of the range cut
    assert not detected[~in_range].any()  # nothing reported beyond range
    assert abs(detected[in_range].mean() - (1 - night.drop_prob)) < 0.05
    assert np.all(np.abs(errors.std(0) - night.position_noise_std_m) < 0.08)
    assert np.all(np.abs(errors.mean(0)) < 0.1)
    assert abs(fp_rate - night.false_positive_rate) < 0.3
    assert fp_conf.max() <= 0.4 * night.confidence_scale + 1e-6 and tp_conf.max() <= night.confidence_scale + 1e-6
    # stale tracks: reported positions are where the agent was two frames ago, metres from where it is now
    assert np.median(stale) > 2 * np.median(np.hypot(*errors.T))


def test_nominal_perception_is_nearly_exact():
    cfg = only("highway", drive_duration_s=10.0, condition_rates=ConditionRates.only("nominal"))
    drive, truth = simulate_drive(cfg, 0, 3)
    assert np.array_equal(truth["source_seq"].to_numpy(), np.arange(drive.num_rows))
    errors, dists, detected, fp_rate, *_ = _match(drive, truth)
    nominal = cfg.perception.nominal
    assert np.all(errors.std(0) < 0.25)
    assert detected[dists <= nominal.max_range_m].mean() > 0.95
    assert fp_rate < 0.1


def test_condition_columns_and_tags():
    glare = simulate_drive(only("merge", drive_duration_s=3.0, condition_rates=ConditionRates.only("glare")), 0, 0)[0]
    c = arrow_to_frames(glare).cols
    assert set(name_of("lighting", c["lighting"])) == {"glare"} and set(name_of("weather", c["weather"])) == {"clear"}
    assert set(c["tag"]) == {"tunnel_exit"} and np.all(c["tag_count"] == 1)
    rain = arrow_to_frames(simulate_drive(only("merge", drive_duration_s=3.0,
                                                 condition_rates=ConditionRates.only("rain")), 0, 0)[0]).cols
    assert set(name_of("weather", rain["weather"])) == {"rain"} and set(name_of("lighting", rain["lighting"])) == {"day"}
    # at the default long-tail rates, conditions hold per segment
    cfg = only("merge", drive_duration_s=100.0, segment_s=1.0, condition_rates=ConditionRates(night=0.3, rain=0.3,
                                                                                           glare=0.3))
    _, truth = simulate_drive(cfg, 0, 0)
    cond = np.array(truth["condition"].cast("string").to_pylist()).reshape(100, 10)
    assert np.all(cond == cond[:, :1]) and len(set(cond[:, 0])) == len(CONDITIONS)


def test_planned_waypoints_are_the_future_ego_path():
    cfg = only("roundabout", drive_duration_s=8.0)
    c = arrow_to_frames(simulate_drive(cfg, 0, 0)[0]).cols
    n = c["ego_x"].shape[0]
    off = np.concatenate([[0], np.cumsum(c["plan_count"])]).astype(int)
    assert c["plan_count"][-1] == 0 and c["plan_count"][n - 6] == 1 and c["plan_count"][0] == 8
    for i in range(n):
        k = np.arange(1, c["plan_count"][i] + 1)
        j = i + 5 * k
        dx, dy = c["ego_x"][j] - c["ego_x"][i], c["ego_y"][j] - c["ego_y"][i]
        h = float(c["ego_heading"][i])
        expect_x, expect_y = np.cos(h) * dx + np.sin(h) * dy, -np.sin(h) * dx + np.cos(h) * dy
        np.testing.assert_allclose(c["plan_x"][off[i]:off[i + 1]], expect_x, atol=2e-3)
        np.testing.assert_allclose(c["plan_y"][off[i]:off[i + 1]], expect_y, atol=2e-3)
    # the roundabout is driven counter-clockwise in the right-handed world frame: the ego turns left on the ring
    assert c["ego_yaw_rate"].max() > 0.2


def test_maneuvers_agree_with_the_motion():
    c = arrow_to_frames(simulate_drive(only("highway", drive_duration_s=40.0), 1, 1)[0]).cols
    names = np.array(name_of("maneuver", c["maneuver"]))
    assert {"keep_lane", "change_left"} <= set(names)
    lateral_speed = np.gradient(c["ego_y"], 0.1)  # the highway runs along +x, y is north = left
    assert lateral_speed[names == "change_left"].mean() > 0.5
    assert np.all(c["control_accel"][names == "accelerate"] > 0.5)
    assert np.all(c["control_accel"][names == "decelerate"] < -0.5)


def test_make_env_puts_the_expert_at_the_wheel():
    env = make_env("intersection", seed=3, config=FleetConfig())
    assert isinstance(env.vehicle, IDMVehicle) and env.vehicle in env.road.vehicles
    start = env.vehicle.position.copy()
    for _ in range(10):
        step_env(env)
    assert env.time == pytest.approx(1.0) and np.linalg.norm(env.vehicle.position - start) > 1.0
    with pytest.raises(ValueError, match="unknown scenario"):
        make_env("parking", 0)


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValidationError, match="whole number"):
        FleetConfig(plan_dt_s=0.25)
    with pytest.raises(ValidationError, match="sum to"):
        ConditionRates(night=0.6, rain=0.6)
    with pytest.raises(ValidationError, match="extra"):
        FleetConfig(vehicle_count=3)
    with pytest.raises(ValidationError, match="truth_range_m"):
        FleetConfig(truth_range_m=100.0)
    assert FleetConfig(workers=4).drive_hash() == FleetConfig(vehicles=9).drive_hash() != FleetConfig(seed=1).drive_hash()
