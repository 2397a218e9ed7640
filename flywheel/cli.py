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
def main(config: ConfigOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
         log_format: Annotated[str, typer.Option(help="text, or json: one JSON object per line for log shippers")]
         = "text") -> None:
    if log_format not in ("text", "json"):
        raise typer.BadParameter("--log-format is text or json")
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
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
def status(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           lake: Annotated[Optional[Path], typer.Option(help="lake directory; default from config")] = None) -> None:
    """Broker, consumer lag, lake size, last replay and jobs at a glance; exits 2 when the broker is unreachable."""
    from rich.table import Table

    from flywheel.status import collect

    st = collect(settings(), lake)
    if as_json:
        typer.echo(json.dumps(st.as_dict(), indent=2))
    else:
        out = Console()
        out.print(f"[bold]broker[/] {st.broker}: " + ("[green]reachable[/]" if st.broker_ok else f"[red]{st.broker_error}[/]"))
        if st.topics:
            t = Table("topic", "partitions", title="topics")
            for topic in st.topics:
                t.add_row(topic.name, str(topic.partitions))
            out.print(t)
        if st.lag:
            t = Table("group", "topic", "committed", "end", "lag", title="consumer lag")
            for g in st.lag:
                t.add_row(g.group, g.topic, str(g.committed), str(g.end), str(g.lag))
            out.print(t)
        t = Table("table", "files", "rows", "MB", "newest file", "partitions", title=f"lake {lake or settings().sink.lake_dir}")
        for tb in st.tables:
            t.add_row(tb.table, str(tb.files), f"{tb.rows:,}", f"{tb.bytes / 1e6:.1f}", tb.newest or "-",
                      ", ".join(tb.partitions[:4]) + (" ..." if len(tb.partitions) > 4 else ""))
        out.print(t)
        if st.jobs:
            t = Table(*st.jobs[0].keys(), title="jobs")
            for j in st.jobs:
                t.add_row(*(str(v) for v in j.values()))
            out.print(t)
        else:
            out.print(f"jobs: {st.jobs_error or 'none'}")
    if not st.broker_ok:
        raise typer.Exit(2)


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
from flywheel import cli_ingest, cli_jobs, cli_models, cli_retrain, cli_shadow, cli_sql  # noqa: E402,F401
