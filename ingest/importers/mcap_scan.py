"""The messages of chosen channels of an MCAP file, back to back in one buffer, for columnar decoders.

`mcap.reader` hands out one Python object per message (about 5 µs each, plus a heap for ordering), and its
`StreamReader` parses every message-index entry in Python (60 ms on the importer benchmark's ROS 2 file, a fifth of
the whole import's budget). Here the file is mapped, its records walked with one struct read per record, with the
checks `StreamReader(validate_crcs=True)` makes: the magic at both ends, every record inside the file, the
data-section CRC (`DataEnd`, when not 0) and each chunk's CRC of its uncompressed records (when not 0); a chunk
must decompress to exactly its declared size. Schema and channel records are read by `mcap.records`. Chunks are
decompressed straight into one buffer (one reused zstd context), and the messages come out in file order (chunk by
chunk, as `iter_messages(log_time_order=False)` gives them) in batches of about `batch_bytes`:
`Batch.buf[starts[i]:ends[i]]` is message i's data. A damaged or truncated file raises `mcap`'s McapError, a wrong
CRC its CRCValidationError (a ValueError).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from mcap.data_stream import ReadDataStream
from mcap.exceptions import McapError
from mcap.records import Channel, Schema
from mcap.stream_reader import CRCValidationError

_OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE = 0x03, 0x04, 0x05
_RECORD = struct.Struct("<BQ")
_MESSAGE = struct.Struct("<HIQQ")


@dataclass
class Batch:
    """Selected messages, file order. buf: uint8 (B,); starts, ends, log_time, index, channel_id: (N,) int64 each
    (index: the message's position among all selected messages of the file)."""

    buf: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    log_time: np.ndarray
    index: np.ndarray
    channel_id: np.ndarray


_MAGIC = b"\x89MCAP0\r\n"
_OP_CHUNK, _OP_FOOTER, _OP_DATA_END = 0x06, 0x02, 0x0F
_CHUNK = struct.Struct("<QQQI")
_MAX_CHUNK = 4 << 30


def _chunk(view: memoryview, body: int, end: int) -> tuple[int, int, str, memoryview]:
    """(uncompressed size, uncompressed CRC, compression, compressed records) of a Chunk record's body."""
    try:
        _, _, size, crc = _CHUNK.unpack_from(view, body)
        at = body + _CHUNK.size
        (n,) = struct.unpack_from("<I", view, at)
        compression = bytes(view[at + 4:at + 4 + n]).decode()
        at += 4 + n
        (n,) = struct.unpack_from("<Q", view, at)
    except (struct.error, UnicodeDecodeError) as exc:
        raise McapError(f"unreadable chunk record ({exc})") from None
    if at + 8 + n > end:
        raise McapError("a chunk's records run past the chunk record")
    if size > _MAX_CHUNK:  # mcap's own reader refuses records past 4 GiB
        raise McapError(f"a chunk of {size} bytes uncompressed, more than {_MAX_CHUNK}")
    return size, crc, compression, view[at + 8:at + 8 + n]


class _Filler:
    """Decompresses chunks (and copies loose messages) into one buffer, then walks the chunks' records."""

    def __init__(self) -> None:
        self._zstd = None

    def fill(self, mv: memoryview, at: int, item: tuple) -> None:
        kind, size, crc, compression, data = item
        dest = mv[at:at + size]
        if kind == "raw" or compression == "":
            if len(data) != size:
                raise McapError(f"chunk holds {len(data)} bytes, its header says {size}")
            dest[:] = data
        elif compression == "zstd":
            if self._zstd is None:
                import zstandard

                self._zstd = zstandard.ZstdDecompressor()
            try:
                reader = self._zstd.stream_reader(data)
                got = 0
                while got < size:
                    n = reader.readinto(dest[got:])
                    if not n:
                        break
                    got += n
            except Exception as exc:  # zstandard.ZstdError: a damaged frame
                raise McapError(f"zstd: {exc}") from None
            if got != size or reader.read(1):
                raise McapError(f"chunk decompresses to other than its {size} bytes")
        elif compression == "lz4":
            import lz4.frame

            try:
                out = lz4.frame.decompress(bytes(data))
            except RuntimeError as exc:  # a damaged frame
                raise McapError(f"lz4: {exc}") from None
            if len(out) != size:
                raise McapError(f"chunk decompresses to {len(out)} bytes, its header says {size}")
            dest[:] = out
        else:
            raise McapError(f"unsupported chunk compression {compression!r}")
        if kind == "chunk" and crc != 0 and zlib.crc32(dest) != crc:
            raise CRCValidationError(expected=crc, actual=zlib.crc32(dest), record=None)


def scan(fh, select: Callable[[Channel, Schema | None], bool], schemas: dict[int, Schema],
         channels: dict[int, Channel], progress: Callable[[int], None] | None = None,
         batch_bytes: int = 256 << 20, seen: list[int] | None = None, count_all: bool = False) -> Iterator[Batch]:
    """Batches of the messages on channels `select(channel, schema)` accepts; `schemas` and `channels` are filled
    as the file declares them (before the first message that uses them). `Batch.index` and `seen[0]` (messages
    read so far, for an error's location) count the selected messages, or every message with `count_all`."""
    if os.fstat(fh.fileno()).st_size < 8:
        raise McapError("not an MCAP file (shorter than its magic)")
    # closed when the last view of it goes (an error's traceback may still hold views of chunks)
    view = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    yield from _scan(view, select, schemas, channels, progress, batch_bytes, seen if seen is not None else [0],
                     count_all)


def _scan(view, select, schemas, channels, progress, batch_bytes, seen, count_all) -> Iterator[Batch]:
    size = len(view)
    if bytes(view[:8]) != _MAGIC:
        raise McapError("not an MCAP file (no magic at its start)")
    chosen: dict[int, bool] = {}
    pending: list[tuple] = []  # ("chunk"|"raw", size, crc, compression, data, channel id, log time)
    pending_bytes = 0
    filler = _Filler()

    def want(channel_id: int) -> bool:
        if channel_id not in chosen:
            ch = channels.get(channel_id)
            if ch is None:
                raise McapError(f"message on channel {channel_id}, which the file never declared")
            chosen[channel_id] = bool(select(ch, schemas.get(ch.schema_id)))
        return chosen[channel_id]

    def flush() -> Batch:
        total = sum(p[1] for p in pending)
        buf = np.empty(total, np.uint8)
        mv = memoryview(buf)
        meta: list[tuple[int, int, int, int, int]] = []  # (start, end, log time, index, channel id)
        at = 0
        for item in pending:
            filler.fill(mv, at, item[:5])
            if item[0] == "raw":
                if want(item[5]):
                    meta.append((at, at + item[1], item[6], seen[0], item[5]))
                    seen[0] += 1
                elif count_all:
                    seen[0] += 1
            else:
                _walk(mv, at, at + item[1], meta)
            at += item[1]
        pending.clear()
        m = np.asarray(meta, np.int64).reshape(-1, 5)
        return Batch(buf, m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4])

    def _walk(mv: memoryview, at: int, end: int, meta: list) -> None:
        while at < end:
            if at + 9 > end:
                raise McapError("chunk ends inside a record header")
            op, length = _RECORD.unpack_from(mv, at)
            body, at = at + 9, at + 9 + length
            if at > end:
                raise McapError(f"record of {length} bytes runs past its chunk")
            if op == _OP_MESSAGE:
                if length < _MESSAGE.size:
                    raise McapError(f"message record of {length} bytes")
                channel_id, _, log_time, _ = _MESSAGE.unpack_from(mv, body)
                if want(channel_id):
                    meta.append((body + _MESSAGE.size, at, log_time, seen[0], channel_id))
                    seen[0] += 1
                elif count_all:
                    seen[0] += 1
            elif op in (_OP_SCHEMA, _OP_CHANNEL):
                _declare(op, bytes(mv[body:at]), schemas, channels)

    at = 8
    while True:
        if at + 9 > size:
            raise McapError(f"the file ends at byte {size}, inside a record header (truncated)")
        op, length = _RECORD.unpack_from(view, at)
        body, end = at + 9, at + 9 + length
        if end > size:
            raise McapError(f"a record of {length} bytes at byte {at} runs past the end of the file (truncated)")
        if op == _OP_CHUNK:
            pending.append(("chunk", *_chunk(view, body, end), 0, 0))
            pending_bytes += pending[-1][1]
        elif op == _OP_MESSAGE:
            if length < _MESSAGE.size:
                raise McapError(f"message record of {length} bytes")
            channel_id, _, log_time, _ = _MESSAGE.unpack_from(view, body)
            pending.append(("raw", length - _MESSAGE.size, 0, "", view[body + _MESSAGE.size:end], channel_id,
                            log_time))
            pending_bytes += length
        elif op in (_OP_SCHEMA, _OP_CHANNEL):
            if pending:  # a declaration after pending chunks: those chunks first, in file order
                yield flush()
                pending_bytes = 0
            _declare(op, bytes(view[body:end]), schemas, channels)
        elif op == _OP_DATA_END:
            (crc,) = struct.unpack_from("<I", view, body) if length >= 4 else (0,)
            if crc != 0 and zlib.crc32(view[:at]) != crc:
                raise CRCValidationError(expected=crc, actual=zlib.crc32(view[:at]), record=None)
        elif op == _OP_FOOTER:
            if bytes(view[end:end + 8]) != _MAGIC:
                raise McapError("no magic after the footer (truncated)")
            break
        at = end
        if pending_bytes >= batch_bytes:
            yield flush()
            pending_bytes = 0
            if progress is not None:
                progress(at)
    if pending:
        yield flush()
    if progress is not None:
        progress(size)


def _declare(op: int, body: bytes, schemas: dict, channels: dict) -> None:
    stream = ReadDataStream(BytesIO(body))
    try:
        if op == _OP_SCHEMA:
            s = Schema.read(stream)
            schemas[s.id] = s
        else:
            c = Channel.read(stream)
            channels[c.id] = c
    except (struct.error, UnicodeDecodeError, EOFError) as exc:
        raise McapError(f"unreadable {'schema' if op == _OP_SCHEMA else 'channel'} record ({exc})") from None
