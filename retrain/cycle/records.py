"""The base of the cycle's typed records: pydantic models that forbid unknown fields and still read like the plain
mappings they replace (`record["key"]`, `record.get("key")`), so code that indexes a record keeps working."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A typed record; `r["x"]` is `r.x` (KeyError for a field it does not have), `r.get("x", d)` is `r.x` unless
    that is missing or None."""

    model_config = ConfigDict(extra="forbid")

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in type(self).model_fields else None
        return default if value is None else value

    def keys(self):
        return type(self).model_fields.keys()
