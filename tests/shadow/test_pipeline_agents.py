"""Selecting the agents of sampled frames (the noise floor's subset) when the last frames have no agents."""

from __future__ import annotations

import numpy as np

from shadow.compute import take_agents


def test_take_agents_of_frames_past_the_last_agent():
    agents = {"frame": np.array([0, 0, 2]), "x": np.array([1.0, 2.0, 3.0])}
    out = take_agents(agents, np.array([2, 5]))  # frame 5 has no agents and lies past every agent's frame
    assert out["frame"].tolist() == [0] and out["x"].tolist() == [3.0]
    none = take_agents({"frame": np.array([], int), "x": np.array([])}, np.array([0, 3]))
    assert none["frame"].size == 0
