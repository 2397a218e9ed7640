"""The `flywheel` console script: one typer app, one module per stage registered with `add_typer`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli import fleet, ingest, jobs, models, retrain, shadow, sql, system
from flywheel.cli.common import configure

app = typer.Typer(help="Fleet-side data flywheel: ingest drives, shadow-replay, query divergence, retrain.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
for stage in (system, fleet, ingest, shadow, sql, retrain, jobs, models):
    app.add_typer(stage.app)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML configuration file")]


@app.callback()
def main(config: ConfigOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
         log_format: Annotated[str, typer.Option(help="text, or json: one JSON object per line for log shippers")]
         = "text") -> None:
    if log_format not in ("text", "json"):
        raise typer.BadParameter("--log-format is text or json")
    configure(config, verbose, log_format)
