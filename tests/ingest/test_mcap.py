"""MCAP import/export of drives: a round trip is exact, and broken logs are refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from mcap.writer import Writer

from ingest.lake import list_drive_files, read_drive, write_drive
from ingest.importers.mcap import SCHEMA_NAME, file_descriptor_set, export_mcap, frames_to_messages, import_mcap
from ingest.synth import synthetic_drive


def test_round_trip(tmp_path):
    src = tmp_path / "src"
    paths = [write_drive(src, synthetic_drive(f"drive-{i}", "veh-1", 40 + i, agents=6, seed=i)) for i in range(2)]
    log = export_mcap(paths, tmp_path / "fleet.mcap")
    written = import_mcap(log, tmp_path / "imported")
    assert sorted(p.name for p in written) == sorted(p.name for p in paths)
    for p in paths:
        a = read_drive(p)
        b = read_drive(tmp_path / "imported" / "veh-1" / p.name)
        assert a.frames.num_frames == b.frames.num_frames
        for name, col in a.frames.cols.items():
            np.testing.assert_array_equal(col, b.frames.cols[name], err_msg=name)


def _write(path, msgs):
    with open(path, "wb") as fh:
        w = Writer(fh)
        w.start()
        sid = w.register_schema(name=SCHEMA_NAME, encoding="protobuf", data=file_descriptor_set())
        ch = w.register_channel(topic="/f", message_encoding="protobuf", schema_id=sid)
        other = w.register_channel(topic="/camera", message_encoding="raw", schema_id=0)
        w.add_message(other, log_time=1, data=b"\x00jpeg", publish_time=1)
        for m in msgs:
            w.add_message(ch, log_time=m.timestamp_ns, data=m.SerializeToString(), publish_time=m.timestamp_ns)
        w.finish()


def test_missing_frame_and_nan_are_refused(tmp_path):
    drive = read_drive(write_drive(tmp_path / "src", synthetic_drive("drive-1", "veh-1", 10, agents=2)))
    msgs = frames_to_messages(drive.frames, "drive-1", "veh-1")
    _write(tmp_path / "gap.mcap", msgs[:4] + msgs[5:])
    with pytest.raises(ValueError, match="seq 0..8"):
        import_mcap(tmp_path / "gap.mcap", tmp_path / "out")
    msgs[3].ego_speed = float("nan")
    _write(tmp_path / "nan.mcap", msgs)
    with pytest.raises(ValueError, match="non_finite"):
        import_mcap(tmp_path / "nan.mcap", tmp_path / "out")
    assert list_drive_files(tmp_path / "out") == []
    _write(tmp_path / "ok.mcap", frames_to_messages(drive.frames, "drive-1", "veh-1"))
    assert len(import_mcap(tmp_path / "ok.mcap", tmp_path / "out")) == 1
