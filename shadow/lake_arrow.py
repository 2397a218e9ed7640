"""SQL over a lake on object storage (`ingest.objstore`): DuckDB reads its files through pyarrow datasets.

DuckDB reads `s3://` itself only with its httpfs extension, which is not part of the duckdb wheel: it is
downloaded on first use, and the catalog never downloads or loads extensions (`autoinstall_known_extensions` and
`autoload_known_extensions` off, the configuration locked). So for a remote lake the catalog registers, per table,
a pyarrow dataset of exactly the table's live files (`ingest.lake.live_files`, hive partition keys typed as in the
local views) on its connection and defines the view over it; DuckDB scans it through the Arrow C stream, with
projection and filter pushdown into pyarrow. External file access stays off: a query still cannot read any file
or URL itself.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from ingest.objstore import key_of, s3
from ingest.tables import TABLES

_HIVE_ARROW = {"date": pa.date32(), "model": pa.string(), "pair": pa.string()}


def dataset(table: str, lake: Path, files: list[Path]) -> ds.Dataset:
    """A pyarrow dataset of `files` (remote paths of one lake table), with the table's hive keys as columns."""
    keys = TABLES[table].partitioning
    part = ds.partitioning(pa.schema([(k, _HIVE_ARROW[k]) for k in keys]), flavor="hive")
    schema = TABLES[table].schema
    for k in keys:
        schema = schema.append(pa.field(k, _HIVE_ARROW[k]))
    return ds.dataset([key_of(f) for f in files], schema=schema, filesystem=s3(), format="parquet",
                      partitioning=part, partition_base_dir=key_of(Path(lake) / table))


def source_name(table: str) -> str:
    return f"__lake_{table}"


def register(con: duckdb.DuckDBPyConnection, table: str, lake: Path, files: list[Path]) -> str:
    """Register the dataset of a table's files on `con`; returns the name to select from."""
    name = source_name(table)
    con.register(name, dataset(table, lake, files))
    return name


def file_rollup_sql(con: duckdb.DuckDBPyConnection, lake: Path, path: Path, into: str, keys: str, columns: str
                    ) -> None:
    """Insert one remote divergences file's rollup rows into `into` (the local rollup reads with filename)."""
    name = "__lake_rollup_file"
    con.register(name, dataset("divergences", lake, [path]))
    try:
        lit = "'" + str(path).replace("'", "''") + "'"
        con.execute(f"INSERT INTO {into} SELECT {lit} AS file, {keys}, {columns} FROM {name} GROUP BY {keys}")
    finally:
        con.unregister(name)
