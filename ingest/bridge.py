"""The ingest server's side of Kafka: the produce bridge into asyncio, the in-flight byte budget and drive progress.

`KafkaBridge` runs kafka-python's threaded producer under the server's event loop (outcomes back on the loop, in
produce order); `ByteBudget` bounds the chunk bytes accepted but not yet durable; `load_progress` rebuilds each
drive's committed seq from the compacted progress topic after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import Gauge

from ingest.config import KafkaConfig, ServerConfig

log = logging.getLogger(__name__)

INFLIGHT = Gauge("flywheel_ingest_inflight_bytes", "chunk bytes accepted but not yet durable in Kafka")


class Unavailable(Exception):
    """Kafka is slow or down; the vehicle should retry after the hint."""


@dataclass
class DriveState:
    vehicle_id: str
    committed_seq: int = -1
    complete: bool = False
    streaming: bool = False


class ByteBudget:
    """Counting semaphore over bytes: at most `limit` bytes held at once across all streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()
        self._waiters = 0

    async def acquire(self, n: int, timeout: float) -> None:
        n = min(n, self.limit)  # a single chunk larger than the budget may still pass alone
        if not self._waiters and self.used + n <= self.limit:
            # the common case, without the condition and timeout machinery (a task and two futures per chunk)
            self.used += n
            INFLIGHT.set(self.used)
            return
        async with self._cond:
            self._waiters += 1
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: self.used + n <= self.limit)
            except TimeoutError:
                raise Unavailable(f"ingest is at its in-flight limit ({self.limit} bytes) for {timeout:.1f}s; "
                                  "Kafka is slow or unavailable") from None
            finally:
                self._waiters -= 1
            self.used += n
            INFLIGHT.set(self.used)

    async def release(self, n: int) -> None:
        self.used -= min(n, self.limit)
        INFLIGHT.set(self.used)
        if self._waiters:
            async with self._cond:
                self._cond.notify_all()


class KafkaBridge:
    """kafka-python's threaded producer bridged into asyncio futures, order preserved."""

    def __init__(self, kafka: KafkaConfig, cfg: ServerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.kafka = kafka
        self.loop = loop
        self.producer = KafkaProducer(
            **kafka.client_options(), acks="all", enable_idempotence=True, linger_ms=cfg.linger_ms,
            batch_size=cfg.producer_batch_bytes, max_request_size=cfg.max_chunk_bytes + 4096,
            max_block_ms=int(cfg.produce_timeout_s * 1000),
            request_timeout_ms=int(cfg.produce_timeout_s * 1000),
            delivery_timeout_ms=int(cfg.produce_timeout_s * 1000) + 1000,
        )
        # send() blocks only while a topic's metadata is unknown: those sends go through one thread (in order) and
        # everything else is sent inline once nothing is queued there, so the produce order is the send order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="produce")
        self._warm: set[str] = set()
        self._backlog = 0
        # Outcomes arrive on the producer's thread; they are queued and handed to the loop by one wake-up per batch
        # of them (call_soon_threadsafe writes to the loop's self-pipe: one syscall per call), in arrival order.
        self._outcomes: deque = deque()
        self._outcomes_lock = threading.Lock()

    def warm(self, topics: list[str]) -> None:
        """Fetch the topics' metadata (blocking); afterwards send() to them never blocks the event loop."""
        for topic in topics:
            try:
                self.producer.partitions_for(topic)
                self._warm.add(topic)
            except Exception as exc:  # Kafka down at start: those sends go through the thread until it answers
                log.warning("no metadata for %s yet (%r); producing through a thread until there is", topic, exc)

    def send(self, topic: str, key: bytes, value: bytes, on_done, headers=None) -> asyncio.Future:
        """Produce; the returned future resolves with the record metadata once Kafka has it durably (acks=all).

        `on_done(metadata_or_exception)` runs on the event loop before the future resolves, in produce order.
        """
        fut = self.loop.create_future()
        # a stream torn down early stops awaiting; the outcome is still logged by on_done
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

        def settle(result, exc) -> None:
            on_done(exc if exc is not None else result)
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        def submit() -> None:
            try:
                f = self.producer.send(topic, key=key, value=value, headers=headers)
            except Exception as exc:  # KafkaTimeoutError when metadata is unavailable
                self._hand_over(settle, None, exc)
                return
            f.add_callback(lambda md: self._hand_over(settle, md, None))
            f.add_errback(lambda e: self._hand_over(settle, None, e))

        if topic in self._warm and not self._backlog:
            submit()  # appends to the accumulator: no I/O, no blocking once the topic's partitions are known
        else:
            # metadata may block: off the loop, and one thread keeps the order of everything sent this way
            self._backlog += 1
            self._executor.submit(self._run_then_warm, submit, topic)
        return fut

    def _hand_over(self, settle, result, exc) -> None:
        """From any thread: run `settle(result, exc)` on the loop, after every outcome handed over before it."""
        with self._outcomes_lock:
            self._outcomes.append((settle, result, exc))
            first = len(self._outcomes) == 1
        if first:
            self.loop.call_soon_threadsafe(self._settle_outcomes)

    def _settle_outcomes(self) -> None:
        while True:
            with self._outcomes_lock:
                if not self._outcomes:
                    return
                settle, result, exc = self._outcomes.popleft()
            settle(result, exc)

    def _run_then_warm(self, submit, topic: str) -> None:
        try:
            submit()
            if self.producer.partitions_for(topic):
                self._warm.add(topic)
        except Exception:
            pass
        finally:
            self.loop.call_soon_threadsafe(self._drained)

    def _drained(self) -> None:
        self._backlog -= 1

    def send_nowait(self, topic: str, key: bytes, value: bytes) -> None:
        self.send(topic, key, value, lambda _: None)

    def close(self, timeout: float = 10.0) -> None:
        self._executor.shutdown(wait=True)
        try:
            self.producer.flush(timeout)
        finally:
            self.producer.close(timeout)


def load_progress(kafka: KafkaConfig, timeout_s: float = 10.0) -> dict[str, DriveState]:
    """Rebuild drive progress from the compacted progress topic (the server may have restarted)."""
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False, consumer_timeout_ms=1000)
    states: dict[str, DriveState] = {}
    try:
        parts = consumer.partitions_for_topic(kafka.progress_topic) or set()
        tps = [TopicPartition(kafka.progress_topic, p) for p in parts]
        if not tps:
            return states
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    try:
                        doc = json.loads(r.value)
                        st = states.setdefault(r.key.decode(), DriveState(doc["vehicle_id"]))
                        st.committed_seq = max(st.committed_seq, int(doc["committed_seq"]))
                        st.complete = st.complete or bool(doc.get("complete"))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        log.warning("ignoring malformed progress record at %s:%d", r.topic, r.offset)
    finally:
        consumer.close()
    return states
