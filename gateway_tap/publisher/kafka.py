"""The publisher's Kafka half: one librdkafka producer (confluent-kafka) driven from asyncio.

The event loop only calls ``produce()``, which copies the message into librdkafka's queue and
returns: batching, compression, the protocol and the I/O run in librdkafka's own threads. One
thread of ours (``gateway-tap-kafka``) does everything that waits: creating and probing the
producer, waiting for each send group's verdict, purging and destroying a producer. Its results come
back to the loop once per group (``run_in_executor``: one ``call_soon_threadsafe``), not once per
message.

Acknowledgements: ``delivery.report.only.error`` makes librdkafka report failed messages only,
so a successful message costs no Python callback at all. A group knows that every one of its
messages was acknowledged (acks=all) because nothing is outstanding any more (``len(producer) == 0``:
every message is either acknowledged or has its error report served, on the Kafka thread) and
no error report named it. Groups are sent one at a time, so "nothing outstanding" is about
this group alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer

from gateway_tap.publisher.spool import Message
from gateway_tap.settings import KafkaSettings, PublisherSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

REJECTED_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_EXCEPTION})
"""Kafka will refuse these every time (message too large, invalid topic): retrying would wedge the spool
behind them. Every other error (topic missing, not enough replicas, timeouts, a fatal producer) is retried
through the spool."""

_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""Kafka's topic names: librdkafka refuses any other name as an unknown topic, which would be retried forever."""
_PURGE_WAIT_S = 1.0
"""After purging a timed-out group, how long to wait for librdkafka to report the purged messages."""
_QUEUE_FULL_WAIT_S = 0.05


class SendResult(NamedTuple):
    """What became of a send group."""

    acked: Counter[str]
    """Messages acknowledged by Kafka, by topic."""
    rejected: list[tuple[Message, KafkaError]]
    """Messages Kafka refuses for good (:data:`REJECTED_CODES`)."""
    retry: list[Message]
    """Messages not known to be acknowledged (failed, timed out or never sent), in group order."""


class _ErrorReports:
    """The delivery callback of one group: with ``delivery.report.only.error`` it sees failures only."""

    __slots__ = ("reports",)

    def __init__(self) -> None:
        self.reports: list[tuple[KafkaError, str, bytes | None, bytes | None]] = []

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:  # runs in the Kafka thread, inside flush()
            self.reports.append((err, msg.topic(), msg.key(), msg.value()))


def librdkafka_config(kafka: KafkaSettings, settings: PublisherSettings) -> dict[str, Any]:
    """The producer's librdkafka configuration; secrets are read from the environment here."""
    s = settings
    delivery_ms = max(1, int(s.delivery_timeout_s * 1000))
    max_request_bytes = max(s.max_batch_bytes, 1_048_576)
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol,
        "client.id": f"{kafka.client_id}-publisher",
        "enable.idempotence": s.enable_idempotence,
        "acks": str(s.acks),
        "compression.type": s.compression,
        "linger.ms": s.linger_ms,
        "batch.size": min(s.max_batch_bytes, max_request_bytes),
        "message.max.bytes": max_request_bytes,
        # A message librdkafka could not deliver within delivery_timeout_s fails (and is spooled).
        "message.timeout.ms": delivery_ms,
        "request.timeout.ms": max(1, min(kafka.request_timeout_ms, delivery_ms)),
        "delivery.report.only.error": True,
        # The Java client's (and aiokafka's) partitioner: murmur2 of the key, so a key stays on its partition
        # whichever client wrote it; librdkafka's own default hashes with CRC32.
        "partitioner": "murmur2_random",
        # Back within a probe interval once the broker returns (librdkafka's default backs off up to 10 s).
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": max(100, int(s.retry_interval_s * 1000)),
        "logger": logging.getLogger("gateway_tap.publisher.librdkafka"),
    }
    if kafka.sasl_mechanism:
        config["sasl.mechanism"] = kafka.sasl_mechanism
        config["sasl.username"] = os.environ.get(kafka.sasl_username_env or "", "")
        config["sasl.password"] = os.environ.get(kafka.sasl_password_env or "", "")
    if kafka.ssl_cafile:
        config["ssl.ca.location"] = kafka.ssl_cafile
    return config


class GroupProducer:
    """Sends groups of messages through one librdkafka producer and reports what became of each message.

    Not a general producer: one group at a time (a lock holds the next one back), each awaited in full.
    A group that fails in any way drops the producer; :meth:`probe` builds a fresh one.
    """

    def __init__(self, kafka: KafkaSettings, settings: PublisherSettings) -> None:
        self._config = librdkafka_config(kafka, settings)
        self._producer: Producer | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="gateway-tap-kafka")
        self._lock = asyncio.Lock()
        # How often the Kafka thread looks for the group's verdict: acknowledgements raise no event to wake it.
        self._poll_s = min(max(settings.linger_ms / 1000, 0.001), 0.01)

    @property
    def exists(self) -> bool:
        return self._producer is not None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def probe(self, timeout_s: float) -> None:
        """Create the producer if needed and fetch the cluster's metadata.

        :raises KafkaException: the cluster did not answer within ``timeout_s``.
        """
        if self._producer is None:
            self._producer = await self._in_thread(Producer, self._config)
        await self._in_thread(_probe, self._producer, max(0.01, timeout_s))

    async def send(self, messages: Sequence[Message], timeout_s: float) -> SendResult:
        """Produce ``messages`` and wait up to ``timeout_s`` for Kafka's verdict on each of them.

        On any failure the producer is dropped (its unacknowledged messages are purged first): an
        idempotent producer whose batches timed out keeps retrying them, and one whose broker lost its
        sequence state (a broker restart) fails every later send.
        """
        async with self._lock:
            producer = self._producer
            if producer is None:
                return SendResult(Counter(), [], list(messages))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            reports = _ErrorReports()
            rejected: list[tuple[Message, KafkaError]] = []
            produced: list[Message] = []
            unsent: list[Message] = []
            produce = producer.produce
            i, n = 0, len(messages)
            while i < n:
                msg = messages[i]
                try:
                    produce(msg.topic, msg.value, msg.key, on_delivery=reports, timestamp=msg.timestamp_ms,
                            headers=msg.headers)  # type: ignore[arg-type]  # list is invariant: bytes values fit
                except BufferError:
                    # librdkafka's queue is full: wait for room (bounded by the deadline) rather than fail.
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        unsent = list(messages[i:])
                        break
                    await self._in_thread(producer.flush, min(_QUEUE_FULL_WAIT_S, remaining))
                    continue
                except KafkaException as exc:
                    error: KafkaError = exc.args[0]
                    if error.code() in REJECTED_CODES or (
                            error.code() == KafkaError._UNKNOWN_TOPIC and not _LEGAL_TOPIC.fullmatch(msg.topic)):
                        rejected.append((msg, error))
                    else:
                        log.warning("send to Kafka failed after %d of %d events: %s", i, n, error)
                        unsent = list(messages[i:])
                        break
                else:
                    produced.append(msg)
                i += 1
            del produce
            abandon = threading.Event()
            try:
                outstanding = await self._in_thread(_await_delivery, producer, max(0.0, deadline - loop.time()),
                                                    self._poll_s, abandon)
            except asyncio.CancelledError:
                # stop() gave up on this group (it spools it): the Kafka thread must not go on waiting for
                # it, or closing the producer would wait behind it.
                abandon.set()
                raise
            result = _verdict(produced, reports.reports, outstanding, rejected, unsent)
            if result.retry:
                self._producer = None
                holder = [producer]
                del producer
                await self._in_thread(_destroy, holder, 0.0)
            return result

    async def close(self, wait_s: float) -> None:
        """Deliver what is outstanding within ``wait_s``, destroy the producer, end the thread."""
        async with self._lock:
            if self._producer is not None:
                holder = [self._producer]
                self._producer = None
                await self._in_thread(_destroy, holder, wait_s)
            else:
                await self._in_thread(_idle)  # whatever a cancelled caller left running ends first
        self._thread.shutdown(wait=True)  # idle by now: joining does not block the loop


def _idle() -> None:
    pass


def _probe(producer: Producer, timeout_s: float) -> None:
    """(Kafka thread) Serve what librdkafka queued for us (its log lines: nothing else polls while Kafka is
    away), then ask for the cluster's metadata."""
    producer.poll(0)
    producer.list_topics(None, timeout_s)


def _await_delivery(producer: Producer, timeout_s: float, poll_s: float, abandon: threading.Event) -> int:
    """(Kafka thread) Wait for every message's verdict; on timeout (or ``abandon``) purge the rest. Returns how
    many are unknown.

    Polls rather than ``flush()``: flush makes librdkafka send at once, ignoring ``linger.ms``, and small
    groups then go out as many tiny (separately compressed) batches, which doubled the CPU per message.
    ``len(producer)`` counts the messages without a verdict and the error reports not yet served.
    """
    deadline = time.monotonic() + timeout_s
    while ((outstanding := len(producer)) and (remaining := deadline - time.monotonic()) > 0
           and not abandon.is_set()):
        producer.poll(min(poll_s, remaining))
    if outstanding:
        # Timed out (a hung or lost broker): take back what librdkafka still holds. The purged
        # messages come back as error reports, and every message then has a verdict.
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        outstanding = producer.flush(0 if abandon.is_set() else _PURGE_WAIT_S)
    return outstanding


def _destroy(holder: list[Producer], wait_s: float) -> None:
    """(Kafka thread) Deliver within ``wait_s``, purge the rest, and drop the last reference here, so that
    librdkafka's teardown (joining its threads) never runs on the event loop."""
    producer = holder.pop()
    try:
        if wait_s > 0:
            producer.flush(wait_s)
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(min(_PURGE_WAIT_S, max(wait_s, 0.1)))
    except Exception:  # a producer in a fatal state: it is being dropped anyway
        log.debug("purging a dropped Kafka producer failed", exc_info=True)
    del producer


def _verdict(produced: list[Message], reports: list[tuple[KafkaError, str, bytes | None, bytes | None]],
             outstanding: int, rejected: list[tuple[Message, KafkaError]], unsent: list[Message]) -> SendResult:
    """Which produced messages were acknowledged, refused for good, or must be retried."""
    if not reports and not outstanding and not unsent:
        acked: Counter[str] = Counter()
        for msg in produced:
            acked[msg.topic] += 1
        return SendResult(acked, rejected, [])
    if outstanding:
        # Some message still has no verdict: none of them is known to be acknowledged.
        return SendResult(Counter(), rejected, produced + unsent)
    # Every message has a verdict: the reported ones failed, the others were acknowledged.
    positions: defaultdict[tuple[str, bytes | None, bytes | None], deque[int]] = defaultdict(deque)
    for index, msg in enumerate(produced):
        positions[(msg.topic, msg.key, msg.value)].append(index)
    failed: dict[int, KafkaError] = {}
    for reported, topic, key, value in reports:
        queue = positions.get((topic, key, value))
        if not queue:
            # A report we cannot place (never expected): treat the whole group as unknown.
            log.error("Kafka reported %s for a message not in the group; retrying the group", reported)
            return SendResult(Counter(), rejected, produced + unsent)
        failed[queue.popleft()] = reported
    acked = Counter()
    retry: list[Message] = []
    first_error: KafkaError | None = None
    for index, msg in enumerate(produced):
        error = failed.get(index)
        if error is None:
            acked[msg.topic] += 1
        elif error.code() in REJECTED_CODES:
            rejected.append((msg, error))
        else:
            first_error = first_error or error
            retry.append(msg)
    if first_error is not None:
        log.warning("Kafka did not take %d of %d events: %s", len(retry), len(produced), first_error)
    return SendResult(acked, rejected, retry + unsent)
