"""System commands: `flywheel config show`, `flywheel status`, `flywheel demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flywheel.cli.common import settings

app = typer.Typer()
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


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
        if st.sinks:
            t = Table("group", "host", "pid", "state", "seen s ago", title="sinks")
            for k in st.sinks:
                state = f"[red]{k['state']}[/]" if k.get("stalled") else k["state"]
                t.add_row(k["group"], k["host"], str(k["pid"]), state, f"{k['age_s']:.0f}")
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
def demo(tiny: Annotated[bool, typer.Option("--tiny", help="a tiny fleet and a few-step cycle on the CPU target "
                                            "(a smoke test of an install; its gate judges on next to nothing)")]
         = False) -> None:
    """The whole flywheel on embedded defaults: simulated fleet -> gRPC -> Kafka -> lake -> shadow -> SQL -> cycle."""
    from flywheel.demo import TINY, run_demo

    s = settings()
    if tiny:
        s = s.model_copy(update={"demo": TINY.model_copy(update={"data_dir": s.demo.data_dir.with_name(
            s.demo.data_dir.name + "-tiny")})})
    run_demo(s, Console())
