"""The RetrainControl gRPC service (grpc.aio): trigger retraining jobs and follow them (proto/flywheel/v1/control.proto).

Built like the ingest server (`ingest.server`): generic method handlers over the generated messages, the standard
health and reflection services, bearer tokens checked against a hashed token file (`ingest.auth`; the identity of the
token is recorded as the job's `requested_by`), optional TLS. Store calls run in threads: SQLite may wait on a lock
held by another process, and the event loop must not.

Every refusal is a precise status with the reason (see the proto): a trigger is validated before it is queued —
the mining query by the catalog's own read-only checks (DuckDB's parser) and, when a lake is configured, bound
against the lake's views (unknown table or column); targets against deploy/targets/*.toml; the student against the
registry when one is configured; the options by the cycle adapter.

`serve()` runs the service with job runners (and the optional trigger policy) until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ingest.auth import TokenStore, bearer, certificate_name, is_loopback
from retrain.compress.targets import known_targets
from retrain.cycle.registry import Registry
from retrain.jobs.adapter import CycleAdapter
from retrain.jobs.messages import (DEFAULT_PAGE, MAX_PAGE, STATE_OF_PB, job_to_pb, page_token, parse_page_token,
                                   spec_from_request)
from retrain.jobs.models import (ControlConfig, CoolingDown, InvalidRequest, Job, JobError, JobFinished, JobNotFound,
                                 JobsConfig, JobSpec, NotConfigured, RequestConflict, StudentBusy, UnknownStudent)
from retrain.jobs.policy import PolicyLoop
from retrain.jobs.runner import JobRunner, default_reporter
from retrain.jobs.store import JobStore
from retrain.jobs.wire import control_pb2 as pb

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["RetrainControl"].full_name

STATUS_OF: dict[type, grpc.StatusCode] = {
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    StudentBusy: grpc.StatusCode.FAILED_PRECONDITION,
    JobFinished: grpc.StatusCode.FAILED_PRECONDITION,
    CoolingDown: grpc.StatusCode.FAILED_PRECONDITION,
    NotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    RequestConflict: grpc.StatusCode.ALREADY_EXISTS,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownStudent: grpc.StatusCode.NOT_FOUND,
}


class Unprotected(RuntimeError):
    """The service would be open to anyone who reaches its address."""


# ------------------------------------------------------------------------------------------------- validation


class Validator:
    """Checks a JobSpec before it is queued; raises InvalidRequest / UnknownStudent with the reason."""

    def __init__(self, config: JobsConfig, cycle: CycleAdapter | None = None) -> None:
        self.config, self.cycle = config, cycle
        self._catalog = None
        self._lock = threading.Lock()

    def check_sql(self, sql: str) -> None:
        from shadow.catalog import Catalog, QueryError, QueryRefused, checked

        try:
            stmts = checked(sql)
        except QueryRefused as exc:
            raise InvalidRequest(f"mining query refused: {exc}") from None
        except QueryError as exc:
            raise InvalidRequest(f"mining query does not parse: {exc}") from None
        if len(stmts) != 1:
            raise InvalidRequest(f"the mining query must be one statement, got {len(stmts)}")
        lake = self.config.lake_dir
        if lake is None or not Path(lake).is_dir():
            return  # no lake to bind against: the parser's checks are all that can be done here
        with self._lock:  # binding against the views catches unknown tables and columns without running the query
            if self._catalog is None:
                self._catalog = Catalog(lake)
            else:
                self._catalog.refresh()
            try:
                columns = set(self._catalog.sql(stmts[0]).columns)
            except QueryError as exc:
                raise InvalidRequest(f"mining query does not bind against the lake: {exc}") from None
        # retrain.cycle.mining's contract: frames (drive_id, seq) or windows (drive_id, window_start_seq, window_end_seq)
        if "drive_id" not in columns or not ("seq" in columns or {"window_start_seq", "window_end_seq"} <= columns):
            raise InvalidRequest("a mining query must return drive_id and seq (frames), or drive_id, "
                                 f"window_start_seq and window_end_seq (windows); it returns {sorted(columns)}")

    def check(self, spec: JobSpec) -> None:
        if spec.sql is not None:
            self.check_sql(spec.sql)
        known = known_targets(self.config.targets_dir)
        unknown = [t for t in spec.targets if t not in known]
        if unknown:
            raise InvalidRequest(f"unknown target {', '.join(unknown)}; known targets: {', '.join(known)}")
        if self.config.registry_dir is not None:
            if not Registry(self.config.registry_dir).list(spec.student):
                raise UnknownStudent(f"student {spec.student!r} is not in the registry {self.config.registry_dir}")
        if self.cycle is not None:
            try:
                self.cycle.validate(spec)
            except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
                raise InvalidRequest(f"options refused: {exc}") from None


# ---------------------------------------------------------------------------------------------------- service


class ControlService:
    """RetrainControl over a JobStore; `start()` builds the grpc.aio server around it."""

    def __init__(self, jobs: JobsConfig, config: ControlConfig, cycle: CycleAdapter | None = None) -> None:
        self.jobs, self.config = jobs, config
        self.store = JobStore.from_config(jobs)
        self.validator = Validator(jobs, cycle)
        self.tokens = TokenStore.load(config.token_file) if config.token_file else None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        if self.tokens is None and config.tls_client_ca is None:
            if not is_loopback(config.listen) and not config.allow_unauthenticated:
                # anyone who reaches the port could start retraining jobs and read the lake through mining queries
                raise Unprotected(f"refusing to serve RetrainControl on {config.listen} without authentication: set "
                                  "[control] token_file or tls_client_ca, listen on loopback, or set "
                                  "allow_unauthenticated = true")
            log.warning("retrain control service runs WITHOUT authentication (no token_file, no mTLS) on %s",
                        config.listen)

    async def start(self) -> int:
        self.server = grpc.aio.server()

        def unary(fn, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=request_type.FromString,
                                                       response_serializer=response_type.SerializeToString)

        handlers = {
            "TriggerRetrain": unary(self.trigger_retrain, pb.TriggerRetrainRequest, pb.Job),
            "GetJob": unary(self.get_job, pb.GetJobRequest, pb.Job),
            "ListJobs": unary(self.list_jobs, pb.ListJobsRequest, pb.ListJobsResponse),
            "CancelJob": unary(self.cancel_job, pb.CancelJobRequest, pb.Job),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        if self.config.tls_cert is None:
            port = self.server.add_insecure_port(self.config.listen)
        else:
            ca = self.config.tls_client_ca
            creds = grpc.ssl_server_credentials([(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
                                                root_certificates=ca.read_bytes() if ca else None,
                                                require_client_auth=ca is not None)
            port = self.server.add_secure_port(self.config.listen, creds)
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("retrain control listening on %s (port %d)", self.config.listen, port)
        return port

    async def stop(self, grace: float | None = None) -> None:
        if self.server is None:
            return
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.config.grace_s if grace is None else grace)
        self.server = None

    async def _identity(self, context) -> str:
        """Who calls: the token's identity and/or the client certificate's name (they must agree); "" when the
        service runs without authentication."""
        names = []
        if self.tokens is not None:
            token = bearer(context.invocation_metadata())
            who = self.tokens.vehicle_for(token) if token else None
            if who is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing bearer token" if not token else "unknown or revoked bearer token")
            names.append(who)
        if self.config.tls_client_ca is not None:
            name = certificate_name(context)
            if name is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate has no common name")
            names.append(name)
        if len(set(names)) > 1:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"token and certificate name different identities: {sorted(set(names))}")
        return names[0] if names else ""

    async def _call(self, context, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking store call in a thread; the store's refusals become their status codes."""
        try:
            return await asyncio.to_thread(fn, *args)
        except JobError as exc:
            code = next((c for t, c in STATUS_OF.items() if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
            await context.abort(code, str(exc))
        except sqlite3.OperationalError as exc:  # the database stayed locked past the busy timeout
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"job store busy, retry: {exc}")
        except Exception as exc:
            log.exception("unexpected error in the control service")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def trigger_retrain(self, request: pb.TriggerRetrainRequest, context) -> pb.Job:
        who = await self._identity(context)

        def trigger() -> Job:
            spec = spec_from_request(request)
            self.validator.check(spec)
            return self.store.create(spec, request.request_id or None, who, request.queue_behind)[0]

        return job_to_pb(await self._call(context, trigger))

    async def get_job(self, request: pb.GetJobRequest, context) -> pb.Job:
        await self._identity(context)
        return job_to_pb(await self._call(context, self.store.get, request.id))

    async def cancel_job(self, request: pb.CancelJobRequest, context) -> pb.Job:
        who = await self._identity(context)
        reason = f"cancelled by {who}" if who else "cancelled on request"
        return job_to_pb(await self._call(context, self.store.cancel, request.id, reason))

    async def list_jobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        await self._identity(context)

        def page() -> pb.ListJobsResponse:
            if any(s not in STATE_OF_PB for s in request.states):
                raise InvalidRequest("states: JOB_STATE_UNSPECIFIED is not a state to filter by")
            size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
            jobs = self.store.list([STATE_OF_PB[s] for s in request.states], request.student or None, size + 1,
                                   parse_page_token(request.page_token))
            more = len(jobs) > size
            jobs = jobs[:size]
            return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs],
                                       next_page_token=page_token(jobs[-1]) if more else "")

        return await self._call(context, page)


# ------------------------------------------------------------------------------------------------------ serve


async def serve(jobs: JobsConfig, config: ControlConfig, cycle: CycleAdapter, ready=None,
                stop: asyncio.Event | None = None) -> None:
    """Serve RetrainControl with `config.runners` job runners until SIGTERM/SIGINT (or `stop`).

    A job still running at shutdown keeps its state; its lease expires and the next runner resumes it.
    """
    try:
        service = ControlService(jobs, config, cycle)
    except Unprotected as exc:  # the command line's refusal: one line and a failing exit status, no traceback
        raise SystemExit(f"retrain control: {exc}") from None
    port = await service.start()
    runners = [JobRunner(JobStore.from_config(jobs), cycle, jobs, reporter=default_reporter(jobs.lake_dir)).start()
               for _ in range(config.runners)]
    policy_stop = threading.Event()
    policy = None
    if config.policy_file is not None:
        policy = PolicyLoop.from_file(config.policy_file, jobs, config.policy_interval_s, service.validator)
        threading.Thread(target=policy.run, args=(policy_stop,), daemon=True, name="policy").start()
    if ready is not None:
        ready(port)
    if stop is None:  # the command line: stop on signals (only possible in the main thread)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        policy_stop.set()
        for r in runners:
            r.stop(0)  # no new jobs; a cycle still running after the grace is resumed from its lease by another runner
        await service.stop()
        for r in runners:
            await asyncio.to_thread(r.stop, config.grace_s)
        log.info("retrain control stopped")
