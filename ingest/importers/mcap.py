"""The project's own MCAP: import robotics logs of `flywheel.v1.Frame` messages into the drive directory, and export drives.

An MCAP file may hold several drives on any channel whose schema is `flywheel.v1.Frame` with protobuf encoding; other
channels (camera, lidar, ...) are ignored. Frames are grouped by drive id, ordered by seq, checked for contiguity
from 0 and against the frame contract, and written with `ingest.lake.write_drive`. The messages are decoded all at
once, column-wise (`drives`: `ingest.importers.mcap_scan` and `ingest.importers.pbcolumns`), falling back to upb
message by message for what that decoder does not take (`drives_reference`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap.writer import Writer

from ingest.contract import COLUMNS, ChunkRejected, Frames, frames_to_arrow, validate
from ingest.importers import pbcolumns
from ingest.importers.common import ImportFailed, ImportOptions, Progress, SourceDrive, group_rows
from ingest.importers.mcap_scan import scan
from ingest.importers.pbcolumns import Unsupported
from ingest.lake import read_drive, write_drive
from ingest.wire import drive_pb2 as pb

log = logging.getLogger(__name__)
SCHEMA_NAME = "flywheel.v1.Frame"
TOPIC = "/flywheel/frames"

_AGENT_FIELDS = {"agent_id": "id", "agent_class": "agent_class", "agent_x": "x", "agent_y": "y", "agent_vx": "vx",
                 "agent_vy": "vy", "agent_heading": "heading", "agent_length": "length", "agent_width": "width",
                 "agent_confidence": "confidence"}


def file_descriptor_set() -> bytes:
    fds = descriptor_pb2.FileDescriptorSet()
    pb.DESCRIPTOR.CopyToProto(fds.file.add())
    return fds.SerializeToString()


def frames_to_messages(frames: Frames, drive_id: str, vehicle_id: str) -> list[pb.Frame]:
    """Columns -> one `Frame` message per frame."""
    c = frames.cols
    a_off, p_off, t_off = (np.concatenate([[0], np.cumsum(c[k], dtype=np.int64)]).tolist()
                           for k in ("agent_count", "plan_count", "tag_count"))
    scalars = [col.name for col in COLUMNS
               if col.level == "frame" and col.name not in ("agent_count", "plan_count", "tag_count")]
    out = []
    for i in range(frames.num_frames):
        msg = pb.Frame(drive_id=drive_id, vehicle_id=vehicle_id, seq=i, plan_dt_s=frames.plan_dt_s,
                       **{name: c[name][i].item() for name in scalars})
        for j in range(a_off[i], a_off[i + 1]):
            msg.agents.add(**{short: c[long][j].item() for long, short in _AGENT_FIELDS.items()})
        msg.plan_x.extend(c["plan_x"][p_off[i]:p_off[i + 1]].tolist())
        msg.plan_y.extend(c["plan_y"][p_off[i]:p_off[i + 1]].tolist())
        msg.tags.extend(c["tag"][t_off[i]:t_off[i + 1]].tolist())
        out.append(msg)
    return out


def messages_to_frames(msgs: list[pb.Frame]) -> Frames:
    """`Frame` messages of one drive, in seq order -> columns."""
    cols: dict[str, list] = {col.name: [] for col in COLUMNS}
    for m in msgs:
        for col in COLUMNS:
            if col.level == "frame" and col.name not in ("agent_count", "plan_count", "tag_count"):
                cols[col.name].append(getattr(m, col.name))
        cols["agent_count"].append(len(m.agents))
        for long, short in _AGENT_FIELDS.items():
            cols[long].extend(getattr(a, short) for a in m.agents)
        cols["plan_count"].append(len(m.plan_x))
        if len(m.plan_y) != len(m.plan_x):
            raise ValueError(f"drive {m.drive_id} seq {m.seq}: plan_x and plan_y lengths differ")
        cols["plan_x"].extend(m.plan_x)
        cols["plan_y"].extend(m.plan_y)
        cols["tag_count"].append(len(m.tags))
        cols["tag"].extend(m.tags)
    dts = {m.plan_dt_s for m in msgs}
    frames = Frames({col.name: np.array(cols[col.name], dtype=col.dtype) for col in COLUMNS},
                    msgs[0].plan_dt_s if msgs else 0.1)
    if len(dts) > 1:
        raise ValueError(f"plan_dt_s changes within the drive: {sorted(dts)}")
    return frames


def export_mcap(drive_files: list[Path], out: Path) -> Path:
    """Write drives as `flywheel.v1.Frame` protobuf messages on one MCAP channel (log time = frame timestamp)."""
    with open(out, "wb") as fh:
        writer = Writer(fh)
        writer.start(profile="", library="flywheel")
        schema_id = writer.register_schema(name=SCHEMA_NAME, encoding="protobuf", data=file_descriptor_set())
        channel = writer.register_channel(topic=TOPIC, message_encoding="protobuf", schema_id=schema_id)
        for path in drive_files:
            drive = read_drive(path)
            for msg in frames_to_messages(drive.frames, drive.drive_id, drive.vehicle_id):
                writer.add_message(channel, log_time=msg.timestamp_ns, data=msg.SerializeToString(),
                                   publish_time=msg.timestamp_ns, sequence=msg.seq)
        writer.finish()
    return out


def drives(path: Path, progress=None) -> list[tuple[str, str, Frames]]:
    """(drive id, vehicle id, frames) of every drive in an MCAP file of `flywheel.v1.Frame` messages, each checked
    for seq 0..n-1 exactly once and one vehicle; ValueError (ImportFailed) names the file and the drive.

    Decoded column-wise (`ingest.importers.pbcolumns`, every message at once); a file holding what that decoder
    leaves to upb is read message by message instead (`drives_reference`, the same results), and the log says so.
    """
    try:
        return _drives_columnar(path, progress)
    except Unsupported as exc:
        log.info("%s: decoded message by message with upb (%s)", path, exc)
        return drives_reference(path, progress)


_FRAME_SCALARS = [c.name for c in COLUMNS if c.level == "frame" and c.name not in ("agent_count", "plan_count",
                                                                                     "tag_count")]
_WANT = {**{k: None for k in (*_FRAME_SCALARS, "drive_id", "vehicle_id", "seq", "plan_dt_s", "plan_x", "plan_y",
                              "tags")}, "agents": {k: None for k in _AGENT_FIELDS.values()}}


def _drives_columnar(path: Path, progress=None) -> list[tuple[str, str, Frames]]:
    schemas: dict = {}
    channels: dict = {}
    seen = [0]
    batches = []
    with open(path, "rb") as fh:
        try:
            for b in scan(fh, lambda ch, sc: sc is not None and sc.name == SCHEMA_NAME
                          and ch.message_encoding == "protobuf", schemas, channels, progress, seen=seen,
                          count_all=True):
                try:
                    batches.append(pbcolumns.decode(pb.Frame.DESCRIPTOR, b.buf, b.starts, b.ends, _WANT))
                except pbcolumns.WireError as exc:
                    i = exc.index
                    raise ImportFailed(path, f"message {b.index[i]} at log time {b.log_time[i]}",
                                       f"undecodable {SCHEMA_NAME} message: {exc.detail}") from None
        except ImportFailed:
            raise
        except (McapError, EOFError, ValueError, KeyError, OSError, struct.error) as exc:
            raise ImportFailed(path, f"after message {seen[0]}", f"unreadable MCAP ({type(exc).__name__}: "
                               f"{exc})") from None
    if not batches:
        return []
    d = _concat(batches)
    out = []
    ids = d.col("drive_id")
    for drive_id in np.unique(ids).tolist():
        rows = np.flatnonzero(ids == drive_id)
        rows = rows[np.argsort(d.col("seq")[rows], kind="stable")]
        if not np.array_equal(d.col("seq")[rows], np.arange(rows.shape[0])):
            raise ImportFailed(path, f"drive {drive_id}", f"does not hold seq 0..{rows.shape[0] - 1} exactly once")
        vehicles = set(d.col("vehicle_id")[rows].tolist())
        if len(vehicles) != 1:
            raise ImportFailed(path, f"drive {drive_id}", f"names several vehicles {sorted(vehicles)}")
        nx, ny = d.counts("plan_x")[rows], d.counts("plan_y")[rows]
        if (nx != ny).any():
            seq = int(d.col("seq")[rows][np.argmax(nx != ny)])
            raise ImportFailed(path, f"drive {drive_id}", f"drive {drive_id} seq {seq}: plan_x and plan_y lengths "
                               "differ")
        off = {k: np.concatenate([[0], np.cumsum(d.counts(k))]).astype(np.int64) for k in ("agents", "plan_x", "tags")}
        a, p, t = (group_rows(off[k], rows) for k in ("agents", "plan_x", "tags"))
        agents = d.sub("agents")
        cols = {name: d.col(name)[rows] for name in _FRAME_SCALARS}
        cols.update({long: agents.col(short)[a] for long, short in _AGENT_FIELDS.items()})
        cols.update(agent_count=d.counts("agents")[rows], plan_count=nx, plan_x=d.col("plan_x")[p],
                    plan_y=d.col("plan_y")[p], tag_count=d.counts("tags")[rows],
                    tag=np.asarray(d.col("tags"), dtype=object)[t])
        dts = d.col("plan_dt_s")[rows]
        if np.unique(dts).shape[0] > 1:
            raise ImportFailed(path, f"drive {drive_id}", f"plan_dt_s changes within the drive: "
                               f"{sorted(set(dts.astype(np.float64).tolist()))}")
        frames = Frames({c.name: np.asarray(cols[c.name]).astype(c.dtype) for c in COLUMNS},
                        float(dts[0]) if dts.size else 0.1)
        out.append((drive_id, vehicles.pop(), frames))
    return out


def _concat(parts: list) -> "pbcolumns.Decoded":
    """The Decoded of several batches as one (batches of one file's messages, in order)."""
    if len(parts) == 1:
        return parts[0]
    out = pbcolumns.Decoded(sum(p.n for p in parts))
    for name, col in parts[0].cols.items():
        out.cols[name] = (sum((p.col(name) for p in parts), []) if isinstance(col, list)
                          else np.concatenate([p.col(name) for p in parts]))
    for name in parts[0].cnt:
        out.cnt[name] = np.concatenate([p.counts(name) for p in parts])
    for name in parts[0].subs:
        out.subs[name] = _concat([p.sub(name) for p in parts])
    return out


def drives_reference(path: Path, progress=None) -> list[tuple[str, str, Frames]]:
    """`drives`, message by message with upb (the reference `drives` is held to, and the path for what the
    columnar decoder leaves to upb)."""
    by_drive: dict[str, list[pb.Frame]] = {}
    where = "the file header"
    with open(path, "rb") as fh:
        try:
            reader = make_reader(fh, validate_crcs=True)
            for count, (schema, channel, message) in enumerate(reader.iter_messages()):
                where = f"message {count} at log time {message.log_time}"
                if schema is None or schema.name != SCHEMA_NAME or channel.message_encoding != "protobuf":
                    continue
                try:
                    msg = pb.Frame.FromString(message.data)
                except DecodeError as exc:
                    raise ImportFailed(path, where, f"undecodable {SCHEMA_NAME} message: {exc}") from None
                by_drive.setdefault(msg.drive_id, []).append(msg)
                if progress is not None and count % 1024 == 0:
                    progress(fh.tell())
        except ImportFailed:
            raise
        except (McapError, EOFError, ValueError, KeyError, OSError) as exc:
            raise ImportFailed(path, f"after {where}", f"unreadable MCAP ({type(exc).__name__}: {exc})") from None
    out = []
    for drive_id, msgs in sorted(by_drive.items()):
        msgs.sort(key=lambda m: m.seq)
        seqs = np.array([m.seq for m in msgs])
        if not np.array_equal(seqs, np.arange(len(msgs))):
            raise ImportFailed(path, f"drive {drive_id}", f"does not hold seq 0..{len(msgs) - 1} exactly once")
        vehicles = {m.vehicle_id for m in msgs}
        if len(vehicles) != 1:
            raise ImportFailed(path, f"drive {drive_id}", f"names several vehicles {sorted(vehicles)}")
        try:
            out.append((drive_id, vehicles.pop(), messages_to_frames(msgs)))
        except ValueError as exc:
            raise ImportFailed(path, f"drive {drive_id}", str(exc)) from None
    return out


def read(path: Path, opts: ImportOptions, progress: Progress | None = None) -> Iterator[SourceDrive]:
    """`flywheel import --format mcap`: every drive of the file as contract frames (validated by the caller, which
    adds the tag `source:mcap` to frames without a source tag)."""
    for drive_id, vehicle_id, frames in drives(path, progress):
        yield SourceDrive(record=f"drive {drive_id}", drive_id=drive_id, vehicle_id=opts.vehicle_id or vehicle_id,
                          frames=frames)


def import_mcap(path: Path, drives_dir: Path) -> list[Path]:
    """Convert every drive in an MCAP file into the drive directory, exactly as logged; returns the written files.

    Raises ValueError naming the drive and the rule when a drive is incomplete or breaks the frame contract; nothing
    of the file is written then (every drive is checked before the first is written).
    """
    checked = []
    for drive_id, vehicle_id, frames in drives(path):
        try:
            validate(frames)
        except ChunkRejected as exc:
            raise ValueError(f"{path}: drive {drive_id}: {exc}") from None
        checked.append((drive_id, vehicle_id, frames))
    written = []
    for drive_id, vehicle_id, frames in checked:
        table = frames_to_arrow(frames, drive_id, vehicle_id, 0)
        written.append(write_drive(drives_dir, pa.Table.from_batches([table])))
        log.info("imported drive %s (%d frames) from %s", drive_id, frames.num_frames, path)
    return written
