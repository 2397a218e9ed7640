"""`flywheel sql`: read-only SQL over the lake (shadow.catalog), one-shot, from a file, saved, or interactive."""

from __future__ import annotations

import enum
import io
import json
import math
import sys
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cli.common import console, settings
from ingest.objstore import is_remote

app = typer.Typer()

PROMPT, CONTINUE = "sql> ", "...> "
HELP = (".quit / .exit: leave    .tables: tables and views    .saved: saved queries    .refresh: re-read the lake's "
        "files    statements end with ';'")


class Format(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: timestamps as ISO 8601, NaN/inf as null, bytes as hex, nested values kept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value) if value % 1 else int(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _flat_for_csv(table: pa.Table) -> pa.Table:
    """CSV holds scalars only: nested columns (lists, structs, maps) become JSON text."""
    for i, field in enumerate(table.schema):
        t = field.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t) or pa.types.is_map(t) \
                or pa.types.is_fixed_size_list(t):
            text = [None if v is None else json.dumps(_plain(v)) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    return table


def render(table: pa.Table, fmt: Format, out: Path | None, max_rows: int) -> None:
    """Write a result in `fmt` to `out` (or stdout; parquet needs a file). A terminal gets at most `max_rows` rows
    (a file or a pipe gets every row)."""
    if fmt is Format.parquet:
        if out is None:
            raise typer.BadParameter("--format parquet needs --out FILE", param_hint="--out")
        pq.write_table(table, out)
        console.print(f"wrote {table.num_rows} rows to {out}")
        return
    if out is None and fmt is not Format.table and sys.stdout.isatty() and table.num_rows > max_rows:
        console.print(f"[yellow]first {max_rows} of {table.num_rows} rows shown (--max-rows, or --out FILE for all)[/]")
        table = table.slice(0, max_rows)
    if fmt is Format.csv:
        buf = io.BytesIO()
        pacsv.write_csv(_flat_for_csv(table), buf)
        text = buf.getvalue().decode()
    elif fmt is Format.json:
        text = json.dumps([_plain(r) for r in table.to_pylist()], indent=1, ensure_ascii=False) + "\n"
    else:
        rich_table = Table(*(escape(n) for n in table.column_names), show_lines=False,
                           caption=f"{table.num_rows} row{'' if table.num_rows == 1 else 's'}" + (f", first {max_rows} shown" if table.num_rows > max_rows else ""))
        for row in table.slice(0, max_rows).to_pylist():
            rich_table.add_row(*("NULL" if v is None else escape(str(_plain(v))) for v in row.values()))
        if out is None:
            Console(soft_wrap=True).print(rich_table)
        else:
            with open(out, "w") as fh:
                Console(file=fh, width=max(120, 16 * table.num_columns)).print(rich_table)
        return
    if out is None:
        typer.echo(text, nl=False)
    else:
        Path(out).write_text(text)


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{p!r} is not k=v", param_hint="--param")
        out[key.strip()] = value
    return out


def _list_saved(catalog) -> None:
    table = Table("name", "parameters", "description", title="saved queries")
    for q in catalog.saved_queries().values():
        params = "\n".join(f"{p.name} {p.type} = {p.default!r}: {p.doc}" for p in q.params.values())
        table.add_row(q.name, escape(params), escape(q.description))
    Console().print(table)


def _run_script(catalog, text: str, fmt: Format, out: Path | None, max_rows: int) -> None:
    """Each statement of `text`, checked before any runs, rendered in turn."""
    for stmt in catalog.split(text):
        render(catalog.arrow(stmt), fmt, out, max_rows)


def interactive(catalog, fmt: Format, out: Path | None, max_rows: int) -> None:
    """Read statements until ';' from stdin, run them; errors are printed and the prompt goes on. .quit leaves."""
    from shadow.catalog import QueryError

    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())

        console.print(f"lake {catalog.lake}; {HELP}")
    buffer: list[str] = []
    while True:
        prompt = CONTINUE if buffer else PROMPT
        try:
            if tty:
                line = input(prompt) + "\n"
            else:
                console.print(prompt, end="")
                line = sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C drops the statement being typed, as in psql
            buffer = []
            console.print()
            continue
        if not line:  # end of input
            break
        stripped = line.strip()
        if not buffer and stripped.startswith("."):
            command = stripped.split()[0].lower()
            if command in (".quit", ".exit"):
                break
            elif command == ".tables":
                typer.echo("\n".join(catalog.views()))
            elif command == ".saved":
                _list_saved(catalog)
            elif command == ".refresh":
                console.print(f"live files: {catalog.refresh()}")
            else:
                console.print(f"[red]unknown command {escape(command)}[/]; {HELP}")
            continue
        if not stripped and not buffer:
            continue
        buffer.append(line)
        if not stripped.endswith(";"):
            continue
        text, buffer = "".join(buffer), []
        try:
            _run_script(catalog, text, fmt, out, max_rows)
        except QueryError as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
    if buffer:
        console.print("[yellow]unfinished statement (no ';') ignored[/]")


@app.command("sql")
def sql_cmd(
    query: Annotated[Optional[str], typer.Argument(help="SQL to run; none (and no --file/--saved): interactive prompt")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="run the statements of a .sql file",
                                                 exists=True, dir_okay=False)] = None,
    saved: Annotated[Optional[str], typer.Option("--saved", "-s", help="run a saved query by name")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="k=v parameter of a saved query; repeatable")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="output format")] = Format.table,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the result to this file")] = None,
    lake: Annotated[Optional[Path], typer.Option(help="lake directory; overrides the config")] = None,
    list_saved: Annotated[bool, typer.Option("--list-saved", help="list the saved queries and exit")] = False,
    max_rows: Annotated[Optional[int], typer.Option(help="rows printed to a terminal; default sql.max_rows",
                                                    min=1)] = None,
    timeout: Annotated[Optional[float], typer.Option(help="interrupt a query running longer, in seconds; default "
                                                     "sql.timeout_s", min=0.001)] = None,
) -> None:
    """Query the lake with read-only SQL: tables frames, decisions, divergences, scenarios, noise_floor, onboard,
    log_replay and the divergence_summary / divergence_by_condition rollups. Files outside the lake cannot be
    read."""
    from shadow.catalog import Catalog, QueryError, QueryInterrupted, QueryRefused

    chosen = [name for name, v in (("QUERY", query), ("--file", file), ("--saved", saved)) if v is not None]
    if len(chosen) > 1:
        raise typer.BadParameter(f"give one of QUERY, --file, --saved (got {', '.join(chosen)})")
    if param and saved is None:
        raise typer.BadParameter("--param is for --saved queries", param_hint="--param")
    if fmt is Format.parquet and out is None and not list_saved:
        raise typer.BadParameter("--format parquet needs --out FILE", param_hint="--out")
    s = settings()
    lake_dir = lake or s.sink.lake_dir
    config = s.sql.model_copy(update={"timeout_s": timeout} if timeout is not None else {})
    max_rows = max_rows or config.max_rows
    if not is_remote(lake_dir) and not Path(lake_dir).is_dir():  # an s3:// lake is listed by the catalog
        console.print(f"[yellow]lake {lake_dir} does not exist: every table is empty[/]")
    try:
        catalog = Catalog(lake_dir, config)
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    try:
        if list_saved:
            _list_saved(catalog)
        elif saved is not None:
            render(catalog.saved(saved, **_params(param or [])), fmt, out, max_rows)
        elif file is not None:
            _run_script(catalog, file.read_text(), fmt, out, max_rows)
        elif query is not None:
            _run_script(catalog, query, fmt, out, max_rows)
        else:
            interactive(catalog, fmt, out, max_rows)
    except QueryRefused as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(3) from None
    except (QueryInterrupted, KeyboardInterrupt) as exc:  # one line, no traceback; Ctrl-C exits as a shell expects
        console.print(f"[red]{escape(str(exc) or 'interrupted')}[/]")
        raise typer.Exit(1 if isinstance(exc, QueryInterrupted) and "after" in str(exc) else 130) from None
    except QueryError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    finally:
        catalog.close()
