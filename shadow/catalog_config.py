"""Settings of the SQL catalog (`shadow.catalog`), pydantic only: the umbrella settings import it without DuckDB."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CatalogConfig(BaseModel):
    """Resources of the catalog's DuckDB engine: the `[sql]` section of the settings (`flywheel sql`, the control
    service), and the defaults of every catalog, the cycle's mining queries included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int | None = Field(None, ge=1, le=512, description="DuckDB worker threads; None: one per core")
    memory_limit: str | None = Field("2GB", pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
                                     description="DuckDB memory limit, e.g. '4GB' (larger operators spill); None: "
                                     "DuckDB's default, 80% of the machine's memory")
    timeout_s: float | None = Field(60.0, gt=0, description="interrupt a query running longer (arrow, saved); None: "
                                    "never")
    spill: bool = Field(True, description="let large operators spill to a private temporary directory")
    max_rows: int = Field(1000, ge=1, description="rows `flywheel sql` prints to a terminal (a file gets every row)")
