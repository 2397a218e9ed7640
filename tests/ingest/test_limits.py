"""Limits of the ingest server against its clients, on a real broker and real gRPC: idle streams, stream caps (and the
agent's backoff through them), where the metrics listen, rejections in the logs, the gap message."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys

import grpc
from prometheus_client import REGISTRY

from ingest.agent import run_agent
from ingest.auth import issue_token
from ingest.broker import free_port
from ingest.config import AgentConfig, ServerConfig
from ingest.lake import write_drive
from ingest import limits
from ingest.limits import RejectionLog, serve_metrics
from ingest.synth import synthetic_drive
from ingest.wire import drive_pb2 as pb
from tests.ingest.test_server import chunk
from tests.ingest_helpers import STREAM, chunk_records, run, running_server, send_raw, start_server_process


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("flywheel_ingest_chunks_rejected_total", {"reason": reason}) or 0.0


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")


def test_a_stream_idle_past_the_timeout_is_ended_with_a_retry_hint(kafka_config):
    before = rejected("idle_timeout")

    async def go():
        async with running_server(kafka_config, produce_timeout_s=0.5, stream_idle_timeout_s=1.0) as (service, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.stream_stream(STREAM, request_serializer=lambda b: b,
                                        response_deserializer=pb.ChunkAck.FromString)(timeout=30)
                await call.write(chunk(n=20).SerializeToString())
                ack = await call.read()  # the chunk is acknowledged; then the vehicle goes quiet
                assert ack.committed_seq == 19
                code = await call.code()  # ends by itself: nothing more is written, nothing closes it
                trailers = dict(await call.trailing_metadata())
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, await call.details()
                assert trailers["flywheel-reason"] == "idle_timeout" and int(trailers["retry-after-ms"]) > 0
            assert service.slots.open == 0 and not service.slots.by_vehicle  # its slot is given back
    run(go())
    assert rejected("idle_timeout") == before + 1


def test_streams_over_the_caps_are_refused_and_the_agent_backs_off(kafka_config, tmp_path):
    tokens = tmp_path / "tokens.json"
    tok = {v: issue_token(tokens, v) for v in ("veh-1", "veh-2")}
    before = rejected("too_many_streams")

    async def go():
        async with running_server(kafka_config, token_file=tokens, max_streams=3, max_streams_per_vehicle=2,
                                  retry_after_ms=50) as (service, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                method = ch.stream_stream(STREAM, request_serializer=lambda b: b,
                                          response_deserializer=pb.ChunkAck.FromString)

                def open_stream(vehicle):
                    return method(metadata=(("authorization", f"Bearer {tok[vehicle]}"),), timeout=30)

                held = [open_stream("veh-1"), open_stream("veh-1")]  # open, sending nothing
                await wait_for(lambda: service.slots.open == 2)
                third = open_stream("veh-1")
                assert await third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                trailers = dict(await third.trailing_metadata())
                assert trailers["flywheel-reason"] == "too_many_streams" and int(trailers["retry-after-ms"]) == 50
                assert "per vehicle is 2" in await third.details()
                held.append(open_stream("veh-2"))  # another vehicle: within the total
                await wait_for(lambda: service.slots.open == 3)
                fourth = open_stream("veh-2")
                assert await fourth.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit is 3" in await fourth.details()
                for call in held:
                    call.cancel()
                await wait_for(lambda: service.slots.open == 0)
                assert not service.slots.by_vehicle
            # the agent meets the per-vehicle cap with three drives at once and gets through by its backoff
            drives = tmp_path / "drives"
            for d in range(3):
                write_drive(drives, synthetic_drive(f"drive-{d}", "veh-1", 600, agents=3, seed=d))
            token_file = tmp_path / "agent-tokens.json"
            token_file.write_text(json.dumps({"veh-1": tok["veh-1"]}))
            cfg = AgentConfig(server=f"127.0.0.1:{port}", token_file=token_file, concurrency=3, frames_per_chunk=20,
                              window=1, backoff_initial_s=0.05, backoff_max_s=0.2)
            report = await run_agent(cfg, drives)
            assert report.uploaded == 3 and not report.failed, [r.error for r in report.failed]
    run(go())
    assert rejected("too_many_streams") >= before + 2
    assert {r.drive_id for r in chunk_records(kafka_config)} == {"drive-0", "drive-1", "drive-2"}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (Linux /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.rpartition(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return out


def test_metrics_listen_on_loopback_unless_exposed(kafka_config, tmp_path):
    assert ServerConfig().metrics_host == "127.0.0.1"
    server = serve_metrics(ServerConfig().metrics_host, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
    # the services as started from the command line: the server, and the sink exposed on purpose
    mport, sport = free_port(), free_port()
    env = {**os.environ, "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": kafka_config.bootstrap_servers,
           "FLYWHEEL_SERVER__METRICS_PORT": str(mport), "FLYWHEEL_SERVER__LISTEN": "127.0.0.1:0",
           "FLYWHEEL_SINK__METRICS_PORT": str(sport), "FLYWHEEL_SINK__METRICS_HOST": "0.0.0.0"}
    procs = [subprocess.Popen([sys.executable, "-m", "flywheel", "server"], env=env, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-m", "flywheel", "sink", "--lake", str(tmp_path / "lake")], env=env,
                              stderr=subprocess.DEVNULL)]
    try:
        for line in procs[0].stderr:
            if line.startswith("listening on port"):
                break

        async def both_listening():
            await wait_for(lambda: _listening_addresses(mport) and _listening_addresses(sport), 20)
        run(both_listening())
        assert _listening_addresses(mport) == {"127.0.0.1"}
        assert _listening_addresses(sport) == {"0.0.0.0"}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def test_rejections_are_logged_once_with_fields_and_rate_limited(kafka_config, tmp_path, caplog, monkeypatch):
    tokens = tmp_path / "tokens.json"
    tok = issue_token(tokens, "veh-1")
    auth = (("authorization", f"Bearer {tok}"),)
    bad = chunk("drive-bad", n=10)
    bad.crc32c ^= 1
    caplog.set_level(logging.WARNING, logger="ingest.server")

    async def go():
        async with running_server(kafka_config, token_file=tokens) as (service, port):
            assert (await send_raw(port, [bad.SerializeToString()], metadata=auth)).code != grpc.StatusCode.OK
            assert (await send_raw(port, [chunk().SerializeToString()])).code == grpc.StatusCode.UNAUTHENTICATED
    run(go())
    refused = [r for r in caplog.records if getattr(r, "reason", None)]
    assert [(r.reason, r.vehicle_id, r.drive_id, r.status) for r in refused] == [
        ("checksum", "veh-1", "drive-bad", "INVALID_ARGUMENT"), ("unauthenticated", None, None, "UNAUTHENTICATED")]
    # a flood: the burst is written, the rest counted, and the next line written says how many were not
    clock = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: clock[0])
    log = RejectionLog(logging.getLogger("ingest.server"), rate_per_s=2.0, burst=5)
    caplog.clear()
    written = sum(log.rejected("malformed", "INVALID_ARGUMENT", "veh-x", "d", "x") for _ in range(200))
    assert written == 5 and len(caplog.records) == 5
    clock[0] += 0.5  # one line's worth of rate
    assert log.rejected("malformed", "INVALID_ARGUMENT", "veh-x", "d", "x")
    assert caplog.records[-1].suppressed == 195 and "195 more refusals not logged" in caplog.records[-1].getMessage()


def test_json_logs_carry_the_rejection_as_fields(kafka_config):
    proc, port = start_server_process(kafka_config, "--log-format", "json")
    try:
        out = run(send_raw(port, [chunk("drive-v9", "veh-9", schema_version=7).SerializeToString()]))
        assert out.code == grpc.StatusCode.FAILED_PRECONDITION
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    docs = [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    refused = [d for d in docs if d.get("reason") == "schema_version"]
    assert len(refused) == 1, docs
    assert (refused[0]["vehicle_id"], refused[0]["drive_id"], refused[0]["status"]) == \
        ("veh-9", "drive-v9", "FAILED_PRECONDITION")


def test_a_gap_names_the_committed_seq_that_status_returns(kafka_config):
    async def go():
        async with running_server(kafka_config) as (_, port):
            # both written at once: the gap is read before the first chunk is durable
            out = await send_raw(port, [chunk("drive-g", n=50).SerializeToString(),
                                        chunk("drive-g", first=100, n=50).SerializeToString()])
            assert out.code == grpc.StatusCode.FAILED_PRECONDITION
            assert [a.committed_seq for a in out.acks] == [49]
            assert "expected 50" in out.details and "(committed 49)" in out.details, out.details
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = ch.unary_unary("/flywheel.v1.DriveIngest/GetDriveStatus",
                                        request_serializer=pb.DriveStatusRequest.SerializeToString,
                                        response_deserializer=pb.DriveStatus.FromString)
                assert (await status(pb.DriveStatusRequest(drive_id="drive-g"))).committed_seq == 49
    run(go())
