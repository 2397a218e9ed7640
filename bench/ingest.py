"""Ingest benchmark: sustained frames/s end to end (gRPC -> Kafka -> Parquet, durable) against a raw kafka-python
produce of the same bytes, in the same run, on the embedded broker.

    python bench/ingest.py [--frames 300000] [--agents 30] [--chunk 100] [--streams 16]

Setup: realistic frames (synthetic kinematics, `--agents` tracked agents each) are encoded into DriveChunks before
timing, so the vehicles' own encoding cost is not counted. The ingest server and the sink run as separate processes,
as deployed. End to end = from the first chunk sent until the lake's live files hold every row (the sink writes,
fsyncs and renames before it commits). Reference = one idempotent acks=all kafka-python producer sending the same
chunk bytes with the same key to a fresh topic, until flushed. Also printed: the CPU time each process used per
frame in both phases (Linux /proc), and the rate at which every core would be busy at the end-to-end cost (the
ceiling no scheduling can beat on this machine). Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pyarrow.parquet as pq
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from ingest.config import KafkaConfig  # noqa: E402
from ingest.contract import encode_chunk  # noqa: E402
from ingest.lake import live_files  # noqa: E402
from ingest.synth import synthetic_frames  # noqa: E402
from ingest.wire import drive_pb2 as pb  # noqa: E402

STREAM = "/flywheel.v1.DriveIngest/StreamDrive"


def make_chunks(frames: int, agents: int, chunk: int, drives: int) -> list[list[tuple[str, bytes]]]:
    """Per drive, its chunks as (drive_id, serialized DriveChunk)."""
    per_drive = frames // drives
    template = synthetic_frames(chunk, agents=agents, seed=1)
    out = []
    for d in range(drives):
        drive_id, vehicle = f"drive-{d:04d}", f"veh-{d:04d}"
        chunks = []
        for first in range(0, per_drive, chunk):
            block = template.slice(0, min(chunk, per_drive - first))
            block.cols["timestamp_ns"] = block.cols["timestamp_ns"] + first * 100_000_000
            chunks.append((drive_id, encode_chunk(drive_id, vehicle, first, block,
                                                  final=first + chunk >= per_drive).SerializeToString()))
        out.append(chunks)
    return out


def raw_produce(bootstrap: str, drives: list[list[tuple[str, bytes]]], partitions: int) -> float:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("bench.raw", partitions, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                             batch_size=1 << 20, max_request_size=8 << 20)
    records = [r for chunks in zip(*drives) for r in chunks]  # interleaved like concurrent vehicles
    producer.send("bench.raw", key=b"warm", value=b"x")
    producer.flush()
    t0 = time.perf_counter()
    for drive_id, data in records:
        producer.send("bench.raw", key=drive_id.encode(), value=data)
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return elapsed


async def stream_all(port: int, drives: list[list[tuple[str, bytes]]], streams: int, window: int) -> None:
    gate = asyncio.Semaphore(streams)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        method = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                       response_deserializer=pb.ChunkAck.FromString)

        async def one(chunks):
            async with gate:
                call = method(timeout=600)
                credit = asyncio.Semaphore(window)

                async def writer():
                    for _, data in chunks:
                        await credit.acquire()
                        await call.write(data)
                    await call.done_writing()

                task = asyncio.create_task(writer())
                async for _ in call:
                    credit.release()
                await task
                if await call.code() != grpc.StatusCode.OK:
                    raise RuntimeError(f"stream failed: {await call.details()}")

        await asyncio.gather(*(one(c) for c in drives))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (Linux /proc), NaN when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def lake_rows(lake: Path) -> int:
    return sum(pq.read_metadata(f.path).num_rows for f in live_files(lake, "frames"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--agents", type=int, default=30)
    ap.add_argument("--chunk", type=int, default=250, help="frames per DriveChunk (the agent default)")
    ap.add_argument("--drives", type=int, default=60)
    ap.add_argument("--streams", type=int, default=16, help="concurrent vehicle streams")
    ap.add_argument("--window", type=int, default=8, help="un-acked chunks per stream")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--sinks", type=int, default=1, help="sink worker processes in one consumer group")
    args = ap.parse_args()

    drives = make_chunks(args.frames, args.agents, args.chunk, args.drives)
    n_frames = sum(args.frames // args.drives for _ in drives)
    n_bytes = sum(len(d) for chunks in drives for _, d in chunks)
    print(f"{n_frames} frames, {args.agents} agents each, {sum(map(len, drives))} chunks, "
          f"{n_bytes / 1e6:.1f} MB, {n_bytes / n_frames:.0f} B/frame")

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, partitions=args.partitions)
        ensure_topics(kafka)
        broker0, own0 = cpu_seconds(broker.proc.pid), sum(os.times()[:2])
        raw_s = raw_produce(broker.bootstrap, drives, args.partitions)
        raw_fps = n_frames / raw_s
        raw_cpu = {"producer": sum(os.times()[:2]) - own0, "broker": cpu_seconds(broker.proc.pid) - broker0}
        print(f"raw kafka-python produce: {raw_s:.2f}s  {raw_fps:,.0f} frames/s  {n_bytes / raw_s / 1e6:.0f} MB/s")

        lake = Path(tmp) / "lake"
        port = free_port()
        env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
               "FLYWHEEL_KAFKA__PARTITIONS": str(args.partitions), "FLYWHEEL_SERVER__METRICS_PORT": "0",
               "FLYWHEEL_SERVER__LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "flywheel", "server"], env=env,
                                  stderr=subprocess.PIPE, text=True)
        sinks = [subprocess.Popen([sys.executable, "-m", "ingest.sink", "--bootstrap", broker.bootstrap,
                                   "--lake", str(lake), "--group", "bench", "--max-age-s", "1.0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(args.sinks)]
        try:
            for line in server.stderr:
                if line.startswith("listening on port"):
                    break
            threading.Thread(target=server.stderr.read, daemon=True).start()
            time.sleep(4 + 4 * (args.sinks - 1))  # the sinks join their group (~3 s on Tansu, each join rebalances)
            procs = {"server": server.pid, "broker": broker.proc.pid, **{f"sink{i}": s.pid for i, s in enumerate(sinks)}}
            cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
            own0 = sum(os.times()[:2])
            t0 = time.perf_counter()
            asyncio.run(stream_all(port, drives, args.streams, args.window))
            acked_s = time.perf_counter() - t0
            while lake_rows(lake) < n_frames:
                if time.perf_counter() - t0 > 600:
                    raise TimeoutError("lake incomplete after 600 s")
                time.sleep(0.05)
            e2e_s = time.perf_counter() - t0
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in procs.items()}
            cpu["vehicles (gRPC client)"] = sum(os.times()[:2]) - own0
        finally:
            for p in (server, *sinks):
                p.terminate()
            for p in (server, *sinks):
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        rows = lake_rows(lake)
        files = len(live_files(lake, "frames"))

    e2e_fps = n_frames / e2e_s
    print(f"gRPC acked (durable in Kafka): {acked_s:.2f}s  {n_frames / acked_s:,.0f} frames/s")
    print(f"end to end, durable in the lake: {e2e_s:.2f}s  {e2e_fps:,.0f} frames/s  ({rows} rows in {files} files)")
    print(f"ratio to raw produce: {e2e_fps / raw_fps:.2f}   targets: >= 25,000 frames/s and >= 0.50 of raw")
    print("CPU during the raw produce (us/frame): "
          + ", ".join(f"{name} {1e6 * sec / n_frames:.1f}" for name, sec in raw_cpu.items())
          + f"; total {1e6 * sum(raw_cpu.values()) / n_frames:.1f}")
    print("CPU during the end-to-end run (us/frame): "
          + ", ".join(f"{name} {1e6 * sec / n_frames:.1f}" for name, sec in cpu.items())
          + f"; total {1e6 * sum(cpu.values()) / n_frames:.1f} on {os.cpu_count()} cores")
    ceiling = (os.cpu_count() or 1) * n_frames / sum(cpu.values())
    print(f"CPU ceiling: every core busy at that cost = {ceiling:,.0f} frames/s = {ceiling / raw_fps:.2f} of raw")
    print(json.dumps({
        "bench": "ingest", "frames": n_frames, "agents_per_frame": args.agents, "bytes": n_bytes,
        "frames_per_chunk": args.chunk, "streams": args.streams, "sinks": args.sinks, "cpu_count": os.cpu_count(),
        "end_to_end_frames_per_s": round(e2e_fps), "grpc_acked_frames_per_s": round(n_frames / acked_s),
        "raw_produce_frames_per_s": round(raw_fps), "ratio_to_raw": round(e2e_fps / raw_fps, 3),
        "lake_rows": rows, "target_frames_per_s": 25000, "target_ratio": 0.5,
        "raw_cpu_us_per_frame": {name: round(1e6 * sec / n_frames, 2) for name, sec in raw_cpu.items()},
        "cpu_ceiling_frames_per_s": round((os.cpu_count() or 1) * n_frames / sum(cpu.values())),
        "cpu_us_per_frame": {name: round(1e6 * sec / n_frames, 2) for name, sec in cpu.items()},
    }))


if __name__ == "__main__":
    main()
