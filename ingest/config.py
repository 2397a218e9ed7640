"""Typed configuration of the ingest components. Defaults live here and nowhere else.

The umbrella settings (`flywheel.settings`) nest these models under [kafka], [broker], [server], [agent] and [sink]
and fill them from a TOML file and FLYWHEEL_* environment variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Model):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap address(es), comma separated")
    frames_topic: str = Field("flywheel.frames", description="topic of drive chunks, keyed by drive id")
    dead_letter_topic: str = Field("flywheel.frames.dlq", description="records the sink could not decode, with the reason")
    progress_topic: str = Field("flywheel.drive-progress", description="highest acknowledged seq per drive, keyed by drive id")
    partitions: int = Field(6, ge=1, le=1024, description="partitions of the frames topic when the project creates it")
    replication_factor: int = Field(1, ge=1, le=7, description="replication of created topics (3 on a real cluster)")
    retention_ms: int = Field(6 * 3600 * 1000, ge=60_000, description="retention.ms of the created topics")
    retention_bytes: int = Field(512 * 1024 * 1024, ge=1 << 20, description="retention.bytes per partition of the created topics")
    security_protocol: str = Field("PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$")
    sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None

    def client_options(self) -> dict:
        """Connection options shared by every kafka-python client."""
        opts: dict = {"bootstrap_servers": self.bootstrap_servers.split(","), "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password.get_secret_value() if self.sasl_password else None)
        if self.ssl_cafile:
            opts["ssl_cafile"] = str(self.ssl_cafile)
        return opts


class BrokerConfig(_Model):
    host: str = Field("127.0.0.1", description="address the embedded broker listens on")
    port: int = Field(0, ge=0, le=65535, description="port of the embedded broker; 0 picks a free one")
    start_timeout_s: float = Field(20.0, gt=0, description="how long to wait for the broker to serve")


class ServerConfig(_Model):
    listen: str = Field("127.0.0.1:50051", description="host:port of the gRPC ingest server")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus metrics port; 0 disables")
    token_file: Path | None = Field(None, description="JSON file vehicle_id -> sha256 of its bearer token; None disables token auth")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA of vehicle certificates; enables mTLS (vehicle id = certificate CN)")
    max_chunk_bytes: int = Field(4 << 20, ge=1024, le=64 << 20, description="largest accepted chunk message")
    max_frames_per_chunk: int = Field(1000, ge=1, le=100_000)
    max_inflight_bytes: int = Field(64 << 20, ge=1 << 20, description="chunk bytes accepted but not yet durable in Kafka, over all streams")
    inflight_wait_s: float = Field(5.0, gt=0, description="how long a stream waits for in-flight room before UNAVAILABLE")
    produce_timeout_s: float = Field(15.0, gt=0, description="a chunk not durable in Kafka by then fails the stream with UNAVAILABLE")
    retry_after_ms: int = Field(2000, ge=0, description="retry hint sent with UNAVAILABLE")
    drain_grace_s: float = Field(20.0, ge=0, description="on SIGTERM, how long open streams get to finish")
    linger_ms: int = Field(5, ge=0, le=1000, description="producer linger")
    producer_batch_bytes: int = Field(1 << 20, ge=16384)
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus endpoint: loopback unless set, "
                              "e.g. 0.0.0.0 to expose it on every interface")
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="a stream that sends no chunk for this long is ended "
                                         "(DEADLINE_EXCEEDED, reason idle_timeout); must exceed produce_timeout_s")
    max_streams: int = Field(1024, ge=1, description="open StreamDrive calls over all vehicles; one more is refused "
                             "(RESOURCE_EXHAUSTED, reason too_many_streams, retry hint)")
    max_streams_per_vehicle: int = Field(4, ge=1, description="open StreamDrive calls of one vehicle (the agent "
                                         "uploads one drive per stream); one more is refused like past max_streams")
    keepalive_time_s: float = Field(30.0, gt=0, description="the server pings a connection with no traffic this often")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="a connection that does not answer a ping within this "
                                       "is closed")
    min_client_ping_interval_s: float = Field(10.0, gt=0, description="a client that pings more often (twice) is "
                                              "disconnected with GOAWAY ENHANCE_YOUR_CALM")
    max_connection_idle_s: float = Field(300.0, gt=0, description="a connection without a call for this long is closed")
    rejection_logs_per_s: float = Field(5.0, gt=0, description="refusals logged per second after a burst of 20; the "
                                        "others are counted in the next line (metrics count every one)")

    @model_validator(mode="after")
    def _tls_pairs(self) -> "ServerConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mTLS (tls_client_ca) needs tls_cert and tls_key")
        if self.stream_idle_timeout_s <= self.produce_timeout_s:
            raise ValueError("stream_idle_timeout_s must exceed produce_timeout_s: a vehicle waiting for its acks "
                             "sends nothing meanwhile")
        return self


class AgentConfig(_Model):
    server: str = Field("127.0.0.1:50051", description="host:port of the ingest server")
    drives_dir: Path = Field(Path("data/drives"), description="directory of logged drives (see ingest.lake)")
    token_file: Path | None = Field(None, description="JSON vehicle_id -> bearer token the agent presents")
    tls_ca: Path | None = Field(None, description="CA that signed the server certificate; enables TLS")
    tls_cert: Path | None = Field(None, description="vehicle certificate for mTLS")
    tls_key: Path | None = Field(None, description="vehicle private key for mTLS")
    frames_per_chunk: int = Field(250, ge=1, le=100_000, description="frames per DriveChunk (25 s at 10 Hz, ~350 KB with 30 agents)")
    window: int = Field(8, ge=1, le=1024, description="chunks sent ahead of the last ack per stream")
    concurrency: int = Field(16, ge=1, le=4096, description="drives uploaded at once")
    max_attempts: int = Field(12, ge=1, description="attempts per drive before giving up on it")
    backoff_initial_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(10.0, gt=0)
    rpc_timeout_s: float = Field(120.0, gt=0, description="deadline of one StreamDrive call")


class SinkConfig(_Model):
    lake_dir: Path = Field(Path("data/lake"), description="root of the Parquet lake")
    metrics_port: int = Field(9465, ge=0, le=65535, description="Prometheus metrics port of `flywheel sink`; 0 disables")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus endpoint: loopback unless set, "
                              "e.g. 0.0.0.0 to expose it on every interface")
    group_id: str = Field("flywheel-sink", description="consumer group of the sink workers")
    max_rows: int = Field(200_000, ge=1, description="rotate a partition's file at this many rows")
    max_bytes: int = Field(128 << 20, ge=1024, description="rotate at this many buffered record bytes")
    max_age_s: float = Field(10.0, gt=0, description="rotate a buffer this old, so data lands while traffic trickles")
    row_group_rows: int = Field(65_536, ge=1024)
    poll_ms: int = Field(200, ge=1)
    session_timeout_ms: int = Field(6000, ge=1000, description="Tansu joins groups in ~3 s only around 6000")
    max_poll_interval_ms: int = Field(10000, ge=1000)
    max_poll_records: int = Field(500, ge=1)
    compact_target_rows: int = Field(1_000_000, ge=1, description="compaction merges runs of small files up to this many rows")
    stall_after_s: float = Field(30.0, gt=0, description="holding no partition while the topic has records the lake "
                                 "lacks, with no progress, for this long: the sink reports a stall and rejoins with a "
                                 "fresh consumer; as long again: it assigns itself every partition (at least max_age_s "
                                 "plus a session timeout: a healthy member may hold records that long)")
    compression: Literal["lz4", "zstd", "snappy", "none"] = Field(
        "lz4", description="Parquet codec of the files the sink writes: LZ4 costs the sink a fifth less CPU than "
        "ZSTD for files ~13% larger; compaction rewrites them with ZSTD")
