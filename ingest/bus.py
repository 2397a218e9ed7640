"""The Kafka record of a chunk: validated frames as one compressed Arrow IPC record batch, decoded once at the edge.

The ingest server decodes and validates a vehicle's `DriveChunk` once (`ingest.contract.decode_chunk`) and produces
the chunk's frames as one Kafka record:

    key      drive id (as always: all chunks of a drive share a partition)
    value    an Arrow IPC stream holding one record batch of `FRAME_SCHEMA` (schema, dictionaries, batch), its
             buffers LZ4-frame compressed; the schema's metadata carries `flywheel.schema_version`
    headers  flywheel-format=arrow-ipc, flywheel-schema-version, flywheel-vehicle, flywheel-first-seq,
             flywheel-frames, flywheel-final (1 or 0)

Readers (the sink, the streaming shadow worker) decode it with `decode_record` without a per-frame Python decode:
their checks are of the record only: the format, the schema (the frame schema's fields, exactly) and its version,
the row count against the headers, the drive, vehicle and seq columns against the key and headers. The frame
contract's value checks were made by the server, which is the only writer of the topic.

A record without the `flywheel-format` header is a serialised `DriveChunk` (the format before this one): it is
decoded and validated in full as before, so a fleet upgrades without draining the topic first.

Everything here follows `FRAME_SCHEMA`: a column added to the frame contract travels without a change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.contract import (FRAME_SCHEMA, FRAME_SCHEMA_V1, SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, ChunkRejected,
                             Frames, RejectReason, decode_chunk, frames_to_arrow, parse_chunk)
from ingest.tables import upgrade_frame_rows

FORMAT_HEADER = "flywheel-format"
ARROW_FORMAT = b"arrow-ipc"
SCHEMA_VERSION_HEADER = "flywheel-schema-version"
VEHICLE_HEADER = "flywheel-vehicle"
FIRST_SEQ_HEADER = "flywheel-first-seq"
FRAMES_HEADER = "flywheel-frames"
FINAL_HEADER = "flywheel-final"
SCHEMA_VERSION_KEY = b"flywheel.schema_version"

# LZ4 (frame format, the one Arrow IPC allows besides ZSTD): measured on a 250-frame chunk with 30 agents per frame,
# 210 us to write and 80 us to read against ZSTD's 1,460 and 1,080, at 243 KB against 209 KB (protobuf: 355 KB).
# One thread: the writers and readers are already one per core, and pyarrow's pool only adds hand-offs.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)
# the fields alone of each version read: the version is checked on its own
_FRAME_FIELDS = {1: pa.schema(list(FRAME_SCHEMA_V1)), 2: pa.schema(list(FRAME_SCHEMA))}


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as read from the frames topic: where its frames belong and the frames as rows of `FRAME_SCHEMA`."""

    drive_id: str
    vehicle_id: str
    first_seq: int
    final: bool
    schema_version: int
    frames: pa.RecordBatch  # FRAME_SCHEMA rows, seq first_seq .. first_seq + num_frames - 1

    @property
    def num_frames(self) -> int:
        return self.frames.num_rows

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.frames.num_rows - 1


def encode_record(frames: Frames, drive_id: str, vehicle_id: str, first_seq: int, final: bool,
                  schema_version: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(value, headers) of the Kafka record of validated frames; the key is the drive id."""
    batch = frames_to_arrow(frames, drive_id, vehicle_id, first_seq)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_batch(batch)
    headers = [(FORMAT_HEADER, ARROW_FORMAT), (SCHEMA_VERSION_HEADER, str(schema_version).encode()),
               (VEHICLE_HEADER, vehicle_id.encode()), (FIRST_SEQ_HEADER, str(first_seq).encode()),
               (FRAMES_HEADER, str(batch.num_rows).encode()), (FINAL_HEADER, b"1" if final else b"0")]
    return sink.getvalue().to_pybytes(), headers


def decode_record(key: bytes | None, value: bytes | None, headers, max_frames: int) -> ChunkRecord:
    """The chunk of a frames-topic record, in either format. Raises ChunkRejected with the reason to dead-letter."""
    if key is None:
        raise ChunkRejected(RejectReason.BAD_ID, "record has no key")
    h = {k: v for k, v in headers or ()}
    fmt = h.get(FORMAT_HEADER)
    if fmt is None:
        return _decode_legacy(key, value or b"", max_frames)
    if fmt != ARROW_FORMAT:
        raise ChunkRejected(RejectReason.MALFORMED, f"unknown record format {fmt[:64]!r}")
    try:
        version = int(h[SCHEMA_VERSION_HEADER])
        vehicle = h[VEHICLE_HEADER].decode()
        first = int(h[FIRST_SEQ_HEADER])
        count = int(h[FRAMES_HEADER])
        final = h[FINAL_HEADER] == b"1"
        drive = key.decode()
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ChunkRejected(RejectReason.MALFORMED, f"record headers incomplete or unreadable: {exc!r}") from None
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ChunkRejected(RejectReason.SCHEMA_VERSION, f"schema_version {version} is not supported; "
                            f"supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}")
    if not 0 < count <= max_frames or first < 0:
        raise ChunkRejected(RejectReason.COLUMN_LENGTH, f"headers say {count} frames from seq {first}")
    batch = _read_batch(value or b"")
    _check_batch(batch, version, drive, vehicle, first, count)
    if version != SCHEMA_VERSION:  # an older server's record: the fields added since are filled ("" = no model)
        batch = upgrade_frame_rows(batch, FRAME_SCHEMA)
    return ChunkRecord(drive, vehicle, first, final, version, batch)


def _decode_legacy(key: bytes, value: bytes, max_frames: int) -> ChunkRecord:
    """A serialised DriveChunk (the record format before Arrow): decoded and validated in full."""
    chunk = parse_chunk(value)
    frames = decode_chunk(chunk, max_frames=max_frames)
    if key != chunk.drive_id.encode():
        raise ChunkRejected(RejectReason.BAD_ID, f"record key {key[:128]!r} is not the chunk's drive_id "
                            f"{chunk.drive_id!r}")
    batch = frames_to_arrow(frames, chunk.drive_id, chunk.vehicle_id, chunk.first_seq)
    return ChunkRecord(chunk.drive_id, chunk.vehicle_id, chunk.first_seq, chunk.final, chunk.schema_version, batch)


def _read_batch(value: bytes) -> pa.RecordBatch:
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(value), options=_READ_OPTIONS)
        batch = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            pass
        else:
            raise ChunkRejected(RejectReason.MALFORMED, "the record holds more than one record batch")
        # offsets and lengths inside the buffers: a record cut short or tampered with must not be read past its end
        batch.validate(full=True)
    except (pa.ArrowException, StopIteration, OSError) as exc:
        raise ChunkRejected(RejectReason.MALFORMED, f"not an Arrow IPC record batch: {exc}") from None
    return batch


def _check_batch(batch: pa.RecordBatch, version: int, drive: str, vehicle: str, first: int, count: int) -> None:
    stored = (batch.schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if stored != str(version).encode():
        raise ChunkRejected(RejectReason.SCHEMA_VERSION, f"the batch's schema says version {stored!r}, the headers "
                            f"{version}")
    if not batch.schema.remove_metadata().equals(_FRAME_FIELDS[version]):
        raise ChunkRejected(RejectReason.SCHEMA_VERSION, f"the batch's fields are not those of frame schema version "
                            f"{version}")
    if batch.num_rows != count:
        raise ChunkRejected(RejectReason.COLUMN_LENGTH, f"the batch has {batch.num_rows} rows, the headers say {count}")
    seq = batch.column("seq").to_numpy()
    if seq[0] != first or (seq.shape[0] > 1 and not (np.diff(seq) == 1).all()):
        raise ChunkRejected(RejectReason.SEQUENCE_GAP, f"seq runs {int(seq[0])}..{int(seq[-1])}, not from the "
                            f"headers' {first} in steps of 1")
    for name, want in (("drive_id", drive), ("vehicle_id", vehicle)):
        if not pc.all(pc.equal(batch.column(name), want)).as_py():
            raise ChunkRejected(RejectReason.BAD_ID, f"the {name} column is not {want!r} throughout (key/headers)")
