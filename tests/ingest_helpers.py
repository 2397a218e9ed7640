"""Test helpers for the ingest path: an in-process server, raw streams, and reading what reached Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass

import grpc
from kafka import KafkaConsumer, TopicPartition

from ingest.bus import ChunkRecord, decode_record
from ingest.config import KafkaConfig, ServerConfig
from ingest.server import IngestService
from ingest.sink import MAX_FRAMES_PER_CHUNK
from ingest.wire import drive_pb2 as pb

STREAM = "/flywheel.v1.DriveIngest/StreamDrive"


@contextlib.asynccontextmanager
async def running_server(kafka: KafkaConfig, **cfg):
    service = IngestService(kafka, ServerConfig(**{"listen": "127.0.0.1:0", "metrics_port": 0, **cfg}))
    port = await service.start()
    try:
        yield service, port
    finally:
        await service.stop(0.5)


@dataclass
class StreamOutcome:
    acks: list[pb.ChunkAck]
    code: grpc.StatusCode
    details: str
    trailers: dict


async def send_raw(port: int, payloads: list[bytes], metadata=(), credentials=None, target=None) -> StreamOutcome:
    """Stream raw request bytes, collect acks until the call ends; never raises for a status."""
    target = target or f"127.0.0.1:{port}"
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    async with channel:
        call = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                     response_deserializer=pb.ChunkAck.FromString)(metadata=metadata, timeout=30)
        acks = []
        try:
            for p in payloads:
                await call.write(p)
            await call.done_writing()
            async for ack in call:
                acks.append(ack)
        except grpc.aio.AioRpcError:
            pass
        return StreamOutcome(acks, await call.code(), await call.details(),
                             dict(await call.trailing_metadata() or ()))


def kafka_records(kafka: KafkaConfig, topic: str | None = None, quiet_polls: int = 3) -> list:
    """Every record currently in a topic (all partitions), read without a consumer group.

    Reads until `quiet_polls` polls in a row bring nothing: Tansu's end_offsets() reports the start of the last
    batch + 1, not the log end, so it cannot tell when everything was read.
    """
    topic = topic or kafka.frames_topic
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        quiet = 0
        while quiet < quiet_polls:
            got = [r for recs in consumer.poll(timeout_ms=300).values() for r in recs]
            out.extend(got)
            quiet = 0 if got else quiet + 1
        return out
    finally:
        consumer.close()


def chunk_records(kafka: KafkaConfig) -> list[ChunkRecord]:
    """The chunks in the frames topic, decoded as the sink reads them (every record must pass its checks)."""
    return [decode_record(r.key, r.value, r.headers, max_frames=MAX_FRAMES_PER_CHUNK) for r in kafka_records(kafka)]


def run(coro):
    return asyncio.run(coro)


def start_server_process(kafka: KafkaConfig, *options: str, env: dict | None = None) -> tuple:
    """`flywheel [options] server` on a free loopback port, metrics off: (process, port), once it listens; its
    stderr is the caller's to read or drain."""
    env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "FLYWHEEL_SERVER__METRICS_PORT": "0", "FLYWHEEL_SERVER__LISTEN": "127.0.0.1:0", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", *options, "server"], env=env, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:
        if line.startswith("listening on port"):
            return proc, int(line.split()[-1])
    raise RuntimeError(f"server did not start (exit {proc.wait()})")
