"""A Kafka client nobody here wrote reads the frames topic of the embedded broker: confluent-kafka (librdkafka, the
library behind kcat and most non-Java clients), with its default settings, decoding each record with plain pyarrow."""

from __future__ import annotations

import time

import confluent_kafka as ck  # the dev extra installs it
import pyarrow as pa

from ingest.contract import frames_to_arrow
from ingest.synth import synthetic_frames
from tests.ingest.test_server import chunk
from tests.ingest_helpers import run, running_server, send_raw


def test_confluent_kafka_reads_the_frames_topic(kafka_config):
    async def upload():
        async with running_server(kafka_config) as (_, port):
            for d in range(3):
                out = await send_raw(port, [chunk(f"drive-{d}", first=0, n=40).SerializeToString(),
                                            chunk(f"drive-{d}", first=40, n=40, final=True).SerializeToString()])
                assert out.acks[-1].committed_seq == 79
    run(upload())

    consumer = ck.Consumer({"bootstrap.servers": kafka_config.bootstrap_servers, "group.id": "foreign-reader",
                            "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(kafka_config.frames_topic, timeout=10).topics[kafka_config.frames_topic]
        consumer.assign([ck.TopicPartition(kafka_config.frames_topic, p, ck.OFFSET_BEGINNING) for p in meta.partitions])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 6 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg)
    finally:
        consumer.close()
    assert len(got) == 6
    for msg in got:
        headers = dict(msg.headers())
        assert headers["flywheel-format"] == b"arrow-ipc"
        batch = pa.ipc.open_stream(msg.value()).read_next_batch()  # nothing of this project needed to read it
        drive, first = msg.key().decode(), int(headers["flywheel-first-seq"])
        assert batch.num_rows == int(headers["flywheel-frames"]) == 40
        expected = frames_to_arrow(synthetic_frames(40, agents=5, seed=first), drive, "veh-1", first)
        assert batch.equals(expected)
