"""The RetrainControl service is never open by accident: without a token file or mTLS it refuses any address but
loopback unless told `allow_unauthenticated`; with mTLS the caller is its certificate's name (real gRPC, real TLS)."""

from __future__ import annotations

import grpc
import pytest

from ingest.auth import is_loopback, issue_token
from retrain.jobs.adapter import FunctionCycle
from retrain.jobs.client import ControlClient
from retrain.jobs.models import ControlConfig
from retrain.jobs.service import ControlService, Unprotected
from tests.retrain.test_control import Loop, jobs_config, spec  # noqa: F401  (the fixture)
from tests.retrain.test_jobs import stand_in_cycle


def test_loopback_addresses():
    assert all(is_loopback(a) for a in ("127.0.0.1:50061", "localhost:1", "[::1]:5", "127.0.0.2:9"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:50061", "[::]:1", ":50061", "10.1.2.3:9"))


def test_refuses_to_start_open_on_a_non_loopback_address(jobs_config, tmp_path):
    with pytest.raises(Unprotected, match="allow_unauthenticated"):
        ControlService(jobs_config, ControlConfig(listen="0.0.0.0:0", runners=0))
    # loopback needs no authentication; any address does with a token file, or when told so explicitly
    ControlService(jobs_config, ControlConfig(listen="127.0.0.1:0", runners=0))
    issue_token(tmp_path / "tokens.json", "alice")
    ControlService(jobs_config, ControlConfig(listen="0.0.0.0:0", runners=0, token_file=tmp_path / "tokens.json"))
    loop = Loop()
    service = ControlService(jobs_config, ControlConfig(listen="0.0.0.0:0", runners=0, allow_unauthenticated=True))
    try:
        port = loop.run(service.start())
        client = ControlClient(f"127.0.0.1:{port}")
        assert client.list() == []
        client.close()
    finally:
        loop.run(service.stop(0))
        loop.close()


def test_mtls_identity_is_the_certificate(jobs_config, tmp_path):
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki", ["operator-1"])
    cfg = ControlConfig(listen="localhost:0", runners=0, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                        tls_client_ca=pki["ca.crt"])
    loop = Loop()
    service = ControlService(jobs_config, cfg, FunctionCycle(stand_in_cycle))
    try:
        port = loop.run(service.start())
        client = ControlClient(f"localhost:{port}", tls_ca=pki["ca.crt"], tls_cert=pki["operator-1.crt"],
                               tls_key=pki["operator-1.key"])
        job = client.trigger(spec())
        assert job.requested_by == "operator-1"
        assert [j.id for j in client.list()] == [job.id]
        client.close()
        anonymous = ControlClient(f"localhost:{port}", tls_ca=pki["ca.crt"])  # TLS, no client certificate
        with pytest.raises(grpc.RpcError) as err:
            anonymous.list()
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        anonymous.close()
    finally:
        loop.run(service.stop(0))
        loop.close()


def test_the_command_refuses_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLYWHEEL_JOBS__DB_PATH": str(tmp_path / "jobs.sqlite"),
           "FLYWHEEL_JOBS__WORK_ROOT": str(tmp_path / "work")}
    out = subprocess.run([sys.executable, "-m", "flywheel", "control", "--listen", "0.0.0.0:0", "--runners", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "refusing to serve RetrainControl on 0.0.0.0:0 without authentication" in out.stderr
    assert "Traceback" not in out.stderr
