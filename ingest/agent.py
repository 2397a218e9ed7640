"""The vehicle agent: uploads logged drives from a drive directory (format in ingest.lake) to the ingest server.

For each drive not yet marked uploaded: ask the server where the drive stands (GetDriveStatus), stream the remaining
frames in chunks with a window of un-acknowledged chunks, and mark the drive uploaded only after the ack of its last
frame. Any transient failure (server restart, UNAVAILABLE, a dropped connection) is retried with exponential backoff
and full jitter, always resuming from the server's committed sequence number, so nothing is skipped or sent twice.
Many drives of many vehicles upload concurrently, one gRPC channel per vehicle (its own credentials).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ingest.config import AgentConfig
from ingest.contract import encode_chunk
from ingest.lake import Drive, is_uploaded, list_drive_files, mark_uploaded, read_drive
from ingest.wire import drive_pb2 as pb

log = logging.getLogger(__name__)
STREAM_METHOD = "/flywheel.v1.DriveIngest/StreamDrive"
STATUS_METHOD = "/flywheel.v1.DriveIngest/GetDriveStatus"

# Retrying cannot fix these: the drive (or the vehicle's credentials) is wrong, not the network.
PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.UNIMPLEMENTED}
PERMANENT_REASONS = {"schema_version", "too_large"}


@dataclass
class DriveResult:
    drive_id: str
    vehicle_id: str
    frames: int
    ok: bool
    attempts: int
    sent_frames: int = 0
    error: str | None = None


@dataclass
class AgentReport:
    results: list[DriveResult] = field(default_factory=list)
    skipped: int = 0  # already marked uploaded
    seconds: float = 0.0

    @property
    def uploaded(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> list[DriveResult]:
        return [r for r in self.results if not r.ok]

    @property
    def frames(self) -> int:
        return sum(r.frames for r in self.results if r.ok)


class PermanentFailure(Exception):
    pass


class VehicleChannels:
    """One channel per vehicle with its own credentials (bearer token and/or client certificate)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.tokens: dict[str, str] = json.loads(cfg.token_file.read_text()) if cfg.token_file else {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def metadata(self, vehicle_id: str) -> tuple:
        token = self.tokens.get(vehicle_id)
        return (("authorization", f"Bearer {token}"),) if token else ()

    def channel(self, vehicle_id: str) -> grpc.aio.Channel:
        ch = self._channels.get(vehicle_id)
        if ch is None:
            options = [("grpc.max_send_message_length", 64 << 20)]
            if self.cfg.tls_ca is None:
                ch = grpc.aio.insecure_channel(self.cfg.server, options=options)
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=self.cfg.tls_ca.read_bytes(),
                    private_key=self.cfg.tls_key.read_bytes() if self.cfg.tls_key else None,
                    certificate_chain=self.cfg.tls_cert.read_bytes() if self.cfg.tls_cert else None)
                ch = grpc.aio.secure_channel(self.cfg.server, creds, options=options)
            self._channels[vehicle_id] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    for key, value in err.trailing_metadata() or ():
        if key == "flywheel-reason":
            return value
    return None


async def drive_status(channels: VehicleChannels, drive: Drive, timeout: float = 10.0) -> pb.DriveStatus:
    call = channels.channel(drive.vehicle_id).unary_unary(
        STATUS_METHOD, request_serializer=pb.DriveStatusRequest.SerializeToString,
        response_deserializer=pb.DriveStatus.FromString)
    return await call(pb.DriveStatusRequest(drive_id=drive.drive_id, vehicle_id=drive.vehicle_id),
                      metadata=channels.metadata(drive.vehicle_id), timeout=timeout)


async def stream_from(channels: VehicleChannels, drive: Drive, start: int, cfg: AgentConfig) -> tuple[int, int]:
    """Stream frames [start, n) of `drive`; returns (highest acknowledged seq, frames sent). Raises AioRpcError."""
    n = drive.frames.num_frames
    step = cfg.frames_per_chunk
    starts = list(range(start, n, step))
    call = channels.channel(drive.vehicle_id).stream_stream(
        STREAM_METHOD, request_serializer=lambda b: b, response_deserializer=pb.ChunkAck.FromString)(
        metadata=channels.metadata(drive.vehicle_id), timeout=cfg.rpc_timeout_s)
    window = asyncio.Semaphore(cfg.window)
    committed = start - 1
    sent = 0

    async def writer() -> None:
        nonlocal sent
        for first in starts:
            await window.acquire()
            last = min(first + step, n)
            chunk = encode_chunk(drive.drive_id, drive.vehicle_id, first, drive.frames.slice(first, last),
                                 final=last == n)
            await call.write(chunk.SerializeToString())
            sent += last - first
        await call.done_writing()

    write_task = asyncio.create_task(writer())
    try:
        try:
            # to the server's end of the call, which follows our half-close: cancelling the call at the last ack made
            # the server's final status fail to send (grpc logged an ExecuteBatchError traceback on the server)
            async for ack in call:
                committed = max(committed, ack.committed_seq)
                window.release()
        except grpc.aio.AioRpcError:
            if committed < n - 1:
                raise  # every frame acknowledged: how the call then ended changes nothing
        if committed < n - 1:
            await write_task  # surfaces a write error, if any
            status = await call.code()
            if status != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(status, await call.initial_metadata(), await call.trailing_metadata(),
                                           await call.details())
        return committed, sent
    finally:
        write_task.cancel()
        call.cancel()


async def upload_drive(channels: VehicleChannels, path: Path, cfg: AgentConfig, progress=None) -> DriveResult:
    """Upload one drive file to completion, resuming after failures; marks it uploaded after the last ack."""
    drive = await asyncio.to_thread(read_drive, path)
    n = drive.frames.num_frames
    result = DriveResult(drive.drive_id, drive.vehicle_id, n, ok=False, attempts=0)
    delay = cfg.backoff_initial_s
    while result.attempts < cfg.max_attempts:
        result.attempts += 1
        try:
            status = await drive_status(channels, drive)
            committed = status.committed_seq
            if committed < n - 1:
                committed, sent = await stream_from(channels, drive, committed + 1, cfg)
                result.sent_frames += sent
            if committed >= n - 1:
                mark_uploaded(path, {"drive_id": drive.drive_id, "vehicle_id": drive.vehicle_id, "frames": n,
                                     "uploaded_at": time.time()})
                result.ok = True
                if progress:
                    progress(drive, n)
                return result
        except grpc.aio.AioRpcError as err:
            reason = _reason(err)
            result.error = f"{err.code().name}: {err.details()}"
            if err.code() in PERMANENT or reason in PERMANENT_REASONS:
                log.error("drive %s refused for good: %s", drive.drive_id, result.error)
                return result
            log.info("drive %s attempt %d: %s; retrying", drive.drive_id, result.attempts, result.error)
            hint = dict(err.trailing_metadata() or ()).get("retry-after-ms")
            if hint and hint.isdigit():
                delay = max(delay, int(hint) / 1000)
        # full jitter: spreads a fleet reconnecting after an outage
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(delay * 2, cfg.backoff_max_s)
    return result


async def run_agent(cfg: AgentConfig, drives_dir: Path | None = None, progress=None,
                    paths: list[Path] | None = None) -> AgentReport:
    """Upload every drive of the directory not yet marked uploaded, `cfg.concurrency` at a time."""
    started = time.perf_counter()
    report = AgentReport()
    todo = []
    for p in paths if paths is not None else list_drive_files(drives_dir or cfg.drives_dir):
        if is_uploaded(p):
            report.skipped += 1
        else:
            todo.append(p)
    channels = VehicleChannels(cfg)
    gate = asyncio.Semaphore(cfg.concurrency)

    async def one(path: Path) -> DriveResult:
        async with gate:
            return await upload_drive(channels, path, cfg, progress)

    try:
        report.results = list(await asyncio.gather(*(one(p) for p in todo)))
    finally:
        await channels.close()
    report.seconds = time.perf_counter() - started
    return report
