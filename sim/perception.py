"""On-board perception as a degradation of the simulator's truth, vectorised over a whole drive.

The simulator knows every vehicle exactly; the car does not. For each frame t, under the condition of t's segment
(`PerceptionParams`), perception reports the agents as they were at frame `t - latency_frames` (not before the
start of the scene: a new scene is a new place), keeps those that were within `max_range_m` of the ego then, misses
each with probability `drop_prob`, adds Gaussian noise to position, velocity and heading, and lowers confidence with
distance and by `confidence_scale`. Spurious agents (class unknown, confidence below 0.4 x scale) appear at
`false_positive_rate` per frame (Poisson), uniformly over the disc of the perception range, moving along roughly
with the ego like spray or reflections do. At most 64 agents per frame are reported: the nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.contract import MAX_AGENTS_PER_FRAME
from sim.config import PerceptionParams
from ingest.wire import drive_pb2 as pb

AGENT_FIELDS = ("id", "x", "y", "vx", "vy", "heading", "length", "width")


@dataclass
class Perceived:
    """What perception reported, flattened by frame: `count` (n,); every other array (P,) for P reported agents.

    `agents` holds id, agent_class, x, y [m, world], vx, vy [m/s], heading [rad], length, width [m], confidence;
    `false_positive` marks spurious detections; `source_frame` (n,) is the frame whose state was reported.
    """

    count: np.ndarray
    agents: dict[str, np.ndarray]
    false_positive: np.ndarray
    source_frame: np.ndarray


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def perceive(truth_count: np.ndarray, truth: dict[str, np.ndarray], ego: dict[str, np.ndarray],
             condition: np.ndarray, scene_start: np.ndarray, params: list[PerceptionParams],
             rng: np.random.Generator, first_false_positive_id: int) -> Perceived:
    """Degrade the true agents of a drive as on-board perception would.

    truth_count (n,) true agents per frame; truth[f] (A,) for f in `AGENT_FIELDS`, world frame, grouped by frame;
    ego["x"], ego["y"], ego["heading"], ego["speed"] (n,); condition (n,) index into `params`; scene_start (n,)
    first frame of each frame's scene. Spurious agents get ids from `first_false_positive_id` on.
    """
    n = truth_count.shape[0]
    frames = np.arange(n)
    table = {k: np.array([getattr(p, k) for p in params]) for k in PerceptionParams.model_fields}
    per_frame = {k: v[condition] for k, v in table.items()}  # (n,) each
    src = np.maximum(frames - per_frame["latency_frames"].astype(np.int64), scene_start)

    # Candidates: the true agents of each frame's source frame, in frame order.
    off = _offsets(truth_count)
    cnt = truth_count[src]
    m = int(cnt.sum())
    out_frame = np.repeat(frames, cnt)
    within = np.arange(m) - np.repeat(_offsets(cnt)[:-1], cnt)
    idx = np.repeat(off[src], cnt) + within
    cand = {f: truth[f][idx] for f in AGENT_FIELDS}
    sf = src[out_frame]
    dist = np.hypot(cand["x"] - ego["x"][sf], cand["y"] - ego["y"][sf])
    rng_m = per_frame["max_range_m"][out_frame]
    seen = (dist <= rng_m) & (rng.random(m) >= per_frame["drop_prob"][out_frame])

    sigma_p = per_frame["position_noise_std_m"][out_frame]
    sigma_v = per_frame["velocity_noise_std_mps"][out_frame]
    scale = per_frame["confidence_scale"][out_frame]
    noise = rng.standard_normal((6, m))
    tp = {
        "id": cand["id"],
        "agent_class": np.full(m, pb.AGENT_CLASS_CAR, np.int64),
        "x": cand["x"] + sigma_p * noise[0],
        "y": cand["y"] + sigma_p * noise[1],
        "vx": cand["vx"] + sigma_v * noise[2],
        "vy": cand["vy"] + sigma_v * noise[3],
        "heading": _wrap(cand["heading"] + per_frame["heading_noise_std_rad"][out_frame] * noise[4]),
        "length": cand["length"],
        "width": cand["width"],
        # far agents are seen less surely; the condition scales everything down
        "confidence": scale * np.clip(0.98 - 0.3 * dist / rng_m + 0.03 * noise[5], 0.01, 1.0),
    }
    tp = {k: v[seen] for k, v in tp.items()}
    tp_frame, tp_dist = out_frame[seen], dist[seen]

    # Spurious detections around the ego of the frame itself.
    k = rng.poisson(per_frame["false_positive_rate"])
    q = int(k.sum())
    fp_frame = np.repeat(frames, k)
    u = rng.random((7, q))
    r = np.maximum(per_frame["max_range_m"][fp_frame] * np.sqrt(u[0]), 3.0)
    ang = 2 * np.pi * u[1]
    heading = _wrap(ego["heading"][fp_frame] + 0.2 * (u[2] - 0.5))
    speed = ego["speed"][fp_frame] * u[3]
    fp = {
        "id": first_false_positive_id + np.arange(q),
        "agent_class": np.full(q, pb.AGENT_CLASS_UNKNOWN, np.int64),
        "x": ego["x"][fp_frame] + r * np.cos(ang),
        "y": ego["y"][fp_frame] + r * np.sin(ang),
        "vx": speed * np.cos(heading),
        "vy": speed * np.sin(heading),
        "heading": heading,
        "length": 3.5 + 1.5 * u[4],
        "width": 1.6 + 0.4 * u[5],
        "confidence": per_frame["confidence_scale"][fp_frame] * (0.1 + 0.3 * u[6]),
    }

    # Merge, order each frame by distance and keep the nearest MAX_AGENTS_PER_FRAME.
    frame_all = np.concatenate([tp_frame, fp_frame])
    dist_all = np.concatenate([tp_dist, r])
    is_fp = np.concatenate([np.zeros(tp_frame.shape[0], bool), np.ones(q, bool)])
    order = np.lexsort((dist_all, frame_all))
    frame_sorted = frame_all[order]
    counts_all = np.bincount(frame_sorted, minlength=n)
    rank = np.arange(order.shape[0]) - np.repeat(_offsets(counts_all)[:-1], counts_all)
    keep = order[rank < MAX_AGENTS_PER_FRAME]
    agents = {f: np.concatenate([tp[f], fp[f]])[keep] for f in tp}
    return Perceived(count=np.minimum(counts_all, MAX_AGENTS_PER_FRAME), agents=agents,
                     false_positive=is_fp[keep], source_frame=src)
