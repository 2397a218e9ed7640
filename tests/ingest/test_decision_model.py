"""The deployed model's id and version in the frame contract (schema version 2): carried through the wire, Arrow and
the lake, malformed values refused, and what version 1 wrote (chunks, lake files) still read, with no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.contract import (FRAME_SCHEMA_V1, ChunkRejected, RejectReason, arrow_to_frames, decode_chunk,
                             encode_chunk, frames_to_arrow)
from ingest.synth import synthetic_frames
from ingest.wire import drive_pb2 as pb
from retrain.cycle.dataset import write_frames_lake
from shadow.catalog import Catalog


def with_model(n: int, model="student", version="v0"):
    f = synthetic_frames(n, agents=2, waypoints=3)
    f.cols["decision_model"] = np.array([model] * n, dtype=object)
    f.cols["decision_model_version"] = np.array([version] * n, dtype=object)
    return f


def test_round_trip_through_wire_and_arrow():
    f = decode_chunk(encode_chunk("d", "v", 0, with_model(12)), max_frames=100)
    back = arrow_to_frames(frames_to_arrow(f, "d", "v", 0))
    assert list(back.decision_model()[0]) == ["student"] * 12 and list(back.decision_model()[1]) == ["v0"] * 12
    plain = decode_chunk(encode_chunk("d", "v", 0, synthetic_frames(5)), max_frames=100)  # no model known
    assert list(plain.decision_model()[0]) == [""] * 5


@pytest.mark.parametrize("model,version,reason", [
    ("student", "", RejectReason.BAD_ID), ("", "v0", RejectReason.BAD_ID), ("stu/dent", "v0", RejectReason.BAD_ID),
    ("x" * 129, "v0", RejectReason.BAD_ID), ("student", " v0", RejectReason.BAD_ID)])
def test_malformed_model_ids_are_refused(model, version, reason):
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(encode_chunk("d", "v", 0, with_model(4, model, version)), max_frames=100)
    assert err.value.reason is reason


def test_column_lengths_and_versions_are_checked():
    f = with_model(4)
    f.cols["decision_model"] = f.cols["decision_model"][:3]
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(encode_chunk("d", "v", 0, f), max_frames=100)
    assert err.value.reason is RejectReason.COLUMN_LENGTH
    with pytest.raises(ChunkRejected) as err:  # a version 1 chunk cannot carry version 2's fields
        decode_chunk(encode_chunk("d", "v", 0, with_model(4), schema_version=pb.SCHEMA_VERSION_1), max_frames=100)
    assert err.value.reason is RejectReason.SCHEMA_VERSION
    old = decode_chunk(encode_chunk("d", "v", 0, synthetic_frames(4), schema_version=pb.SCHEMA_VERSION_1), 100)
    assert list(old.decision_model()[1]) == [""] * 4


def test_a_lake_of_version_1_files_still_reads(tmp_path):
    lake = tmp_path / "lake"
    new = pa.Table.from_batches([frames_to_arrow(with_model(20), "drive-new", "veh-1", 0)])
    write_frames_lake(lake, new)
    # a frames file as version 1 wrote it: without the two columns, version 1 in its footer
    write_frames_lake(tmp_path / "v1", pa.Table.from_batches([frames_to_arrow(synthetic_frames(10), "drive-old",
                                                                               "veh-2", 0)]))
    src = next((tmp_path / "v1").rglob("*.parquet"))
    t = pq.read_table(src)
    t = t.drop_columns(["decision_model", "decision_model_version"])
    meta = {**(t.schema.metadata or {}), b"flywheel.schema_version": b"1"}
    dest = lake / src.relative_to(tmp_path / "v1")
    dest = dest.with_name(dest.name.replace("-p00000-", "-p00001-"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.replace_schema_metadata(meta), dest)
    assert [f.name for f in FRAME_SCHEMA_V1] == t.schema.names[:len(FRAME_SCHEMA_V1)]
    cat = Catalog(lake)
    got = cat.arrow("SELECT drive_id, count(*) AS n, any_value(decision_model) AS m FROM frames GROUP BY 1 "
                    "ORDER BY 1").to_pylist()
    cat.close()
    assert got == [{"drive_id": "drive-new", "n": 20, "m": "student"}, {"drive_id": "drive-old", "n": 10, "m": None}]
    only_old = tmp_path / "old-lake" / dest.relative_to(lake)  # a lake of version 1 files alone still has its view
    only_old.parent.mkdir(parents=True)
    dest.rename(only_old)
    cat = Catalog(tmp_path / "old-lake")
    assert cat.arrow("SELECT count(*) AS n, count(decision_model) AS m FROM frames").to_pylist() == [{"n": 10, "m": 0}]
    cat.close()
