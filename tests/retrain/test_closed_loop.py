"""Closed loop on real highway-env: the expert reference, an ONNX planner, a hard-braking policy, the controller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.env import make_env
from sim.config import FleetConfig
from sim.env import record_scene, to_world
from retrain.models.architectures import Planner, PlannerConfig, export_onnx
from retrain.cycle.closed_loop import (EXPERT, ClosedLoopConfig, ConstantCommand, ControllerConfig, EpisodeLog,
                                       OnnxPlanner, comfort_metrics, control_from_trajectory, episode_workers,
                                       evaluate, run_episode, window_frames)
from shadow.featurize import HORIZON, HORIZON_DT_S, featurize

CFG = ClosedLoopConfig(scenarios=["highway", "merge"], episodes=2, max_steps=40)


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(Planner(PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)),
                       tmp_path_factory.mktemp("cl") / "planner.onnx")


@pytest.fixture(scope="module")
def expert_records():
    return evaluate({"expert": EXPERT}, CFG, with_episodes=True)


def test_expert_reference_is_safe_and_reproducible(expert_records):
    assert [r["scenario"] for r in expert_records] == CFG.scenarios
    for r in expert_records:
        assert r["episodes"] == 2 and r["collisions"] == 0
        for e in r["episode_records"]:
            assert 0 <= e["min_ttc_s"] <= CFG.ttc_cap_s
            assert 0 < e["duration_s"] <= CFG.max_steps * 0.1 + 1e-9
            assert 0 < e["mean_speed_mps"] < 45 and e["distance_m"] > 10  # highway speeds, m/s
            assert e["min_lon_accel_mps2"] <= e["max_lon_accel_mps2"]
            assert e["max_abs_yaw_rate_radps"] >= 0 and e["max_abs_lat_accel_mps2"] >= 0
            assert isinstance(e["comfortable"], bool) and e["end_reason"] in ("length", "route_end")
    assert evaluate({"expert": EXPERT}, CFG, with_episodes=True) == expert_records


def test_hard_braking_breaks_the_comfort_limit():
    cfg = CFG.model_copy(update={"scenarios": ["highway"], "episodes": 1})
    e = run_episode(ConstantCommand(-8.0, name="brake"), "highway", 11, cfg)
    assert not e["comfortable"] and "lon_accel" in e["comfort_violations"]
    assert e["min_lon_accel_mps2"] < cfg.comfort.min_lon_accel
    assert e["min_lon_accel_mps2"] == pytest.approx(-8.0, abs=0.5)
    gentle = run_episode(ConstantCommand(0.0, name="coast"), "highway", 11, cfg)
    assert "lon_accel" not in gentle["comfort_violations"] and gentle["distance_m"] > e["distance_m"]


def test_onnx_planner_drives_reproducibly(planner, expert_records):
    pol = {"expert": EXPERT, "student": OnnxPlanner(planner, "student")}
    a = evaluate(pol, CFG)
    b = evaluate(pol, CFG)
    assert a == b
    student = [r for r in a if r["policy"] == "student"]
    assert len(student) == 2 and all("progress_vs_expert" in r for r in student)
    assert all(r["progress_vs_expert"] >= 0 and 0 <= r["collision_rate"] <= 1 for r in student)


def test_episodes_in_two_processes_give_the_same_records(planner):
    pol = {"expert": EXPERT, "student": OnnxPlanner(planner, "student")}
    one = evaluate(pol, CFG.model_copy(update={"workers": 1}), with_episodes=True)
    two = evaluate(pol, CFG.model_copy(update={"workers": 2}), with_episodes=True)
    assert two == one and [r["policy"] for r in two] == ["expert", "expert", "student", "student"]
    auto = CFG.model_copy(update={"workers": 0, "max_steps": 1000})
    assert episode_workers(auto, 3) == 1  # one episode per process is not worth it
    assert episode_workers(CFG.model_copy(update={"workers": 0}), 8) == 1  # 8 x 40 steps: not worth a process
    assert episode_workers(CFG.model_copy(update={"workers": 4}), 3) == 3


def test_a_failing_episode_fails_the_evaluation_in_a_worker(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(Exception, match="(?i)protobuf|onnx|load"):
        evaluate({"student": OnnxPlanner(bad, "student")}, CFG.model_copy(update={"workers": 2}))


def test_controller_follows_the_plan():
    cfg = ControllerConfig()
    t = HORIZON_DT_S * np.arange(1, HORIZON + 1)
    straight = np.stack([20.0 * t, 0 * t, 0 * t], axis=1)
    accel, steer = control_from_trajectory(straight, 20.0, 5.0, cfg)
    assert abs(accel) < 1e-6 and abs(steer) < 1e-9
    braking = np.stack([20.0 * t - 1.5 * t * t, 0 * t, 0 * t], axis=1)  # -3 m/s^2
    assert control_from_trajectory(braking, 20.0, 5.0, cfg)[0] == pytest.approx(-3.0, abs=1e-6)
    left = np.stack([20.0 * t, 0.02 * (20.0 * t) ** 2, 0 * t], axis=1)  # curving left (y left)
    steer_left = control_from_trajectory(left, 20.0, 5.0, cfg)[1]
    assert steer_left < 0  # highway-env's y axis points right: a left turn is a negative steering angle
    assert control_from_trajectory(np.zeros((HORIZON, 3)), 0.0, 5.0, cfg) == (0.0, 0.0)
    assert control_from_trajectory(braking * 0, 30.0, 5.0, cfg)[0] == -cfg.max_brake  # plan says stop: clipped


def test_logged_state_matches_the_fleet_logger():
    """The closed loop logs the ego and its lane context exactly as the fleet simulator does."""
    fleet = FleetConfig(workers=1)
    env_a, env_b = make_env("highway", 5, fleet), make_env("highway", 5, fleet)
    scene = record_scene(env_a, {}, 12, fleet)
    log = EpisodeLog(fleet.truth_range_m)
    for _ in range(12):
        log.record(env_b)
        env_b.step(None)
    window, prev = log.window()
    assert prev is not None  # 12 frames logged, 10 in the window
    for key in ("x", "y", "heading", "speed", "lane_count", "lane_rank", "lane_width", "lane_offset",
                "lane_heading", "lane_curvature", "speed_limit"):
        np.testing.assert_allclose(window.ego[key], scene.ego[key][-10:], err_msg=key)
    frames = window_frames(window, prev, "highway", 0, fleet, np.random.default_rng(0))
    np.testing.assert_allclose(frames.cols["ego_x"], to_world(scene, None).ego["x"][-10:])
    speed = scene.ego["speed"]
    np.testing.assert_allclose(frames.cols["ego_accel"], np.diff(speed[-11:]) / fleet.dt_s, rtol=1e-5, atol=1e-5)
    feats = featurize(frames, with_targets=False)
    assert feats.ego_hist.shape == (10, 10, 9) and feats.agent_mask[-1].sum() > 0


def test_comfort_metrics_units():
    dt = 0.1
    t = np.arange(50) * dt
    m = comfort_metrics(20.0 - 2.0 * t, np.zeros_like(t), dt, ClosedLoopConfig().comfort)
    assert m["min_lon_accel_mps2"] == pytest.approx(-2.0, abs=1e-6) and m["comfortable"]
    turning = comfort_metrics(np.full_like(t, 10.0), 0.5 * t, dt, ClosedLoopConfig().comfort)
    assert turning["max_abs_yaw_rate_radps"] == pytest.approx(0.5, abs=1e-6)
    assert turning["max_abs_lat_accel_mps2"] == pytest.approx(5.0, abs=1e-5) and not turning["comfortable"]
