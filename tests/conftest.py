"""Shared fixtures: a real Tansu broker per test (it starts in ~0.1 s), topics created, and a temporary data dir."""

from __future__ import annotations

import uuid

import pytest

from ingest.broker import EmbeddedBroker, ensure_topics
from ingest.config import KafkaConfig


@pytest.fixture
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def kafka_config(broker) -> KafkaConfig:
    """Kafka settings pointing at the test broker, with its topics created (3 partitions)."""
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, partitions=3)
    ensure_topics(cfg)
    return cfg


@pytest.fixture
def group_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"
