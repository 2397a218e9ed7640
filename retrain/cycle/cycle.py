"""One flywheel cycle: mine -> snapshot -> fine-tune -> compress per target -> verify -> gate -> registry.

    result = run_cycle(CycleConfig(lake="data/lake", registry="data/registry"), "data/cycles/c1", progress=None)

Models come from the registry: the teacher and the current student (its promoted version unless named), the
student's torch checkpoint from `student_checkpoint`, else its spec (`extra.checkpoint`, or the student recipe's
out_dir), else rebuilt from the registered FP32 ONNX (`retrain.models.onnx_import.planner_from_onnx`, checked).

Steps, each writing its record `<work_dir>/<step>.json` atomically when done (resume=True skips a step whose record
exists, so a killed cycle continues where it stopped; the fine-tune also resumes inside its step from its state):

1. mine      windows by SQL or by score above the noise floor (`retrain.cycle.mining`) of the pair (teacher, student);
2. snapshot  an immutable dataset snapshot split by drive (`retrain.cycle.dataset`);
   baseline  the current student's artifact for every chip (`retrain.cycle.baseline`: from the registry, else
             compressed from its checkpoint and registered): what the candidate is compared with, on the chip's
             numerics, in verification and in the compression gates;
3. finetune  distillation on the mined train windows plus a replay sample (`retrain.cycle.finetune`; a plug-in
             planner's, `retrain.models.plugins`, by `retrain.cycle.finetune_plugin`);
4. compress  the fine-tuned model for every target chip (`retrain.compress.workflow`; a plug-in planner's by
             `retrain.cycle.compress_plugin`), one result per chip; the accuracy-aware fallback may not go below the
             current student's INT8 share on that chip;
5. verify    `retrain.cycle.verify`: shadow replay (`shadow.batch.replay`) of the current student and the candidate (both
             as `verification.chip` artifacts) on the snapshot's test drives, written as a lake of its own under
             work_dir/verify; the divergence where mined (test mined windows) and elsewhere (test ordinary
             windows), per condition; the acceptance criteria's pass rates on the test scenario windows;
             the log-replay closed loop; closed-loop episodes in highway-env (`retrain.cycle.closed_loop`) for both, and
             the expert as reference;
6. gate      `retrain.cycle.gates` rules on those figures;
7. register  the candidate in the registry with lineage (parents: current student and teacher; dataset: snapshot
             hash; every target's artifact as <name>-<chip>), then promoted, or rejected with the reasons.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ingest.lake import model_id, pair_id, write_json_atomic
from ingest.versions import UnknownVersion, check_version
from retrain.compress.workflow import CompressConfig, TargetResult, compress_for_target
from retrain.cycle.baseline import ChipBaseline, chip_baselines, int8_products
from retrain.cycle.dataset import DatasetConfig, compress_frames, create_snapshot, load_snapshot
from retrain.cycle.compress_plugin import compress_plugin_for_target
from retrain.cycle.finetune import FinetuneConfig, FinetuneResult, finetune
from retrain.cycle.finetune_plugin import finetune_plugin
from retrain.models.onnx_import import planner_from_onnx
from retrain.cycle.gates import GateConfig, GateDecision, evaluate_gates, target_summary
from retrain.cycle.verify import VerificationConfig, verify
from retrain.cycle.mining import MiningConfig, MiningResult, mine
from retrain.cycle.registry import ModelEntry, Registry
from retrain.cycle.results import CycleResult
from retrain.compress.targets import load_targets
from retrain.models.plugins import export, load_state, state_plugin
from retrain.models.training import export_with_spec, load_checkpoint, save_checkpoint
from shadow.spec import MODEL_FILE, read_spec, write_spec

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict], None]
"""progress(step, done, total, info): step is one of STEPS; done/total count the step's own units."""
STEPS = ("mine", "snapshot", "baseline", "finetune", "compress", "verify", "gate", "register")
RECORD_FORMAT_VERSION = 1
"""Version of the records in a cycle's work_dir: cycle.json, <step>.json, result.json."""


class CycleError(RuntimeError):
    """A cycle that cannot run: unknown models, a work_dir holding another cycle, a missing artifact."""


class CycleConfig(BaseModel):
    """Everything one flywheel cycle needs; defaults are the reference cycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lake: Path = Field(description="the Parquet lake with frames and the current pair's shadow tables")
    registry: Path = Field(description="model registry holding the teacher and the current student")
    teacher: str = Field("teacher", description="teacher in the registry: name or name:version")
    student: str = Field("student", description="current student: name or name:version (default: promoted)")
    student_checkpoint: Path | None = Field(None, description="torch checkpoint of the current student; None: "
                                            "found from its spec, else rebuilt from its FP32 ONNX")
    snapshots_dir: Path | None = Field(None, description="where snapshots go; None: <work_dir>/snapshots")
    mining: MiningConfig = Field(default_factory=MiningConfig, description="what to mine")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="snapshot: split by drive, replay")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="distillation fine-tune")
    targets: list[str] | None = Field(None, description="target chips (deploy/targets/<chip>.toml); None: all")
    compress: CompressConfig = Field(default_factory=CompressConfig, description="per-target compression")
    verification: VerificationConfig = Field(default_factory=VerificationConfig,
                                               description="shadow replay and closed loop")
    gates: GateConfig = Field(default_factory=GateConfig, description="promotion rules")
    candidate_version: str | None = Field(None, description="registry version of the candidate; None: "
                                          "<student version>.ft-<cycle id>")
    update_registry: bool = Field(True, description="register the candidate and promote or reject it")

    @model_validator(mode="after")
    def _chip_compressed(self) -> "CycleConfig":
        if self.targets is not None and self.verification.chip not in self.targets:
            raise ValueError(f"verification.chip {self.verification.chip!r} is not among targets {self.targets}")
        return self


# ------------------------------------------------------------------------------------------------------- helpers


def read_record(path: Path, what: str) -> dict:
    """A record of this cycle's work_dir, its format version checked (one without the key predates versions: 1)."""
    rec = json.loads(path.read_text())
    try:
        check_version(path, what, rec.get("format_version", 1), RECORD_FORMAT_VERSION)
    except UnknownVersion as exc:
        raise CycleError(str(exc)) from None
    return rec


def _ref(text: str) -> tuple[str, str | None]:
    name, _, version = text.partition(":")
    return name, version or None


def _checkpoint_of(reg: Registry, entry: ModelEntry, config: CycleConfig, work: Path) -> tuple[Path, str]:
    """The current student's torch checkpoint and how it was found."""
    if config.student_checkpoint is not None:
        if not Path(config.student_checkpoint).is_file():
            raise CycleError(f"student_checkpoint {config.student_checkpoint} does not exist")
        return Path(config.student_checkpoint), "config"
    fp32 = [e for e in reg.list(f"{entry.name}-fp32") if e.version == entry.version]
    for e in [entry, *fp32]:
        extra = read_spec(reg.version_dir(e.name, e.version), verify=False).extra
        for cand in (extra.get("checkpoint"), (extra.get("config") or {}).get("out_dir")):
            if cand:
                p = Path(cand) if str(cand).endswith(".pt") else Path(cand) / "checkpoint.pt"
                if p.is_file():
                    return p, f"spec of {e.ref}"
    if fp32:
        out = work / "parent_from_onnx.pt"
        if not out.is_file():
            save_checkpoint(planner_from_onnx(reg.version_dir(fp32[0].name, fp32[0].version)), out,
                            {"rebuilt_from": fp32[0].ref})
        return out, f"rebuilt from the FP32 ONNX of {fp32[0].ref} (weights read from the graph, checked)"
    raise CycleError(f"no torch checkpoint for {entry.ref}: set student_checkpoint, or register {entry.name}-fp32:"
                     f"{entry.version} (an FP32 export) so that it can be rebuilt")


class _Steps:
    """Runs steps with their records; skips those done when resuming."""

    def __init__(self, work: Path, resume: bool, progress: Progress | None) -> None:
        self.work, self.resume, self.progress, self.timing = work, resume, progress, {}

    def __call__(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.work / f"{name}.json"
        if self.resume and path.is_file():
            rec = read_record(path, "cycle step record")
            self.timing[name] = {"seconds": rec.get("seconds", 0.0), "resumed": True}
            self.tell(name, 1, 1, {"status": "resumed"})
            return rec["output"]
        self.tell(name, 0, 1, {"status": "started"})
        t0 = time.perf_counter()
        output = fn()
        seconds = time.perf_counter() - t0
        write_json_atomic(path, {"format_version": RECORD_FORMAT_VERSION, "step": name, "seconds": seconds,
                                 "finished_at": time.time(), "output": output})
        self.timing[name] = {"seconds": seconds, "resumed": False}
        self.tell(name, 1, 1, {"status": "done", "seconds": seconds})
        return json.loads(json.dumps(output, default=str))

    def tell(self, step: str, done: int, total: int, info: dict) -> None:
        if self.progress:
            self.progress(step, done, total, info)


def _start(config: CycleConfig, work: Path, resume: bool) -> dict:
    """The cycle's identity in work_dir/cycle.json; a work_dir of another config is refused when resuming."""
    path = work / "cycle.json"
    cfg = json.loads(config.model_dump_json())
    if path.is_file():
        prev = read_record(path, "cycle record")
        if resume:
            if prev["config"] != cfg:
                raise CycleError(f"{work} holds a cycle with another config; use another work_dir or resume=False")
            return prev
    for name in (*STEPS, "result"):  # starting over: forget the old records and the fine-tune state
        (work / f"{name}.json").unlink(missing_ok=True)
    shutil.rmtree(work / "finetune", ignore_errors=True)
    shutil.rmtree(work / "compress", ignore_errors=True)
    shutil.rmtree(work / "verify", ignore_errors=True)
    shutil.rmtree(work / "candidate", ignore_errors=True)
    ident = {"format_version": RECORD_FORMAT_VERSION, "cycle_id": uuid.uuid4().hex[:12], "started_at": time.time(),
             "config": cfg}
    write_json_atomic(path, ident)
    return ident


# -------------------------------------------------------------------------------------------------------- cycle


def run_cycle(config: CycleConfig, work_dir: Path, progress: Progress | None = None,
              resume: bool = True) -> CycleResult:
    """Run (or resume) one cycle in `work_dir`; see the module docstring. Exceptions of a step propagate (its
    record is not written, so a rerun with resume=True redoes it and skips the steps before it)."""
    t0 = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ident = _start(config, work, resume)
    cycle_id = ident["cycle_id"]
    reg = Registry(config.registry)
    if "parent" not in ident:  # pinned at the first start: a resumed cycle keeps its models whatever was promoted
        ident.update(teacher=reg.get(*_ref(config.teacher)).ref, parent=reg.get(*_ref(config.student)).ref)
        write_json_atomic(work / "cycle.json", ident)
    teacher, parent = reg.get(*_ref(ident["teacher"])), reg.get(*_ref(ident["parent"]))
    teacher_dir, parent_dir = reg.version_dir(teacher.name, teacher.version), reg.version_dir(parent.name,
                                                                                               parent.version)
    ckpt, ckpt_source = _checkpoint_of(reg, parent, config, work)
    version = config.candidate_version or f"{parent.version}.ft-{cycle_id[:8]}"
    if version == parent.version:
        raise CycleError(f"the candidate needs a version other than the current student's ({version})")
    pair = config.mining.pair or pair_id(model_id(teacher.name, teacher.version), model_id(parent.name,
                                                                                             parent.version))
    targets = load_targets(chips=config.targets)
    snapshots = Path(config.snapshots_dir or work / "snapshots")
    step = _Steps(work, resume, progress)

    mined = MiningResult.from_dict(step("mine", lambda: mine(
        config.lake, config.mining.model_copy(update={"pair": pair}) if config.mining.sql is None
        else config.mining).to_dict()))

    def do_snapshot() -> dict:
        sources = {"teacher": teacher.ref, "teacher_sha256": teacher.sha256, "student": parent.ref,
                   "student_sha256": parent.sha256, "pair": pair}
        s = create_snapshot(config.lake, mined, config.dataset, snapshots, sources)
        return {"id": s.id, "path": str(s.path), "content_sha256": s.content_sha256, "counts": s.manifest["counts"],
                "drives": {k: len(v) for k, v in s.manifest["split"]["drives"].items()}}

    snap_rec = step("snapshot", do_snapshot)
    snap = load_snapshot(Path(snap_rec["path"]))

    plugin = state_plugin(ckpt)  # a plug-in planner (retrain.models.plugins): its own fine-tune and compression
    frames = None

    def compress_inputs():
        nonlocal frames
        frames = frames or compress_frames(snap, config.dataset.seed, [plugin.featurizer] if plugin else [])
        return frames

    def do_baseline() -> dict:
        calib, val, mined_f = compress_inputs()
        base = chip_baselines(reg, parent, ckpt, targets, calib, val, mined_f, config.compress, teacher_dir,
                              work / "baseline", config.update_registry,
                              compress_one=compress_plugin_for_target if plugin else compress_for_target,
                              progress=(lambda d, n, info: step.tell("baseline", d, n, info)) if progress else None)
        return {chip: b.model_dump(mode="json") for chip, b in base.items()}

    baselines = {c: ChipBaseline.model_validate(b) for c, b in step("baseline", do_baseline).items()}

    def do_finetune() -> dict:
        tune = (lambda *a, **k: finetune_plugin(*a, **k, stored=config.lake)) if plugin else finetune
        ft_cfg, qat = config.finetune, config.finetune.qat
        if qat.enabled and qat.products is None:  # fake INT8 only where the current student runs INT8 on a chip
            ft_cfg = ft_cfg.model_copy(update={"qat": qat.model_copy(update={
                "products": int8_products(baselines.values())})})
        res = tune(ckpt, teacher_dir, snap, ft_cfg, work / "finetune",
                   progress=(lambda s, n, info: step.tell("finetune", s, n, info)) if progress else None)
        return res.model_dump(mode="json")

    ft = FinetuneResult.model_validate(step("finetune", do_finetune))

    def do_compress() -> dict:
        calib, val, mined_f = compress_inputs()
        compress_one = compress_plugin_for_target if plugin else compress_for_target
        cfg = config.compress.model_copy(update={"export": config.compress.export.model_copy(
            update={"name": parent.name, "version": version})})
        out = []
        for i, (chip, target) in enumerate(targets.items()):
            done = work / "compress" / chip / "result.json"
            b = baselines[chip]
            if done.is_file():  # compress_for_target writes this last: the chip is finished
                r = TargetResult.model_validate_json(done.read_text())
            else:  # the fallback may not give back what the current student has on this chip
                r = compress_one(Path(ft.checkpoint), target, calib, val, work / "compress", cfg, teacher_dir,
                                 mined_f, floor={"int8": b.int8_matmul_share, "integer": b.integer_matmul_share})
            out.append(r.model_copy(update={"baseline": b.figures()}).model_dump(mode="json"))
            step.tell("compress", i + 1, len(targets), {"chip": chip})
        return {"targets": out}

    compressed = step("compress", do_compress)["targets"]
    chip_art = {t["chip"]: Path(t["artifact"]).parent for t in compressed}
    verified = step("verify", lambda: verify(
        config.verification, snap, teacher_dir, Path(baselines[config.verification.chip].path),
        chip_art[config.verification.chip], work / "verify",
        progress=(lambda s, d, n, info: step.tell("verify", d, n, {"stage": s, **info})) if progress else None,
        fp32=_fp32_models(reg, parent, compressed, config, work)))
    gate = GateDecision.model_validate(step("gate", lambda: evaluate_gates(config.gates, {
        "divergence": verified["divergence"], "closed_loop": verified["closed_loop"],
        "log_replay": verified.get("log_replay"), "criteria": verified.get("criteria"),
        "targets": compressed}).model_dump(mode="json")))

    def do_register() -> dict:
        if not config.update_registry:
            return {"status": "not registered", "entries": []}
        return _register(reg, gate, parent, teacher, version, ft, snap, compressed, verified, config, work, cycle_id)

    registered = step("register", do_register)
    result = CycleResult(
        cycle_id=cycle_id, work_dir=str(work), status=registered["status"], passed=gate.passed, reasons=gate.reasons,
        teacher={"ref": teacher.ref, "path": str(teacher_dir), "sha256": teacher.sha256},
        parent={"ref": parent.ref, "path": str(parent_dir), "sha256": parent.sha256, "checkpoint": str(ckpt),
                "checkpoint_source": ckpt_source},
        candidate={"name": parent.name, "version": version, "checkpoint": ft.checkpoint,
                   "artifacts": {c: str(p) for c, p in chip_art.items()}, "verified_chip": config.verification.chip},
        mining={k: v for k, v in mined.to_dict().items() if k != "items"}, snapshot=snap_rec,
        finetune=ft.model_dump(mode="json", exclude={"history"}) | {"evaluations": len(ft.history)},
        divergence=verified["divergence"], closed_loop=verified["closed_loop"],
        log_replay=verified.get("log_replay") or {}, criteria=verified.get("criteria"),
        targets=[target_summary(t) for t in compressed], gate=gate.model_dump(mode="json"), registry=registered,
        steps=step.timing, wall_s=time.perf_counter() - t0)
    write_json_atomic(work / "result.json", result.model_dump(mode="json"))
    return result


def _fp32_models(reg: Registry, parent: ModelEntry, compressed: list[dict], config: CycleConfig,
                 work: Path) -> tuple[Path, Path] | None:
    """(current student's registered FP32, candidate's FP32 export of the verified chip, as <name>-fp32) for the
    attribution replay; None when the student has no FP32 entry."""
    if not config.verification.fp32_reference:
        return None
    found = [e for e in reg.list(f"{parent.name}-fp32") if e.version == parent.version]
    if not found:
        return None
    src = Path(next(t for t in compressed if t["chip"] == config.verification.chip)["fp32_artifact"])
    dest = work / "verify" / "candidate-fp32"
    if not (dest / MODEL_FILE).is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / MODEL_FILE)
        spec = read_spec(src)
        spec.name = f"{spec.name}-fp32"  # its own model id: the INT8 candidate has the plain name
        write_spec(spec, dest / MODEL_FILE)
    return reg.version_dir(found[0].name, found[0].version), dest


def _register(reg: Registry, gate: GateDecision, parent: ModelEntry, teacher: ModelEntry, version: str,
              ft: FinetuneResult, snap, compressed: list[dict], verified: dict, config: CycleConfig, work: Path,
              cycle_id: str) -> dict:
    """Register the candidate (FP32 export, the verified chip's artifact as <name>, the others as <name>-<chip>)
    with lineage, then promote or reject every entry; returns what was done."""
    extra = {"checkpoint": ft.checkpoint, "cycle_id": cycle_id, "snapshot": snap.id, "recipe": "retrain.cycle.cycle"}
    cand = work / "candidate"
    fp32_dir = cand / "fp32"
    if not (fp32_dir / MODEL_FILE).is_file() and state_plugin(Path(ft.checkpoint)):
        export(*load_state(Path(ft.checkpoint)), fp32_dir, f"{parent.name}-fp32", version, extra)
    elif not (fp32_dir / MODEL_FILE).is_file():
        export_with_spec(load_checkpoint(Path(ft.checkpoint)), fp32_dir, f"{parent.name}-fp32", version, extra)
    div = verified["divergence"]
    metrics = {"mined_before": div["mined"]["before"].get("mean_score"),
               "mined_after": div["mined"]["after"].get("mean_score"),
               "elsewhere_before": div["elsewhere"]["before"].get("mean_score"),
               "elsewhere_after": div["elsewhere"]["after"].get("mean_score"),
               "collisions_before": verified["closed_loop"]["before"].get("collisions"),
               "collisions_after": verified["closed_loop"]["after"].get("collisions")}
    common = {"recipe": "retrain.cycle.cycle", "dataset_sha256": snap.content_sha256}
    entries = [reg.register(f"{parent.name}-fp32", version, fp32_dir, parents=[parent.ref, teacher.ref], **common,
                            metrics={k: float(v) for k, v in metrics.items() if v is not None})]
    main_ref = f"{parent.name}:{version}"
    for t in sorted(compressed, key=lambda t: t["chip"] != config.verification.chip):
        dest = cand / t["chip"]
        if not (dest / MODEL_FILE).is_file():  # a copy whose spec names the checkpoint, for the next cycle
            tmp = cand / f".{t['chip']}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copyfile(t["artifact"], tmp / MODEL_FILE)
            spec = read_spec(Path(t["artifact"]))
            spec.extra = {**spec.extra, **extra, "chip": t["chip"], "compression": {
                k: t[k] for k in ("bytes", "latency_ms_estimate", "int8_matmul_share", "integer_matmul_share")}}
            write_spec(spec, tmp / MODEL_FILE)
            os.replace(tmp, dest)
        main = t["chip"] == config.verification.chip
        m = {**metrics, "bytes": t["bytes"], "latency_ms_estimate": t["latency_ms_estimate"],
             "cpu_latency_ms_measured": t["cpu_latency_ms_measured"]}
        entries.append(reg.register(parent.name if main else f"{parent.name}-{t['chip']}", version, dest,
                                    parents=[parent.ref, teacher.ref, f"{parent.name}-fp32:{version}"] if main
                                    else [main_ref], **common,
                                    metrics={k: float(v) for k, v in m.items() if v is not None}))
    note = "gates passed" if gate.passed else "rejected: " + "; ".join(gate.reasons)
    final = [(reg.promote if gate.passed else reg.reject)(e.name, e.version, note) for e in entries]
    log.info("candidate %s %s", main_ref, "promoted" if gate.passed else f"rejected ({len(gate.reasons)} reasons)")
    return {"status": "promoted" if gate.passed else "rejected", "ref": main_ref,
            "entries": [{"ref": e.ref, "status": e.status, "parents": e.parents, "sha256": e.sha256}
                        for e in final], "note": note}


def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def format_result(r: CycleResult) -> str:
    """The cycle as fixed-width tables: divergence, closed loop, targets, gate, step times."""
    c, d, cl = r.candidate, r.divergence, r.closed_loop
    lines = [f"cycle {r.cycle_id}: {c.name}:{c.version} from {r.parent.ref} -> {r.status.upper()}",
             f"mined {r.mining.windows} windows ({r.mining.rule}), snapshot {r.snapshot.id} "
             f"(drives {r.snapshot.drives}); fine-tune {r.finetune.steps_run} steps, best {r.finetune.best_step}",
             "", "divergence on held-out test drives (mean score; ADE 4 s in m)",
             f"{'set':<10} {'condition':<12} {'frames':>7} {'before':>8} {'after':>8} {'change':>8} "
             f"{'ADE bef':>8} {'ADE aft':>8}"]
    rows = [("mined", "all", d.mined), ("elsewhere", "all", d.elsewhere)]
    rows += [(x.set, x.condition, x) for x in d.by_condition]
    for w, cond, x in rows:
        b, a = x.before, x.after
        lines.append(f"{w:<10} {cond:<12} {a.frames:>7d} {_f(b.mean_score):>8} {_f(a.mean_score):>8} "
                     f"{_f(x.change.get('mean_score'), '+.1%'):>8} {_f(b.mean_ade_4s, '.3f'):>8} "
                     f"{_f(a.mean_ade_4s, '.3f'):>8}")
    if d.fp32 is not None:
        lines.append("FP32 models, before compression (attribution, not gated): " + "; ".join(
            f"{w} {_f(x.before.mean_score)} -> {_f(x.after.mean_score)} ({_f(x.change.get('mean_score'), '+.1%')})"
            for w, x in (("mined", d.fp32.mined), ("elsewhere", d.fp32.elsewhere))))
    if r.log_replay:
        lines.append("log-replay closed loop (held-out windows, PDM-form score, higher is better): " + "; ".join(
            f"{w} {_f(x['before']['score'])} -> {_f(x['after']['score'])} ({x['windows']} windows)"
            for w, x in r.log_replay.items()))
    if r.criteria is not None:
        o = r.criteria.overall
        lines += ["", "acceptance criteria on held-out scenario windows (pass rate before -> after)",
                  f"{'criterion':<24} {'required':>8} {'windows':>7} {'all':>16} {f'mined ({o.mined.windows})':>16} "
                  f"{f'elsewhere ({o.elsewhere.windows})':>16}"]
        for name, x in [("(every criterion)", r.criteria.overall), *r.criteria.criteria.items()]:
            lines.append(f"{name:<24} {x.required:>8.1%} {x.all.windows:>7d} " + " ".join(
                f"{_f(y.before.pass_rate, '.1%'):>6} -> {_f(y.after.pass_rate, '.1%'):>6}"
                for y in (x.all, x.mined, x.elsewhere)))
    lines += ["", f"closed loop ({', '.join(cl.conditions)})",
              f"{'policy':<14} {'episodes':>8} {'collisions':>10} {'rate':>6} {'mean min TTC s':>14} "
              f"{'min TTC s':>9} {'comfortable':>11}"]
    for x, label in ((cl.before, "current"), (cl.after, "candidate"), (cl.expert, "expert")):
        if x is not None:
            lines.append(f"{label:<14} {x.episodes:>8d} {x.collisions:>10d} {x.collision_rate:>6.2f} "
                         f"{_f(x.mean_min_ttc_s, '.2f'):>14} {_f(x.min_ttc_s, '.2f'):>9} "
                         f"{_f(x.comfortable_rate, '.2f'):>11}")
    lines += ["", f"{'chip':<10} {'bytes':>9} {'size ok':>7} {'CPU ms measured':>15} {'chip ms ESTIMATE':>16} "
              f"{'latency ok':>10} {'verified':>8}"]
    for t in r.targets:
        lines.append(f"{t.chip:<10} {t.bytes:>9d} {str(t.size_budget_met):>7} {t.cpu_latency_ms_measured:>15.3f} "
                     f"{t.latency_ms_estimate:>16.4f} {str(t.latency_budget_met):>10} {str(t.verified):>8}")
    lines += ["", f"gate: {'PASSED' if r.passed else 'REJECTED'}"] + [f"  - {x}" for x in r.reasons]
    lines.append("steps: " + ", ".join(f"{k} {v.seconds:.1f}s{' (resumed)' if v.resumed else ''}"
                                       for k, v in r.steps.items()) + f"; wall {r.wall_s:.1f}s")
    return "\n".join(lines)
