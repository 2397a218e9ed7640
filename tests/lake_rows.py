"""Test helper: rows of a lake table's fixed schema from a few named values."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from ingest.tables import TABLES


def default_value(field: pa.Field):
    """A type-correct value for a column the test does not care about."""
    t = field.type
    if pa.types.is_dictionary(t):
        return "unknown"
    if pa.types.is_list(t):
        return []
    if field.nullable:
        return None
    if pa.types.is_string(t):
        return "x"
    if pa.types.is_boolean(t):
        return False
    if pa.types.is_timestamp(t):
        return datetime(2026, 1, 2, tzinfo=timezone.utc)
    return 0


def rows(table: str, records: list[dict]) -> pa.Table:
    """A table of `table`'s fixed schema; unnamed columns get a type-correct default."""
    schema = TABLES[table].schema
    return pa.Table.from_pylist([{f.name: r.get(f.name, default_value(f)) for f in schema} for r in records],
                                schema=schema)
