"""Column-wise ROS 2 decoding (`ingest.importers.cdr`, `ingest.importers.mcap_scan`) against mcap-ros2-support's
decoder on the same messages: every primitive field of Odometry, Tracked/PredictedObjects and Trajectory with
varied sequences (no classification, ties, NaN probabilities, footprints, predicted paths, non-ASCII frame ids),
truncated and hostile messages refused by both, the importer's two paths giving the same drive, and a schema the
columnar decoder does not take decoded by mcap-ros2-support instead."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap.writer import CompressionType
from mcap.writer import Writer as McapWriter
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer

from ingest.importers import ros2_samples, samples
from ingest.importers.cdr import CdrError, Program, Unsupported, decode
from ingest.importers.common import ImportFailed, ImportOptions
from ingest.importers.mcap_scan import scan
from ingest.importers.ros2 import OBJECTS, TRAJECTORY, read_columnar, read_reference
from ingest.importers.run import import_sources
from ingest.lake import read_drive

ODOM = "nav_msgs/msg/Odometry"


def _vec(rng, n=3):
    return dict(zip("xyz", rng.normal(0, 50, n).tolist()))


def _pose(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return {"position": _vec(rng), "orientation": dict(zip("xyzw", q.tolist()))}


def _cov(rng):
    return rng.normal(size=36).tolist()


def _object(rng, predicted: bool):
    probs = [0.5, 0.5, 0.2, float("nan"), 0.9]
    k = int(rng.integers(0, 4))
    cls = [{"label": int(rng.integers(0, 9)), "probability": float(rng.choice(probs))} for _ in range(k)]
    pose = {"pose": _pose(rng), "covariance": _cov(rng)}
    twist = {"twist": {"linear": _vec(rng), "angular": _vec(rng)}, "covariance": _cov(rng)}
    accel = {"accel": {"linear": _vec(rng), "angular": _vec(rng)}, "covariance": _cov(rng)}
    if predicted:
        paths = [{"path": [_pose(rng) for _ in range(int(rng.integers(0, 3)))],
                  "time_step": {"sec": 0, "nanosec": 500_000_000}, "confidence": float(rng.random())}
                 for _ in range(int(rng.integers(0, 3)))]
        kin = {"initial_pose_with_covariance": pose, "initial_twist_with_covariance": twist,
               "initial_acceleration_with_covariance": accel, "predicted_paths": paths}
    else:
        kin = {"pose_with_covariance": pose, "orientation_availability": int(rng.integers(0, 3)),
               "twist_with_covariance": twist, "acceleration_with_covariance": accel,
               "is_stationary": bool(rng.random() < 0.5)}
    pts = [dict(zip("xyz", rng.normal(size=3).tolist())) for _ in range(int(rng.integers(0, 4)))]
    return {"object_id": {"uuid": rng.integers(0, 256, 16).tolist()},
            "existence_probability": float(rng.choice([0.0, 0.7, 1.5, -0.2])), "classification": cls,
            "kinematics": kin, "shape": {"type": int(rng.integers(0, 3)), "footprint": {"points": pts},
                                         "dimensions": _vec(rng)}}


def write_varied(path: Path, n: int = 40, seed: int = 0, predicted: bool = False) -> Path:
    """Messages of all three kinds with varied sequence lengths and odd values, written by mcap-ros2-support."""
    rng = np.random.default_rng(seed)
    obj_type = OBJECTS[1] if predicted else OBJECTS[0]
    opts = ImportOptions()
    with open(path, "wb") as fh:
        w = Writer(fh)
        sch = {k: w.register_msgdef(k, ros2_samples.msgdef(k)) for k in (ODOM, obj_type, TRAJECTORY)}
        for j in range(n):
            t = 1_700_000_000_000_000_000 + j * 100_000_000
            frame = ["map", "", "карта", "m" * int(rng.integers(0, 9))][j % 4]
            stamp = {"sec": 0, "nanosec": 0} if j % 7 == 3 else {"sec": t // 10**9, "nanosec": t % 10**9}
            header = {"stamp": stamp, "frame_id": frame}
            w.write_message(opts.odometry_topic, sch[ODOM], {
                "header": header, "child_frame_id": frame[::-1],
                "pose": {"pose": _pose(rng), "covariance": _cov(rng)},
                "twist": {"twist": {"linear": _vec(rng), "angular": _vec(rng)}, "covariance": _cov(rng)}},
                log_time=t, publish_time=t, sequence=j)
            w.write_message(opts.objects_topic, sch[obj_type], {
                "header": header, "objects": [_object(rng, predicted) for _ in range(int(rng.integers(0, 6)))]},
                log_time=t, publish_time=t, sequence=j)
            pts = [{"time_from_start": {"sec": int(k), "nanosec": int(rng.integers(0, 10**9))},
                    "pose": _pose(rng), **{f: float(rng.normal()) for f in (
                        "longitudinal_velocity_mps", "lateral_velocity_mps", "acceleration_mps2",
                        "heading_rate_rps", "front_wheel_angle_rad", "rear_wheel_angle_rad")}}
                   for k in range(int(rng.integers(0, 5)))]
            w.write_message(opts.trajectory_topic, sch[TRAJECTORY], {"header": header, "points": pts},
                            log_time=t, publish_time=t, sequence=j)
        w.finish()
    return path


def _by_topic(path: Path) -> dict:
    out: dict = {}
    factory = DecoderFactory()
    with open(path, "rb") as fh:
        for schema, channel, message in make_reader(fh).iter_messages(log_time_order=False):
            entry = out.setdefault(channel.topic, (schema, factory.decoder_for("cdr", schema), []))
            entry[2].append(message.data)
    return out


def _reference(msgs: list, path: str) -> tuple[list, dict[str, list]]:
    """Values of `path` over decoded messages, flat, with the element counts of every sequence on the way."""
    level, counts = msgs, {}
    parts = path.split(".")
    for depth, part in enumerate(parts):
        nxt = []
        if part.endswith("[]"):
            seq = ".".join(parts[:depth] + [part[:-2]])
            counts[seq] = [len(getattr(o, part[:-2])) for o in level]
            for o in level:
                nxt.extend(getattr(o, part[:-2]))
        else:
            nxt = [getattr(o, part) for o in level]
        level = nxt
    return level, counts


def _columns(datas: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lens = np.array([len(d) for d in datas], np.int64)
    ends = np.cumsum(lens)
    return np.frombuffer(b"".join(datas), np.uint8), ends - lens, ends


@pytest.mark.parametrize("predicted", [False, True])
def test_every_field_matches_mcap_ros2_support(tmp_path, predicted):
    topics = _by_topic(write_varied(tmp_path / "v.mcap", predicted=predicted))
    assert len(topics) == 3
    for topic, (schema, ref_decoder, datas) in topics.items():
        program = Program.of(schema.name, schema.data.decode())
        want = {p for p, spec in program.paths.items() if spec}
        ref = [ref_decoder(d) for d in datas]
        got = decode(program, *_columns(datas), want)
        for path in sorted(want):
            expect, counts = _reference(ref, path)
            col = got.col(path)
            if col.ndim == 2 or (expect and isinstance(expect[0], (bytes, list))):  # fixed or byte arrays
                assert [list(bytes(e)) if isinstance(e, bytes) else list(e) for e in expect] == col.tolist(), path
            else:
                np.testing.assert_array_equal(np.asarray(expect, np.float64), col.astype(np.float64),
                                              err_msg=f"{topic} {path}")
            for seq, n in counts.items():
                np.testing.assert_array_equal(got.counts(seq), n, err_msg=f"{topic} {seq}")


def test_truncated_and_hostile_messages_fail_in_both_decoders(tmp_path):
    topics = _by_topic(write_varied(tmp_path / "v.mcap", n=6, seed=3))
    for topic, (schema, ref_decoder, datas) in topics.items():
        program = Program.of(schema.name, schema.data.decode())
        want = {p for p, spec in program.paths.items() if spec}
        data = max(datas, key=len)
        for cut in sorted({*range(0, len(data), 13), len(data) - 1, len(data) - 4}):
            bad = data[:cut]
            with pytest.raises(Exception):
                ref_decoder(bad)
            with pytest.raises(CdrError) as err:
                decode(program, *_columns([datas[0], bad]), want)
            assert err.value.index == 1
        # a count claiming far more elements than the message holds: the first count after the header's stamp
        # and frame id is a sequence (objects, points) or the string child_frame_id
        frame_len = int.from_bytes(data[12:16], "little")
        at = 16 + frame_len
        at += -(at - 4) % 4
        hostile = data[:at] + (0xFFFFFFF0).to_bytes(4, "little") + data[at + 4:]
        with pytest.raises(Exception):
            ref_decoder(hostile)
        with pytest.raises(CdrError, match="claims more elements|truncated"):
            decode(program, *_columns([hostile]), want)
        # a frame id that is not UTF-8
        if frame_len > 1:
            garbled = data[:16] + b"\xff" + data[17:]
            with pytest.raises(UnicodeDecodeError):
                ref_decoder(garbled)
            with pytest.raises(CdrError, match="not UTF-8"):
                decode(program, *_columns([garbled]), want)


@pytest.mark.parametrize("predicted", [False, True])
def test_the_importers_two_paths_give_the_same_drive(tmp_path, predicted):
    opts = ImportOptions()
    paths = [write_varied(tmp_path / "v.mcap", n=30, seed=1, predicted=predicted),
             ros2_samples.write_ros2(tmp_path / "s.mcap", samples.scene(steps=40, agents=6, seed=2),
                                     objects="predicted" if predicted else "tracked")]
    for path in paths:
        (e1, a1, p1), (e2, a2, p2) = read_columnar(path, opts, None), read_reference(path, opts, None)
        for k in e1:
            np.testing.assert_array_equal(e1[k], e2[k], err_msg=k)
        for name in ("t_ns", "id", "cls", "x", "y", "length", "width", "conf", "heading"):
            np.testing.assert_array_equal(getattr(a1, name), getattr(a2, name), err_msg=name)
        for name in ("vx", "vy"):  # numpy's cos/sin against math's: equal here, within an ulp on any host
            np.testing.assert_allclose(getattr(a1, name), getattr(a2, name), rtol=1e-15, atol=1e-12)
        for u, v in zip(p1, p2):
            np.testing.assert_array_equal(u, v)


def test_a_schema_the_columnar_decoder_does_not_take_goes_to_mcap_ros2_support(tmp_path, monkeypatch, caplog):
    sc = samples.scene(steps=30, agents=4, seed=6)
    ours = import_sources("ros2", [ros2_samples.write_ros2(tmp_path / "a" / "std.mcap", sc)], tmp_path / "d1")
    # a UUID declared as a sequence, not uint8[16]: mcap-ros2-support reads it as bytes, the importer still can
    monkeypatch.setitem(ros2_samples._DEPS, "unique_identifier_msgs/UUID", "uint8[] uuid")
    other = ros2_samples.write_ros2(tmp_path / "b" / "std.mcap", sc)
    with caplog.at_level(logging.INFO, logger="ingest.importers.ros2"):
        theirs = import_sources("ros2", [other], tmp_path / "d2")
    assert "decoded by mcap-ros2-support" in caplog.text and "uuid" in caplog.text
    a, b = read_drive(Path(ours.drives[0].path)), read_drive(Path(theirs.drives[0].path))
    for name in ("ego_x", "agent_id", "agent_x", "agent_vx", "plan_x"):
        np.testing.assert_array_equal(a.frames.cols[name], b.frames.cols[name])


@pytest.mark.parametrize("chunked,compression", [(True, CompressionType.ZSTD), (True, CompressionType.LZ4),
                                                 (True, CompressionType.NONE), (False, CompressionType.NONE)])
def test_scan_gives_the_messages_mcap_reads(tmp_path, chunked, compression):
    path = tmp_path / "m.mcap"
    with open(path, "wb") as fh:
        w = McapWriter(fh, chunk_size=2000, compression=compression, use_chunking=chunked)
        w.start()
        sid = w.register_schema("s", "raw", b"")
        chans = [w.register_channel(f"/t{i}", "raw", sid) for i in range(3)]
        for j in range(200):
            w.add_message(chans[j % 3], log_time=j, data=bytes([j % 251]) * (j * 7 % 300), publish_time=j)
        w.finish()
    with open(path, "rb") as fh:
        expect = [(c.id, m.log_time, m.data) for _, c, m in make_reader(fh).iter_messages(log_time_order=False)
                  if c.topic != "/t1"]
    schemas, channels, got = {}, {}, []
    with open(path, "rb") as fh:
        for b in scan(fh, lambda ch, _: ch.topic != "/t1", schemas, channels, batch_bytes=5000):
            got += [(int(c), int(t), b.buf[s:e].tobytes()) for c, t, s, e in
                    zip(b.channel_id, b.log_time, b.starts, b.ends)]
            assert (np.diff(b.index) == 1).all()
    assert got == expect
    data = path.read_bytes()
    if chunked and compression != CompressionType.NONE:  # a damaged compressed chunk
        bad = bytearray(data)
        bad[len(data) // 3] ^= 0xFF
        (tmp_path / "bad.mcap").write_bytes(bytes(bad))
        with pytest.raises((McapError, ValueError)), open(tmp_path / "bad.mcap", "rb") as fh:
            list(scan(fh, lambda ch, _: True, {}, {}))
    for cut in (len(data) - 3, len(data) // 2, 20):
        (tmp_path / "cut.mcap").write_bytes(data[:cut])
        with pytest.raises(Exception, match="truncated|magic|past|ends"):
            with open(tmp_path / "cut.mcap", "rb") as fh:
                list(scan(fh, lambda ch, _: True, {}, {}))



def test_a_type_that_holds_itself_is_left_to_mcap_ros2_support():
    with pytest.raises(Unsupported, match="nested deeper"):
        Program("tree/msg/Node", "float64 value\nNode[] children")


def test_scan_refuses_a_chunk_that_claims_too_much(tmp_path):
    path = ros2_samples.write_ros2(tmp_path / "s.mcap", samples.scene(steps=10, agents=2, seed=1))
    data = bytearray(path.read_bytes())
    at = 8
    while data[at] != 0x06:  # the first chunk record
        at += 9 + int.from_bytes(data[at + 1:at + 9], "little")
    data[at + 9 + 16:at + 9 + 24] = (1 << 40).to_bytes(8, "little")  # its uncompressed size: 1 TiB
    (tmp_path / "big.mcap").write_bytes(bytes(data))
    with pytest.raises(ImportFailed, match="big.mcap: .*unreadable MCAP.*more than"):
        import_sources("ros2", [tmp_path / "big.mcap"], tmp_path / "drives")
    with open(tmp_path / "big.mcap", "rb") as fh, pytest.raises(McapError):
        list(scan(fh, lambda ch, _: True, {}, {}))
