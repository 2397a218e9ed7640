"""Argoverse 2 motion-forecasting scenarios (`scenario_<id>.parquet`) -> drives.

A SRC may be a scenario file or a directory holding them (`<split>/<scenario id>/scenario_<id>.parquet`, searched
recursively). The published columns used: `observed`, `track_id`, `object_type`, `timestep`, `position_x`,
`position_y`, `heading`, `velocity_x`, `velocity_y`, `scenario_id`, `start_timestamp` (ns), `num_timestamps`, `city`.
One scenario is one drive: the track `AV` is the ego, the others are agents; frame i is at start_timestamp +
i * 100 ms (AV2 logs at 10 Hz). A track's missing timesteps are missing observations. AV2 gives no object size:
class-typical lengths and widths stand in (`TYPICAL_SIZE`, an estimate). The published `object_type` values map to
the contract's agent classes (`TYPE_TO_CLASS`); static objects and background keep the class unknown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.importers.common import AgentObs, EgoTrack, ImportFailed, ImportOptions, Progress, SourceDrive, safe_id

EGO_TRACK = "AV"
AV2_PERIOD_NS = 100_000_000
TYPE_TO_CLASS = {"vehicle": 1, "bus": 2, "motorcyclist": 3, "cyclist": 4, "riderless_bicycle": 4, "pedestrian": 5,
                 "static": 0, "background": 0, "construction": 0, "unknown": 0}
TYPICAL_SIZE = {0: (1.0, 1.0), 1: (4.6, 1.9), 2: (12.0, 2.5), 3: (2.2, 0.8), 4: (1.8, 0.6), 5: (0.5, 0.5)}
REQUIRED = ("track_id", "object_type", "timestep", "position_x", "position_y", "heading", "velocity_x",
            "velocity_y", "scenario_id", "start_timestamp")


def files_of(src: Path) -> list[Path]:
    """The scenario files of a SRC: itself, or every `scenario_*.parquet` below a directory."""
    src = Path(src)
    return sorted(src.rglob("scenario_*.parquet")) if src.is_dir() else [src]


def _distinct(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(names, index per row): each distinct value as `str()` makes it of the Python value (a null: 'None'), and
    every row's index into them."""
    enc = column.combine_chunks().dictionary_encode()
    values = enc.dictionary.to_pylist()
    names = np.asarray([str(v) for v in values] + ["None"], dtype=object)
    index = enc.indices.fill_null(len(values)).to_numpy(zero_copy_only=False).astype(np.int64)
    return names, index


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """The drive of one scenario file (see the module docstring)."""
    try:  # one file of a few hundred kB: the reader's threads cost more than they save
        table = pq.ParquetFile(path).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise ImportFailed(path, "the file", f"not a readable Parquet file ({exc})") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ImportFailed(path, "the schema", f"missing AV2 columns {missing}")
    sids = pc.unique(table["scenario_id"]).to_pylist()
    if len(sids) != 1:
        raise ImportFailed(path, "column scenario_id", f"one scenario per file, found {len(sids)}")
    where = f"scenario {sids[0]}"
    start = pc.unique(table["start_timestamp"]).to_pylist()
    if len(start) != 1 or start[0] is None:
        raise ImportFailed(path, f"{where}: column start_timestamp", "must hold one value")
    try:
        step = table["timestep"].to_numpy(zero_copy_only=False).astype(np.int64)
        cols = {c: table[c].to_numpy(zero_copy_only=False).astype(np.float64)
                for c in ("position_x", "position_y", "heading", "velocity_x", "velocity_y")}
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ImportFailed(path, where, f"a numeric column holds nulls or text ({exc})") from None
    if step.size and step.min() < 0:
        raise ImportFailed(path, f"{where}: row {int(np.argmin(step))}", "negative timestep")
    # per distinct value, not per row: the track ids and object types through their dictionaries
    track_names, track = _distinct(table["track_id"])
    type_names, otype = _distinct(table["object_type"])
    t_ns = int(start[0]) + step * AV2_PERIOD_NS
    is_ego = (track_names == EGO_TRACK)[track]
    if not is_ego.any():
        raise ImportFailed(path, where, f"no ego track ({EGO_TRACK!r})")
    ego = EgoTrack(t_ns[is_ego], cols["position_x"][is_ego], cols["position_y"][is_ego], cols["heading"][is_ego],
                   np.hypot(cols["velocity_x"], cols["velocity_y"])[is_ego])
    other = ~is_ego
    # agent ids: the rank of the track's name among the agents' names (as np.unique of the names numbers them)
    used = np.unique(track[other])
    rank = np.zeros(track_names.shape[0], np.int64)
    _, rank[used] = np.unique(track_names[used], return_inverse=True)
    codes = rank[track[other]]
    cls = np.asarray([TYPE_TO_CLASS.get(name, 0) for name in type_names.tolist()], np.int32)[otype[other]]
    size = np.asarray([TYPICAL_SIZE[c] for c in range(6)], np.float64)[cls].reshape(-1, 2)
    agents = AgentObs(t_ns[other], codes.astype(np.int64), cls, cols["position_x"][other], cols["position_y"][other],
                      cols["velocity_x"][other], cols["velocity_y"][other], cols["heading"][other], size[:, 0],
                      size[:, 1], np.ones(int(other.sum())))
    city = table["city"][0].as_py() if "city" in table.column_names and table.num_rows else None
    if progress is not None:
        progress(Path(path).stat().st_size)
    yield SourceDrive(record=where, drive_id=safe_id(f"av2-{sids[0]}"),
                      vehicle_id=opts.vehicle_id or safe_id(f"av2-{city}" if city else "av2"), ego=ego,
                      agents=agents)
