"""`flywheel fleet simulate`: logged drives from the reference simulator (`sim`), cached."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flywheel.cli.common import console, settings

app = typer.Typer()
fleet_app = typer.Typer(help="The reference fleet: drives from the highway-env simulator.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("simulate")
def fleet_simulate(out: Annotated[Path, typer.Option(help="drive directory to write")] = Path("data/drives"),
                   vehicles: Annotated[Optional[int], typer.Option(help="vehicles; overrides the config")] = None,
                   drives: Annotated[Optional[int], typer.Option(help="drives per vehicle")] = None,
                   seed: Annotated[Optional[int], typer.Option(help="root seed")] = None) -> None:
    """Simulate logged drives (cached: drives already simulated with the same settings are kept)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sim.fleet import simulate_fleet

    update = {k: v for k, v in {"vehicles": vehicles, "drives_per_vehicle": drives, "seed": seed}.items()
              if v is not None}
    cfg = settings().fleet.model_copy(update=update)
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the overrides
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("sim", total=None)
        summary = simulate_fleet(cfg, out, progress=lambda done, total: bar.update(task, completed=done, total=total))
    Console().print(summary)
