"""Ingest benchmark: sustained frames/s end to end (gRPC -> Kafka -> Parquet, durable), with the floors it compares
with measured in the same run, on the embedded broker.

    python -m bench.ingest [--frames 300000] [--agents 30] [--chunk 250] [--streams 16] [--sinks 1]

Setup: realistic frames (synthetic kinematics, `--agents` tracked agents each) are encoded into DriveChunks before
timing, so the vehicles' own encoding cost is not counted. The ingest server and the sink run as separate processes
(`flywheel server`, `flywheel sink`), as deployed. End to end = from the first chunk sent until the lake's live files
hold every row (the sink writes, fsyncs and renames before it commits).

Floors, same run, same records:
- raw produce: one idempotent acks=all kafka-python producer sending the records the server produces (the chunks'
  frames as Arrow, `ingest.bus`, encoded before timing) with the same keys and headers to a fresh topic, until
  flushed. Its CPU per frame is the floor of the server's (`server_cpu_vs_raw_producer`).
- bare consumer: one kafka-python consumer with the sink's fetch settings that only fetches every record of the
  frames topic after the run. Its CPU per frame is the floor of the sink's (`sink_cpu_vs_bare_consumer`).
Also printed: the CPU time each process used per frame (Linux /proc), and the CPU ceiling: the rate at which every
core would be busy at the end-to-end cost, which no scheduling can beat on this machine. Last line: one JSON object
with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyarrow.parquet as pq
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.broker import EmbeddedBroker, ensure_topics, free_port  # noqa: E402
from ingest.config import KafkaConfig, SinkConfig  # noqa: E402
from ingest.bus import encode_record  # noqa: E402
from ingest.contract import SCHEMA_VERSION, encode_chunk  # noqa: E402
from ingest.lake import live_files  # noqa: E402
from ingest.synth import synthetic_frames  # noqa: E402
from ingest.wire import drive_pb2 as pb  # noqa: E402

STREAM = "/flywheel.v1.DriveIngest/StreamDrive"


@dataclass
class Chunk:
    """One chunk as the vehicle sends it (`wire`) and as the server produces it (`value`, `headers`)."""

    drive_id: str
    wire: bytes
    value: bytes
    headers: list


def make_chunks(frames: int, agents: int, chunk: int, drives: int) -> list[list[Chunk]]:
    """Per drive, its chunks."""
    per_drive = frames // drives
    template = synthetic_frames(chunk, agents=agents, seed=1)
    out = []
    for d in range(drives):
        drive_id, vehicle = f"drive-{d:04d}", f"veh-{d:04d}"
        chunks = []
        for first in range(0, per_drive, chunk):
            block = template.slice(0, min(chunk, per_drive - first))
            block.cols["timestamp_ns"] = block.cols["timestamp_ns"] + first * 100_000_000
            final = first + chunk >= per_drive
            value, headers = encode_record(block, drive_id, vehicle, first, final, SCHEMA_VERSION)
            chunks.append(Chunk(drive_id, encode_chunk(drive_id, vehicle, first, block, final=final).SerializeToString(),
                                value, headers))
        out.append(chunks)
    return out


def raw_produce(bootstrap: str, drives: list[list[Chunk]], partitions: int) -> float:
    """Seconds to produce every chunk's record (as the server would) with one producer, until flushed."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("bench.raw", partitions, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                             batch_size=1 << 20, max_request_size=8 << 20)
    records = [r for chunks in zip(*drives) for r in chunks]  # interleaved like concurrent vehicles
    producer.send("bench.raw", key=b"warm", value=b"x")
    producer.flush()
    t0 = time.perf_counter()
    for c in records:
        producer.send("bench.raw", key=c.drive_id.encode(), value=c.value, headers=c.headers)
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return elapsed


def bare_consume(kafka: KafkaConfig, records: int) -> float:
    """Seconds for one kafka-python consumer (the sink's fetch settings, no group) to fetch `records` records of the
    frames topic from the beginning; it does nothing with them."""
    sink = SinkConfig()
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False, max_poll_records=sink.max_poll_records)
    tps = [TopicPartition(kafka.frames_topic, p) for p in consumer.partitions_for_topic(kafka.frames_topic)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got = 0
    t0 = time.perf_counter()
    while got < records:
        if time.perf_counter() - t0 > 300:
            raise TimeoutError(f"bare consumer fetched {got} of {records} records in 300 s")
        got += sum(len(r) for r in consumer.poll(timeout_ms=sink.poll_ms).values())
    elapsed = time.perf_counter() - t0
    consumer.close()
    return elapsed


async def stream_all(port: int, drives: list[list[Chunk]], streams: int, window: int) -> None:
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
                    for c in chunks:
                        await credit.acquire()
                        await call.write(c.wire)
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


def start_profiles(out: Path | None, pids: dict[str, int]) -> dict[str, tuple[subprocess.Popen, Path]]:
    """py-spy sampling each process (its native frames too) until `stop_profiles`; nothing without `out`."""
    if out is None:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    spies = {}
    for name, pid in pids.items():
        raw = out / f"{name}.stacks.txt"
        spies[name] = (subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                         *(["--native"] if os.environ.get("BENCH_NATIVE") else []), "--threads", "--output", str(raw)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
    return spies


# Leaves where a thread waits rather than works (py-spy cannot tell a blocked select from a busy one), and the
# frames every stack passes through: left out of the listings, so the shares are of the process's busy samples.
IDLE = re.compile(r"^(EpollSelector\.select|Condition\.wait|_worker|Thread\.run|epoll_wait|select|poll)\b")
GENERIC = re.compile(r"runpy|typer/|click/|asyncio/|threading\.py|concurrent/|flywheel/__main__|flywheel/cli/|"
                     r"<module>|^thread ")


def stop_profiles(spies: dict[str, tuple[subprocess.Popen, Path]], top: int = 12) -> None:
    """Stop the samplers; print and store each process's busy functions by samples spent in them (own) and in them
    or their callees (cumulative), line numbers folded into the function."""
    for name, (proc, raw) in spies.items():
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        own: Counter[str] = Counter()
        under: Counter[str] = Counter()
        busy = 0
        for line in raw.read_text().splitlines() if raw.exists() else ():
            stack, _, count = line.rpartition(" ")
            frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
            if not frames or IDLE.match(frames[-1]):
                continue
            n = int(count)
            busy += n
            own[frames[-1]] += n
            for f in set(frames):
                if not GENERIC.search(f):
                    under[f] += n
        lines = [f"{name}: {busy} busy samples; top functions, own % of busy samples (cumulative %)"]
        lines += [f"  {100 * n / busy:5.1f} ({100 * under[f] / busy:5.1f})  {f}" for f, n in own.most_common(top)]
        lines += [f"{name}: top functions with their callees, cumulative %"]
        lines += [f"  {100 * n / busy:5.1f}  {f}" for f, n in under.most_common(top)]
        text = "\n".join(lines)
        raw.with_name(f"{name}.top.txt").write_text(text + "\n")
        print(text)


def per_frame(seconds: dict[str, float], n_frames: int) -> dict[str, float]:
    return {name: round(1e6 * sec / n_frames, 2) for name, sec in seconds.items()}


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
    ap.add_argument("--profile", type=Path, help="sample the server and the sinks with py-spy during the timed run "
                    "and write their flame graphs' raw stacks and the top functions into this directory")
    args = ap.parse_args()

    drives = make_chunks(args.frames, args.agents, args.chunk, args.drives)
    n_frames = sum(args.frames // args.drives for _ in drives)
    n_chunks = sum(map(len, drives))
    n_bytes = sum(len(c.wire) for chunks in drives for c in chunks)
    bus_bytes = sum(len(c.value) for chunks in drives for c in chunks)
    print(f"{n_frames} frames, {args.agents} agents each, {n_chunks} chunks; {n_bytes / 1e6:.1f} MB on the wire "
          f"({n_bytes / n_frames:.0f} B/frame), {bus_bytes / 1e6:.1f} MB on the bus ({bus_bytes / n_frames:.0f} B/frame)")

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, partitions=args.partitions)
        ensure_topics(kafka)
        broker0, own0 = cpu_seconds(broker.proc.pid), sum(os.times()[:2])
        raw_s = raw_produce(broker.bootstrap, drives, args.partitions)
        raw_fps = n_frames / raw_s
        raw_cpu = {"producer": sum(os.times()[:2]) - own0, "broker": cpu_seconds(broker.proc.pid) - broker0}
        print(f"raw kafka-python produce of the server's records: {raw_s:.2f}s  {raw_fps:,.0f} frames/s  "
              f"{bus_bytes / raw_s / 1e6:.0f} MB/s")

        lake = Path(tmp) / "lake"
        port = free_port()
        env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
               "FLYWHEEL_KAFKA__PARTITIONS": str(args.partitions), "FLYWHEEL_SERVER__METRICS_PORT": "0",
               "FLYWHEEL_SERVER__LISTEN": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "flywheel", "server"], env=env,
                                  stderr=subprocess.PIPE, text=True)
        sinks = [subprocess.Popen([sys.executable, "-m", "flywheel", "sink", "--lake", str(lake), "--group", "bench",
                                   "--max-age-s", "1.0", "--metrics-port", "0"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(args.sinks)]
        try:
            for line in server.stderr:
                if line.startswith("listening on port"):
                    break
            threading.Thread(target=server.stderr.read, daemon=True).start()
            time.sleep(4 + 4 * (args.sinks - 1))  # the sinks join their group (~3 s on Tansu, each join rebalances)
            procs = {"server": server.pid, "broker": broker.proc.pid, **{f"sink{i}": s.pid for i, s in enumerate(sinks)}}
            spies = start_profiles(args.profile, {k: v for k, v in procs.items() if k != "broker"})
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
            stop_profiles(spies)
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
        broker0, own0 = cpu_seconds(broker.proc.pid), sum(os.times()[:2])
        bare_s = bare_consume(kafka, n_chunks)
        bare_cpu = {"consumer": sum(os.times()[:2]) - own0, "broker": cpu_seconds(broker.proc.pid) - broker0}

    e2e_fps = n_frames / e2e_s
    sink_cpu = sum(sec for name, sec in cpu.items() if name.startswith("sink"))
    total_cpu = sum(cpu.values())
    ceiling = (os.cpu_count() or 1) * n_frames / total_cpu
    server_ratio = cpu["server"] / raw_cpu["producer"]
    sink_ratio = sink_cpu / bare_cpu["consumer"]
    us = per_frame(cpu, n_frames)
    print(f"gRPC acked (durable in Kafka): {acked_s:.2f}s  {n_frames / acked_s:,.0f} frames/s")
    print(f"end to end, durable in the lake: {e2e_s:.2f}s  {e2e_fps:,.0f} frames/s  ({rows} rows in {files} files)")
    print(f"bare consumer fetching the frames topic: {bare_s:.2f}s  {n_frames / bare_s:,.0f} frames/s")
    print("CPU during the raw produce (us/frame): "
          + ", ".join(f"{name} {v}" for name, v in per_frame(raw_cpu, n_frames).items()))
    print("CPU during the bare consume (us/frame): "
          + ", ".join(f"{name} {v}" for name, v in per_frame(bare_cpu, n_frames).items()))
    print("CPU during the end-to-end run (us/frame): " + ", ".join(f"{name} {v}" for name, v in us.items())
          + f"; total {1e6 * total_cpu / n_frames:.1f} on {os.cpu_count()} cores")
    print(f"server CPU / raw producer CPU: {server_ratio:.2f} (target <= 2.5); "
          f"sink CPU / bare consumer CPU: {sink_ratio:.2f} (target <= 2.0)")
    print(f"CPU ceiling: every core busy at that cost = {ceiling:,.0f} frames/s; end to end reached "
          f"{e2e_fps / ceiling:.2f} of it (target >= 0.50) and {e2e_fps:,.0f} frames/s (target >= 25,000)")
    print(json.dumps({
        "bench": "ingest", "frames": n_frames, "agents_per_frame": args.agents, "wire_bytes": n_bytes,
        "bus_bytes": bus_bytes, "frames_per_chunk": args.chunk, "streams": args.streams, "sinks": args.sinks,
        "cpu_count": os.cpu_count(),
        "end_to_end_frames_per_s": round(e2e_fps), "grpc_acked_frames_per_s": round(n_frames / acked_s),
        "raw_produce_frames_per_s": round(raw_fps), "bare_consume_frames_per_s": round(n_frames / bare_s),
        "ratio_to_raw": round(e2e_fps / raw_fps, 3), "lake_rows": rows,
        "cpu_us_per_frame": us, "raw_cpu_us_per_frame": per_frame(raw_cpu, n_frames),
        "bare_consumer_cpu_us_per_frame": per_frame(bare_cpu, n_frames),
        "server_cpu_vs_raw_producer": round(server_ratio, 2), "sink_cpu_vs_bare_consumer": round(sink_ratio, 2),
        "cpu_ceiling_frames_per_s": round(ceiling), "fraction_of_cpu_ceiling": round(e2e_fps / ceiling, 3),
        "targets": {"end_to_end_frames_per_s": 25000, "server_cpu_vs_raw_producer": 2.5,
                    "sink_cpu_vs_bare_consumer": 2.0, "fraction_of_cpu_ceiling": 0.5},
    }))


if __name__ == "__main__":
    main()
