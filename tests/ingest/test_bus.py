"""The frames topic's record format (`ingest.bus`): Arrow from the ingest server on, the older protobuf records still
read, and corrupt records dead-lettered with their reason while the partition goes on (real broker, real lake)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ingest.bus import (FIRST_SEQ_HEADER, FRAMES_HEADER, SCHEMA_VERSION_HEADER, decode_record, encode_record)
from ingest.contract import FRAME_SCHEMA, SCHEMA_VERSION, ChunkRejected, RejectReason, encode_chunk, frames_to_arrow
from ingest.synth import synthetic_frames
from tests.ingest_helpers import kafka_records
from tests.ingest.test_sink import (SinkThread, check_files, frame_rows, lake_rows, make_drive, produce, read_lake,
                                    sink_config, wait_until)


def with_header(record: tuple, name: str, value: bytes) -> tuple:
    value_bytes, headers = record
    return value_bytes, [(k, value if k == name else v) for k, v in headers]


def test_a_record_is_the_validated_frames_as_arrow():
    frames = synthetic_frames(40, agents=6, waypoints=4, seed=3)
    value, headers = encode_record(frames, "drive-a", "veh-a", 120, True, SCHEMA_VERSION)
    got = decode_record(b"drive-a", value, headers, max_frames=1000)
    assert (got.drive_id, got.vehicle_id, got.first_seq, got.last_seq, got.final) == ("drive-a", "veh-a", 120, 159, True)
    assert got.frames.equals(frames_to_arrow(frames, "drive-a", "veh-a", 120))
    assert got.frames.schema.equals(FRAME_SCHEMA, check_metadata=True)
    # compressed: a chunk of the agent's default size is smaller than the protobuf chunk the vehicle sent
    big = synthetic_frames(250, agents=30, seed=4)
    assert len(encode_record(big, "drive-a", "veh-a", 0, False, SCHEMA_VERSION)[0]) < \
        0.8 * len(encode_chunk("drive-a", "veh-a", 0, big).SerializeToString())
    # the older format reads to the same chunk
    old = decode_record(b"drive-a", encode_chunk("drive-a", "veh-a", 120, frames, final=True).SerializeToString(),
                        None, max_frames=1000)
    assert old.frames.equals(got.frames) and (old.first_seq, old.final) == (120, True)


def corrupt_records() -> list[tuple[str, tuple, RejectReason]]:
    """(name, (value, headers), reason) of records that must be dead-lettered; the drive is `drive-bad`, seq 25..49."""
    frames = synthetic_frames(75, agents=5, waypoints=3, seed=5).slice(25, 50)
    good = encode_record(frames, "drive-bad", "veh-1", 25, False, SCHEMA_VERSION)
    v7 = pa.BufferOutputStream()
    batch = frames_to_arrow(frames, "drive-bad", "veh-1", 25)
    batch = batch.replace_schema_metadata({"flywheel.schema_version": "7"})
    with pa.ipc.new_stream(v7, batch.schema) as w:
        w.write_batch(batch)
    return [
        ("truncated", (good[0][: len(good[0]) // 2], good[1]), RejectReason.MALFORMED),
        ("not arrow", (b"\x0a\xff\xff\xff\xff\x0f", good[1]), RejectReason.MALFORMED),
        ("version in headers", with_header(good, SCHEMA_VERSION_HEADER, b"7"), RejectReason.SCHEMA_VERSION),
        ("version in schema", (v7.getvalue().to_pybytes(), good[1]), RejectReason.SCHEMA_VERSION),
        ("row count", with_header(good, FRAMES_HEADER, b"24"), RejectReason.COLUMN_LENGTH),
        ("seq range", with_header(good, FIRST_SEQ_HEADER, b"26"), RejectReason.SEQUENCE_GAP),
        ("no headers", (good[0], [h for h in good[1] if h[0] != FRAMES_HEADER]), RejectReason.MALFORMED),
    ]


@pytest.mark.parametrize("name,record,reason", corrupt_records(), ids=[c[0] for c in corrupt_records()])
def test_corrupt_records_are_refused_with_their_reason(name, record, reason):
    with pytest.raises(ChunkRejected) as err:
        decode_record(b"drive-bad", record[0], record[1], max_frames=1000)
    assert err.value.reason == reason, err.value


def test_old_and_new_records_in_one_partition_land_once(kafka_config, group_id, tmp_path):
    """A fleet upgraded without a drain: the partition holds protobuf records before Arrow ones, and a vehicle's
    resend after the upgrade repeats frames that arrived in the old format."""
    ref, new = make_drive("drive-up", 150, 25, seed=11)
    _, old = make_drive("drive-up", 150, 25, seed=11, legacy=True)
    key = b"drive-up"
    # old 0..24, old 25..49, new 25..49 (the resend), new 50..74, old 75..99 (a server not yet upgraded), new rest
    records = [old[0][1], old[1][1], new[1][1], new[2][1], old[3][1], new[4][1], new[5][1]]
    sent = produce(kafka_config, [(key, r) for r in records])
    assert len({md.partition for md in sent}) == 1
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 150, 20, "every frame")
        wait_until(lambda: st.stats.records >= len(records), 5, "every record read")
    lake = read_lake(cfg.lake_dir)
    assert lake.num_rows == 150
    assert frame_rows(lake) == frame_rows(ref)
    assert st.stats.duplicate_records == 1 and st.stats.duplicate_frames == 25 and not st.stats.dead_lettered
    check_files(cfg.lake_dir, kafka_config.frames_topic)


def test_corrupt_arrow_records_are_dead_lettered_and_the_partition_goes_on(kafka_config, group_id, tmp_path):
    ref, chunks = make_drive("drive-bad", 75, 25, seed=5)
    key = b"drive-bad"
    bad = corrupt_records()
    sent = produce(kafka_config, [(key, chunks[0][1]), *[(key, r) for _, r, _ in bad], (key, chunks[1][1]),
                                  (key, chunks[2][1])])
    cfg = sink_config(tmp_path, group_id)
    with SinkThread(kafka_config, cfg) as st:
        wait_until(lambda: lake_rows(cfg.lake_dir) >= 75, 20, "the good records after the bad ones")
        wait_until(lambda: sum(r.last_offset - r.first_offset + 1 for r in st.flushes) >= len(sent), 5, "commits")
    assert frame_rows(read_lake(cfg.lake_dir)) == frame_rows(ref)
    expected: dict[str, int] = {}
    for _, _, reason in bad:
        expected[reason.value] = expected.get(reason.value, 0) + 1
    assert st.stats.dead_lettered == expected

    got = kafka_records(kafka_config, kafka_config.dead_letter_topic)
    got.sort(key=lambda r: int(dict(r.headers)["source_offset"]))
    assert [dict(r.headers)["reason"].decode() for r in got] == [reason.value for _, _, reason in bad]
    for r, (_, (value, headers), _) in zip(got, bad):
        assert r.value == value and dict(r.headers)["detail"]
        # the record's own headers travel with it, so it can be read (or replayed) as it was
        assert all(dict(r.headers)[k] == v for k, v in headers)
