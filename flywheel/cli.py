"""The `flywheel` console script: one subcommand per user task."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flywheel.settings import Settings, load_settings

app = typer.Typer(help="Fleet-side data flywheel: ingest drives, shadow-replay, query divergence, retrain.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML configuration file")]


class _State:
    settings: Settings | None = None


@app.callback()
def main(config: ConfigOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    _State.settings = load_settings(config)


def settings() -> Settings:
    return _State.settings or load_settings()


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Print the effective configuration, secrets hidden."""
    data = settings().model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.table import Table

    table = Table("key", "value", title="effective configuration")

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            table.add_row(prefix, str(value))

    walk("", data)
    Console().print(table)


def wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


@app.command()
def broker() -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) with the project's topics, until Ctrl-C."""
    from ingest.broker import EmbeddedBroker, ensure_topics

    s = settings()
    with EmbeddedBroker(s.broker) as b:
        created = ensure_topics(s.kafka.model_copy(update={"bootstrap_servers": b.bootstrap}))
        console.print(f"broker serving on [bold]{b.bootstrap}[/] (topics created: {', '.join(created) or 'none'}); "
                      "Ctrl-C stops it")
        typer.echo(b.bootstrap)
        wait_for_stop()



@app.command()
def demo() -> None:
    """The pipeline on embedded defaults: simulated fleet -> gRPC -> Kafka -> lake -> SQL summary."""
    from flywheel.demo import run_demo

    run_demo(settings(), Console())


fleet_app = typer.Typer(help="The reference fleet: drives from the highway-env simulator.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("simulate")
def fleet_simulate(out: Annotated[Path, typer.Option(help="drive directory to write")] = Path("data/drives"),
                   vehicles: Annotated[Optional[int], typer.Option(help="vehicles; overrides the config")] = None,
                   drives: Annotated[Optional[int], typer.Option(help="drives per vehicle")] = None,
                   seed: Annotated[Optional[int], typer.Option(help="root seed")] = None) -> None:
    """Simulate logged drives (cached: drives already simulated with the same settings are kept)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ingest.fleet import simulate_fleet

    update = {k: v for k, v in {"vehicles": vehicles, "drives_per_vehicle": drives, "seed": seed}.items()
              if v is not None}
    cfg = settings().fleet.model_copy(update=update)
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the overrides
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("sim", total=None)
        summary = simulate_fleet(cfg, out, progress=lambda done, total: bar.update(task, completed=done, total=total))
    Console().print(summary)


# registers the subcommands of each stage
from flywheel import cli_ingest, cli_sql  # noqa: E402,F401
