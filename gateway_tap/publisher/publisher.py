"""The tap's event publisher: never blocks a request, never loses an event by default.

Two paths, one order:

- *direct*: :meth:`EventPublisher.publish` appends to a bounded in-memory queue; the
  sender task sends it in groups through one librdkafka producer (:mod:`.kafka`) and
  awaits Kafka's verdict on every message of each group.
- *spooling*: when Kafka is unreachable, a send fails or times out, or the queue is
  full, events go to an overflow list that the spool task writes to the disk spool
  (in a dedicated thread). Once anything is spooled every new event is spooled too
  until the spool is drained, so per-key order holds. The spool task re-probes Kafka
  every ``retry_interval_s`` and drains the spool oldest first, deleting a segment
  only after Kafka acknowledged all of it.

Events that were in flight when a send failed are spooled again: delivery is
at-least-once and sinks dedupe by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import prometheus_client
from confluent_kafka import KafkaException

import schemas
from gateway_tap.publisher.kafka import GroupProducer
from gateway_tap.publisher.spool import AppendResult, Message, ReadBatch, Spool
from gateway_tap.settings import KafkaSettings, PublisherSettings
from schemas.wire import encode_wire, valid_text, wire_type

log = logging.getLogger(__name__)

_OVERFLOW_FACTOR = 10
"""The overflow list waiting for the disk holds at most this many queues' worth of events."""


DROP_REASONS = ("unencodable", "after_stop", "too_large", "spool_backlog", "rejected", "spool_full", "spool_error")
"""Every ``reason`` label of ``gateway_tap_publisher_events_dropped_total``."""


class PublisherMetrics:
    """The publisher's ``gateway_tap_publisher_*`` metrics on one registry."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None) -> None:
        reg = registry if registry is not None else prometheus_client.REGISTRY
        p = "gateway_tap_publisher_"
        self.published = prometheus_client.Counter(p + "events_published", "Events acknowledged by Kafka.",
                                                   ["type"], registry=reg)
        self.spooled = prometheus_client.Counter(p + "events_spooled", "Events written to the disk spool.",
                                                 ["type"], registry=reg)
        self.dropped = prometheus_client.Counter(p + "events_dropped", "Events dropped, by reason.",
                                                 ["type", "reason"], registry=reg)
        self.failures = prometheus_client.Counter(p + "delivery_failures", "Send groups that failed or timed out.",
                                                  registry=reg)
        self.queue_depth = prometheus_client.Gauge(p + "queue_depth_events", "Events in the in-memory queue.",
                                                   registry=reg)
        self.spool_bytes = prometheus_client.Gauge(p + "spool_bytes", "Size of the disk spool.", registry=reg)
        self.spool_pending = prometheus_client.Gauge(p + "spool_pending_events", "Events in the spool not yet sent.",
                                                     registry=reg)
        self.connected = prometheus_client.Gauge(p + "kafka_connected", "1 when Kafka is reachable.", registry=reg)
        # Every series exists from the start at 0, so rate() and alerts see the first spooled or dropped event.
        for kind in (*schemas.EVENT_TYPES, schemas.CONTROL_SUFFIX):
            self.published.labels(kind)
            self.spooled.labels(kind)
            for reason in DROP_REASONS:
                self.dropped.labels(kind, reason)


class EventPublisher:
    """Publishes events to Kafka through a bounded queue, overflowing to a durable disk spool.

    :param kafka: the cluster and topic prefix.
    :param settings: queue, producer and spool settings (``tap.publisher``).
    :param spool_dir: overrides ``settings.spool_dir`` (each tap worker passes its own subfolder).
    :param registry: Prometheus registry for the metrics (default: the global one).
    """

    def __init__(self, kafka: KafkaSettings, settings: PublisherSettings, *, spool_dir: Path | None = None,
                 registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self._kafka = kafka
        self._settings = settings
        self._spool = Spool(Path(spool_dir if spool_dir is not None else settings.spool_dir),
                            segment_bytes=settings.spool_segment_bytes, max_bytes=settings.spool_max_bytes,
                            on_full=settings.on_spool_full, fsync_interval_s=settings.spool_fsync_interval_s)
        self._m = PublisherMetrics(registry)
        self._m.queue_depth.set_function(lambda: len(self._queue))
        self._m.spool_bytes.set_function(lambda: self._spool_bytes)
        self._m.spool_pending.set_function(lambda: self._spool_pending)
        self._m.connected.set_function(lambda: 1 if self._connected else 0)
        self._types: dict[str, str] = {}
        # Per event type: its topic and its message headers (one shared list per type, never mutated).
        self._routes = {kind: (schemas.topic_for(kind, kafka.topic_prefix), schemas.message_headers_for(kind))
                        for kind in schemas.EVENT_TYPES}

        self._queue: deque[Message] = deque()
        self._overflow: list[Message] = []  # waiting to be written to the spool, oldest first
        self._spooling = False  # new events go to the spool (Kafka down, queue overflowed, or spool not empty)
        self._connected = False
        self._spool_ok = True
        self._spool_bytes = 0
        self._spool_pending = 0
        self._spool_segments = 0
        self._inflight: list[Message] = []  # the sender's current group
        self._producer = GroupProducer(kafka, settings)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-tap-spool")  # one thread: spool order
        self._wake_sender = asyncio.Event()
        self._wake_spool = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._writing = False  # the writer has taken a batch off the overflow and not yet counted it
        self._sender_task: asyncio.Task[None] | None = None
        self._spool_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._stop_task: asyncio.Task[None] | None = None
        self._deadline: float | None = None  # set by stop(): no wait goes beyond it
        self._next_probe = 0.0
        self._probes = 0
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Open the spool and connect; Kafka being down only means starting in spooling mode."""
        if self._started:
            return
        self._started = True
        await self._in_spool_thread(self._spool.open)
        self._refresh_spool_stats()
        if self._spool_pending:
            log.info("spool %s holds %d events from an earlier run; they go first", self._spool.directory,
                     self._spool_pending)
            self._enter_spooling()
        await self._probe()
        if not self._connected:
            self._enter_spooling()
        if self._spooling:
            # Published before start(): newer than the spool, so they queue up behind it.
            self._overflow[:0] = list(self._queue)
            self._queue.clear()
        self._sender_task = asyncio.create_task(self._sender_loop(), name="gateway-tap-publisher-sender")
        self._spool_task = asyncio.create_task(self._spool_loop(), name="gateway-tap-publisher-spool")
        self._writer_task = asyncio.create_task(self._writer_loop(), name="gateway-tap-publisher-spool-writer")

    def publish(self, event: schemas.Event) -> None:
        """Queue ``event`` for its topic. Never blocks, never raises."""
        try:
            self.publish_message(schemas.topic_for(event.type, self._kafka.topic_prefix), schemas.encode_event(event),
                                 schemas.message_key(event), schemas.message_headers(event))
        except Exception:  # an unencodable event must not fail the request that produced it
            log.exception("cannot encode %s event %s", event.type, event.id)
            self._drop(event.type, "unencodable")

    def publish_wire(self, event: msgspec.Struct) -> None:
        """Queue a struct from :data:`schemas.wire.WIRE_EVENTS` (the tap's hot path). Never blocks, never raises."""
        kind = wire_type(event)
        app_id: str | None = event.app_id  # type: ignore[attr-defined]
        key = valid_text(app_id).encode() if app_id else None
        try:  # escapes undecodable text and clips what would not fit (only an absurd max_batch_bytes fails)
            value = encode_wire(event, self._settings.max_batch_bytes - (len(key) if key else 0))
        except Exception:  # an unencodable event must not fail the request that produced it
            log.exception("cannot encode %s event %s", kind, getattr(event, "id", "?"))
            self._drop(kind, "unencodable")
            return
        topic, headers = self._routes[kind]
        self.publish_message(topic, value, key, headers)

    def publish_message(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Queue one raw message. Never blocks, never raises."""
        if self._closed:
            self._drop(topic, "after_stop")
            return
        if len(value) + (len(key) if key else 0) > self._settings.max_batch_bytes:
            log.error("event of %d bytes on %s is larger than max_batch_bytes; dropped", len(value), topic)
            self._drop(topic, "too_large")
            return
        msg = Message(topic, value, key, headers, int(time.time() * 1000))
        if not self._spooling and len(self._queue) < self._settings.queue_max_events:
            self._queue.append(msg)
            if not self._wake_sender.is_set():
                self._wake_sender.set()
            return
        if len(self._overflow) >= self._settings.queue_max_events * _OVERFLOW_FACTOR:
            # The disk cannot keep up (or refuses writes): bounded memory wins over the event.
            self._drop(topic, "spool_backlog")
            return
        self._enter_spooling()
        self._overflow.append(msg)
        if not self._wake_writer.is_set():
            self._wake_writer.set()

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - the public interface
        """Stop accepting, send the queue within ``timeout``, spool what is left, close. Safe to call twice."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(timeout))
        await asyncio.shield(self._stop_task)

    @property
    def ready(self) -> bool:
        """Kafka is reachable or the spool is writable."""
        return not self._closed and (self._connected or (self._spool.opened and self._spool_ok))

    def stats(self) -> dict[str, int]:
        return {
            "queue_depth": len(self._queue),
            "overflow_depth": len(self._overflow),
            "spool_bytes": self._spool_bytes,
            "spool_segments": self._spool_segments,
            "spool_pending_events": self._spool_pending,
            "spool_corrupt_segments": self._spool.corrupt_segments,
            "spool_lost_bytes": self._spool.lost_bytes,
            "kafka_connected": int(self._connected),
            "spooling": int(self._spooling),
            "published": self._counts["published"],
            "spooled": self._counts["spooled"],
            "dropped": self._counts["dropped"],
            "delivery_failures": self._counts["failures"],
        }

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ helpers

    def _type(self, topic: str) -> str:
        kind = self._types.get(topic)
        if kind is None:
            prefix = self._kafka.topic_prefix
            kind = schemas.type_for_topic(topic, prefix) or (
                schemas.CONTROL_SUFFIX if topic == schemas.control_topic(prefix) else "other")
            self._types[topic] = kind
        return kind

    def _drop(self, topic_or_type: str, reason: str, n: int = 1) -> None:
        kind = topic_or_type if topic_or_type in schemas.EVENT_TYPES else self._type(topic_or_type)
        self._m.dropped.labels(kind, reason).inc(n)
        self._counts["dropped"] += n

    def _count(self, metric: prometheus_client.Counter, name: str, by_topic: Counter[str]) -> None:
        for topic, n in by_topic.items():
            metric.labels(self._type(topic)).inc(n)
            self._counts[name] += n

    def _enter_spooling(self) -> None:
        if not self._spooling:
            self._spooling = True
            if not self._wake_spool.is_set():
                self._wake_spool.set()

    async def _in_spool_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _refresh_spool_stats(self) -> None:
        # Read from the loop while the spool thread is idle (every call site awaits it first).
        self._spool_bytes = self._spool.size_bytes
        self._spool_pending = self._spool.pending_events
        self._spool_segments = self._spool.segments

    def _wait_budget(self, limit: float) -> float:
        if self._deadline is None:
            return limit
        return max(0.0, min(limit, self._deadline - asyncio.get_running_loop().time()))

    # ------------------------------------------------------------------ Kafka

    async def _probe(self) -> None:
        """Connect (first time) or check the cluster answers metadata; sets ``_connected``."""
        self._next_probe = asyncio.get_running_loop().time() + self._settings.retry_interval_s
        self._probes += 1
        timeout = self._wait_budget(max(self._settings.retry_interval_s, 2.0))
        try:
            await self._producer.probe(timeout)
        except (KafkaException, OSError) as exc:
            if self._connected or self._probes == 1:
                log.warning("Kafka unreachable (%s); spooling events to %s", exc, self._spool.directory)
            self._connected = False
            return
        if not self._connected:
            log.info("Kafka reachable at %s", self._kafka.bootstrap_servers)
        self._connected = True

    async def _send_group(self, messages: Sequence[Message]) -> list[Message]:
        """Send and await Kafka's verdict; returns the messages to retry (failed, timed out or never sent)."""
        if not self._producer.exists or not self._connected:
            return list(messages)
        result = await self._producer.send(messages, self._wait_budget(self._settings.delivery_timeout_s))
        for msg, error in result.rejected:
            log.error("Kafka rejected an event on %s for good (%s); dropped", msg.topic, error)
            self._drop(msg.topic, "rejected")
        self._count(self._m.published, "published", result.acked)
        retry = result.retry
        if retry:
            self._counts["failures"] += 1
            self._m.failures.inc()
            if self._connected:
                log.warning("%d of %d events not acknowledged by Kafka; spooling them",
                            len(retry), len(messages))
            self._connected = False
            # The producer dropped itself (see GroupProducer.send); the next probe starts a fresh one.
            self._next_probe = asyncio.get_running_loop().time() + self._settings.retry_interval_s
        return retry

    # ------------------------------------------------------------------ tasks

    async def _sender_loop(self) -> None:
        """Direct path: queue -> Kafka, group by group."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake_sender.clear()
                if self._spooling:
                    self._wake_spool.set()  # the spool may drain now that the queue is empty
                await self._wake_sender.wait()
                continue
            n = min(len(self._queue), self._settings.send_group_events)
            # If stop() cancels the send, ``_inflight`` stays set and stop() spools it.
            self._inflight = [self._queue.popleft() for _ in range(n)]
            retry = await self._send_group(self._inflight)
            self._inflight = []
            if retry:
                # Older than anything queued or already in the overflow: put them in front.
                self._overflow[:0] = retry + list(self._queue)
                self._queue.clear()
                self._enter_spooling()
                self._wake_writer.set()

    async def _writer_loop(self) -> None:
        """overflow -> disk. Its own task so a slow or hanging Kafka never holds events in memory."""
        while True:
            if self._overflow:
                await self._persist_overflow()
                self._wake_spool.set()
                continue
            if self._closing:
                return
            if self._spool.sync_due():
                await self._in_spool_thread(self._spool.sync)
            self._wake_writer.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_writer.wait(), max(self._settings.spool_fsync_interval_s, 0.05))

    async def _spool_loop(self) -> None:
        """Probe Kafka while it is away, drain the disk in order, go back to direct when it is empty."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            progressed = False
            if self._spooling and not self._connected and loop.time() >= self._next_probe:
                await self._probe()
                progressed = self._connected
            direct_idle = not self._queue and not self._inflight
            if self._spooling and self._connected and direct_idle:
                progressed = await self._drain_step() or progressed
            if (self._spooling and self._connected and direct_idle and not self._overflow and not self._writing
                    and self._spool_pending == 0):
                self._spooling = False
                log.info("spool drained; publishing directly again")
            if progressed:
                continue
            self._wake_spool.clear()
            timeout = self._settings.retry_interval_s
            if self._spooling and not self._connected:
                timeout = max(0.0, self._next_probe - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_spool.wait(), timeout)

    async def _drain_step(self) -> bool:
        """Send the oldest batch of the spool; True when Kafka acknowledged it."""
        if self._closing or self._spool_pending == 0:
            return False
        read: ReadBatch | None = await self._in_spool_thread(self._spool.read_batch, self._settings.send_group_events,
                                                             self._settings.max_batch_bytes * 4)
        if read is None:
            self._refresh_spool_stats()
            return False
        retry = await self._send_group(read.messages)
        if retry:
            return False  # the batch stays in the spool and is read again after the next probe
        await self._in_spool_thread(self._spool.ack, read)
        self._refresh_spool_stats()
        return True

    async def _persist_overflow(self) -> None:
        batch, self._overflow = self._overflow, []
        self._writing = True
        try:
            result: AppendResult = await self._in_spool_thread(self._spool.append, batch)
        except OSError as exc:
            self._writing = False
            if self._spool_ok:
                log.error("cannot write the spool %s: %s; holding %d events in memory", self._spool.directory,
                          exc, len(batch))
            self._spool_ok = False
            self._overflow[:0] = batch  # keep them (bounded by publish_message) and retry later
            self._refresh_spool_stats()
            await asyncio.sleep(self._wait_budget(self._settings.retry_interval_s))
            return
        self._writing = False
        self._spool_ok = True
        self._count(self._m.spooled, "spooled", result.written)
        for topic, n in result.dropped.items():
            self._drop(topic, "spool_full", n)
        self._refresh_spool_stats()

    async def _stop(self, wait_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + wait_s
        self._closing = True
        self._wake_sender.set()
        self._wake_spool.set()
        self._wake_writer.set()
        if self._started:
            # The spool task finishes its current step (bounded by the deadline) and exits; the sender
            # empties the queue to Kafka unless the deadline passes first.
            for task in (self._sender_task, self._spool_task, self._writer_task):
                if task is None:
                    continue
                done, _ = await asyncio.wait([task], timeout=max(0.1, self._deadline - loop.time()))
                if not done:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            # Whatever is still in memory (in flight, queued, overflow) goes to the spool, oldest first.
            self._overflow[:0] = self._inflight + list(self._queue)
            self._inflight = []
            self._queue.clear()
            self._closed = True
            deadline = self._deadline
            if self._overflow:
                self._deadline = None  # the last write must not be cut short
                await self._persist_overflow()
                if self._overflow:
                    log.error("%d events could not be spooled at stop and are lost", len(self._overflow))
                    for msg in self._overflow:
                        self._drop(msg.topic, "spool_error")
                    self._overflow = []
            await self._in_spool_thread(self._spool.close)
            self._refresh_spool_stats()
            await self._producer.close(max(0.5, deadline - loop.time()))
            self._connected = False
        self._closed = True
        self._executor.shutdown(wait=True)
        if self._spool_pending:
            log.info("publisher stopped with %d events in the spool %s; the next start sends them",
                     self._spool_pending, self._spool.directory)

