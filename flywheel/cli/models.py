"""Model commands: build the shipped reference teacher and student v0 (or train either recipe on drives of your
own), and report where the student stands."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flywheel.cli.common import console
from retrain.models.reference import reference_dir

app = typer.Typer()

models_app = typer.Typer(help="The reference teacher and student v0 shipped in retrain/reference/.", no_args_is_help=True)
app.add_typer(models_app, name="models")

REFERENCE_DIR = reference_dir()
# The fleet the shipped models were trained on: 500 drives, 50 vehicles, 60 s each, seed 11 (300k frames).
REFERENCE_FLEET = {"seed": 11, "vehicles": 50, "drives_per_vehicle": 10, "drive_duration_s": 60.0}
QUICK_FLEET = {"seed": 11, "vehicles": 4, "drives_per_vehicle": 2, "drive_duration_s": 12.0}


@models_app.command("build")
def build(out: Annotated[Path, typer.Option(help="where the reference models go")] = REFERENCE_DIR,
          fleet_dir: Annotated[Path, typer.Option(help="drives to train on (simulated when missing)")]
          = Path("data/reference/drives"),
          quick: Annotated[bool, typer.Option("--quick", help="a tiny fleet and few steps, to check the recipe")]
          = False) -> None:
    """Regenerate the reference teacher and student v0 (simulate the fleet, train, distil, prune, quantize)."""
    from sim.config import FleetConfig
    from sim.fleet import simulate_fleet
    from retrain.recipes import student, teacher

    fleet = FleetConfig(**(QUICK_FLEET if quick else REFERENCE_FLEET))
    console.print(f"fleet: {fleet.vehicles} vehicles x {fleet.drives_per_vehicle} drives of {fleet.drive_duration_s:.0f} s")
    simulate_fleet(fleet, fleet_dir)
    steps = {"optim": {"steps": 20}} if quick else {}
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        work = Path(tmp)
        t = teacher.run(teacher.TeacherConfig(drives_dir=fleet_dir, out_dir=work / "teacher", **steps))
        console.print(f"teacher: {t.parameters:,} parameters, held-out ADE {t.heldout['ade_m']:.3f} m")
        quick_student = {"optim": {"steps": 20}, "prune": {"finetune": {"steps": 5, "warmup_steps": 1}}} if quick else {}
        s = student.run(student.StudentConfig(drives_dir=fleet_dir, teacher=work / "teacher", out_dir=work / "student",
                                              **quick_student))
        console.print(f"student v0: {s.parameters_pruned:,} parameters, INT8 {s.size_ratio_int8_vs_teacher:.1f}x "
                      "smaller than the teacher")
        out.mkdir(parents=True, exist_ok=True)
        layout = {"teacher": [(work / "teacher", ["model.onnx", "spec.json"])],
                  "student-v0": [(work / "student" / "int8", ["model.onnx", "spec.json"]),
                                 (work / "student", ["checkpoint.pt"])],
                  "student-v0-fp32": [(work / "student" / "fp32", ["model.onnx", "spec.json"])]}
        for name, sources in layout.items():
            dest = out / name
            dest.mkdir(parents=True, exist_ok=True)
            for src, files in sources:
                for f in files:
                    shutil.copy2(src / f, dest / f)
        results = {"teacher": t.model_dump(mode="json"), "student-v0": s.model_dump(mode="json")}
        results["teacher"].pop("heldout_drive_files", None)
        for name, record in results.items():
            (out / name / "result.json").write_text(json.dumps(record, indent=1))
    console.print(f"reference models written to {out}")


@models_app.command("report")
def report(drives: Annotated[Optional[list[Path]], typer.Argument(help="held-out drive files or directories")] = None,
           teacher_dir: Annotated[Path, typer.Option("--teacher")] = REFERENCE_DIR / "teacher",
           student_dir: Annotated[Path, typer.Option("--student")] = REFERENCE_DIR / "student-v0") -> None:
    """Student against teacher per condition and scenario type: on given drives, else the recorded held-out figures."""
    from retrain.models.evaluate import format_table

    if not drives:
        recorded = json.loads((student_dir / "result.json").read_text())
        Console().print("held-out drives of the recipe (recorded when the models were built):")
        Console().print(format_table(recorded["heldout_int8"]))
        return
    from retrain.models.evaluate import report as evaluate
    from ingest.lake import list_drive_files

    files = [f for d in drives for f in (list_drive_files(d) if d.is_dir() else [d])]
    Console().print(format_table(evaluate(student_dir, teacher_dir, files)))


def _recipe_fields(config: Path | None, **given) -> dict:
    """Recipe config fields: a JSON file's, then the command line's (those given win)."""
    fields = json.loads(config.read_text()) if config else {}
    fields.update({k: v for k, v in given.items() if v is not None})
    return fields


@models_app.command("teacher")
def train_teacher(drives_dir: Path, out_dir: Path,
                  registry: Annotated[Optional[Path], typer.Option(help="register the model here")] = None,
                  seed: Annotated[Optional[int], typer.Option(help="seeds split, weights and data order")] = None,
                  steps: Annotated[Optional[int], typer.Option(help="optimiser steps")] = None,
                  config: Annotated[Optional[Path], typer.Option(help="JSON file of TeacherConfig fields (the "
                                                                 "options given here win)")] = None) -> None:
    """Train the teacher planner on a drives directory (the teacher recipe), export it to ONNX with its spec."""
    from retrain.recipes.teacher import TeacherConfig, run

    fields = _recipe_fields(config, drives_dir=drives_dir, out_dir=out_dir, registry=registry, seed=seed)
    if steps is not None:
        fields.setdefault("optim", {})["steps"] = steps
    typer.echo(run(TeacherConfig.model_validate(fields)).model_dump_json(indent=2))


@models_app.command("student")
def train_student(drives_dir: Path, teacher_dir: Annotated[Path, typer.Argument(help="teacher model directory")],
                  out_dir: Path,
                  registry: Annotated[Optional[Path], typer.Option(help="register both artifacts here")] = None,
                  seed: Annotated[Optional[int], typer.Option(help="seeds split, weights and data order")] = None,
                  config: Annotated[Optional[Path], typer.Option(help="JSON file of StudentConfig fields (the "
                                                                 "options given here win)")] = None) -> None:
    """Distil, prune and quantize student v0 from a teacher (the student recipe)."""
    from retrain.models.evaluate import format_table
    from retrain.recipes.student import StudentConfig, run

    fields = _recipe_fields(config, drives_dir=drives_dir, teacher=teacher_dir, out_dir=out_dir, registry=registry,
                            seed=seed)
    result = run(StudentConfig.model_validate(fields))
    typer.echo(result.model_dump_json(indent=2, exclude={"heldout_fp32", "heldout_int8"}))
    typer.echo(format_table(result.heldout_int8))
