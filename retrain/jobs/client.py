"""A blocking client of the RetrainControl gRPC service (what the CLI uses); raises grpc.RpcError with the server's
status and reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from retrain.jobs.messages import MAX_PAGE, STATE_PB, job_from_pb
from retrain.jobs.models import Job, JobSpec, JobState
from retrain.jobs.wire import control_pb2 as pb
from retrain.jobs.wire import control_pb2_grpc


class ControlClient:
    """A blocking client of RetrainControl (the CLI's); raises grpc.RpcError with the server's status."""

    def __init__(self, target: str, token: str | None = None, tls_ca: Path | None = None, timeout: float = 30.0,
                 tls_cert: Path | None = None, tls_key: Path | None = None):
        """`tls_ca` enables TLS; `tls_cert` and `tls_key` (PEM) present a client certificate for mTLS."""
        if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
            raise ValueError("a client certificate needs tls_cert, tls_key and tls_ca together")
        if tls_ca:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(),
                                                 Path(tls_key).read_bytes() if tls_key else None,
                                                 Path(tls_cert).read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = control_pb2_grpc.RetrainControlStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def _do(self, method: str, request) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)

    def trigger(self, spec: JobSpec, request_id: str = "", queue_behind: bool = False) -> Job:
        req = pb.TriggerRetrainRequest(student=spec.student, targets=list(spec.targets), request_id=request_id,
                                       options_json=json.dumps(spec.options), queue_behind=queue_behind)
        if spec.sql is not None:
            req.sql = spec.sql
        else:
            req.score_rule.CopyFrom(pb.ScoreRule(**spec.score_rule.model_dump()))
        return job_from_pb(self._do("TriggerRetrain", req))

    def get(self, job_id: str) -> Job:
        return job_from_pb(self._do("GetJob", pb.GetJobRequest(id=job_id)))

    def cancel(self, job_id: str) -> Job:
        return job_from_pb(self._do("CancelJob", pb.CancelJobRequest(id=job_id)))

    def list(self, states: list[JobState] | None = None, student: str | None = None, limit: int = 50) -> list[Job]:
        out: list[Job] = []
        token = ""
        while len(out) < limit:
            resp = self._do("ListJobs", pb.ListJobsRequest(states=[STATE_PB[JobState(s)] for s in states or []],
                                                           student=student or "", page_size=min(limit - len(out),
                                                                                                MAX_PAGE),
                                                           page_token=token))
            out += [job_from_pb(j) for j in resp.jobs]
            token = resp.next_page_token
            if not token:
                break
        return out

    def close(self) -> None:
        self.channel.close()
