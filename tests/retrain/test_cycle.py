"""One flywheel cycle on a tiny real world: synthetic drives in a real Parquet lake, a teacher and a student made by
the real recipes (a few steps), real shadow replay and onnxruntime, real compression, real highway-env episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from ingest.contract import frames_to_arrow
from ingest.lake import live_files, write_drive
from ingest.synth import EPOCH_NS, synthetic_frames
from retrain.models.architectures import PlannerConfig
from retrain.cycle.cycle import CycleConfig, format_result, run_cycle
from retrain.cycle.results import CycleResult
from retrain.cycle.dataset import load_snapshot, write_frames_lake
from retrain.cycle.gates import GateConfig, evaluate_gates
from retrain.cycle.verify import VerificationConfig
from retrain.cycle.registry import Registry
from retrain.models.qat import module_of_node
from retrain.models.training import load_checkpoint, save_checkpoint
from shadow.config import ReplayConfig
from shadow.batch.replay import replay
from shadow.spec import read_spec

DRIVES, FRAMES = 12, 150
TINY_T = PlannerConfig(width=16, depth=1, heads=2, head_dim=8, ffn=32)
TINY_S = PlannerConfig(width=8, depth=1, heads=2, head_dim=4, ffn=16)


def synthetic_drive(i: int) -> pa.Table:
    """A synthetic drive whose conditions change by window: drive i has glare (with the tunnel tag's lighting) in
    its second window when i % 3 == 0, night in its first when i % 4 == 1, rain in its last when i % 2 == 1."""
    f = synthetic_frames(FRAMES, agents=6, waypoints=8, seed=i, start_ns=EPOCH_NS + i * 10**12)
    c = f.cols
    c["road_type"][:] = 1 + i % 2  # highway, merge
    if i % 3 == 0:
        c["lighting"][50:100] = 3
    if i % 4 == 1:
        c["lighting"][:50] = 2
    if i % 2 == 1:
        c["weather"][100:] = 2
    return pa.Table.from_batches([frames_to_arrow(f, f"drive-{i:02d}", f"veh-{i % 4}", 0)])


def tiny_world(root: Path) -> dict:
    """Drives, teacher and student v0 (registered, student promoted), the lake and its shadow replay; built once
    per test session under `root` and reused."""
    from retrain.recipes.student import StudentConfig
    from retrain.recipes.student import run as run_student
    from retrain.recipes.teacher import TeacherConfig
    from retrain.recipes.teacher import run as run_teacher

    world = {"root": root, "lake": root / "lake", "registry": root / "registry", "drives": root / "drives"}
    if (root / "ready").exists():
        return world
    tables = [synthetic_drive(i) for i in range(DRIVES)]
    for t in tables:
        write_drive(world["drives"], t)
    optim = {"steps": 8, "batch_size": 32, "warmup_steps": 2}
    run_teacher(TeacherConfig(drives_dir=world["drives"], out_dir=root / "teacher", model=TINY_T, optim=optim,
                              registry=world["registry"]))
    reg = Registry(world["registry"])
    run_student(StudentConfig(drives_dir=world["drives"], teacher=reg.version_dir("teacher", "v1"),
                              out_dir=root / "student", model=TINY_S, optim=optim, registry=world["registry"],
                              prune={"importance_batches": 1, "finetune": {"steps": 2, "warmup_steps": 1,
                                                                            "batch_size": 32}},
                              quant={"calibration_frames": 64}))
    reg.promote("student", "v0", "student v0")
    write_frames_lake(world["lake"], pa.concat_tables(tables), partitions=2)
    replay(world["lake"], reg.version_dir("teacher", "v1"), reg.version_dir("student", "v0"),
           ReplayConfig(drive_end_idle_s=0.0, noise_every=5))
    (root / "ready").touch()
    return world


def config(world: dict, **override) -> CycleConfig:
    fields = {"lake": world["lake"], "registry": world["registry"], "teacher": "teacher:v1", "student": "student:v0",
              "snapshots_dir": world["root"] / "snapshots",
              "mining": {"max_windows": 14, "max_per_drive": 2, "noise_margin": 1.0},
              "finetune": {"steps": 8, "batch_size": 32, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 2},
              "targets": ["cpu", "orin"],
              "compress": {"calibration_frames": 128, "fallback_frames": 64, "latency_runs": 3, "latency_warmup": 1},
              "verification": {"closed_loop": {"scenarios": ["highway"], "episodes": 1, "max_steps": 15},
                               "conditions": ["nominal"]},
              "gates": {"min_mined_frames": 10, "min_elsewhere_frames": 10}, **override}
    return CycleConfig.model_validate(fields)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.getbasetemp() / "flywheel-world")


@pytest.fixture(scope="module")
def cycle_run(world, tmp_path_factory):
    """A cycle killed as verification starts, then resumed: (result, progress events of both runs, work dir)."""
    work = tmp_path_factory.mktemp("cycle")
    events: list[tuple] = []

    def killer(step, done, total, info):
        events.append(("first", step, info.get("status")))
        if step == "verify" and info.get("status") == "started":
            raise Killed("killed as verification starts")

    with pytest.raises(Killed):
        run_cycle(config(world), work, progress=killer)
    records = {p.name: p.read_text() for p in work.glob("*.json")}
    result = run_cycle(config(world), work, progress=lambda s, d, n, i: events.append(("second", s, i.get("status"))))
    return result, events, work, records


def test_cycle_result_has_every_section(cycle_run, world):
    result, _, work, _ = cycle_run
    assert isinstance(result, CycleResult)
    d = result.divergence
    for where in ("mined", "elsewhere"):
        for when in ("before", "after"):
            assert d[where][when]["frames"] > 0 and d[where][when]["mean_score"] >= 0
        assert d[where]["change"]["mean_score"] is not None
    assert {r["set"] for r in d["by_condition"]} == {"mined", "elsewhere"}
    for where in ("mined", "elsewhere"):  # the FP32 models too (attribution)
        assert d["fp32"][where]["after"]["frames"] == d[where]["after"]["frames"]
    assert {r["condition"] for r in d["by_condition"]} <= {"nominal", "glare", "night", "rain"}
    for who in ("before", "after", "expert"):
        cl = result.closed_loop[who]
        assert cl["episodes"] == 1 and cl["collisions"] >= 0 and cl["min_ttc_s"] >= 0
        assert cl["mean_min_ttc_s"] is not None and cl["comfortable_rate"] is not None
    for where in ("mined", "elsewhere"):  # both students driven through every held-out window of the log
        lr = result.log_replay[where]
        assert lr["windows"] == d[where]["after"]["frames"]
        for who in ("before", "after"):
            assert all(0.0 <= lr[who][k] <= 1.0 for k in ("score", "no_at_fault_collision", "ego_progress"))
        assert f"log_replay_{where}" in {c["name"] for c in result.gate["checks"]}
    assert [t["chip"] for t in result.targets] == ["cpu", "orin"]
    for t in result.targets:
        assert t["bytes"] > 0 and t["cpu_latency_ms_measured"] > 0 and t["latency_ms_estimate"] > 0
        assert "estimate" in t["latency_estimate_label"]
    assert result.gate["status"] in ("promoted", "rejected") and result.passed == result.gate["passed"]
    assert result.status == result.gate["status"]
    assert set(result.steps) == {"mine", "snapshot", "baseline", "finetune", "compress", "verify", "gate", "register"}
    assert all(v["seconds"] >= 0 for v in result.steps.values()) and result.wall_s > 0
    assert result.mining["windows"] > 0 and result.mining["threshold"] is not None
    assert result.parent["checkpoint_source"].startswith("spec of student")
    # the registry holds the candidate with its lineage, in the state the gate decided
    reg = Registry(world["registry"])
    main = reg.get("student", result.candidate["version"])
    assert main.status == result.status
    assert main.parents[:2] == ["student:v0", "teacher:v1"] and main.dataset_sha256 == result.snapshot["content_sha256"]
    orin = reg.get("student-orin", result.candidate["version"])
    assert orin.parents == [main.ref] and orin.status == result.status
    # the current student compressed for each chip is the baseline: registered, compared in the gate, and what
    # verification replays as "before" (the verified chip's artifact, not the generic student:v0)
    for t in result.targets:
        base = reg.get(f"student-{t['chip']}", "v0")
        assert t["baseline"]["ref"] == base.ref and base.status == "promoted" and base.parents == ["student:v0"]
        assert t["int8_matmul_share"] >= t["baseline"]["int8_matmul_share"] - 1e-9  # the bounded fallback
        for name in ("int8_share", "integer_share", "size", "latency"):
            assert f"{t['chip']}_compression_{name}" in {c["name"] for c in result.gate["checks"]}
    # the quantization-aware phase fake-quantized exactly the products the current student runs in INT8 on a chip
    ft = result.finetune
    assert ft["qat_started_at"] is not None
    int8 = set()
    for t in result.targets:
        nodes = read_spec(reg.version_dir(f"student-{t['chip']}", "v0"), verify=False).extra["int8_nodes"]
        int8 |= {module_of_node(n) for n in nodes}
    linears = {n for n, m in load_checkpoint(Path(ft["checkpoint"])).named_modules() if isinstance(m, torch.nn.Linear)}
    assert int8 and int8 < linears and set(ft["qat_skipped"]) == linears - int8
    verify_rec = json.loads((work / "verify.json").read_text())["output"]
    assert "student-cpu" in json.dumps(verify_rec) or reg.version_dir("student-cpu", "v0").name in json.dumps(
        verify_rec)
    table = format_result(result)
    assert "ESTIMATE" in table and "measured" in table and result.candidate["version"] in table
    assert json.loads((work / "result.json").read_text())["cycle_id"] == result.cycle_id


def test_next_cycle_finds_the_candidates_chip_artifacts_as_baselines(cycle_run, world, tmp_path):
    from retrain.compress.targets import load_targets
    from retrain.compress.workflow import CompressConfig
    from retrain.cycle.baseline import chip_baselines

    result, *_ = cycle_run
    reg = Registry(world["registry"])
    cand = reg.get("student", result.candidate["version"])
    targets = load_targets(chips=[t["chip"] for t in result.targets])
    # no frames and no checkpoint: anything not found in the registry would have to be compressed and fail
    base = chip_baselines(reg, cand, tmp_path / "none.pt", targets, None, None, None, CompressConfig(), tmp_path,
                          tmp_path / "b", register=False)
    assert {c: b.source for c, b in base.items()} == {c: "registry" for c in targets}
    for t in result.targets:
        assert base[t["chip"]].bytes == t["bytes"] and base[t["chip"]].int8_matmul_share == t["int8_matmul_share"]


def test_killed_cycle_resumes_and_skips_finished_steps(cycle_run):
    result, events, work, records = cycle_run
    first = [(s, st) for who, s, st in events if who == "first"]
    assert ("verify", "started") in first and ("register", "started") not in first
    assert set(records) == {"cycle.json", "mine.json", "snapshot.json", "baseline.json", "finetune.json", "compress.json"}
    resumed = {k for k, v in result.steps.items() if v["resumed"]}
    assert resumed == {"mine", "snapshot", "baseline", "finetune", "compress"}
    second = [(s, st) for who, s, st in events if who == "second"]
    assert ("finetune", "resumed") in second and ("verify", "started") in second
    for name in ("mine.json", "snapshot.json", "baseline.json", "finetune.json", "compress.json"):
        assert (work / name).read_text() == records[name]  # untouched by the second run


def test_held_out_split_by_drive(cycle_run):
    result, *_ = cycle_run
    snap = load_snapshot(Path(result.snapshot["path"]))
    drives = snap.manifest["split"]["drives"]
    sets = [set(drives[s]) for s in ("train", "val", "test")]
    assert all(sets) and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    t = snap.table()
    by_split: dict[str, set] = {}
    for d, s in zip(t["drive_id"].to_pylist(), t["split"].to_pylist()):
        by_split.setdefault(d, set()).add(s)
    assert all(len(v) == 1 for v in by_split.values())  # every drive in exactly one split
    for it in snap.manifest["items"]:
        assert it["drive_id"] in drives[it["split"]]
    counts = snap.manifest["counts"]["frames"]
    assert result.finetune["frames"]["train_mined"] == counts["train"]["mined"]
    assert result.finetune["frames"]["val_mined"] == counts["val"]["mined"]
    # judged only on test drives: every divergence the verification used comes from them
    verify = json.loads((Path(result.work_dir) / "verify.json").read_text())["output"]
    lake_drives = {d for f in live_files(Path(verify["lake"]), "frames")
                   for d in pq.read_table(f.path, columns=["drive_id"])["drive_id"].unique().to_pylist()}
    assert lake_drives == sets[2]


def test_damaged_candidate_is_rejected_with_reasons(world, tmp_path):
    reg = Registry(world["registry"])
    good = load_checkpoint(world["root"] / "student" / "checkpoint.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in good.parameters():
            p.add_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 0.1) * 3 + 0.2)
    bad = save_checkpoint(good, tmp_path / "damaged.pt")
    in_service = [e.ref for e in reg.list("student") if e.status == "promoted"]
    cfg = config(world, student_checkpoint=bad, targets=["cpu"], finetune={"steps": 0},
                 candidate_version="v0.damaged")
    result = run_cycle(cfg, tmp_path / "work")
    assert result.status == "rejected" and not result.passed
    text = " ".join(result.reasons)
    assert "where mined" in text and "elsewhere" in text
    assert result.divergence["elsewhere"]["change"]["mean_score"] > 0.1
    entry = reg.get("student", "v0.damaged")
    assert entry.status == "rejected" and "where mined" in entry.note
    assert [e.ref for e in reg.list("student") if e.status == "promoted"] == in_service  # still in service


def test_gates_on_figures():
    fig = {"divergence": {"mined": {"before": {"mean_score": 1.0, "frames": 100}, "after": {"mean_score": 0.4,
                                                                                          "frames": 100}},
                          "elsewhere": {"before": {"mean_score": 1.0, "frames": 100},
                                        "after": {"mean_score": 1.05, "frames": 100}}},
           "closed_loop": {"before": {"collisions": 1, "mean_min_ttc_s": 5.0, "episodes": 8},
                           "after": {"collisions": 1, "mean_min_ttc_s": 4.8, "episodes": 8}},
           "log_replay": {"mined": {"windows": 40, "before": {"score": 0.40}, "after": {"score": 0.45}},
                          "elsewhere": {"windows": 90, "before": {"score": 0.70}, "after": {"score": 0.70}}},
           "criteria": {"overall": {"required": 0.9, "all": {"windows": 36, "before": {"pass_rate": 30 / 36},
                                                             "after": {"pass_rate": 34 / 36}}},
                        "criteria": {"fde_4s": {"required": 0.9, "all": {"windows": 36, "before": {"pass_rate": 0.9},
                                                                         "after": {"pass_rate": 0.9}}}}},
           "targets": [{"chip": "orin", "size_budget_met": True, "latency_budget_met": True, "verified": True,
                        "bytes": 600_000, "latency_ms_estimate": 0.05, "int8_matmul_share": 0.95,
                        "integer_matmul_share": 0.95, "baseline": {
                            "ref": "student-orin:v0", "bytes": 590_000, "latency_ms_estimate": 0.048,
                            "int8_matmul_share": 0.95, "integer_matmul_share": 0.95}}]}
    assert evaluate_gates(GateConfig(), fig).passed
    fig["closed_loop"]["after"]["collisions"] = 2
    fig["targets"][0]["latency_budget_met"] = False
    d = evaluate_gates(GateConfig(), fig)
    assert not d.passed and {c.name for c in d.checks if not c.passed} == {"closed_loop_collisions", "orin_latency"}
    fig["divergence"]["mined"]["after"]["frames"] = 3
    d = evaluate_gates(GateConfig(), fig)
    assert any("held-out mined frames" in r for r in d.reasons)
    assert not evaluate_gates(GateConfig(), {}).passed  # a missing figure never passes
    assert not evaluate_gates(GateConfig(), {**fig, "criteria": None}).passed
    fig["divergence"]["mined"]["after"]["frames"] = 100
    fig["closed_loop"]["after"]["collisions"] = 1
    fig["targets"][0]["latency_budget_met"] = True
    assert evaluate_gates(GateConfig(), fig).passed
    fig["log_replay"]["elsewhere"]["after"]["score"] = 0.69  # the candidate drives the logged windows worse
    d = evaluate_gates(GateConfig(), fig)
    assert [c.name for c in d.checks if not c.passed] == ["log_replay_elsewhere"]
    assert d.reasons == ["log-replay score elsewhere 0.7 -> 0.69 over 90 windows; may fall at most 0.0"]
    assert evaluate_gates(GateConfig(log_replay_margin=0.02), fig).passed
    del fig["log_replay"]["mined"]
    assert "log_replay_mined" in {c.name for c in evaluate_gates(GateConfig(log_replay_margin=0.02), fig).checks
                                  if not c.passed}  # missing: fails


def test_gate_rejects_a_candidate_that_gives_the_compression_back():
    base = {"ref": "student-journey6:v0", "bytes": 600_000, "latency_ms_estimate": 0.040, "int8_matmul_share": 0.96,
            "integer_matmul_share": 1.0}
    ok = {"chip": "journey6", "size_budget_met": True, "latency_budget_met": True, "verified": True, "bytes": 650_000,
          "latency_ms_estimate": 0.043, "int8_matmul_share": 0.96, "integer_matmul_share": 1.0, "baseline": base}
    cfg = GateConfig(mined_reduction=None, elsewhere_increase=None, closed_loop=False, log_replay=False, criteria=False)
    assert evaluate_gates(cfg, {"targets": [ok]}).passed  # +8% size, +7.5% latency: within 10%
    cases = {"journey6_compression_int8_share": {"int8_matmul_share": 0.60},  # products fell back to INT16
             "journey6_compression_integer_share": {"integer_matmul_share": 0.9},
             "journey6_compression_size": {"bytes": 661_000},
             "journey6_compression_latency": {"latency_ms_estimate": 0.045}}
    for name, change in cases.items():
        d = evaluate_gates(cfg, {"targets": [{**ok, **change}]})
        failed = [c for c in d.checks if not c.passed]
        assert not d.passed and [c.name for c in failed] == [name], (name, d.reasons)
        assert d.reasons == [failed[0].detail] and "journey6" in d.reasons[0] and "student-journey6:v0" in (
            d.reasons[0] if "share" in name else "student-journey6:v0")
    d = evaluate_gates(cfg, {"targets": [{**ok, "baseline": None}]})
    assert not d.passed and d.reasons == ["journey6: no current student on this chip to compare the compression with"]
    assert evaluate_gates(cfg.model_copy(update={"compression": False}), {"targets": [{**ok, "bytes": 10**7}]}).passed


def test_criteria_pass_rates_from_the_verification_lake(cycle_run, world):
    """The per-criterion pass rates of verify.json, the result and its summary match the lake's scenario windows
    counted here directly; a lake judged with another criteria file is refused."""
    from retrain.cycle.verify import VerificationError, scenario_windows
    from shadow.catalog import Catalog
    from shadow.criteria import load_criteria, parse_criteria

    result, _, work, _ = cycle_run
    rec = json.loads((work / "verify.json").read_text())["output"]
    fig = rec["criteria"]
    assert result.criteria.model_dump() == fig and fig["version"] == load_criteria().version
    with Catalog(Path(rec["lake"])) as cat:
        for who in ("before", "after"):
            rows = cat.arrow("SELECT passed, failed_criteria FROM scenarios WHERE pair = $p",
                             {"p": rec["pairs"][who]}).to_pylist()
            n = len(rows)
            assert n > 0 and fig["overall"]["all"]["windows"] == n
            assert fig["overall"]["all"][who]["passed"] == sum(r["passed"] for r in rows)
            for name, c in fig["criteria"].items():  # every default criterion is enabled on every window
                assert c["all"]["windows"] == n and c["required"] == 0.9
                assert c["all"][who]["passed"] == sum(name not in r["failed_criteria"] for r in rows)
                assert c["mined"]["windows"] + c["elsewhere"]["windows"] == n and c["mined"]["windows"] > 0
        assert set(fig["criteria"]) == set(load_criteria().spec.criteria)
        with pytest.raises(VerificationError, match="another criteria file"):
            scenario_windows(cat, rec["pairs"]["before"], rec["pairs"]["after"],
                             parse_criteria("criteria: {a: {metric: mean_ade_4s, max: 1}}"))
    names = {c["name"] for c in result.gate["checks"]}
    assert {f"criterion_{n}" for n in fig["criteria"]} | {"criteria_all"} <= names
    assert "acceptance criteria on held-out scenario windows" in format_result(result)


def test_bad_configs_are_refused(world):
    with pytest.raises(ValidationError, match="verification.chip"):
        config(world, targets=["orin"])
    with pytest.raises(ValidationError, match="extra"):
        config(world, surprise=1)
    with pytest.raises(ValidationError, match="unknown closed-loop conditions"):
        VerificationConfig(conditions=["snow"])
    with pytest.raises(ValidationError):
        GateConfig(mined_reduction=2.0)
    with pytest.raises(ValidationError, match="leaves no drive"):
        config(world, dataset={"val_fraction": 0.5, "test_fraction": 0.5})


def test_report_reads_the_typed_result_and_its_verify_record(cycle_run):
    from retrain.cycle.report_data import load_data
    from retrain.cycle.results import VerifyRecord

    result, _, work, _ = cycle_run
    doc = json.loads((work / "result.json").read_text())
    assert CycleResult.model_validate(doc) == result  # result.json is the typed result, losslessly
    verified = VerifyRecord.model_validate(json.loads((work / "verify.json").read_text())["output"])
    assert verified.models["teacher"] == "teacher-v1" and verified.models["after"].endswith(result.candidate.version)
    cpu = ["CPUExecutionProvider"]
    assert verified.execution["after"]["providers"] == verified.execution["teacher"]["providers"] == cpu
    data = load_data(doc, None)
    assert data.summary["student before"] == result.parent.ref and data.summary["pair after"] == verified.pairs["after"]
    assert [t["chip"] for t in data.targets] == [t.chip for t in result.targets]
    assert data.gate["status"] == result.status and len(data.gate["checks"]) == len(result.gate.checks)
    assert ("teacher", result.teacher.ref) in data.lineage
    assert data.scenes and "scenes" in data.missing  # drawn from the verification lake the record names
