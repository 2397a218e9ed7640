"""Divergence metrics, TTC and window aggregates against values computed by hand on tiny hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shadow import metrics as mt
from shadow.metrics import MetricsConfig
from shadow.compute import agents_in_ego_frame
from shadow.ttc import disc_cover, time_to_collision

CFG = MetricsConfig()
K = np.arange(1, 9)  # waypoints at 0.5 s .. 4 s


def plan(x, y=0.0, yaw=0.0) -> np.ndarray:
    """One plan (1, 8, 3) from per-waypoint x, y, yaw (scalars broadcast)."""
    out = np.zeros((1, 8, 3), np.float32)
    out[0, :, 0], out[0, :, 1], out[0, :, 2] = x, y, yaw
    return out


def logits(*p) -> np.ndarray:
    """Logits (1, 6) whose softmax is the given probabilities (zeros become ~1e-40)."""
    p = np.array(p + (0.0,) * (6 - len(p)))
    return np.log(np.maximum(p, 1e-40))[None, :].astype(np.float32)


def test_lateral_offset_of_one_metre():
    m = mt.displacement_metrics(plan(5.0 * K), plan(5.0 * K, y=1.0), CFG)
    for h in (1, 2, 4):
        assert m[f"ade_{h}s"][0] == pytest.approx(1.0) and m[f"fde_{h}s"][0] == pytest.approx(1.0)
        assert m[f"ahe_{h}s"][0] == 0 and not m[f"miss_{h}s"][0]
    m = mt.displacement_metrics(plan(5.0 * K), plan(5.0 * K, y=2.5), CFG)
    assert all(m[f"miss_{h}s"][0] for h in (1, 2, 4))


def test_slower_student_along_a_straight_line():
    # teacher 10 m/s, student 8 m/s: the gap at waypoint k is k metres
    m = mt.displacement_metrics(plan(5.0 * K), plan(4.0 * K), CFG)
    assert m["ade_1s"][0] == pytest.approx(1.5) and m["fde_1s"][0] == pytest.approx(2.0)
    assert m["ade_2s"][0] == pytest.approx(2.5) and m["fde_2s"][0] == pytest.approx(4.0)
    assert m["ade_4s"][0] == pytest.approx(4.5) and m["fde_4s"][0] == pytest.approx(8.0)
    assert not m["miss_1s"][0], "2 m is not above the 2 m threshold"
    assert m["miss_2s"][0] and m["miss_4s"][0]


def test_heading_errors_and_wrap_around():
    m = mt.displacement_metrics(plan(5.0 * K), plan(5.0 * K, yaw=0.1 * K), CFG)
    assert m["ahe_1s"][0] == pytest.approx(0.15) and m["fhe_1s"][0] == pytest.approx(0.2)
    assert m["ahe_4s"][0] == pytest.approx(0.45) and m["fhe_4s"][0] == pytest.approx(0.8)
    m = mt.displacement_metrics(plan(5.0 * K, yaw=3.1), plan(5.0 * K, yaw=-3.1), CFG)
    assert m["fhe_4s"][0] == pytest.approx(2 * math.pi - 6.2, abs=1e-5)


def test_miss_threshold_per_horizon_is_configurable():
    cfg = MetricsConfig(miss_threshold_m={1: 0.5, 2: 1.0, 4: 4.0})
    m = mt.displacement_metrics(plan(5.0 * K), plan(5.0 * K, y=2.0), cfg)
    assert m["miss_1s"][0] and m["miss_2s"][0] and not m["miss_4s"][0]
    with pytest.raises(ValueError, match="horizons"):
        MetricsConfig(miss_threshold_m={1: 2.0})


def test_jensen_shannon_identical_disjoint_and_a_known_value():
    a = logits(0.1, 0.2, 0.3, 0.4)
    assert mt.jensen_shannon(mt.softmax(a), mt.softmax(a))[0] == pytest.approx(0.0, abs=1e-12)
    assert mt.jensen_shannon(mt.softmax(logits(1.0)), mt.softmax(logits(0.0, 1.0)))[0] == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); 0.5 log2(4/3) + 0.25 (log2(2/3) + log2(2))
    want = 0.5 * math.log2(4 / 3) + 0.25 * (math.log2(2 / 3) + 1.0)
    got = mt.jensen_shannon(mt.softmax(logits(1.0)), mt.softmax(logits(0.5, 0.5)))[0]
    assert got == pytest.approx(want, abs=1e-9)
    # huge logits do not overflow
    assert mt.jensen_shannon(mt.softmax(np.array([[1e4, 0, 0, 0, 0, 0]])),
                             mt.softmax(np.array([[0, 1e4, 0, 0, 0, 0]])))[0] == pytest.approx(1.0)


def test_maneuver_disagreement_and_jsd_in_pair_metrics():
    m = mt.pair_metrics((plan(5.0 * K), logits(0.1, 0.6, 0.3)), (plan(5.0 * K), logits(0.1, 0.3, 0.6)), CFG)
    assert m["maneuver_teacher"][0] == 1 and m["maneuver_student"][0] == 2 and m["maneuver_disagree"][0]
    assert 0 < m["maneuver_jsd"][0] < 0.2


# ------------------------------------------------------------------------------------------------------------- TTC

E_OFF, E_R = 5.0 / 3, math.sqrt((5.0 / 6) ** 2 + 1.0 ** 2)  # ego 5 x 2 m: discs at +-5/3 m
A_OFF, A_R = 1.5, math.sqrt(0.75 ** 2 + 0.9 ** 2)  # agent 4.5 x 1.8 m: discs at +-1.5 m


def ttc(traj, *agents, horizon=4.0):
    """agents: (x, y, vx, vy, heading) in the ego frame, each 4.5 x 1.8 m, all in frame 0."""
    a = np.array(agents, np.float64).reshape(-1, 5)
    n = a.shape[0]
    return time_to_collision(traj, 0.5, np.zeros(n, np.int64), a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4],
                             np.full(n, 4.5), np.full(n, 1.8), 5.0, 2.0, horizon)[0]


def test_disc_cover_matches_hand_values():
    off, r = disc_cover(np.float64(4.5), np.float64(1.8))
    assert off == pytest.approx([-1.5, 0.0, 1.5]) and r == pytest.approx(A_R)


def test_head_on_agent_has_the_hand_computed_ttc():
    # ego 10 m/s along x; agent from x = 50 m at 10 m/s towards it: front discs close at 20 m/s
    want = (50.0 - E_OFF - A_OFF - E_R - A_R) / 20.0
    assert ttc(plan(5.0 * K), (50.0, 0.0, -10.0, 0.0, math.pi)) == pytest.approx(want, abs=1e-6)


def test_stopped_agent_ahead_and_agents_that_never_meet_the_plan():
    want = (30.0 - E_OFF - A_OFF - E_R - A_R) / 10.0
    assert ttc(plan(5.0 * K), (30.0, 0.0, 0.0, 0.0, 0.0)) == pytest.approx(want, abs=1e-6)
    # the neighbouring lane (3.5 m) at the same speed, an agent behind that is slower, one beyond the horizon
    assert math.isnan(ttc(plan(5.0 * K), (0.0, 3.5, 10.0, 0.0, 0.0), (-20.0, 0.0, 8.0, 0.0, 0.0),
                          (200.0, 0.0, 0.0, 0.0, 0.0)))
    # a plan that stops short of the stopped agent
    assert math.isnan(ttc(plan(np.minimum(5.0 * K, 20.0)), (30.0, 0.0, 0.0, 0.0, 0.0)))
    # overlapping already: 0
    assert ttc(plan(5.0 * K), (2.0, 0.5, 10.0, 0.0, 0.0)) == 0.0


def test_ttc_takes_the_earliest_agent_per_frame_and_separates_frames():
    traj = np.concatenate([plan(5.0 * K), plan(0.0 * K)])  # frame 1 stands still
    a = np.array([[50.0, 0, -10, 0, math.pi], [30.0, 0, 0, 0, 0], [30.0, 0, 0, 0, 0]])
    out = time_to_collision(traj, 0.5, np.array([0, 0, 1]), a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4],
                            np.full(3, 4.5), np.full(3, 1.8), 5.0, 2.0, 4.0)
    assert out[0] == pytest.approx((50.0 - E_OFF - A_OFF - E_R - A_R) / 20.0, abs=1e-6)
    assert math.isnan(out[1])


def brute_force_ttc(traj, agents, dt=0.5, horizon=4.0, step=0.1):
    """Every (agent, time) sample, every disc pair, no pruning: the reference for the fast version."""
    from shadow.ttc import ego_poses

    times = np.arange(int(round(horizon / step)) + 1) * step
    ex, ey, eyaw = ego_poses(traj, dt, times)
    e_off, e_r = disc_cover(np.float64(5.0), np.float64(2.0))
    out = np.full(traj.shape[0], np.nan)
    for j in range(agents.shape[0]):
        fr, x, y, vx, vy, h, ln, wd = agents[j]
        fr = int(fr)
        a_off, a_r = disc_cover(np.float64(ln), np.float64(wd))
        ecx = ex[fr][:, None] + np.cos(eyaw[fr])[:, None] * e_off
        ecy = ey[fr][:, None] + np.sin(eyaw[fr])[:, None] * e_off
        acx = (x + vx * times)[:, None] + math.cos(h) * a_off
        acy = (y + vy * times)[:, None] + math.sin(h) * a_off
        gap = np.hypot(ecx[:, :, None] - acx[:, None, :], ecy[:, :, None] - acy[:, None, :]).min(axis=(1, 2)) \
            - (e_r + a_r)
        if (gap <= 0).any():
            k = int(np.argmax(gap <= 0))
            t = 0.0 if k == 0 else times[k - 1] + step * gap[k - 1] / (gap[k - 1] - gap[k])
            out[fr] = np.fmin(out[fr], t)
    return out


def test_fast_ttc_equals_brute_force_on_random_scenes():
    rng = np.random.default_rng(7)
    n, m = 60, 900
    yaw = np.cumsum(rng.normal(0, 0.08, (n, 8)), axis=1)
    speed = rng.uniform(0, 30, (n, 1))
    traj = np.stack([np.cumsum(speed * 0.5 * np.cos(yaw), axis=1), np.cumsum(speed * 0.5 * np.sin(yaw), axis=1),
                     yaw], axis=-1).astype(np.float32)
    heading = rng.uniform(-math.pi, math.pi, m)
    v = rng.uniform(0, 30, m)
    agents = np.stack([rng.integers(0, n, m), rng.uniform(-40, 120, m), rng.uniform(-15, 15, m),
                       v * np.cos(heading), v * np.sin(heading), heading, rng.uniform(3, 12, m),
                       rng.uniform(1.5, 2.6, m)], axis=1)
    fast = time_to_collision(traj, 0.5, agents[:, 0].astype(np.int64), *agents[:, 1:].T, 5.0, 2.0, 4.0)
    slow = brute_force_ttc(traj, agents)
    assert np.isfinite(slow).sum() > 10, "the scenes must hold collisions to compare"
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9, equal_nan=True)


def test_agents_are_moved_into_the_ego_frame():
    # ego at (100, -50) facing +y (heading pi/2); agent 10 m ahead moving at 5 m/s along +y, heading pi/2
    cols = {"agent_count": np.array([1]), "ego_x": np.array([100.0]), "ego_y": np.array([-50.0]),
            "ego_heading": np.array([math.pi / 2], np.float32), "agent_x": np.array([100.0]),
            "agent_y": np.array([-40.0]), "agent_vx": np.array([0.0], np.float32),
            "agent_vy": np.array([5.0], np.float32), "agent_heading": np.array([math.pi / 2], np.float32),
            "agent_length": np.array([4.5], np.float32), "agent_width": np.array([1.8], np.float32)}
    a = agents_in_ego_frame(cols, np.array([0]))
    assert a["x"][0] == pytest.approx(10.0) and a["y"][0] == pytest.approx(0.0, abs=1e-6)
    assert a["vx"][0] == pytest.approx(5.0) and a["vy"][0] == pytest.approx(0.0, abs=1e-6)
    assert a["heading"][0] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ driver, score, windows


def test_driver_metrics_null_where_the_drive_ends():
    target = np.concatenate([plan(5.0 * K), plan(5.0 * K)])
    mask = np.ones((2, 8), bool)
    mask[1, -1] = False
    ade, fde = mt.driver_metrics(np.concatenate([plan(5.0 * K, y=1.0), plan(5.0 * K)]), target, mask)
    assert ade[0] == pytest.approx(1.0) and fde[0] == pytest.approx(1.0)
    assert math.isnan(ade[1]) and math.isnan(fde[1])


def test_score_is_the_documented_formula():
    t = (plan(5.0 * K), logits(0.1, 0.9))
    s = (plan(5.0 * K, y=1.0), logits(0.1, 0.9))
    agents = {"frame": np.array([0]), "x": np.array([30.0]), "y": np.array([3.5]), "vx": np.array([0.0]),
              "vy": np.array([0.0]), "heading": np.array([0.0]), "length": np.array([4.5]),
              "width": np.array([1.8])}
    m = mt.pair_metrics(t, s, CFG, agents)
    assert math.isnan(m["ttc_teacher"][0]) and math.isnan(m["ttc_student"][0])
    assert m["score"][0] == pytest.approx(1.0)  # 1 m ADE, nothing else
    # the student veers into the parked car one lane left: its TTC counts, the teacher's stays null
    s2 = (plan(5.0 * K, y=np.minimum(K, 3.5)), logits(0.1, 0.9))
    m2 = mt.pair_metrics(t, s2, CFG, agents)
    assert math.isnan(m2["ttc_teacher"][0]) and 0 < m2["ttc_student"][0] < 4
    d = mt.displacement_metrics(t[0], s2[0], CFG)
    drop = (4.0 - m2["ttc_student"][0]) / 4.0
    want = d["ade_4s"][0] + 2.0 * d["ahe_4s"][0] + 0.5 * d["miss_4s"][0] + 2.0 * drop
    assert m2["score"][0] == pytest.approx(want, rel=1e-5)
    assert mt.ttc_drop(np.array([1.0]), np.array([3.0]), 4.0)[0] == 0.0, "a safer student adds nothing"


def test_window_aggregates_and_dominant_condition():
    m = {"ade_4s": np.array([1.0, 3.0, 2.0]), "fde_4s": np.array([2.0, 5.0, 4.0]),
         "miss_4s": np.array([False, True, True]), "maneuver_disagree": np.array([True, False, False]),
         "maneuver_jsd": np.array([0.2, 0.4, 0.0]), "score": np.array([1.0, 2.0, 6.0]),
         "ttc_teacher": np.array([np.nan, 2.5, np.nan]), "ttc_student": np.array([np.nan, np.nan, np.nan])}
    agg = mt.window_aggregates(np.array([0, 0, 1]), 2, m)
    assert agg["frames"].tolist() == [2, 1]
    assert agg["mean_ade_4s"].tolist() == [2.0, 2.0] and agg["max_fde_4s"].tolist() == [5.0, 4.0]
    assert agg["miss_rate_4s"].tolist() == [0.5, 1.0] and agg["disagree_rate"].tolist() == [0.5, 0.0]
    assert agg["mean_jsd"][0] == pytest.approx(0.3) and agg["max_score"].tolist() == [2.0, 6.0]
    assert agg["min_ttc_teacher"][0] == 2.5 and math.isnan(agg["min_ttc_teacher"][1])
    assert np.isnan(agg["min_ttc_student"]).all()
    assert mt.dominant(np.array([0, 0, 0, 1]), 2, np.array([2, 1, 2, 3]), 5).tolist() == [2, 3]
