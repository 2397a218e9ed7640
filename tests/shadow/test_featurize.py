"""The featurizer against hand-computed values on tiny hand-made drives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ingest.contract import Frames, frames_to_arrow
from ingest.synth import synthetic_frames
from shadow import featurize as fz
from shadow.featurize import featurize


def straight_drive(n: int = 60, speed: float = 10.0, heading: float = 0.5, yaw_rate: float = 0.0,
                   agents: list[tuple[float, float, float, int]] | None = None) -> Frames:
    """Ego at constant speed from (100, -50) with constant yaw rate, 10 Hz. Agents: (forward m, left m, speed, class)
    fixed relative to the ego, moving with the same heading."""
    agents = agents if agents is not None else [(10.0, 0.0, 10.0, 1), (0.0, 5.0, 12.0, 2)]
    f = synthetic_frames(n, agents=max(1, len(agents)), seed=0)
    c = f.cols
    t = np.arange(n) * 0.1
    psi = heading + yaw_rate * t
    if yaw_rate:
        x = 100 + speed / yaw_rate * (np.sin(psi) - np.sin(heading))
        y = -50 - speed / yaw_rate * (np.cos(psi) - np.cos(heading))
    else:
        x, y = 100 + speed * t * np.cos(heading), -50 + speed * t * np.sin(heading)
    c.update(ego_x=x, ego_y=y, ego_heading=psi.astype(np.float32), ego_speed=np.full(n, speed, np.float32),
             ego_accel=np.zeros(n, np.float32), ego_yaw_rate=np.full(n, yaw_rate, np.float32),
             lane_heading=psi.astype(np.float32))
    na = len(agents)
    fwd = np.array([a[0] for a in agents])
    left = np.array([a[1] for a in agents])
    cp, sp = np.cos(psi)[:, None], np.sin(psi)[:, None]
    aspeed = np.array([a[2] for a in agents])[None, :]
    c.update(agent_count=np.full(n, na, np.uint32), agent_id=np.tile(np.arange(1, na + 1, dtype=np.uint32), n),
             agent_class=np.tile(np.array([a[3] for a in agents], np.int32), n),
             agent_x=(x[:, None] + fwd * cp - left * sp).ravel(), agent_y=(y[:, None] + fwd * sp + left * cp).ravel(),
             agent_vx=(aspeed * cp).astype(np.float32).ravel(), agent_vy=(aspeed * sp).astype(np.float32).ravel(),
             agent_heading=np.repeat(psi, na).astype(np.float32),
             agent_length=np.full(n * na, 4.5, np.float32), agent_width=np.full(n * na, 1.8, np.float32),
             agent_confidence=np.full(n * na, 0.9, np.float32))
    return f


def test_shapes_and_dtypes():
    f = featurize(straight_drive())
    n = 60
    assert f.ego_hist.shape == (n, fz.HISTORY, fz.EGO_FEATURES)
    assert f.agents.shape == (n, fz.MAX_AGENTS, fz.AGENT_FEATURES)
    assert f.agent_mask.shape == (n, fz.MAX_AGENTS)
    assert f.lane.shape == (n, fz.LANE_FEATURES)
    assert f.traj.shape == (n, fz.HORIZON, 3) and f.traj_mask.shape == (n, fz.HORIZON)
    for a in f.inputs().values():
        assert a.dtype == np.float32 and a.flags.c_contiguous and np.isfinite(a).all()


def test_straight_constant_speed_future_is_vt_0_0():
    v = 10.0
    f = featurize(straight_drive(speed=v))
    t = fz.HORIZON_DT_S * np.arange(1, fz.HORIZON + 1)
    expect = np.stack([v * t, np.zeros_like(t), np.zeros_like(t)], axis=-1)
    np.testing.assert_allclose(f.traj[0], expect, atol=1e-4)
    np.testing.assert_allclose(f.traj[19], expect, atol=1e-4)
    # frame i has waypoint k (1-based) iff i + 5k <= 59
    i, k = np.meshgrid(np.arange(60), np.arange(1, fz.HORIZON + 1), indexing="ij")
    np.testing.assert_array_equal(f.traj_mask, i + 5 * k <= 59)
    assert (f.traj[~f.traj_mask] == 0).all()


def test_turning_future_yaw_and_lateral():
    v, w = 10.0, 0.2
    f = featurize(straight_drive(speed=v, yaw_rate=w, heading=3.0))  # crosses +-pi: yaw must stay wrapped
    t = fz.HORIZON_DT_S * np.arange(1, fz.HORIZON + 1)
    expect = np.stack([v / w * np.sin(w * t), v / w * (1 - np.cos(w * t)), w * t], axis=-1)
    np.testing.assert_allclose(f.traj[10], expect, atol=1e-3)


def test_ego_history_tokens():
    v = 10.0
    f = featurize(straight_drive(speed=v))
    h = np.arange(fz.HISTORY)
    lag = (fz.HISTORY - 1 - h) * 0.1
    tok = f.ego_hist[20]
    np.testing.assert_allclose(tok[:, 0], -v * lag / fz.POS_SCALE_M, atol=1e-5)
    np.testing.assert_allclose(tok[:, 1], 0, atol=1e-5)
    np.testing.assert_allclose(tok[:, 2:4], np.tile([1.0, 0.0], (fz.HISTORY, 1)), atol=1e-6)
    np.testing.assert_allclose(tok[:, 4], v / fz.VEL_SCALE_MPS, atol=1e-6)
    np.testing.assert_allclose(tok[:, 7], -lag, atol=1e-6)
    assert (tok[:, 8] == 1).all()
    # frame 3: tokens for frames -6..-1 do not exist, repeat frame 0 and are flagged invalid
    early = f.ego_hist[3]
    np.testing.assert_array_equal(early[:, 8], [0] * 6 + [1] * 4)
    np.testing.assert_allclose(early[:6, 0], -v * 0.3 / fz.POS_SCALE_M, atol=1e-5)


def test_agent_tokens_nearest_first_in_ego_frame():
    f = featurize(straight_drive(speed=10.0, agents=[(10.0, 0.0, 10.0, 1), (0.0, 5.0, 12.0, 2)]))
    a = f.agents[30]
    np.testing.assert_array_equal(f.agent_mask[30], [1, 1] + [0] * (fz.MAX_AGENTS - 2))
    # nearest first: the agent 5 m to the left, then the one 10 m ahead
    np.testing.assert_allclose(a[0, :10], [0, 5 / 20, 2 / 10, 0, 1, 0, 4.5 / 5, 1.8 / 2, 0.9, 5 / 20], atol=1e-5)
    np.testing.assert_allclose(a[1, :10], [10 / 20, 0, 0, 0, 1, 0, 4.5 / 5, 1.8 / 2, 0.9, 10 / 20], atol=1e-5)
    np.testing.assert_array_equal(a[0, 10:], np.eye(6)[2])  # truck
    np.testing.assert_array_equal(a[1, 10:], np.eye(6)[1])  # car
    assert (a[2:] == 0).all()


def test_keeps_k_nearest_of_many_and_handles_no_agents():
    many = [(float(d), 0.0, 10.0, 1) for d in range(40, 0, -1)]  # 40 agents, farthest first
    f = featurize(straight_drive(agents=many))
    np.testing.assert_allclose(f.agents[5, :, 9] * 20, np.arange(1, fz.MAX_AGENTS + 1), atol=1e-4)
    assert f.agent_mask.all()
    g = featurize(_no_agents())
    assert (g.agent_mask == 0).all() and (g.agents == 0).all()


def _no_agents() -> Frames:
    f = straight_drive(agents=[(5.0, 0.0, 1.0, 1)])
    c = f.cols
    c["agent_count"][:] = 0
    for k in [k for k in c if k.startswith("agent_") and k != "agent_count"]:
        c[k] = c[k][:0]
    return f


def test_lane_vector():
    f = featurize(straight_drive())
    lane = f.lane[0]
    c = straight_drive().cols
    assert lane[0] == pytest.approx(c["lane_count"][0] / 4)
    np.testing.assert_allclose(lane[3:5], [1, 0], atol=1e-6)
    np.testing.assert_array_equal(lane[11:], np.eye(6)[c["road_type"][0]])


def test_table_input_equals_frames_and_drives_do_not_leak():
    a, b = straight_drive(speed=10.0), straight_drive(speed=20.0, heading=-1.0)
    ta = pa.Table.from_batches([frames_to_arrow(a, "a", "v", 0)])
    tb = pa.Table.from_batches([frames_to_arrow(b, "b", "v", 0)])
    fa = featurize(a)
    both = featurize(pa.concat_tables([ta, tb]))
    first = both.take(slice(0, 60))
    for name in ("ego_hist", "agents", "agent_mask", "lane", "traj", "traj_mask"):
        np.testing.assert_allclose(getattr(first, name), getattr(fa, name), atol=1e-5)
    # the first frame of drive b has no history from drive a, the last frames of a no future from b
    assert (both.ego_hist[60, :-1, 8] == 0).all()
    assert not both.traj_mask[59].any()


def test_dropped_frame_masks_its_target():
    f = straight_drive()
    f.cols["timestamp_ns"][30:] += 100_000_000  # a frame went missing after frame 29
    out = featurize(f)
    # frame 25 waypoint 1 wants t+0.5 s = frame 30 nominally, which is now 0.6 s ahead
    assert not out.traj_mask[25, 0]
    assert out.traj_mask[31, 0]


def test_lake_table_with_extra_columns_and_a_seq_gap():
    f = straight_drive()
    t = pa.Table.from_batches([frames_to_arrow(f, "a", "v", 0)])
    t = t.append_column("kafka_offset", pa.array(np.arange(60, dtype=np.int64)))
    gap = pa.concat_tables([t.slice(0, 30), t.slice(35)])  # seq 30..34 missing: a new segment starts at seq 35
    out = featurize(gap)
    assert len(out) == 55
    assert (out.ego_hist[30, :-1, 8] == 0).all() and (out.ego_hist[29, :, 8] == 1).all()
    assert not out.traj_mask[29].any()  # frames 30.. of the first run are not there: no future either
    np.testing.assert_array_equal(out.traj_mask[0], [True] * 5 + [False] * 3)  # frame 25 is the run's last reachable
    np.testing.assert_allclose(out.traj[0, :5], featurize(f).traj[0, :5], atol=1e-5)
