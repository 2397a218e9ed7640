"""The log-replay closed loop: sub-scores against hand-computed scenes, then real frames of a simulated drive."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from ingest.contract import COLUMNS, Frames, arrow_to_frames, validate
from ingest.synth import EPOCH_NS
from shadow.featurize import featurize
from shadow.log_replay import SCORE_SCHEMA, LogReplayConfig, log_replay, logged_plans
from shadow.log_replay_checks import boxes_overlap, savgol_operator
from sim.config import SCENARIOS, FleetConfig, ScenarioMix
from sim.fleet import simulate_drive

DT = 0.1
PLAN_DT = 0.5


def road(n: int, speed: float, accel: float = 0.0, lanes: int = 2, rank: int = 0, width: float = 4.0,
         agents: list[dict] | None = None, heading: float = 0.0, origin: tuple[float, float] = (1000.0, -500.0)
         ) -> Frames:
    """n frames at 10 Hz of a logged ego on a straight road heading `heading`, driving at `speed` changing by
    `accel` (stopping at 0), in lane `rank` of `lanes` (`width` m each), centred in it. `agents`: dicts with id,
    x, y (road frame at t = 0, x along the road from the ego, y left), vx, vy (road frame), length, width; they
    move at constant velocity and are logged in every frame."""
    t = np.arange(n) * DT
    v = np.maximum(speed + accel * t, 0.0)
    s = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] + v[:-1]) * DT)])
    c, sn = np.cos(heading), np.sin(heading)
    agents = agents or []
    k = len(agents)

    def world(x, y):
        return origin[0] + c * x - sn * y, origin[1] + sn * x + c * y

    ax = np.array([[a["x"] + a["vx"] * ti for a in agents] for ti in t]).reshape(n, k)
    ay = np.array([[a["y"] + a["vy"] * ti for a in agents] for ti in t]).reshape(n, k)
    wx, wy = world(ax, ay)
    vx = np.array([a["vx"] for a in agents] * n)
    vy = np.array([a["vy"] for a in agents] * n)
    ex, ey = world(s, np.zeros(n))
    cols = {
        "timestamp_ns": EPOCH_NS + np.arange(n, dtype=np.int64) * 100_000_000,
        "ego_x": ex, "ego_y": ey, "ego_heading": np.full(n, heading), "ego_speed": v,
        "ego_accel": np.where(v > 0, accel, 0.0), "ego_yaw_rate": np.zeros(n), "ego_lane": np.full(n, rank),
        "agent_count": np.full(n, k), "agent_id": np.tile([a["id"] for a in agents], n),
        "agent_class": np.ones(n * k), "agent_x": wx.ravel(), "agent_y": wy.ravel(),
        "agent_vx": c * vx - sn * vy, "agent_vy": sn * vx + c * vy,
        "agent_heading": np.tile([np.arctan2(a["vy"], a["vx"]) if a["vx"] or a["vy"] else 0.0 for a in agents], n)
        + heading, "agent_length": np.tile([a.get("length", 5.0) for a in agents], n),
        "agent_width": np.tile([a.get("width", 2.0) for a in agents], n), "agent_confidence": np.ones(n * k),
        "lane_count": np.full(n, lanes), "lane_width": np.full(n, width), "lane_offset": np.zeros(n),
        "lane_heading": np.full(n, heading), "lane_curvature": np.zeros(n), "speed_limit": np.full(n, 30.0),
        "lighting": np.ones(n), "weather": np.ones(n), "road_type": np.ones(n), "tag_count": np.zeros(n),
        "tag": np.zeros(0, object), "plan_count": np.zeros(n), "plan_x": np.zeros(0), "plan_y": np.zeros(0),
        "maneuver": np.zeros(n), "control_steer": np.zeros(n), "control_accel": np.zeros(n),
    }
    frames = Frames({col.name: np.asarray(cols[col.name]).astype(col.dtype) for col in COLUMNS}, PLAN_DT)
    validate(frames)
    return frames


def plan(speed: float, accel: float = 0.0, lateral=None, waypoints: int = 8) -> np.ndarray:
    """(1, T, 3) plan from t = 0.5 s: along the road at `speed` changing by `accel` (until it stops), and the
    lateral offset lateral(t) [m] (left positive)."""
    t = PLAN_DT * np.arange(1, waypoints + 1)
    stop = speed / -accel if accel < 0 else np.inf
    tt = np.minimum(t, stop)
    x = speed * tt + 0.5 * accel * tt * tt
    y = np.zeros_like(t) if lateral is None else lateral(t)
    return np.stack([x, y, np.zeros_like(t)], axis=-1)[None]


def one(frames: Frames, traj: np.ndarray, config: LogReplayConfig | None = None) -> dict:
    return log_replay(frames, np.array([0]), traj, PLAN_DT, config=config).records()[0]


# ------------------------------------------------------------------------------------------------ hand-made scenes


def test_following_the_logged_driver_scores_one():
    frames = road(60, 10.0, agents=[{"id": 1, "x": 30.0, "y": 4.0, "vx": 10.0, "vy": 0.0}])  # a car in the next lane
    r = one(frames, plan(10.0))
    assert r["score"] == pytest.approx(1.0)
    assert r["collision"] is False and r["min_ttc_s"] is None and r["at_fault_collision_s"] is None
    assert r["ego_progress"] == pytest.approx(1.0) and r["progress_m"] == pytest.approx(40.0, abs=0.05)
    assert r["logged_progress_m"] == pytest.approx(40.0, abs=1e-6) and r["horizon_s"] == pytest.approx(4.0)
    assert r["max_drivable_violation_m"] == pytest.approx(0.0) and r["lane_known"] is True
    assert abs(r["min_lon_accel_mps2"]) < 1e-6 and r["max_abs_yaw_rate_radps"] < 1e-6


def test_head_on_collision_is_at_fault():
    # a car 60 m ahead in the ego's lane comes at 10 m/s while the ego keeps 10 m/s: centres close at 20 m/s and
    # the 5 m boxes touch when 5 m apart, after 55 / 20 = 2.75 s, so the first 0.1 s step in contact is 2.8 s
    frames = road(60, 10.0, agents=[{"id": 7, "x": 60.0, "y": 0.0, "vx": -10.0, "vy": 0.0}])
    r = one(frames, plan(10.0))
    assert r["collision"] is True
    assert r["at_fault_collision_s"] == pytest.approx(2.8)
    assert r["no_at_fault_collision"] == 0.0 and r["score"] == 0.0
    # and well before that the time to collision fell under the bound (1.8 s before contact is 19 m at 20 m/s)
    assert r["ttc_within_bound"] == 0.0 and r["min_ttc_s"] < 0.95
    assert r["drivable_area_compliance"] == 1.0 and r["comfort"] == 1.0


def test_rear_end_into_a_stopped_ego_is_not_its_fault():
    # the ego stands (plan: stay); a car from 30 m behind at 10 m/s hits it after (30 - 5) / 10 = 2.5 s
    frames = road(60, 0.0, agents=[{"id": 3, "x": -30.0, "y": 0.0, "vx": 10.0, "vy": 0.0}])
    r = one(frames, plan(0.0))
    assert r["collision"] is True and r["at_fault_collision_s"] is None
    assert r["no_at_fault_collision"] == 1.0
    assert r["ttc_within_bound"] == 1.0  # a car behind a standing ego is not the ego's time to collision
    assert r["score"] == pytest.approx(1.0)  # the logged driver stood too: nothing to progress against


def test_driving_into_a_stopped_car_is_at_fault():
    frames = road(60, 10.0, agents=[{"id": 4, "x": 25.0, "y": 0.0, "vx": 0.0, "vy": 0.0}])
    r = one(frames, plan(10.0))
    assert r["collision"] is True and r["at_fault_collision_s"] == pytest.approx(2.0)  # (25 - 5) / 10
    assert r["score"] == 0.0


def test_leaving_the_lane():
    # one 4 m lane, the ego in its middle: its left edge is 2 m to the left and the ego's own half width is 1 m.
    # A plan that drifts 6 m left puts the ego's corners ~5 m beyond the edge; staying is compliant.
    frames = road(60, 10.0, lanes=1, width=4.0)
    r = one(frames, plan(10.0, lateral=lambda t: 6.0 * np.clip(t / 3.0, 0, 1) ** 2))
    assert r["drivable_area_compliance"] == 0.0 and r["score"] == 0.0
    assert 4.0 < r["max_drivable_violation_m"] < 6.5
    assert r["no_at_fault_collision"] == 1.0
    # a lane change into the left lane of a two-lane road (the ego in the right one) stays on the road
    frames = road(60, 10.0, lanes=2, rank=0, width=4.0)
    r = one(frames, plan(10.0, lateral=lambda t: 4.0 * np.clip(t / 3.0, 0, 1)))
    assert r["drivable_area_compliance"] == 1.0
    # ... but not into a left lane the road does not have (the ego in the left one of two)
    frames = road(60, 10.0, lanes=2, rank=1, width=4.0)
    r = one(frames, plan(10.0, lateral=lambda t: 4.0 * np.clip(t / 3.0, 0, 1)))
    assert r["drivable_area_compliance"] == 0.0


def test_a_log_without_lane_context_cannot_fail_the_drivable_area():
    # imported logs without a map carry lane rank -1 and no lanes: the drivable area is unknown, not failed
    frames = road(60, 10.0, lanes=1)
    frames.cols["ego_lane"][:], frames.cols["lane_count"][:], frames.cols["lane_width"][:] = -1, 0, 0.0
    validate(frames)
    r = one(frames, plan(10.0, lateral=lambda t: 6.0 * np.clip(t / 3.0, 0, 1) ** 2))
    assert r["lane_known"] is False and r["drivable_area_compliance"] == 1.0 and r["max_drivable_violation_m"] == 0


def test_stopped_ego_makes_no_progress():
    # the logged driver drove 40 m in the 4 s; the plan stays put: progress 0, the rest perfect, so the score is
    # NAVSIM's weighted mean without progress: (5 * 0 + 5 * 1 + 2 * 1) / 12
    frames = road(60, 10.0)
    frames.cols["ego_speed"][0] = 0.0  # the window starts standing: the ego can stay exactly where it is
    r = one(frames, plan(0.0))
    assert r["progress_m"] == pytest.approx(0.0, abs=1e-9) and r["logged_progress_m"] == pytest.approx(40.0)
    assert r["ego_progress"] == pytest.approx(0.0, abs=1e-9)
    assert (r["no_at_fault_collision"], r["drivable_area_compliance"], r["ttc_within_bound"], r["comfort"]) == (
        1.0, 1.0, 1.0, 1.0)
    assert r["score"] == pytest.approx(7 / 12)
    # half the logged progress scores a half
    frames.cols["ego_speed"][0] = 5.0
    r = one(frames, plan(5.0))
    assert r["ego_progress"] == pytest.approx(0.5, abs=0.01)
    assert r["score"] == pytest.approx((5 * 0.5 + 7) / 12, abs=0.01)


def test_harsh_brake_fails_comfort_and_gentle_brake_passes():
    frames = road(60, 15.0)
    # -7 m/s^2 from 15 m/s stops in 2.14 s after 16.1 m: beyond nuPlan's -4.05 m/s^2
    r = one(frames, plan(15.0, accel=-7.0))
    assert r["comfort"] == 0.0
    assert -8.0 <= r["min_lon_accel_mps2"] < -5.5
    assert r["progress_m"] == pytest.approx(16.07, abs=0.6)
    assert r["ego_progress"] == pytest.approx(16.07 / 60.0, abs=0.01)
    assert r["score"] == pytest.approx((5 * r["ego_progress"] + 5 * 1 + 2 * 0) / 12, abs=1e-6)
    r = one(frames, plan(15.0, accel=-1.5))
    assert r["comfort"] == 1.0 and -2.0 < r["min_lon_accel_mps2"] < -1.0


def test_turning_road_is_followed_in_any_heading():
    # the same scene rotated anywhere in the world scores the same
    a = one(road(60, 10.0, agents=[{"id": 7, "x": 60.0, "y": 0.0, "vx": -10.0, "vy": 0.0}], heading=2.5),
            plan(10.0))
    b = one(road(60, 10.0, agents=[{"id": 7, "x": 60.0, "y": 0.0, "vx": -10.0, "vy": 0.0}]), plan(10.0))
    for k in ("score", "at_fault_collision_s", "progress_m", "max_drivable_violation_m"):
        assert a[k] == pytest.approx(b[k], abs=1e-4), k


def test_windows_near_the_end_are_scored_over_what_is_logged():
    frames = road(30, 10.0)  # 3 s of log
    rows = np.array([0, 10, 29])
    r = log_replay(frames, rows, np.repeat(plan(10.0), 3, axis=0), PLAN_DT).columns
    np.testing.assert_allclose(r["horizon_s"], [2.9, 1.9, 0.0], atol=1e-9)
    np.testing.assert_allclose(r["logged_progress_m"], [29.0, 19.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(r["score"], 1.0)


def test_geometry_helpers():
    # two 5 x 2 boxes side by side 2.1 m apart do not touch; 1.9 m apart they do; crossed at 90 deg they do
    z = np.zeros(3)
    hit = boxes_overlap(np.zeros(3), np.array([2.1, 1.9, 3.4]), z, 5.0, 2.0, np.array([0, 0, np.pi / 2]),
                        np.full(3, 5.0), np.full(3, 2.0))
    assert hit.tolist() == [False, True, True]
    # the derivative operator is exact on quadratics, inside and at the ends
    t = np.arange(41) * DT
    d1 = np.array([3 * t * t + 2 * t]) @ savgol_operator(41, 15, 2, 1, DT).T
    np.testing.assert_allclose(d1[0], 6 * t + 2, atol=1e-9)


def test_bad_input_is_refused():
    frames = road(20, 10.0)
    with pytest.raises(ValueError, match="traj must have shape"):
        log_replay(frames, np.array([0, 1]), plan(10.0), PLAN_DT)
    with pytest.raises(ValueError, match="NaN"):
        log_replay(frames, np.array([0]), np.full((1, 8, 3), np.nan), PLAN_DT)
    with pytest.raises(ValueError, match="rows must index"):
        log_replay(frames, np.array([20]), plan(10.0), PLAN_DT)
    with pytest.raises(ValueError, match="plan_dt_s"):
        log_replay(frames, np.array([0]), plan(10.0), 0.0)
    with pytest.raises(ValidationError):
        LogReplayConfig(horizon=4.0)
    with pytest.raises(ValidationError, match="positive weight"):
        LogReplayConfig(weights={"progress": 0, "ttc": 0, "comfort": 0})
    assert len(log_replay(frames, np.zeros(0, np.int64), np.zeros((0, 8, 3)), PLAN_DT)) == 0


# ------------------------------------------------------------------------------------------- a real simulated drive


@pytest.fixture(scope="module")
def sim_drive() -> pa.Table:
    mix = ScenarioMix(**{s: float(s == "highway") for s in SCENARIOS})
    drive, _ = simulate_drive(FleetConfig(scenario_mix=mix, drive_duration_s=12.0), 0, 0)
    return drive


def test_real_drive_logged_plans_and_futures(sim_drive):
    frames = arrow_to_frames(sim_drive)
    rows = np.arange(frames.num_frames)
    plans, full = logged_plans(frames, rows)
    assert plans.shape[1:] == (8, 2) and full[:70].all() and not full[-1]
    scored = log_replay(sim_drive, rows[full], plans[full], frames.plan_dt_s)
    c = scored.columns
    t = scored.table()
    assert t.schema == SCORE_SCHEMA and t.num_rows == int(full.sum())
    for k in ("score", "ego_progress", "no_at_fault_collision", "drivable_area_compliance", "comfort"):
        assert np.all((c[k] >= 0) & (c[k] <= 1)), k
    # the on-board plan here is the expert's own future: driven back over its log it keeps to its lanes and pace
    assert c["lane_known"].all()
    assert np.mean(c["drivable_area_compliance"]) >= 0.95
    assert np.median(c["ego_progress"]) >= 0.97
    assert np.mean(c["no_at_fault_collision"]) >= 0.95
    assert np.mean(c["score"]) >= 0.85
    assert c["horizon_s"].max() == pytest.approx(4.0)
    # the featurizer's targets (the logged future, with yaw) give the same picture through the same API
    f = featurize(frames, with_targets=True)
    ok = f.traj_mask.all(axis=1)
    by_target = log_replay(frames, rows[ok], f.traj[ok], 0.5).columns
    assert np.median(by_target["ego_progress"]) >= 0.97
    # the same plans moved 8 m to the right leave the road (4 lanes of 4 m, the ego in one of the right two)
    assert set(frames.cols["ego_lane"].tolist()) <= {0, 1} and set(frames.cols["lane_width"].tolist()) == {4.0}
    moved = plans[full] + np.array([0.0, -8.0])
    off = log_replay(frames, rows[full], moved, frames.plan_dt_s).columns
    assert np.mean(off["drivable_area_compliance"]) <= 0.2
    assert np.mean(off["score"]) < np.mean(c["score"]) - 0.5


def test_real_drives_concatenated_never_cross(sim_drive):
    # two drives one after the other (the same one twice, under two ids): a window at the end of the first has no
    # future, and every other window scores as it does alone
    field = sim_drive.schema.field("drive_id")
    both = pa.concat_tables([sim_drive, sim_drive.set_column(
        sim_drive.schema.get_field_index("drive_id"), field, pa.array(["other"] * sim_drive.num_rows, field.type))])
    n = sim_drive.num_rows
    frames = arrow_to_frames(sim_drive)
    plans, full = logged_plans(frames, np.arange(n))
    rows = np.flatnonzero(full)[:20]
    alone = log_replay(sim_drive, rows, plans[rows], 0.5).columns["score"]
    two = log_replay(both, np.concatenate([rows, rows + n, [n - 1]]),
                     np.concatenate([plans[rows], plans[rows], plans[:1]]), 0.5).columns
    np.testing.assert_allclose(two["score"][:20], alone)
    np.testing.assert_allclose(two["score"][20:40], alone)
    assert two["horizon_s"][-1] == 0.0
