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


from flywheel import cli_ingest  # noqa: E402,F401  (registers the ingest subcommands)
