"""The gRPC ingest server (grpc.aio): vehicles stream DriveChunks, the server decodes and validates them, produces one
Kafka record per chunk (the validated frames as Arrow, `ingest.bus`; idempotent producer, acks=all, key = drive id)
and acknowledges each chunk with the highest sequence number Kafka has durably accepted.

Per stream a reader task validates chunks and hands them to the producer in order, while the handler awaits the
produce results in the same order and yields acks. A rejected chunk ends the stream with a precise status only after
the acks of every chunk accepted before it, so a vehicle always knows exactly what is safe.

Bounded memory: a global budget of chunk bytes accepted but not yet durable; a stream that cannot get room within
`inflight_wait_s` (Kafka slow or down) ends with UNAVAILABLE and a retry hint, and while it waits it stops reading,
so HTTP/2 flow control pushes back on the vehicle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from ingest.auth import TokenStore, bearer
from ingest.bridge import ByteBudget, DriveState, KafkaBridge, Unavailable, load_progress
from ingest.bus import encode_record
from ingest.config import KafkaConfig, ServerConfig
from ingest.contract import ChunkRejected, RejectReason, check_id, decode_chunk, parse_chunk
from ingest.limits import RejectionLog, StreamSlots, serve_metrics
from ingest.wire import drive_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["DriveIngest"].full_name

FRAMES_ACCEPTED = Counter("flywheel_ingest_frames_accepted_total", "frames durably accepted by Kafka")
CHUNKS_ACCEPTED = Counter("flywheel_ingest_chunks_accepted_total", "chunks durably accepted by Kafka")
BYTES_ACCEPTED = Counter("flywheel_ingest_bytes_accepted_total", "chunk bytes durably accepted by Kafka")
REJECTED = Counter("flywheel_ingest_chunks_rejected_total", "chunks or streams refused", ["reason"])
PRODUCE_LATENCY = Histogram("flywheel_ingest_produce_latency_seconds", "chunk handed to the producer -> durable",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STREAMS = Gauge("flywheel_ingest_active_streams", "open StreamDrive calls")

STATUS_OF = {
    RejectReason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.CHECKSUM: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.COLUMN_LENGTH: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.NON_FINITE: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.OUT_OF_RANGE: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.BAD_ENUM: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.TIMESTAMPS: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.TOO_MANY_AGENTS: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.BAD_ID: grpc.StatusCode.INVALID_ARGUMENT,
    RejectReason.SCHEMA_VERSION: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.SEQUENCE_GAP: grpc.StatusCode.FAILED_PRECONDITION,
    RejectReason.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.VEHICLE_MISMATCH: grpc.StatusCode.PERMISSION_DENIED,
    RejectReason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RejectReason.DRIVE_BUSY: grpc.StatusCode.ABORTED,
    RejectReason.TOO_MANY_STREAMS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectReason.IDLE_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# refusals that pass with time: their trailers carry the retry hint, as UNAVAILABLE's do
RETRY_LATER = {RejectReason.TOO_MANY_STREAMS, RejectReason.IDLE_TIMEOUT}


class SequenceGap(ChunkRejected):
    """A chunk that does not start at the drive's next seq. Raised when the chunk is read, reported after the acks
    of the chunks before it: its message names the committed seq at that moment, the one GetDriveStatus returns."""

    def __init__(self, drive_id: str, first_seq: int, expected: int) -> None:
        super().__init__(RejectReason.SEQUENCE_GAP, f"drive {drive_id}: chunk starts at seq {first_seq}, expected "
                         f"{expected}")
        self.drive_id, self.first_seq, self.expected = drive_id, first_seq, expected

    def with_committed(self, committed: int) -> str:
        return f"{self.detail} (committed {committed}); resume from status"


@dataclass
class _Stream:
    """Who a stream is, as far as it is known: for the stream slots and the rejection log."""

    vehicle_id: str | None = None  # authenticated, else the first chunk's
    counted: str | None = None  # the vehicle whose slot this stream holds
    drive_id: str | None = None  # of the last chunk read


@dataclass
class _Pending:
    chunk: pb.DriveChunk
    last_seq: int
    frames: int
    size: int
    produced: asyncio.Future | None  # None: an already-committed resend, acknowledged without producing
    started: float = field(default_factory=time.perf_counter)


class IngestService:
    """The DriveIngest service; `start()` builds the grpc.aio server around it."""

    def __init__(self, kafka: KafkaConfig, cfg: ServerConfig) -> None:
        self.kafka = kafka
        self.cfg = cfg
        self.tokens = TokenStore.load(cfg.token_file) if cfg.token_file else None
        self.drives: dict[str, DriveState] = {}
        self._progress: dict[str, DriveState] = {}  # drives acknowledged since the last progress records
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.bridge: KafkaBridge | None = None
        self.budget: ByteBudget | None = None
        self.port: int | None = None
        self.kafka_healthy = True
        self.slots = StreamSlots(cfg.max_streams, cfg.max_streams_per_vehicle)
        self.rejections = RejectionLog(log, cfg.rejection_logs_per_s, burst=20)
        if self.tokens is None and cfg.tls_client_ca is None:
            log.warning("ingest server runs WITHOUT vehicle authentication (no token_file, no mTLS)")

    # ------------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.drives = await loop.run_in_executor(None, load_progress, self.kafka)
        self.bridge = KafkaBridge(self.kafka, self.cfg, loop)
        await loop.run_in_executor(None, self.bridge.warm, [self.kafka.frames_topic, self.kafka.progress_topic])
        self.budget = ByteBudget(self.cfg.max_inflight_bytes)
        options = [("grpc.max_receive_message_length", self.cfg.max_chunk_bytes * 2),
                   ("grpc.max_send_message_length", 1 << 20),
                   # a chunk is ~350 KB: with HTTP/2's defaults (16 KB frames, 64 KB stream window) each one arrives
                   # in 22 frames and costs a dozen WINDOW_UPDATE writes, a syscall each, on the event loop
                   ("grpc.http2.max_frame_size", 1 << 20),
                   ("grpc.http2.lookahead_bytes", 4 << 20),
                   # keepalive enforced: dead peers are found, idle connections closed, ping floods disconnected
                   ("grpc.keepalive_time_ms", int(self.cfg.keepalive_time_s * 1000)),
                   ("grpc.keepalive_timeout_ms", int(self.cfg.keepalive_timeout_s * 1000)),
                   ("grpc.keepalive_permit_without_calls", 0),
                   ("grpc.http2.min_ping_interval_without_data_ms", int(self.cfg.min_client_ping_interval_s * 1000)),
                   ("grpc.http2.max_ping_strikes", 2),
                   ("grpc.max_connection_idle_ms", int(self.cfg.max_connection_idle_s * 1000))]
        self.server = grpc.aio.server(options=options)
        handlers = {
            "StreamDrive": grpc.stream_stream_rpc_method_handler(
                self.stream_drive, request_deserializer=None, response_serializer=pb.ChunkAck.SerializeToString),
            "GetDriveStatus": grpc.unary_unary_rpc_method_handler(
                self.get_drive_status, request_deserializer=pb.DriveStatusRequest.FromString,
                response_serializer=pb.DriveStatus.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        self.port = self._bind(self.server)
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ingest server listening on %s (port %d)", self.cfg.listen, self.port)
        return self.port

    def _bind(self, server: grpc.aio.Server) -> int:
        if self.cfg.tls_cert is None:
            return server.add_insecure_port(self.cfg.listen)
        creds = grpc.ssl_server_credentials(
            [(self.cfg.tls_key.read_bytes(), self.cfg.tls_cert.read_bytes())],
            root_certificates=self.cfg.tls_client_ca.read_bytes() if self.cfg.tls_client_ca else None,
            require_client_auth=self.cfg.tls_client_ca is not None)
        return server.add_secure_port(self.cfg.listen, creds)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let open streams finish within the grace, flush Kafka."""
        if self.server is None:
            return
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.cfg.drain_grace_s if grace is None else grace)
        if self._progress:
            self._send_progress()
        if self.bridge is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.bridge.close)
        self.server = None

    # ------------------------------------------------------------------------------------------------------ auth

    async def _identity(self, context: grpc.aio.ServicerContext) -> str | None:
        """The authenticated vehicle id (None when authentication is disabled); aborts UNAUTHENTICATED otherwise."""
        identities: list[str] = []
        if self.tokens is not None:
            token = bearer(context.invocation_metadata())
            vehicle = self.tokens.vehicle_for(token) if token else None
            if vehicle is None:
                await self._refuse(context, RejectReason.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                                   "missing bearer token" if not token else "unknown or revoked bearer token")
            identities.append(vehicle)
        if self.cfg.tls_client_ca is not None:
            names = context.auth_context().get("x509_common_name") or []
            if not names:
                await self._refuse(context, RejectReason.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                                   "client certificate has no common name")
            identities.append(names[0].decode())
        if len(set(identities)) > 1:
            await self._refuse(context, RejectReason.VEHICLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED,
                               f"token and certificate name different vehicles: {sorted(set(identities))}")
        return identities[0] if identities else None

    async def _refuse(self, context, reason: RejectReason | str, code: grpc.StatusCode, detail: str,
                      stream: _Stream | None = None, trailers: tuple = ()) -> None:
        """End the call with `code` and `detail`: counted, logged once (rate-limited), reason in the trailers."""
        label = reason.value if isinstance(reason, RejectReason) else reason
        REJECTED.labels(label).inc()
        stream = stream or _Stream()
        self.rejections.rejected(label, code.name, stream.vehicle_id, stream.drive_id, detail)
        context.set_trailing_metadata((("flywheel-reason", label), *trailers))
        await context.abort(code, detail)

    # ---------------------------------------------------------------------------------------------------- status

    async def get_drive_status(self, request: pb.DriveStatusRequest, context) -> pb.DriveStatus:
        identity = await self._identity(context)
        try:
            check_id("drive_id", request.drive_id)
        except ChunkRejected as exc:
            await self._refuse(context, exc.reason, grpc.StatusCode.INVALID_ARGUMENT, str(exc), _Stream(identity))
        state = self.drives.get(request.drive_id)
        owner = state.vehicle_id if state else request.vehicle_id
        if identity is not None and owner and owner != identity:
            await self._refuse(context, RejectReason.VEHICLE_MISMATCH, grpc.StatusCode.PERMISSION_DENIED,
                               f"drive {request.drive_id} belongs to another vehicle",
                               _Stream(identity, drive_id=request.drive_id))
        if state is None:
            return pb.DriveStatus(drive_id=request.drive_id, committed_seq=-1)
        return pb.DriveStatus(drive_id=request.drive_id, committed_seq=state.committed_seq,
                              drive_complete=state.complete)

    # ---------------------------------------------------------------------------------------------------- stream

    async def stream_drive(self, requests, context):
        identity = await self._identity(context)
        stream = _Stream(identity)
        try:
            self.slots.take()
        except ChunkRejected as exc:
            await self._abort(context, exc, stream)
        try:
            if identity is not None:
                self.slots.take_vehicle(identity)
                stream.counted = identity
        except ChunkRejected as exc:
            self.slots.give(None)
            await self._abort(context, exc, stream)
        STREAMS.inc()
        queue: asyncio.Queue = asyncio.Queue()
        claimed: list[str] = []
        reader = asyncio.create_task(self._read(requests, stream, queue, claimed))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Pending):
                    yield await self._settle(item, context)  # releases the item's budget, also when cancelled
                elif item is None:
                    return
                else:
                    await self._abort(context, item, stream)
        finally:
            STREAMS.dec()
            self.slots.give(stream.counted)
            reader.cancel()
            while not queue.empty():  # a stream torn down early still returns its budget
                item = queue.get_nowait()
                if isinstance(item, _Pending):
                    await self.budget.release(item.size)
            for drive_id in claimed:
                self.drives[drive_id].streaming = False

    async def _settle(self, item: _Pending, context) -> pb.ChunkAck:
        try:
            if item.produced is not None:
                try:
                    # the future is settled by the producer (its delivery timeout is just past this one); cancelling
                    # it on timeout is harmless: the outcome callback checks before it sets a result
                    async with asyncio.timeout(self.cfg.produce_timeout_s):
                        await item.produced
                except Exception as exc:  # timeout or a Kafka error: the vehicle must resume from status
                    self.kafka_healthy = False
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                    await self._abort(context, Unavailable(f"Kafka did not accept chunk at seq {item.chunk.first_seq} "
                                                           f"of drive {item.chunk.drive_id}: {exc!r}"),
                                      _Stream(item.chunk.vehicle_id, drive_id=item.chunk.drive_id))
            state = self.drives[item.chunk.drive_id]
            return pb.ChunkAck(drive_id=item.chunk.drive_id, committed_seq=state.committed_seq,
                               drive_complete=state.complete)
        finally:
            await self.budget.release(item.size)

    async def _abort(self, context, error: Exception, stream: _Stream) -> None:
        hint = (("retry-after-ms", str(self.cfg.retry_after_ms)), ("grpc-retry-pushback-ms", str(self.cfg.retry_after_ms)))
        if isinstance(error, ChunkRejected):
            detail = str(error)
            if isinstance(error, SequenceGap):  # every chunk before it is settled now: name the real committed seq
                state = self.drives.get(error.drive_id)
                detail = f"{error.reason.value}: {error.with_committed(state.committed_seq if state else -1)}"
            later = error.reason in RETRY_LATER
            await self._refuse(context, error.reason, STATUS_OF[error.reason],
                               f"{detail}; retry after {self.cfg.retry_after_ms} ms" if later else detail, stream,
                               hint if later else ())
        if isinstance(error, Unavailable):
            await self._refuse(context, "unavailable", grpc.StatusCode.UNAVAILABLE,
                               f"{error}; retry after {self.cfg.retry_after_ms} ms", stream, hint)
        log.error("unexpected error in StreamDrive", exc_info=error,
                  extra={"vehicle_id": stream.vehicle_id, "drive_id": stream.drive_id, "reason": "internal"})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")

    async def _next(self, requests) -> bytes | None:
        """The stream's next message, None at its end; an idle stream ends with `idle_timeout`."""
        try:
            async with asyncio.timeout(self.cfg.stream_idle_timeout_s):
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise ChunkRejected(RejectReason.IDLE_TIMEOUT, f"no chunk for {self.cfg.stream_idle_timeout_s:g} s; "
                                "streams are ended after stream_idle_timeout_s") from None

    async def _read(self, requests, stream: _Stream, queue: asyncio.Queue, claimed: list[str]) -> None:
        """Validate chunks in arrival order and hand them to Kafka; the handler turns results into acks."""
        next_seq: dict[str, int] = {}
        identity = stream.vehicle_id
        requests = aiter(requests)
        try:
            while (data := await self._next(requests)) is not None:
                if len(data) > self.cfg.max_chunk_bytes:
                    raise ChunkRejected(RejectReason.TOO_LARGE,
                                        f"chunk of {len(data)} bytes; limit {self.cfg.max_chunk_bytes}")
                chunk = parse_chunk(data)
                stream.drive_id = chunk.drive_id[:128]
                if stream.counted is None:  # no authentication: the slot of the vehicle the chunk names
                    stream.vehicle_id = chunk.vehicle_id[:128]
                    self.slots.take_vehicle(chunk.vehicle_id)
                    stream.counted = chunk.vehicle_id
                if identity is not None and chunk.vehicle_id != identity:
                    raise ChunkRejected(RejectReason.VEHICLE_MISMATCH,
                                        f"authenticated as {identity!r}, chunk claims vehicle {chunk.vehicle_id!r}")
                frames = decode_chunk(chunk, self.cfg.max_frames_per_chunk)
                drive_id = chunk.drive_id
                if drive_id not in next_seq:
                    state = self._claim(chunk, claimed)
                    next_seq[drive_id] = state.committed_seq + 1
                state = self.drives[drive_id]
                last_seq = chunk.first_seq + frames.num_frames - 1
                if last_seq < next_seq[drive_id] and last_seq <= state.committed_seq:
                    # a resend of frames Kafka already holds: acknowledge, do not store twice
                    await queue.put(_Pending(chunk, last_seq, frames.num_frames, 0, None))
                    continue
                if chunk.first_seq != next_seq[drive_id]:
                    raise SequenceGap(drive_id, chunk.first_seq, next_seq[drive_id])
                await self.budget.acquire(len(data), self.cfg.inflight_wait_s)
                next_seq[drive_id] = last_seq + 1
                item = _Pending(chunk, last_seq, frames.num_frames, len(data), None)
                value, headers = encode_record(frames, drive_id, chunk.vehicle_id, chunk.first_seq, chunk.final,
                                               chunk.schema_version)
                item.produced = self.bridge.send(self.kafka.frames_topic, drive_id.encode(), value,
                                                 lambda result, it=item: self._on_produced(it, result), headers)
                await queue.put(item)
            await queue.put(None)
        except (ChunkRejected, Unavailable) as exc:
            await queue.put(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken client stream: end this call only, never the server
            await queue.put(exc)

    def _claim(self, chunk: pb.DriveChunk, claimed: list[str]) -> DriveState:
        state = self.drives.get(chunk.drive_id)
        if state is None:
            state = self.drives[chunk.drive_id] = DriveState(chunk.vehicle_id)
        if state.vehicle_id != chunk.vehicle_id:
            raise ChunkRejected(RejectReason.VEHICLE_MISMATCH,
                                f"drive {chunk.drive_id} belongs to vehicle {state.vehicle_id!r}")
        if state.streaming:
            raise ChunkRejected(RejectReason.DRIVE_BUSY, f"drive {chunk.drive_id} is being uploaded on another stream")
        state.streaming = True
        claimed.append(chunk.drive_id)
        return state

    def _on_produced(self, item: _Pending, result) -> None:
        """Runs on the event loop, in produce order: advance the drive's committed seq on success."""
        if isinstance(result, BaseException):
            log.warning("produce failed for drive %s seq %d: %r", item.chunk.drive_id, item.chunk.first_seq, result)
            return
        PRODUCE_LATENCY.observe(time.perf_counter() - item.started)
        state = self.drives[item.chunk.drive_id]
        # only a contiguous extension is committed: after a failed chunk, later ones do not count
        if item.chunk.first_seq == state.committed_seq + 1:
            state.committed_seq = item.last_seq
            state.complete = state.complete or item.chunk.final
            FRAMES_ACCEPTED.inc(item.frames)
            CHUNKS_ACCEPTED.inc()
            BYTES_ACCEPTED.inc(item.size)
            if not self._progress:
                asyncio.get_running_loop().call_soon(self._send_progress)
            self._progress[item.chunk.drive_id] = state
        if not self.kafka_healthy:
            self.kafka_healthy = True
            asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.SERVING))

    def _send_progress(self) -> None:
        """Produce the progress of every drive acknowledged since the last call: the outcomes of one produce
        response arrive together, so a drive with several chunks in it gets one progress record, not one per chunk.
        Progress was never awaited before acking (it only serves `GetDriveStatus` after a restart, and a status that
        lags makes a vehicle resend frames the sink drops as duplicates), so this loses nothing."""
        pending, self._progress = self._progress, {}
        for drive_id, state in pending.items():
            doc = json.dumps({"vehicle_id": state.vehicle_id, "committed_seq": state.committed_seq,
                              "complete": state.complete}).encode()
            self.bridge.send_nowait(self.kafka.progress_topic, drive_id.encode(), doc)


async def serve(kafka: KafkaConfig, cfg: ServerConfig, ready=None) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully. `ready(port)` is called once the server listens."""
    if cfg.metrics_port:
        serve_metrics(cfg.metrics_host, cfg.metrics_port)
    service = IngestService(kafka, cfg)
    port = await service.start()
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining ingest server (grace %.1fs)", cfg.drain_grace_s)
    await service.stop()
