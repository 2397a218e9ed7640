"""Column-wise protobuf decoding (`ingest.importers.pbcolumns`) against upb on the same bytes: every field of
`flywheel.v1.Frame` with proto3's omitted zeros, negative int32s, repeated singular fields (the last wins), unpacked
floats and unknown fields; the by-layout path on messages that share a layout and on ones that only seem to;
truncated and hostile bytes; and the own-MCAP and Waymo importers' two paths giving the same drives."""

from __future__ import annotations

import logging
import struct
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from ingest.importers import mcap, pbcolumns, samples, waymo
from ingest.importers.common import ImportOptions
from ingest.lake import write_drive
from ingest.synth import synthetic_drive
from ingest.wire import drive_pb2 as pb


def _frame(rng, i: int) -> pb.Frame:
    m = pb.Frame(drive_id=["d-1", "d-2", "трасса"][i % 3], vehicle_id="v", seq=i,
                 timestamp_ns=int(rng.integers(0, 2**62)),
                 ego_x=float(rng.normal()) if i % 4 else 0.0, ego_lane=int(rng.integers(-3, 5)),
                 plan_dt_s=0.5, lane_count=int(rng.integers(0, 3)), maneuver=int(rng.integers(0, 3)))
    for _ in range(int(rng.integers(0, 6))):
        m.agents.add(id=int(rng.choice([0, 1, 200, 70000])), agent_class=int(rng.integers(0, 6)),
                     x=float(rng.normal()), y=0.0 if rng.random() < 0.3 else float(rng.normal()),
                     vx=float(rng.normal()), confidence=float(rng.random()))
    k = int(rng.integers(0, 5))
    m.plan_x.extend(rng.normal(size=k).tolist())
    m.plan_y.extend(rng.normal(size=k).tolist())
    m.tags.extend(["a", "source:x", ""][: int(rng.integers(0, 4))])
    return m


def _key(number: int, wt: int) -> bytes:
    return _uvarint(number << 3 | wt)


def _uvarint(v: int) -> bytes:
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def _columns(datas: list[bytes]):
    lens = np.array([len(d) for d in datas], np.int64)
    ends = np.cumsum(lens)
    return np.frombuffer(b"".join(datas), np.uint8), ends - lens, ends


def _check(descriptor, cls, datas: list[bytes], got: pbcolumns.Decoded) -> None:
    """Every field of `got` equals upb's parse of each message."""
    ref = [cls.FromString(d) for d in datas]
    for fd in descriptor.fields:
        if fd.type == fd.TYPE_MESSAGE:
            np.testing.assert_array_equal(got.counts(fd.name), [len(getattr(r, fd.name)) for r in ref])
            subs = [s.SerializeToString() for r in ref for s in getattr(r, fd.name)]
            _check(fd.message_type, message_factory.GetMessageClass(fd.message_type), subs, got.sub(fd.name))
            continue
        col = got.col(fd.name)
        if fd.is_repeated:
            want = [v for r in ref for v in getattr(r, fd.name)]
            np.testing.assert_array_equal(got.counts(fd.name), [len(getattr(r, fd.name)) for r in ref])
        else:
            want = [getattr(r, fd.name) for r in ref]
        if fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES):
            assert list(col) == want, fd.name
        else:
            np.testing.assert_array_equal(np.asarray(col).astype(np.float64), np.asarray(want, np.float64),
                                          err_msg=fd.name)


def test_frames_match_upb():
    rng = np.random.default_rng(0)
    datas = [_frame(rng, i).SerializeToString() for i in range(300)]
    # a singular field given twice (the last wins), plan_x unpacked, unknown fields of every wire type
    datas[3] = datas[3] + pb.Frame(ego_x=7.5, drive_id="again").SerializeToString()
    datas[4] += b"".join(_key(62, 5) + struct.pack("<f", v) for v in (1.5, -2.0))
    datas[5] += (_key(999, 0) + _uvarint(2**40) + _key(998, 1) + b"\0" * 8 + _key(997, 2) + _uvarint(3) + b"abc"
                 + _key(996, 5) + b"\0" * 4)
    got = pbcolumns.decode(pb.Frame.DESCRIPTOR, *_columns(datas))
    _check(pb.Frame.DESCRIPTOR, pb.Frame, datas, got)
    assert got.col("ego_x")[3] == 7.5 and got.col("drive_id")[3] == "again" and got.col("ego_lane").min() < 0


def test_agents_by_layout_and_field_by_field_agree_with_upb():
    rng = np.random.default_rng(1)
    agents = [pb.Frame.Agent(id=7, agent_class=1, x=float(x), y=1.0, vx=2.0, vy=-1.0, heading=0.5, length=4.0,
                             width=2.0, confidence=0.9) for x in rng.normal(size=600)]
    datas = [a.SerializeToString() for a in agents]
    same_len = datas[0]
    # same length, other layout: the id's varint three bytes long and the class left out (0): every offset moves
    datas[10] = pb.Frame.Agent(id=70000, x=1.0, y=1.0, vx=2.0, vy=-1.0, heading=0.5, length=4.0, width=2.0,
                               confidence=0.9).SerializeToString()
    assert len(datas[10]) == len(same_len)
    datas[11] = same_len[:1] + bytes([0x87, 0x00]) + same_len[2:]  # an overlong varint for the id: still id 7
    datas[12] = same_len + same_len  # every field twice: the last wins
    plain = pb.Frame.Agent(id=7, agent_class=1, x=1.0, y=1.0, vx=2.0, vy=-1.0, heading=0.5, length=4.0, width=2.0,
                           confidence=0.9).SerializeToString()
    vx = plain.index(_key(5, 5))
    datas[13] = plain[:vx] + _key(15, 5) + plain[vx + 1:]  # same length, vx now an unknown field 15
    got = pbcolumns.decode(pb.Frame.Agent.DESCRIPTOR, *_columns(datas))
    _check(pb.Frame.Agent.DESCRIPTOR, pb.Frame.Agent, datas, got)
    assert got.col("id")[10] == 70000 and got.col("agent_class")[10] == 0 and got.col("vx")[13] == 0


def test_hostile_bytes_fail_in_both_decoders():
    rng = np.random.default_rng(2)
    data = _frame(rng, 1).SerializeToString() + _frame(rng, 2).SerializeToString()
    for cut in range(1, len(data)):
        piece = data[:cut]
        try:
            pb.Frame.FromString(piece)
        except DecodeError:
            with pytest.raises(pbcolumns.WireError) as err:
                pbcolumns.decode(pb.Frame.DESCRIPTOR, *_columns([data, piece]))
            assert err.value.index == 1
        else:  # a prefix ending on a field boundary is a valid message: the same values
            _check(pb.Frame.DESCRIPTOR, pb.Frame, [piece], pbcolumns.decode(pb.Frame.DESCRIPTOR, *_columns([piece])))
    for bad in (_key(16, 0) + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
                _key(16, 6) + b"\x00",                  # wire type 6
                b"\x00\x01",                            # field number 0
                _key(1, 2) + _uvarint(2) + b"\xff\xfe",  # drive_id not UTF-8
                _key(62, 2) + _uvarint(3) + b"\0\0\0"):  # packed floats that are not whole
        with pytest.raises(DecodeError):
            pb.Frame.FromString(bad)
        with pytest.raises(pbcolumns.WireError):
            pbcolumns.decode(pb.Frame.DESCRIPTOR, *_columns([bad]))
    for odd in (_key(10, 0) + _uvarint(5),      # ego_x (a double) as a varint: upb keeps it as an unknown field
                _key(5, 3) + _key(5, 4)):       # a group
        pb.Frame.FromString(odd)
        with pytest.raises(pbcolumns.Unsupported):
            pbcolumns.decode(pb.Frame.DESCRIPTOR, *_columns([odd]))


def test_own_mcap_two_paths_and_the_fallback(tmp_path, caplog):
    files = [write_drive(tmp_path / "sim", synthetic_drive(f"drive-{i}", f"veh-{i % 2}", 40 + i, agents=3 + i))
             for i in range(3)]
    path = mcap.export_mcap(files, tmp_path / "f.mcap")
    a, b = mcap.drives(path), mcap.drives_reference(path)
    assert [x[:2] for x in a] == [y[:2] for y in b] and len(a) == 3
    for (_, _, fa), (_, _, fb) in zip(a, b):
        assert fa.plan_dt_s == fb.plan_dt_s
        for k in fb.cols:
            assert fa.cols[k].dtype == fb.cols[k].dtype and np.array_equal(fa.cols[k], fb.cols[k]), k
    # a frame whose ego_x comes as a varint: upb keeps it as an unknown field, so the file goes to upb
    from mcap.writer import Writer

    odd = tmp_path / "odd.mcap"
    with open(odd, "wb") as fh:
        w = Writer(fh)
        w.start()
        sid = w.register_schema(mcap.SCHEMA_NAME, "protobuf", mcap.file_descriptor_set())
        ch = w.register_channel(mcap.TOPIC, "protobuf", sid)
        for m in mcap.frames_to_messages(b[0][2], "d", "v"):
            w.add_message(ch, log_time=m.timestamp_ns, data=m.SerializeToString() + _key(10, 0) + b"\x05",
                          publish_time=m.timestamp_ns)
        w.finish()
    with caplog.at_level(logging.INFO, logger="ingest.importers.mcap"):
        got = mcap.drives(odd)
    assert "decoded message by message with upb" in caplog.text
    assert np.array_equal(got[0][2].cols["agent_x"], b[0][2].cols["agent_x"])


def test_waymo_two_paths_and_the_fallback(tmp_path, caplog):
    scenes = [(f"s{i}", samples.scene(steps=91, agents=5 + i, seed=i, missing=0.2)) for i in range(4)]
    path = samples.write_waymo(tmp_path / "w.tfrecord", scenes)
    opts = ImportOptions()

    def same(xs, ys):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert (x.record, x.drive_id, dict(x.dropped)) == (y.record, y.drive_id, dict(y.dropped))
            for part in ("ego", "agents"):
                for f in fields(getattr(x, part)):
                    u, v = getattr(getattr(x, part), f.name), getattr(getattr(y, part), f.name)
                    assert (u is None and v is None) or (u.dtype == v.dtype and np.array_equal(u, v)), f.name

    same(list(waymo.read(path, opts)), list(waymo.read_reference(path, opts)))
    # a record holding a group (an old proto2 encoding): the batch goes to upb
    odd = samples.waymo_scenario_bytes(scenes[0][1], "odd") + _key(20, 3) + _key(20, 4)
    (tmp_path / "o.tfrecord").write_bytes(samples.tfrecord(odd) + path.read_bytes())
    with caplog.at_level(logging.INFO, logger="ingest.importers.waymo"):
        got = list(waymo.read(Path(tmp_path / "o.tfrecord"), opts))
    assert "decoded record by record with upb" in caplog.text
    same(got, list(waymo.read_reference(tmp_path / "o.tfrecord", opts)))


def test_bytes_and_repeated_strings_match_upb():
    from google.protobuf import descriptor_pb2, descriptor_pool

    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="pbcolumns_test.proto", package="pbt", syntax="proto3")
    m = fdp.message_type.add(name="T")
    m.field.add(name="b", number=1, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    m.field.add(name="s", number=2, type=f.TYPE_STRING, label=f.LABEL_REPEATED)
    m.field.add(name="k", number=3, type=f.TYPE_SINT64, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("pbt.T")
    cls = message_factory.GetMessageClass(desc)
    datas = [cls(b=bytes([i, 0xFF, 0]) * (i % 3), s=["x" * (i % 4), "é"][: i % 3], k=-i * 1000).SerializeToString()
             for i in range(20)]
    _check(desc, cls, datas, pbcolumns.decode(desc, *_columns(datas)))
    ascii_only = [cls(s=["ab", "c"]).SerializeToString()] * 3
    _check(desc, cls, ascii_only, pbcolumns.decode(desc, *_columns(ascii_only)))
