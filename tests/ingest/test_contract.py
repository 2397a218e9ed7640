"""The frame contract: round trips, validation of each rule, and the drive file format."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ingest.contract import (FRAME_SCHEMA, ChunkRejected, RejectReason, arrow_to_frames, decode_chunk, encode_chunk,
                             frames_to_arrow, parse_chunk, validate)
from ingest.lake import read_drive, write_drive
from ingest.synth import synthetic_drive, synthetic_frames


def test_chunk_round_trip_is_exact():
    frames = synthetic_frames(50, agents=7, waypoints=4, seed=1)
    frames.cols["tag_count"][3] = 2
    frames.cols["tag"] = np.array(["tunnel", "glare"], dtype=object)
    data = encode_chunk("d1", "v1", 10, frames).SerializeToString()
    back = decode_chunk(parse_chunk(data), max_frames=1000)
    for name, col in frames.cols.items():
        np.testing.assert_array_equal(col, back.cols[name], err_msg=name)
    batch = frames_to_arrow(back, "d1", "v1", 10)
    assert batch.schema == FRAME_SCHEMA
    assert batch["seq"].to_pylist() == list(range(10, 60))
    assert batch["tags"][3].as_py() == ["tunnel", "glare"]
    assert len(batch["agents"][0].as_py()) == 7
    again = arrow_to_frames(batch)
    for name, col in frames.cols.items():
        np.testing.assert_array_equal(col, again.cols[name], err_msg=name)


@pytest.mark.parametrize("mutate, reason", [
    (lambda c: c["ego_speed"].__setitem__(5, np.nan), RejectReason.NON_FINITE),
    (lambda c: c["agent_x"].__setitem__(0, np.inf), RejectReason.NON_FINITE),
    (lambda c: c["ego_speed"].__setitem__(5, 500.0), RejectReason.OUT_OF_RANGE),
    (lambda c: c["agent_confidence"].__setitem__(2, 1.5), RejectReason.OUT_OF_RANGE),
    (lambda c: c["lighting"].__setitem__(1, 99), RejectReason.BAD_ENUM),
    (lambda c: c["timestamp_ns"].__setitem__(4, c["timestamp_ns"][3]), RejectReason.TIMESTAMPS),
    (lambda c: c.__setitem__("agent_x", c["agent_x"][:-1]), RejectReason.COLUMN_LENGTH),
])
def test_validation_rejects_each_rule(mutate, reason):
    frames = synthetic_frames(20, agents=5)
    mutate(frames.cols)
    with pytest.raises(ChunkRejected) as err:
        validate(frames)
    assert err.value.reason is reason


def test_too_many_agents():
    frames = synthetic_frames(3, agents=65)
    with pytest.raises(ChunkRejected) as err:
        validate(frames)
    assert err.value.reason is RejectReason.TOO_MANY_AGENTS


def test_decode_rejects_garbage_checksum_and_version():
    with pytest.raises(ChunkRejected) as err:
        parse_chunk(b"\xff\xff\xff\xff garbage")
    assert err.value.reason is RejectReason.MALFORMED
    chunk = encode_chunk("d1", "v1", 0, synthetic_frames(5))
    chunk.crc32c ^= 1
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(chunk, 100)
    assert err.value.reason is RejectReason.CHECKSUM
    chunk = encode_chunk("d1", "v1", 0, synthetic_frames(5), schema_version=7)
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(chunk, 100)
    assert err.value.reason is RejectReason.SCHEMA_VERSION
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(encode_chunk("d1", "v1", 0, synthetic_frames(50)), 10)
    assert err.value.reason is RejectReason.TOO_LARGE
    with pytest.raises(ChunkRejected) as err:
        decode_chunk(encode_chunk("d/1", "v1", 0, synthetic_frames(5)), 10)
    assert err.value.reason is RejectReason.BAD_ID


def test_drive_file_round_trip(tmp_path):
    table = synthetic_drive("drive-7", "veh-3", 120, seed=4)
    path = write_drive(tmp_path, table)
    drive = read_drive(path)
    assert (drive.drive_id, drive.vehicle_id, drive.frames.num_frames) == ("drive-7", "veh-3", 120)
    assert pa.Table.from_batches([frames_to_arrow(drive.frames, "drive-7", "veh-3", 0)]).equals(table)
    with pytest.raises(ValueError, match="seq"):
        write_drive(tmp_path, table.slice(1))
