"""Waymo Open Motion Dataset `Scenario` records in TFRecord files -> drives, without TensorFlow.

TFRecord framing, read here: each record is `uint64 length` (little endian), `uint32 masked_crc32c(length bytes)`,
`length` bytes of data, `uint32 masked_crc32c(data)`, where masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2^32.
Both CRCs are checked; a wrong one or a file that ends inside a record raises `ImportFailed` naming the record and
its byte offset.

Only the fields used are declared, with the public field numbers of `waymo_open_dataset/protos/scenario.proto`
(proto2): Scenario.timestamps_seconds = 1, tracks = 2, scenario_id = 5, sdc_track_index = 6; Track.id = 1,
object_type = 2, states = 3; ObjectState.center_x = 2, center_y = 3, length = 5, width = 6, heading = 8,
velocity_x = 9, velocity_y = 10, valid = 11. Every other field (the map, dynamic states, lidar) is skipped by the
parser. One scenario is one drive: the SDC's track is the ego, the others are agents; states with `valid` false are
missing observations. Times are relative, so they are placed after `ImportOptions.base_time_ns`.

The records of a file are decoded together, column-wise, by `ingest.importers.pbcolumns` from the declared
message types (the same fields, the same rules as upb); what that decoder leaves to upb (a group, a field of another
wire type) is decoded record by record (`read_reference`), and the log says so.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ingest.importers import pbcolumns
from ingest.importers.common import (AgentObs, EgoTrack, ImportFailed, ImportOptions, Progress, SourceDrive,
                                     safe_id)

log = logging.getLogger(__name__)

# Track.ObjectType: UNSET, VEHICLE, PEDESTRIAN, CYCLIST, OTHER -> AgentClass codes
TYPE_TO_CLASS = {0: 0, 1: 1, 2: 5, 3: 4, 4: 0}
_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    c = crc32c.crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _declare() -> type:
    """The Scenario message class from hand-declared fields (see the module docstring)."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="flywheel_waymo_scenario_subset.proto",
                                             package="flywheel.waymo_subset", syntax="proto2")

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name

    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("ObjectState", [("center_x", 2, f.TYPE_DOUBLE, opt, ""), ("center_y", 3, f.TYPE_DOUBLE, opt, ""),
                            ("length", 5, f.TYPE_FLOAT, opt, ""), ("width", 6, f.TYPE_FLOAT, opt, ""),
                            ("heading", 8, f.TYPE_FLOAT, opt, ""), ("velocity_x", 9, f.TYPE_FLOAT, opt, ""),
                            ("velocity_y", 10, f.TYPE_FLOAT, opt, ""), ("valid", 11, f.TYPE_BOOL, opt, "")])
    # object_type is an enum in the published file; declared int32 here (same varint on the wire) so an unknown
    # value stays visible instead of being moved to the unknown fields
    message("Track", [("id", 1, f.TYPE_INT32, opt, ""), ("object_type", 2, f.TYPE_INT32, opt, ""),
                      ("states", 3, f.TYPE_MESSAGE, rep, ".flywheel.waymo_subset.ObjectState")])
    message("Scenario", [("timestamps_seconds", 1, f.TYPE_DOUBLE, rep, ""),
                         ("tracks", 2, f.TYPE_MESSAGE, rep, ".flywheel.waymo_subset.Track"),
                         ("scenario_id", 5, f.TYPE_STRING, opt, ""), ("sdc_track_index", 6, f.TYPE_INT32, opt, "")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("flywheel.waymo_subset.Scenario"))


Scenario = _declare()


def records(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(index, byte offset, data) of every TFRecord in a file, CRCs checked."""
    with open(path, "rb") as fh:
        index = 0
        while True:
            at = fh.tell()
            head = fh.read(12)
            if not head:
                return
            where = f"record {index} at byte {at}"
            if len(head) < 12:
                raise ImportFailed(path, where, "truncated: the file ends inside a record header")
            length_bytes, crc = head[:8], struct.unpack("<I", head[8:])[0]
            if masked_crc(length_bytes) != crc:
                raise ImportFailed(path, where, f"wrong length CRC ({crc:#010x}, computed "
                                   f"{masked_crc(length_bytes):#010x})")
            (length,) = struct.unpack("<Q", length_bytes)
            data = fh.read(length)
            tail = fh.read(4)
            if len(data) < length or len(tail) < 4:
                raise ImportFailed(path, where, f"truncated: the file ends inside a record of {length} bytes")
            if masked_crc(data) != struct.unpack("<I", tail)[0]:
                raise ImportFailed(path, where, "wrong data CRC")
            yield index, at, data
            index += 1
            if progress is not None:
                progress(fh.tell())


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """One drive per Scenario record (see the module docstring): the records of a file decoded together
    (`ingest.importers.pbcolumns`, in batches of about 256 MB), or one by one with upb where that decoder leaves
    them to it (the reference, `read_reference`)."""
    batch: list[tuple[int, int, bytes]] = []
    size = 0
    for record in records(path, progress):
        batch.append(record)
        size += len(record[2])
        if size >= _BATCH_BYTES:
            yield from _batch(path, batch, opts)
            batch, size = [], 0
    if batch:
        yield from _batch(path, batch, opts)


_BATCH_BYTES = 256 << 20
_STATE = ("center_x", "center_y", "length", "width", "heading", "velocity_x", "velocity_y", "valid")
_WANT = {"timestamps_seconds": None, "scenario_id": None, "sdc_track_index": None,
         "tracks": {"id": None, "object_type": None, "states": {k: None for k in _STATE}}}


def _batch(path: Path, batch: list[tuple[int, int, bytes]], opts: ImportOptions) -> list[SourceDrive]:
    lens = np.asarray([len(r[2]) for r in batch], np.int64)
    ends = np.cumsum(lens)
    buf = np.frombuffer(b"".join(r[2] for r in batch), np.uint8)
    try:
        sc = pbcolumns.decode(Scenario.DESCRIPTOR, buf, ends - lens, ends, _WANT)
    except pbcolumns.Unsupported as exc:
        log.info("%s: decoded record by record with upb (%s)", path, exc)
        return [_reference(path, index, at, data, opts) for index, at, data in batch]
    except pbcolumns.WireError as exc:
        index, at, _ = batch[exc.index]
        raise ImportFailed(path, f"record {index} at byte {at}", f"not a Scenario: {exc.detail}") from None
    tracks, states = sc.sub("tracks"), sc.sub("tracks").sub("states")
    n_ts, n_tracks, n_states = sc.counts("timestamps_seconds"), sc.counts("tracks"), tracks.counts("states")
    ts_off, tr_off = np.cumsum(n_ts) - n_ts, np.cumsum(n_tracks) - n_tracks
    st_off = np.cumsum(n_states) - n_states
    v = np.stack([states.col(k).astype(np.float64) for k in _STATE], axis=1)
    out = []
    for i, (index, at, _) in enumerate(batch):
        sid = sc.col("scenario_id")[i]
        where = f"record {index} at byte {at} (scenario {sid or '?'})"
        ts = sc.col("timestamps_seconds")[ts_off[i]:ts_off[i] + n_ts[i]].astype(np.float64)
        sdc = int(sc.col("sdc_track_index")[i])
        if not ts.size:
            raise ImportFailed(path, where, "no timestamps_seconds")
        if not sc.has["sdc_track_index"][i] or not 0 <= sdc < n_tracks[i]:
            raise ImportFailed(path, where, f"sdc_track_index {sdc} is not one of its {n_tracks[i]} tracks")
        tr = tr_off[i] + np.arange(n_tracks[i])
        wrong = np.flatnonzero(n_states[tr] != ts.size)
        if wrong.size:
            t = tr[wrong[0]]
            raise ImportFailed(path, where, f"track {tracks.col('id')[t]} has {n_states[t]} states for {ts.size} "
                               "timestamps")
        t_ns = opts.base_time_ns + np.round(ts * 1e9).astype(np.int64)
        s = v[st_off[tr[0]]:st_off[tr[0]] + tr.shape[0] * ts.size] if tr.size else v[:0]
        s = s.reshape(tr.shape[0], ts.size, 8)
        valid = s[:, :, 7] != 0
        e, ev = s[sdc], valid[sdc]
        ego = EgoTrack(t_ns[ev], e[ev, 0], e[ev, 1], e[ev, 4], np.hypot(e[:, 5], e[:, 6])[ev])
        others = np.arange(tr.shape[0]) != sdc
        ok = valid & others[:, None]
        k = np.flatnonzero(ok.ravel())
        flat = s.reshape(-1, 8)[k]
        per_track = ok.sum(axis=1)
        cls = np.asarray([TYPE_TO_CLASS.get(int(o), 0) for o in tracks.col("object_type")[tr].tolist()], np.int32)
        agents = AgentObs(np.tile(t_ns, tr.shape[0])[k], np.repeat(tracks.col("id")[tr].astype(np.int64), per_track),
                          np.repeat(cls, per_track), flat[:, 0], flat[:, 1], flat[:, 5], flat[:, 6], flat[:, 4],
                          flat[:, 2], flat[:, 3], np.ones(k.shape[0]))
        drive = SourceDrive(record=where, drive_id=safe_id(f"waymo-{sid or where}"),
                            vehicle_id=opts.vehicle_id or "waymo", ego=ego, agents=agents)
        drive.dropped["agent_invalid_state"] += int((~valid & others[:, None]).sum())
        out.append(drive)
    return out


def read_reference(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """`read`, record by record with upb: the reference the columnar path is held to."""
    for index, at, data in records(path, progress):
        yield _reference(path, index, at, data, opts)


def _reference(path: Path, index: int, at: int, data: bytes, opts: ImportOptions) -> SourceDrive:
    where = f"record {index} at byte {at}"
    try:
        sc = Scenario.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ImportFailed(path, where, f"not a Scenario: {exc}") from None
    return _scenario(path, where, sc, opts)


def _scenario(path: Path, where: str, sc, opts: ImportOptions) -> SourceDrive:
    where = f"{where} (scenario {sc.scenario_id or '?'})"
    ts = np.asarray(sc.timestamps_seconds, np.float64)
    if not ts.size:
        raise ImportFailed(path, where, "no timestamps_seconds")
    if not sc.HasField("sdc_track_index") or not 0 <= sc.sdc_track_index < len(sc.tracks):
        raise ImportFailed(path, where, f"sdc_track_index {sc.sdc_track_index} is not one of its "
                           f"{len(sc.tracks)} tracks")
    t_ns = opts.base_time_ns + np.round(ts * 1e9).astype(np.int64)
    ego = None
    ag = {k: [] for k in ("t_ns", "id", "cls", "x", "y", "vx", "vy", "heading", "length", "width", "conf")}
    invalid = 0
    for ti, track in enumerate(sc.tracks):
        if len(track.states) != ts.size:
            raise ImportFailed(path, where, f"track {track.id} has {len(track.states)} states for {ts.size} "
                               "timestamps")
        # one tuple per state, one array per track: the cheapest way through upb's per-field accessors
        v = np.array([(s.center_x, s.center_y, s.length, s.width, s.heading, s.velocity_x, s.velocity_y, s.valid)
                      for s in track.states], np.float64).reshape(-1, 8)
        valid = v[:, 7] != 0
        cols = dict(zip(("center_x", "center_y", "length", "width", "heading", "velocity_x", "velocity_y"), v.T))
        if ti == sc.sdc_track_index:
            ego = EgoTrack(t_ns[valid], cols["center_x"][valid], cols["center_y"][valid], cols["heading"][valid],
                           np.hypot(cols["velocity_x"], cols["velocity_y"])[valid])
            continue
        invalid += int((~valid).sum())
        k = int(valid.sum())
        ag["t_ns"].extend(t_ns[valid])
        ag["id"].extend([track.id] * k)
        ag["cls"].extend([TYPE_TO_CLASS.get(track.object_type, 0)] * k)
        for key, name in (("x", "center_x"), ("y", "center_y"), ("vx", "velocity_x"), ("vy", "velocity_y"),
                          ("heading", "heading"), ("length", "length"), ("width", "width")):
            ag[key].extend(cols[name][valid])
        ag["conf"].extend([1.0] * k)
    drive = SourceDrive(record=where, drive_id=safe_id(f"waymo-{sc.scenario_id or where}"),
                        vehicle_id=opts.vehicle_id or "waymo", ego=ego, agents=AgentObs.from_lists(ag))
    drive.dropped["agent_invalid_state"] += invalid
    return drive
