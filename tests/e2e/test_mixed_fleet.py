"""A mixed fleet on real parts: drives imported from Waymo and Argoverse 2 files and drives logged by vehicles upload
through the agent (gRPC server, Tansu, sink) into one lake; a plug-in pair (the transformer teacher, the MLP-Mixer
student with its own featurizer) replays it; SQL and mining group by source."""

from __future__ import annotations

import asyncio

import torch

from ingest.agent import run_agent
from ingest.config import AgentConfig
from ingest.importers import samples
from ingest.importers.run import import_sources
from ingest.lake import write_drive
from ingest.synth import synthetic_drive
from retrain.cycle.mining import MiningConfig, mine
from retrain.models.architectures import Planner, PlannerConfig, export_onnx
from retrain.models.mixer import MixerConfig
from retrain.models.plugins import MIXER, export
from shadow.batch.replay import replay
from shadow.catalog import Catalog
from shadow.config import ReplayConfig
from shadow.spec import ModelSpec, write_spec
from tests.e2e.test_e2e import SinkThread, wait_for_rows
from tests.ingest_helpers import running_server


def test_two_formats_and_the_fleet_in_one_lake_replayed_by_a_plugin_pair(kafka_config, group_id, tmp_path):
    drives, lake = tmp_path / "drives", tmp_path / "lake"
    waymo = samples.write_waymo(tmp_path / "src" / "w.tfrecord", [(f"w{i}", samples.scene(91, agents=6, seed=i))
                                                                   for i in range(2)])
    av2 = [samples.write_av2(tmp_path / "src" / "av2", samples.scene(110, agents=6, seed=10 + i), f"a{i}")
           for i in range(2)]
    total = import_sources("waymo", [waymo], drives).frames + import_sources("av2", av2, drives).frames
    for i in range(2):
        write_drive(drives, synthetic_drive(f"fleet-{i}", "veh-1", 120, agents=6, seed=i))
        total += 120

    async def upload():
        async with running_server(kafka_config) as (_, port):
            return await run_agent(AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=40, concurrency=4), drives)

    with SinkThread(kafka_config, lake, group_id):
        report = asyncio.run(upload())
        assert report.uploaded == 6 and not report.failed
        assert wait_for_rows(lake, total) == total

    torch.manual_seed(0)
    teacher = export_onnx(Planner(PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)),
                          tmp_path / "teacher" / "model.onnx")
    write_spec(ModelSpec(name="teacher", version="v1"), teacher)
    student = tmp_path / "student"
    export(MIXER, MIXER.build(MixerConfig(width=16, depth=1, token_hidden=8, channel_hidden=32).model_dump()),
           student, "student-mixer", "v0")
    rep = replay(lake, teacher.parent, student, ReplayConfig(group_frames=256))
    assert rep.frames_replayed == total
    by_source = {r["value"]: r["frames"] for r in rep.by_condition if r["group"] == "source"}
    assert by_source == {"waymo": 182, "av2": 220, "fleet": 240}  # the replay's report groups by source too

    with Catalog(lake) as cat:
        by_source = cat.saved("divergence_by_source")
        frames = dict(zip(by_source["source"].to_pylist(), by_source["frames"].to_pylist()))
        assert frames == {"waymo": 182, "av2": 220, "fleet": 240}
        assert set(by_source["pair"].to_pylist()) == {"teacher-v1__student-mixer-v0"}
        decisions = cat.arrow("SELECT model, featurizer_version, count(*) AS n FROM decisions GROUP BY ALL "
                              "ORDER BY model").to_pylist()
        assert decisions == [{"model": "student-mixer-v0", "featurizer_version": "mix-v1", "n": total},
                             {"model": "teacher-v1", "featurizer_version": "feat-v1", "n": total}]
    mined = mine(lake, MiningConfig(require_noise_floor=False, min_score=0.0, tail_quantile=0,
                                    max_per_drive=1, min_window_frames=5))
    sources = mined.to_dict()["by_source"]
    assert set(sources) == {"waymo", "av2", "fleet"}  # balanced over sources: each gets its windows
    assert all(it.source in sources for it in mined.items)
