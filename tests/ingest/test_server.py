"""The gRPC ingest server against a real broker on loopback: acks, hostile input, auth, backpressure, operations."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from ingest.agent import VehicleChannels, run_agent, stream_from
from ingest.auth import issue_token
from ingest.config import AgentConfig
from ingest.contract import encode_chunk
from ingest.lake import read_drive, write_drive
from ingest.server import DriveState
from ingest.synth import synthetic_drive, synthetic_frames
from ingest.wire import drive_pb2 as pb
from tests.ingest_helpers import chunk_records, run, running_server, send_raw, start_server_process


def chunk(drive="drive-1", vehicle="veh-1", first=0, n=100, **kw) -> pb.DriveChunk:
    return encode_chunk(drive, vehicle, first, synthetic_frames(n, agents=5, seed=first), **kw)


def test_acks_carry_committed_seq_and_one_record_per_chunk(kafka_config):
    async def go():
        async with running_server(kafka_config) as (_, port):
            out = await send_raw(port, [chunk(first=0).SerializeToString(), chunk(first=100).SerializeToString(),
                                        chunk(first=200, n=50, final=True).SerializeToString()])
            assert out.code == grpc.StatusCode.OK, out.details
            seqs = [a.committed_seq for a in out.acks]
            # each ack covers at least its own chunk and never goes back
            assert len(seqs) == 3 and seqs == sorted(seqs) and all(s >= last for s, last in zip(seqs, [99, 199, 249]))
            assert seqs[-1] == 249
            assert out.acks[-1].drive_complete
            # a resend of committed frames is acknowledged and not stored again
            again = await send_raw(port, [chunk(first=100).SerializeToString()])
            assert again.code == grpc.StatusCode.OK and again.acks[0].committed_seq == 249
    run(go())
    records = chunk_records(kafka_config)
    assert sorted(r.first_seq for r in records) == [0, 100, 200]
    assert {r.drive_id for r in records} == {"drive-1"}


def test_hostile_input_gets_precise_status_and_never_reaches_kafka(kafka_config, tmp_path):
    tokens = tmp_path / "tokens.json"
    tok1, tok2 = issue_token(tokens, "veh-1"), issue_token(tokens, "veh-2")
    auth1 = (("authorization", f"Bearer {tok1}"),)
    nan = synthetic_frames(10, agents=3)
    nan.cols["agent_x"][4] = np.nan
    big = encode_chunk("drive-big", "veh-1", 0, synthetic_frames(1000, agents=25))  # just over the 1 MiB limit
    huge = encode_chunk("drive-big", "veh-1", 0, synthetic_frames(1000, agents=60))  # over gRPC's hard cap (2x)
    assert 1 << 20 < len(big.SerializeToString()) < 2 << 20 < len(huge.SerializeToString())
    cases = [
        ("garbage", [b"\x0a\xff\xff\xff\xff\x0f garbage"], auth1, grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
        ("version", [chunk(schema_version=7).SerializeToString()], auth1, grpc.StatusCode.FAILED_PRECONDITION,
         "schema_version"),
        ("nan", [encode_chunk("drive-nan", "veh-1", 0, nan).SerializeToString()], auth1,
         grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        ("oversized", [big.SerializeToString()], auth1, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
        ("far oversized", [huge.SerializeToString()], auth1, grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        ("other vehicle", [chunk(vehicle="veh-2").SerializeToString()], auth1, grpc.StatusCode.PERMISSION_DENIED,
         "vehicle_mismatch"),
        ("no token", [chunk().SerializeToString()], (), grpc.StatusCode.UNAUTHENTICATED, None),
        ("wrong token", [chunk().SerializeToString()], (("authorization", "Bearer nope"),),
         grpc.StatusCode.UNAUTHENTICATED, None),
    ]
    before = REGISTRY.get_sample_value("flywheel_ingest_chunks_rejected_total", {"reason": "non_finite"}) or 0

    async def go():
        async with running_server(kafka_config, token_file=tokens, max_chunk_bytes=1 << 20) as (_, port):
            for name, payloads, md, code, reason in cases:
                out = await send_raw(port, payloads, metadata=md)
                assert out.code == code, (name, out.code, out.details)
                assert out.acks == [], name
                assert out.details, name
                if reason:
                    assert out.trailers.get("flywheel-reason") == reason, (name, out.trailers)
            # a gap: the first chunk is acked before the stream ends with the reason
            gap = await send_raw(port, [chunk("drive-gap", first=0).SerializeToString(),
                                        chunk("drive-gap", first=150).SerializeToString()], metadata=auth1)
            assert gap.code == grpc.StatusCode.FAILED_PRECONDITION and "expected 100" in gap.details
            assert [a.committed_seq for a in gap.acks] == [99]
            # the server keeps serving other vehicles
            ok = await send_raw(port, [chunk("drive-ok", "veh-2", final=True).SerializeToString()],
                                metadata=(("authorization", f"Bearer {tok2}"),))
            assert ok.code == grpc.StatusCode.OK and ok.acks[-1].committed_seq == 99
    run(go())
    records = chunk_records(kafka_config)
    assert sorted((r.drive_id, r.first_seq) for r in records) == [("drive-gap", 0), ("drive-ok", 0)]
    after = REGISTRY.get_sample_value("flywheel_ingest_chunks_rejected_total", {"reason": "non_finite"})
    assert after == before + 1


def test_one_stream_per_drive_and_status(kafka_config):
    async def go():
        async with running_server(kafka_config) as (service, port):
            service.drives["drive-1"] = DriveState("veh-1", streaming=True)  # as if another stream held it
            busy = await send_raw(port, [chunk().SerializeToString()])
            assert busy.code == grpc.StatusCode.ABORTED and busy.trailers["flywheel-reason"] == "drive_busy"
            service.drives["drive-1"].streaming = False
            assert (await send_raw(port, [chunk().SerializeToString()])).code == grpc.StatusCode.OK
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = ch.unary_unary("/flywheel.v1.DriveIngest/GetDriveStatus",
                                        request_serializer=pb.DriveStatusRequest.SerializeToString,
                                        response_deserializer=pb.DriveStatus.FromString)
                assert (await status(pb.DriveStatusRequest(drive_id="drive-1"))).committed_seq == 99
                assert (await status(pb.DriveStatusRequest(drive_id="never"))).committed_seq == -1
    run(go())


def test_status_survives_a_server_restart(kafka_config):
    async def go():
        async with running_server(kafka_config) as (_, port):
            assert (await send_raw(port, [chunk().SerializeToString()])).code == grpc.StatusCode.OK
        async with running_server(kafka_config) as (service, port):
            assert service.drives["drive-1"].committed_seq == 99
            out = await send_raw(port, [chunk(first=100).SerializeToString()])
            assert out.code == grpc.StatusCode.OK and out.acks[0].committed_seq == 199
    run(go())


def test_kafka_down_gives_unavailable_with_retry_hint(kafka_config, broker):
    async def go():
        async with running_server(kafka_config, produce_timeout_s=2.0, inflight_wait_s=1.0,
                                  max_inflight_bytes=1 << 20) as (service, port):
            assert (await send_raw(port, [chunk().SerializeToString()])).code == grpc.StatusCode.OK
            broker.kill()
            started = time.monotonic()
            out = await send_raw(port, [chunk(first=100).SerializeToString(), chunk(first=200).SerializeToString()])
            assert out.code == grpc.StatusCode.UNAVAILABLE, out.details
            assert int(out.trailers["retry-after-ms"]) > 0
            assert time.monotonic() - started < 15
            assert service.budget.used == 0  # nothing held after the stream ended
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
                assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    run(go())


def test_health_reflection_and_metrics(kafka_config):
    async def go():
        async with running_server(kafka_config) as (_, port):
            before = REGISTRY.get_sample_value("flywheel_ingest_frames_accepted_total") or 0
            assert (await send_raw(port, [chunk(n=30).SerializeToString()])).code == grpc.StatusCode.OK
            assert REGISTRY.get_sample_value("flywheel_ingest_frames_accepted_total") == before + 30
            assert REGISTRY.get_sample_value("flywheel_ingest_produce_latency_seconds_count") >= 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="flywheel.v1.DriveIngest"))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                names = [s.name async for r in responses for s in r.list_services_response.service]
                assert "flywheel.v1.DriveIngest" in names and "grpc.health.v1.Health" in names
    run(go())


def test_sigterm_drains_open_streams(kafka_config, tmp_path):
    path = write_drive(tmp_path / "drives", synthetic_drive("drive-long", "veh-1", 3000, agents=5))
    proc, port = start_server_process(kafka_config)
    try:

        async def go():
            cfg = AgentConfig(server=f"127.0.0.1:{port}", frames_per_chunk=50, window=1)
            channels = VehicleChannels(cfg)
            drive = read_drive(path)
            task = asyncio.create_task(stream_from(channels, drive, 0, cfg))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            committed, _ = await task
            await channels.close()
            return committed
        committed = run(go())
        assert committed == 2999  # the open stream finished during the drain
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert sum(r.first_seq >= 0 for r in chunk_records(kafka_config)) == 60


def test_mtls_identity_is_the_certificate(kafka_config, tmp_path):
    from tests.certs import make_pki

    pki = make_pki(tmp_path, ["veh-1", "veh-2"])
    write_drive(tmp_path / "d1", synthetic_drive("drive-a", "veh-1", 120, agents=4))

    async def go():
        async with running_server(kafka_config, listen="localhost:0", tls_cert=pki["server.crt"],
                                  tls_key=pki["server.key"], tls_client_ca=pki["ca.crt"]) as (_, port):
            cfg = AgentConfig(server=f"localhost:{port}", tls_ca=pki["ca.crt"], tls_cert=pki["veh-1.crt"],
                              tls_key=pki["veh-1.key"], max_attempts=2)
            report = await run_agent(cfg, tmp_path / "d1")
            assert report.uploaded == 1, [r.error for r in report.results]
            creds = grpc.ssl_channel_credentials(pki["ca.crt"].read_bytes(), pki["veh-2.key"].read_bytes(),
                                                 pki["veh-2.crt"].read_bytes())
            out = await send_raw(port, [chunk("drive-b", "veh-1").SerializeToString()], credentials=creds,
                                 target=f"localhost:{port}")
            assert out.code == grpc.StatusCode.PERMISSION_DENIED
            no_cert = await send_raw(port, [chunk("drive-c").SerializeToString()],
                                     credentials=grpc.ssl_channel_credentials(pki["ca.crt"].read_bytes()),
                                     target=f"localhost:{port}")
            assert no_cert.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    run(go())
    assert {r.drive_id for r in chunk_records(kafka_config)} == {"drive-a"}
    assert json.loads((tmp_path / "d1" / "veh-1" / "drive-a.uploaded.json").read_text())["frames"] == 120
