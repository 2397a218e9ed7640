"""The lake as SQL: a locked-down, read-only DuckDB catalog over the live files of every lake table.

`Catalog(lake)` is an in-memory DuckDB database with one view per table of `ingest.tables.TABLES` over its LIVE
files only (`live_files`), hive keys as columns (`date` DATE, `model`, `pair`); an empty table has its fixed schema,
no rows; `refresh()` re-resolves the files. Saved queries (`shadow/queries/*.sql`) run by name with parameters.
`divergence_summary` and `divergence_by_condition` answer from an incremental per-file rollup of the divergences
(sums and counts: 20 M frame rows take about a second to aggregate on two cores, the rollup milliseconds).

SQL from users is read-only and cannot reach files outside the lake, each rule enforced by DuckDB itself:

* statement types come from DuckDB's parser (`duckdb.extract_statements`), never a regex: only SELECT-type statements
  (SELECT, WITH, VALUES, FROM, TABLE, DESCRIBE, SHOW, SUMMARIZE, PIVOT, UNPIVOT) and EXPLAIN of one pass (EXPLAIN
  ANALYZE runs its statement, so that is checked too); every statement of a string is checked before any runs;
* each user statement runs in `BEGIN TRANSACTION READ ONLY`: the engine refuses writes to the views' database;
* `enable_external_access=false`, `allowed_directories=[<lake>/]`: read_csv('/etc/passwd'), read_text, glob, ATTACH or
  COPY of outside files, `..` and symlinks out of the lake fail in the engine; extensions cannot be installed or
  loaded (auto-install/auto-load and community extensions off too); Python replacement scans are off;
* `lock_configuration=true`, set last: no SET/RESET undoes any of it.

DuckDB alone cannot keep `COPY ... TO '<lake>/x'` out (allowed directories are writable) nor temporary objects: the
statement check does. Relations handed to Python callers are not a sandbox; the sandbox is for SQL text.
"""

from __future__ import annotations

import functools
from importlib import resources
import logging
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.tables import TABLES, read_footer
from ingest.lake import LakeFile, live_files
from ingest.objstore import is_remote, lake_path, stat
from shadow import lake_arrow
from shadow.catalog_config import CatalogConfig  # noqa: F401  (re-exported: part of the catalog's API)

log = logging.getLogger(__name__)

QUERIES_DIR = Path(str(resources.files("shadow") / "queries"))  # package data: a wheel carries the saved queries
HIVE_TYPES = {"date": "DATE", "model": "VARCHAR", "pair": "VARCHAR"}
READ_ONLY_HINT = ("the lake's SQL interface is read-only: only SELECT, WITH, VALUES, FROM, TABLE, DESCRIBE, SHOW, "
                  "SUMMARIZE, PIVOT, UNPIVOT and EXPLAIN are allowed")
_ST, _TOK = duckdb.StatementType, duckdb.token_type

# Per-file rollup of the divergences. An aggregate over the frame rows costs about 5 ns per row and column on a core.
_SUMMARY_KEYS = "pair, date, road_type, lighting, weather"
_SUMMARY_COLUMNS = """count(*)::BIGINT AS frames, sum(score) AS sum_score, max(score) AS max_score,
    sum(ade_4s) AS sum_ade_4s, sum(fde_4s) AS sum_fde_4s,
    count_if(miss_4s)::BIGINT AS miss_4s, count_if(maneuver_disagree)::BIGINT AS disagree,
    count(teacher_ade_driver)::BIGINT AS driver_frames,
    sum(teacher_ade_driver) AS sum_teacher_ade_driver, sum(student_ade_driver) AS sum_student_ade_driver,
    count_if(ttc_student < coalesce(ttc_teacher, 'inf'::FLOAT))::BIGINT AS student_ttc_worse"""
SUMMARY_TABLE = "_divergence_files"
SUMMARY_VIEWS = {
    "divergence_summary": f"""SELECT {_SUMMARY_KEYS}, sum(frames)::BIGINT AS frames, sum(sum_score) AS sum_score,
        max(max_score) AS max_score, sum(sum_ade_4s) AS sum_ade_4s, sum(sum_fde_4s) AS sum_fde_4s,
        sum(miss_4s)::BIGINT AS miss_4s, sum(disagree)::BIGINT AS disagree, sum(driver_frames)::BIGINT AS driver_frames,
        sum(sum_teacher_ade_driver) AS sum_teacher_ade_driver, sum(sum_student_ade_driver) AS sum_student_ade_driver,
        sum(student_ttc_worse)::BIGINT AS student_ttc_worse
        FROM {SUMMARY_TABLE} GROUP BY ALL""",
    "divergence_by_condition": """SELECT pair, road_type, lighting, weather, sum(frames)::BIGINT AS frames,
        sum(sum_score) / sum(frames) AS mean_score, max(max_score) AS max_score,
        sum(sum_ade_4s) / sum(frames) AS mean_ade_4s, sum(sum_fde_4s) / sum(frames) AS mean_fde_4s,
        sum(miss_4s) / sum(frames) AS miss_rate_4s, sum(disagree) / sum(frames) AS disagree_rate
        FROM divergence_summary GROUP BY ALL""",
}


class QueryError(Exception):
    """A query that could not run: syntax, unknown table or column, runtime error, timeout."""


class QueryInterrupted(QueryError):
    """A query stopped by the caller (Ctrl-C) or by `CatalogConfig.timeout_s`."""


class QueryRefused(QueryError):
    """A query refused by a protection of the catalog; the message names what was refused and why."""


# ---------------------------------------------------------------------------------------------- statement checks


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    """DuckDB's tokens of `text` as (text, type, position), comments dropped."""
    raw = duckdb.tokenize(text)
    ends = [p for p, _ in raw[1:]] + [len(text)]
    return [(text[p:e].strip(), k, p) for (p, k), e in zip(raw, ends) if k != _TOK.comment]


def _explained(text: str) -> str:
    """The statement an EXPLAIN explains: EXPLAIN, ANALYZE and a parenthesised option list skipped."""
    toks, i = _tokens(text), 1
    if i < len(toks) and toks[i][0].lower() == "analyze":
        i += 1
    start = i
    if i < len(toks) and toks[i][0] == "(":
        depth = 0
        while i < len(toks):
            depth += toks[i][0].count("(") - toks[i][0].count(")")
            i += 1
            if depth <= 0:
                break
        if i >= len(toks):  # "EXPLAIN (SELECT 1)": the parentheses held the statement, not options
            i = start
    if i >= len(toks):
        raise QueryRefused("EXPLAIN without a statement refused")
    return text[toks[i][2]:]


def check_statement(stmt: duckdb.Statement, depth: int = 0) -> None:
    """Raise QueryRefused unless `stmt` only reads."""
    kind = stmt.type
    if kind == _ST.SELECT:
        return
    if kind == _ST.EXPLAIN and depth == 0:
        for inner in parse(_explained(stmt.query)):
            check_statement(inner, depth + 1)
        return
    # A PIVOT without an IN list is DuckDB's only MULTI statement (a temporary enum type, then the SELECT)
    if kind == _ST.MULTI and any(t.lower() == "pivot" for t, k, _ in _tokens(stmt.query) if k == _TOK.keyword):
        return
    words = []
    for tok, k, _ in _tokens(stmt.query):
        if k != _TOK.keyword or len(words) == 2:
            break
        words.append(tok.upper())
    raise QueryRefused(f"{' '.join(words) or 'statement'} refused ({kind.name} statement): {READ_ONLY_HINT}")


def parse(query: str) -> list[duckdb.Statement]:
    """Split `query` into statements with DuckDB's parser; QueryError on a syntax error."""
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    except ValueError as exc:  # a statement type the Python binding does not know (e.g. UPDATE EXTENSIONS)
        raise QueryRefused(f"statement of an unknown type refused ({exc}): {READ_ONLY_HINT}") from None


def checked(query: str) -> list[duckdb.Statement]:
    """Every statement of `query`, each checked read-only before any of them runs."""
    stmts = parse(query)
    if not stmts:
        raise QueryError("empty query")
    for s in stmts:
        check_statement(s)
    return stmts


# -------------------------------------------------------------------------------------------------- view schemas


@functools.cache
def duckdb_columns(table: str) -> tuple[tuple[str, str], ...]:
    """(name, DuckDB type) of a lake table as DuckDB reads its files, partition keys last.

    Found by letting DuckDB describe an empty file of the fixed Arrow schema, so that the view of an empty table has
    exactly the types of the view over real files.
    """
    spec = TABLES[table]
    with tempfile.TemporaryDirectory(prefix="flywheel-schema-") as tmp:
        path = Path(tmp) / "empty.parquet"
        pq.write_table(spec.schema.empty_table(), path)
        con = duckdb.connect(":memory:")
        try:
            cols = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        finally:
            con.close()
    return tuple((c[0], c[1]) for c in cols) + tuple((k, HIVE_TYPES[k]) for k in spec.partitioning)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read_parquet(files: list[str], keys: tuple[str, ...], extra: str = "") -> str:
    hive = ", ".join(f"{_literal(k)}: {HIVE_TYPES[k]}" for k in keys)
    return (f"read_parquet([{', '.join(_literal(f) for f in files)}], hive_partitioning = true, "
            f"hive_types = {{{hive}}}, hive_types_autocast = false{extra})")


def view_sql(table: str, files: list[Path]) -> str:
    """CREATE VIEW statement of one lake table over `files` (none: the fixed schema with no rows)."""
    cols = duckdb_columns(table)
    empty = "SELECT " + ", ".join(f"CAST(NULL AS {t}) AS {_ident(n)}" for n, t in cols) + " WHERE false"
    if not files:
        return f"CREATE OR REPLACE VIEW {_ident(table)} AS {empty}"
    older = TABLES[table].older  # files of an older version lack columns: matched by name, NULL where missing
    src = "SELECT * FROM " + _read_parquet([str(p) for p in files], TABLES[table].partitioning,
                                           ", union_by_name = true" * bool(older))
    # explicit columns: the view's schema is the contract's, whatever order the reader appends hive keys in
    return (f"CREATE OR REPLACE VIEW {_ident(table)} AS SELECT {', '.join(_ident(n) for n, _ in cols)} "
            f"FROM ({src}{f' UNION ALL BY NAME {empty}' if older else ''})")


# ------------------------------------------------------------------------------------------------ saved queries

_PARAM_RE = re.compile(r"^@param\s+(?P<name>[a-z_][a-z0-9_]*)\s+(?P<type>INTEGER|DOUBLE|VARCHAR|DATE|BOOLEAN)"
                       r"\s*=\s*(?P<default>'[^']*'|\S+)\s*(?P<doc>.*)$")
_CONVERT = {"INTEGER": int, "DOUBLE": float, "VARCHAR": str, "DATE": date.fromisoformat,
            "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()]}


@dataclass(frozen=True)
class SavedParam:
    """A named parameter of a saved query: `$name` in its SQL, `-- @param name TYPE = default doc` in its header."""

    name: str
    type: str
    default: Any
    doc: str

    def convert(self, value: Any) -> Any:
        """`value` (a CLI string or a Python value) as the declared type; QueryError when it is not one."""
        if not isinstance(value, str) or self.type == "VARCHAR":
            return value
        try:
            return _CONVERT[self.type](value.strip())
        except (ValueError, KeyError):
            raise QueryError(f"parameter {self.name} must be {self.type}, got {value!r}") from None


@dataclass(frozen=True)
class SavedQuery:
    """A query of `shadow/queries/`: header comment (description, `@param` lines) and one statement."""

    name: str
    description: str
    params: dict[str, SavedParam]
    sql: str

    def bind(self, **values: Any) -> dict[str, Any]:
        """Every parameter's value: given ones converted to their type, the others their defaults."""
        unknown = set(values) - set(self.params)
        if unknown:
            raise QueryError(f"saved query {self.name} has no parameter {', '.join(sorted(unknown))}; "
                             f"it takes: {', '.join(self.params) or 'none'}")
        return {n: p.convert(values[n]) if n in values else p.default for n, p in self.params.items()}


def load_saved(path: Path) -> SavedQuery:
    """Parse a saved query file; ValueError when its header and its SQL disagree on the parameters."""
    text = Path(path).read_text()
    description, params = [], {}
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        body = line[2:].strip()
        if not body.startswith("@param"):
            description.append(body)
            continue
        m = _PARAM_RE.match(body)
        if m is None:
            raise ValueError(f"{path}: bad parameter line {body!r}")
        quoted = m["default"].startswith("'")
        p = SavedParam(m["name"], m["type"], None, m["doc"])
        params[p.name] = SavedParam(p.name, p.type, p.convert(m["default"].strip("'") if quoted else m["default"]), p.doc)
    stmts = duckdb.extract_statements(text)
    used = set().union(*(s.named_parameters for s in stmts))
    if len(stmts) != 1 or used != set(params):
        raise ValueError(f"{path}: one statement expected, using exactly the declared parameters "
                         f"{sorted(params)}; found {len(stmts)} statements using {sorted(used)}")
    return SavedQuery(Path(path).stem, " ".join(d for d in description if d), params, text)


def saved_queries(directory: Path = QUERIES_DIR) -> dict[str, SavedQuery]:
    """The saved queries by name."""
    return {p.stem: load_saved(p) for p in sorted(Path(directory).glob("*.sql"))}


# ------------------------------------------------------------------------------------------------------ catalog


class Catalog:
    """Read-only SQL over one lake. Calls are serialised: one query at a time per catalog."""

    def __init__(self, lake: Path, config: CatalogConfig | None = None, queries_dir: Path = QUERIES_DIR) -> None:
        self.remote = is_remote(lake)  # object storage: views over pyarrow datasets (shadow.lake_arrow)
        # allowed_directories is checked on the real path: symlinks are followed
        self.lake = lake_path(lake) if self.remote else Path(lake).resolve()
        self.config = config or CatalogConfig()
        self.queries_dir = Path(queries_dir)
        self.files: dict[str, list[LakeFile]] = {}
        self._versions_checked: dict[Path, int] = {}  # file -> mtime its footer's schema version was checked at
        self._summarised: dict[str, tuple[int, int]] | None = None  # rollup's files: (size, mtime); None: not built
        self._lock = threading.RLock()
        settings: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                    "allow_community_extensions": False, "python_enable_replacements": False}
        settings |= {k: v for k, v in (("threads", self.config.threads), ("memory_limit", self.config.memory_limit)) if v}
        self._con = duckdb.connect(":memory:", config=settings)
        # DuckDB adds its temp directory (default ./.tmp) to the allowed directories: give it a private one, or none
        self.spill_dir = tempfile.mkdtemp(prefix="flywheel-sql-spill-") if self.config.spill else ""
        if self.spill_dir:
            weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
        for setting in ("SET TimeZone = 'UTC'", "SET parquet_metadata_cache = true",
                        f"SET temp_directory = {_literal(self.spill_dir)}",
                        f"SET allowed_directories = [{'' if self.remote else _literal(str(self.lake) + '/')}]",
                        "SET enable_external_access = false",
                        "SET lock_configuration = true"):  # last: from here on nothing above can be changed
            self._con.execute(setting)
        self.refresh()  # the table views first: the rollup's table takes its shape from the divergences view
        self._rollback()
        self._con.execute(f"CREATE TABLE {SUMMARY_TABLE} AS SELECT NULL::VARCHAR AS file, {_SUMMARY_KEYS}, "
                          f"{_SUMMARY_COLUMNS} FROM divergences WHERE false GROUP BY ALL")
        for name, body in SUMMARY_VIEWS.items():
            self._con.execute(f"CREATE VIEW {_ident(name)} AS {body}")
        self._begin_read_only()

    def _rollback(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except duckdb.TransactionException:
            pass  # no transaction open

    def _begin_read_only(self) -> None:
        self._rollback()
        self._con.execute("BEGIN TRANSACTION READ ONLY")

    def _live(self, table: str) -> list[LakeFile]:
        files = live_files(self.lake, table)
        out = files if self.remote else [f for f in files if f.path.resolve().is_relative_to(self.lake)]
        for f in out:  # a file of a schema version this code does not know is refused, not misread
            stamp = 0 if self.remote else f.path.stat().st_mtime_ns  # remote: same name, same records
            if self._versions_checked.get(f.path) != stamp:
                read_footer(f.path, table)
                self._versions_checked[f.path] = stamp
        if len(out) < len(files):
            log.warning("%s: %d files linking outside the lake left out", table, len(files) - len(out))
        return out

    def refresh(self) -> dict[str, int]:
        """Re-resolve every table's live files (new data, compaction); returns the live file count per table."""
        with self._lock:
            self._rollback()
            self.files = {t: self._live(t) for t in TABLES}
            for table, files in self.files.items():
                if self.remote and files:
                    source = lake_arrow.register(self._con, table, self.lake, [f.path for f in files])
                    cols = ", ".join(_ident(n) for n, _ in duckdb_columns(table))
                    self._con.execute(f"CREATE OR REPLACE VIEW {_ident(table)} AS SELECT {cols} FROM {source}")
                else:
                    self._con.execute(view_sql(table, [f.path for f in files]))
            if self._summarised is not None:
                self._update_summary()
            self._begin_read_only()
            return {t: len(f) for t, f in self.files.items()}

    def _update_summary(self) -> None:
        """Bring the rollup to the live divergence files: drop hidden or rewritten ones, aggregate new ones."""
        live = {}
        for f in self.files["divergences"]:
            try:
                st = stat(f.path)
            except FileNotFoundError:  # removed by a compaction since the views were made; the next refresh sees it
                continue
            live[str(f.path)] = st  # (size, mtime): a file rewritten under its name is new again
        done = self._summarised or {}
        gone = [p for p, stamp in done.items() if live.get(p) != stamp]
        new = [p for p, stamp in live.items() if done.get(p) != stamp]
        if gone:
            self._con.execute(f"DELETE FROM {SUMMARY_TABLE} WHERE file IN ({', '.join(_literal(p) for p in gone)})")
        if new and self.remote:
            for p in new:
                lake_arrow.file_rollup_sql(self._con, self.lake, Path(p), SUMMARY_TABLE, _SUMMARY_KEYS,
                                           _SUMMARY_COLUMNS)
        elif new:
            started = time.perf_counter()
            self._con.execute(f"INSERT INTO {SUMMARY_TABLE} SELECT filename AS file, {_SUMMARY_KEYS}, "
                              f"{_SUMMARY_COLUMNS} FROM {_read_parquet(new, ('pair', 'date'), ', filename = true')} "
                              f"GROUP BY filename, {_SUMMARY_KEYS}")
            log.info("divergence rollup: %d files in %.2f s", len(new), time.perf_counter() - started)
        self._summarised = live

    def _ensure_summary(self, stmt: duckdb.Statement) -> None:
        """Build the rollup the first time a statement names it or one of its views."""
        if self._summarised is None and {t.strip('"').lower() for t, _, _ in _tokens(stmt.query)} & \
                {SUMMARY_TABLE, *SUMMARY_VIEWS}:
            self._rollback()
            self._update_summary()

    def _error(self, exc: duckdb.Error) -> QueryError:
        msg = str(exc)
        if isinstance(exc, duckdb.PermissionException):
            return QueryRefused(f"refused: {msg} (queries may read only files under {self.lake})")
        if isinstance(exc, duckdb.TransactionException) and "read-only" in msg:
            return QueryRefused(f"refused: {msg} ({READ_ONLY_HINT})")
        if isinstance(exc, duckdb.InterruptException):
            return QueryInterrupted(f"query interrupted after {self.config.timeout_s:g} s (sql.timeout_s)")
        return QueryError(msg)

    def sql(self, query: str | duckdb.Statement, params: dict[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
        """One read-only statement as a lazy DuckDB relation; raises QueryRefused or QueryError."""
        stmts = [query] if isinstance(query, duckdb.Statement) else checked(query)
        check_statement(stmts[0])
        if len(stmts) != 1:
            raise QueryError(f"one statement per query, got {len(stmts)}; run them one at a time")
        with self._lock:
            try:
                self._ensure_summary(stmts[0])
                self._begin_read_only()  # also clears a transaction aborted by an earlier error
                rel = self._con.sql(stmts[0], params=params)
            except duckdb.Error as exc:
                raise self._error(exc) from None
        if rel is None:  # no allowed statement returns nothing; be clear if one ever does
            raise QueryError("the statement returned no result")
        return rel

    def arrow(self, query: str | duckdb.Statement, params: dict[str, Any] | None = None) -> pa.Table:
        """One read-only statement, executed, as an Arrow table. Interrupted after `config.timeout_s`, or by Ctrl-C
        within a fraction of a second: it runs in a worker thread while the calling thread waits in short slices,
        so a signal reaches Python at once and interrupts the engine (`QueryInterrupted`)."""
        with self._lock:
            rel = self.sql(query, params)
            got: dict[str, Any] = {}
            done = threading.Event()

            def run() -> None:
                try:
                    got["table"] = rel.to_arrow_table()
                except BaseException as exc:  # handed to the caller's thread
                    got["error"] = exc
                finally:
                    done.set()

            worker = threading.Thread(target=run, name="flywheel-sql", daemon=True)
            deadline = time.monotonic() + self.config.timeout_s if self.config.timeout_s else None
            # interrupt() is lost on a query not yet executing: repeated until `done`. An Event, as Ctrl-C inside
            # join() can leave is_alive() False for a running thread (CPython), whose connection would be closed
            try:
                worker.start()
                log.debug("running %s", str(query).strip()[:200])
                while not done.wait(0.05):
                    if deadline is not None and time.monotonic() > deadline:
                        self._con.interrupt()
            except KeyboardInterrupt:
                while not done.wait(0.05):
                    self._con.interrupt()
                raise QueryInterrupted("query interrupted") from None
            if "error" in got:
                if isinstance(got["error"], duckdb.Error):
                    raise self._error(got["error"]) from None
                raise got["error"]
            return got["table"]

    def split(self, text: str) -> list[str]:
        """The statements of a script (e.g. a .sql file), each checked read-only before any runs."""
        return [s.query.strip() for s in checked(text)]

    def table(self, name: str) -> duckdb.DuckDBPyRelation:
        """A lake table or view as a relation."""
        if name not in self.views():
            raise QueryError(f"no table {name!r}; tables: {', '.join(self.views())}")
        return self.sql(f"SELECT * FROM {_ident(name)}")

    def views(self) -> list[str]:
        """Names of the queryable tables and views."""
        return [*TABLES, *SUMMARY_VIEWS]

    def saved_queries(self) -> dict[str, SavedQuery]:
        return saved_queries(self.queries_dir)

    def saved(self, name: str, **params: Any) -> pa.Table:
        """Run a saved query by name with its named parameters (defaults from its header)."""
        queries = self.saved_queries()
        if name not in queries:
            raise QueryError(f"no saved query {name!r}; saved queries: {', '.join(queries) or 'none'}")
        return self.arrow(queries[name].sql, queries[name].bind(**params))

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(lake: Path, **config: Any) -> Catalog:
    """A read-only catalog over `lake`; keyword arguments are CatalogConfig fields."""
    return Catalog(lake, CatalogConfig(**config))
