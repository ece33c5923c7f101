"""The collector runtime: one Kafka consumer-group member driving one :class:`DataCollector`.

It owns, once for every sink: batching, decoding, retries with backoff, dead letters,
offset commits, rebalances, metrics and shutdown. The loop is deliberately sequential
(fetch a batch -> hand over -> flush -> dead letters acked -> commit), so at any moment
at most one batch is in flight and a rebalance or a signal never finds half a batch.

Guarantees: an offset is committed only after every record below it was handled and
flushed or its dead letter acknowledged by the broker; retriable failures are retried
forever (with fetching paused) and never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from collectors.config import validate_collector_config
from collectors.control import ControlOutbox
from collectors.delivery import retry_delay_s
from collectors.dlq import DeadLetter, DeadLetterPublisher
from collectors.metrics import CollectorMetrics, serve_metrics
from collectors.registry import resolve_collector
from collectors.reload import CollectorReloader
from collectors.sdk import CollectorError, CollectorServices, DataCollector, RetryLater, hand_over, hand_over_control
from gateway_tap.services import Gateway
from gateway_tap.settings import CollectorDefaults, CollectorSettings, GatewayConfig, group_id_for
from schemas import ControlMessage, EventDecodeError, EventType, control_topic, decode_control, topic_for
from schemas.wire import LazyEvents, validate_event_bytes

log = logging.getLogger("gateway_tap.collectors")

FRESHNESS_SAMPLES = 32
"""Events per type and batch whose freshness is observed (observing all would cost more than decoding)."""

Record: TypeAlias = ConsumerRecord  # type: ignore[type-arg]


class BatchLogger(logging.LoggerAdapter[logging.Logger]):
    """The logger a collector gets: every line names the collector and the current batch."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[collector={extra.get('collector')} batch={extra.get('batch')}] {msg}", kwargs


class ShutdownTimeout(Exception):
    """The batch in hand could not be finished within the shutdown grace period (it stays uncommitted)."""


@dataclass
class _Bucket:
    """The validated events of one type in a batch, with their raw values and records (parallel lists).

    ``events`` builds each pydantic model on first access only: sinks that write the
    raw values (file, Elasticsearch) never pay for models they do not read.
    """

    event_type: EventType
    values: list[bytes] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    events: LazyEvents = field(init=False)

    def __post_init__(self) -> None:
        self.events = LazyEvents(self.event_type, self.values)

    def drop(self, indexes: set[int]) -> None:
        keep = [i for i in range(len(self.values)) if i not in indexes]
        self.values = [self.values[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        self.events = LazyEvents(self.event_type, self.values)


@dataclass
class _ControlBucket:
    """The decoded control messages of a batch with their records (parallel lists)."""

    messages: list[ControlMessage] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)

    def drop(self, ids: set[str]) -> list[tuple[Record, str]]:
        """Remove the messages with these ids; returns their records."""
        keep = [i for i, m in enumerate(self.messages) if m.id not in ids]
        gone = [(self.records[i], self.messages[i].id) for i in range(len(self.messages)) if self.messages[i].id in ids]
        self.messages = [self.messages[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        return gone


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: CollectorRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class CollectorRuntime:
    """Runs ``collector_cls`` as a member of a consumer group until :meth:`request_stop`.

    :param name: the collector NAME (metrics label, DLQ header, default group id).
    :param collector_cls: the :class:`DataCollector` subclass to run.
    :param settings: this collector's section of the config file.
    :param kafka_options: aiokafka client keyword arguments (``KafkaSettings.client_options()``).
    :param topic_prefix: prefix of the event topics.
    :param client_id: Kafka client id.
    :param root: the validated config file the settings came from (None: defaults). The collector gets only
        ``root.collector_defaults()`` (``services.defaults``: e.g. the budget collector's ``budgets`` and
        ``budget_store``); the reloader compares a reloaded file with it.
    :param extras: added to the collector's ``services.extras``, overriding the runtime's own entries:
        ``gateway-tap replay`` passes its own ``group_instance_id`` (the worker identity the file collector
        names its segments after) without joining as a static member.
    :param ranges: bounded mode (``gateway-tap replay``): read only these partitions from ``start`` to ``stop``
        (exclusive) offsets, assigned directly instead of joining the group (commits still go to the group
        id), and return from :meth:`run` once every range is handled. Default None: subscribe and run forever.
    :param on_batch_done: called with the number of records after each batch is committed (progress display).
    :param config_path: the file the settings came from; :meth:`request_reload` (SIGHUP) re-reads it between
        batches (:mod:`collectors.reload`). ``overrides`` are re-applied to every reload (CLI options).
    """

    def __init__(self, name: str, collector_cls: type[DataCollector], settings: CollectorSettings,
                 kafka_options: dict[str, Any], topic_prefix: str = "gateway", client_id: str = "gateway-tap",
                 root: GatewayConfig | None = None, extras: dict[str, Any] | None = None,
                 ranges: Mapping[TopicPartition, tuple[int, int]] | None = None,
                 on_batch_done: Callable[[int], None] | None = None, config_path: str | Path | None = None,
                 overrides: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.root = root
        self.extras = dict(extras or {})
        self.collector_cls = collector_cls
        self.settings = settings
        self.kafka_options = kafka_options
        self.prefix = topic_prefix
        self.client_id = client_id
        self.group_id = group_id_for(name, settings, topic_prefix)
        self.topic_types: dict[str, EventType] = {topic_for(t, topic_prefix): t for t in collector_cls.consumed_types()}
        self.control_topic = control_topic(topic_prefix) if collector_cls.consumes_control() else None
        self.metrics = CollectorMetrics(name)
        self.logger = BatchLogger(log, {"collector": name, "batch": 0})
        self.collector: DataCollector | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.dlq: DeadLetterPublisher | None = None
        self._stopping = asyncio.Event()
        self._stop_deadline = float("inf")
        self._idle = asyncio.Event()
        self._idle.set()
        self._retrying = False
        self._batches = 0
        self._healthy = False
        self.ranges = dict(ranges) if ranges is not None else None
        self._open_ranges: set[TopicPartition] = set()
        self.on_batch_done = on_batch_done
        self.services: CollectorServices | None = None
        self.gateway = Gateway.from_config(root.apps, root.llms) if root is not None else Gateway.from_config((), ())
        self.control = ControlOutbox(f"collector/{settings.group_instance_id or name}", topic_prefix)
        self.reloader = CollectorReloader(self, config_path, overrides) if config_path is not None else None

    # -- control ------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching; the batch in hand is finished, flushed and committed within the grace period."""
        if not self._stopping.is_set():
            log.info("stop requested: finishing the batch in hand (grace %.1fs)", self.settings.shutdown_grace_s)
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_s
            self._stopping.set()

    @property
    def topics(self) -> list[str]:
        """Every topic this collector reads: its event types', plus ``<prefix>.control`` if it handles control."""
        return [*self.topic_types, *([self.control_topic] if self.control_topic else [])]

    def request_reload(self) -> None:
        """Re-read the config file at the next batch boundary (SIGHUP); ignored without a file."""
        if self.reloader is None:
            log.warning("reload requested but collector %s was not started from a config file", self.name)
            return
        self.reloader.request()

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def run(self) -> int:
        """Run until stopped. Returns the exit code: 0 after a clean stop, 1 if the grace period ran out.

        :raises ConfigError: the collector's config does not match its schema.
        """
        config = validate_collector_config(self.name, self.collector_cls, self.settings.config)
        collector = self.collector = self.collector_cls()
        defaults = self.root.collector_defaults() if self.root is not None else CollectorDefaults()
        services = self.services = CollectorServices(name=self.name, logger=self.logger, metrics=self.metrics.registry,
                                     kafka_prefix=self.prefix, defaults=defaults,
                                     extras={"group_instance_id": self.settings.group_instance_id, **self.extras},
                                     gateway=self.gateway, control=self.control.send)
        await collector.initialize(config, services)
        s = self.settings
        consumer = self.consumer = AIOKafkaConsumer(
            **self.kafka_options,
            client_id=f"{self.client_id}-{self.name}",
            group_id=self.group_id,
            group_instance_id=s.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            max_poll_records=s.batch.max_events,
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
        )
        if self.ranges is None:
            consumer.subscribe(self.topics, listener=_Listener(self))
        dlq = self.dlq = DeadLetterPublisher(self.name, {**self.kafka_options,
                                                         "client_id": f"{self.client_id}-{self.name}-dlq"})
        runner = None
        code = 0
        try:
            await dlq.start()
            self.control.attach(dlq.send)  # what the collector sent from initialize goes out now
            await consumer.start()
            if self.ranges is not None:
                self._assign_ranges()
            if s.metrics.port is not None:
                runner = await serve_metrics(self.metrics, s.metrics.host, s.metrics.port, lambda: self.healthy)
            self._healthy = True
            log.info("collector %s consuming %s as group %s (instance %s)", self.name, sorted(self.topics),
                     self.group_id, s.group_instance_id)
            while not self._stopping.is_set() and not self.ranges_done:
                records = await self._fetch_batch()
                if records:
                    await self._process(records)
                elif self.ranges is not None:
                    await self._close_passed_ranges()
                if self.reloader is not None and self.reloader.requested:
                    await self.reloader.apply()  # between batches: the last one is flushed and committed
        except ShutdownTimeout as exc:
            log.error("%s", exc)
            code = 1
        finally:
            self._healthy = False
            with contextlib.suppress(Exception):
                await (self.collector or collector).close()  # a reload may have replaced the instance
            await consumer.stop()  # static members do not leave the group: a restart takes over at once
            with contextlib.suppress(Exception):  # what close() sent; at most a few seconds, it is best effort
                await asyncio.wait_for(self.control.drain(), timeout=5)
            self.control.detach()
            await dlq.stop()
            if runner is not None:
                await runner.cleanup()
        log.info("collector %s stopped (exit %d)", self.name, code)
        return code

    # -- the loop -----------------------------------------------------------------------------------------

    async def _fetch_batch(self) -> list[Record]:
        """Up to max_events / max_bytes, waiting at most max_wait_ms once the first record arrived."""
        assert self.consumer is not None
        b = self.settings.batch
        records: list[Record] = []
        size = 0
        deadline: float | None = None
        while not self._stopping.is_set():
            wait = b.max_wait_ms if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000)
            got = await self.consumer.getmany(timeout_ms=int(wait), max_records=b.max_events - len(records))
            if self.ranges is not None:
                got = self._clip_to_ranges(got)
            for recs in got.values():
                records.extend(recs)
                size += sum(r.serialized_value_size for r in recs)
            if not records:
                return records  # let the caller look at the stop flag
            if deadline is None:
                deadline = time.monotonic() + b.max_wait_ms / 1000
            if len(records) >= b.max_events or size >= b.max_bytes or time.monotonic() >= deadline:
                break
        return records

    async def _process(self, records: list[Record]) -> None:
        """Decode, deliver (with retries), then commit the batch's offsets."""
        self._idle.clear()
        try:
            started = time.monotonic()
            self._batches += 1
            assert self.logger.extra is not None
            self.logger.extra["batch"] = self._batches  # type: ignore[index]
            buckets, dead, control = self._decode(records)
            await self._deliver_with_retry(buckets, dead, control)
            await self._commit(records)
            self._observe(records, buckets, dead, started, control)
            if self.on_batch_done is not None:
                self.on_batch_done(len(records))
        finally:
            self._idle.set()

    def _decode(self, records: list[Record]) -> tuple[dict[EventType, _Bucket], list[DeadLetter], _ControlBucket]:
        buckets: dict[EventType, _Bucket] = {}
        dead: list[DeadLetter] = []
        control = _ControlBucket()
        topic_types = self.topic_types
        for rec in records:
            value = rec.value
            if value is None:  # a tombstone: nothing to decode
                dead.append(DeadLetter(rec, "empty message value", "EventDecodeError"))
                continue
            if rec.topic == self.control_topic:
                try:
                    control.messages.append(decode_control(value))
                    control.records.append(rec)
                except EventDecodeError as exc:
                    dead.append(DeadLetter(rec, str(exc), "EventDecodeError"))
                continue
            event_type = topic_types[rec.topic]
            try:
                validate_event_bytes(value, event_type)
            except EventDecodeError as exc:
                dead.append(DeadLetter(rec, str(exc), "EventDecodeError"))
                continue
            bucket = buckets.get(event_type)
            if bucket is None:
                bucket = buckets[event_type] = _Bucket(event_type)
            bucket.values.append(value)  # bucket.events shares this list
            bucket.records.append(rec)
        return buckets, dead, control

    async def _deliver_with_retry(self, buckets: dict[EventType, _Bucket], dead: list[DeadLetter],
                                  control: _ControlBucket) -> None:
        attempt = 0
        while True:
            try:
                await self._deliver(buckets, dead, control)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.metrics.retries_c.inc()
                delay = retry_delay_s(exc, attempt, self.settings.retry)
                if isinstance(exc, RetryLater | KafkaError):
                    self.logger.warning("retry %d in %.2fs: %s: %s", attempt, delay, type(exc).__name__, exc)
                else:
                    self.logger.warning("retry %d in %.2fs after an unexpected error", attempt, delay, exc_info=exc)
                await self._pause_for(delay)
        if self._retrying:
            self._retrying = False
            assert self.consumer is not None
            self.consumer.resume(*self.consumer.paused())

    async def _deliver(self, buckets: dict[EventType, _Bucket], dead: list[DeadLetter],
                       control: _ControlBucket) -> None:
        """Hand every bucket over, flush, then publish the dead letters and wait for their acks."""
        collector = self.collector
        assert collector is not None
        for event_type, bucket in buckets.items():
            if not bucket.events:
                continue
            try:
                rejected = await hand_over(collector, event_type, bucket.events, bucket.values)
            except RetryLater as exc:
                if exc.pending is not None:  # per event: keep only what is still to retry
                    self._narrow(bucket, exc.pending, exc.rejected, dead)
                raise
            except CollectorError as exc:
                if exc.retriable:
                    raise
                self._reject(bucket, dict.fromkeys((e.id for e in bucket.events), str(exc)), dead,
                             type(exc).__name__)
                continue
            if rejected:
                self._reject(bucket, rejected, dead)
        if control.messages:
            rejected = await hand_over_control(collector, control.messages)
            for rec, message_id in control.drop(set(rejected)):
                dead.append(DeadLetter(rec, rejected[message_id], "BadEvent"))
        try:
            await collector.flush()
        except CollectorError as exc:
            if exc.retriable:
                raise
            # The sink says the batch can never be stored: every event of it is dead-lettered.
            for bucket in buckets.values():
                self._reject(bucket, dict.fromkeys((e.id for e in bucket.events), str(exc)), dead,
                             type(exc).__name__)
            for rec, _ in control.drop({m.id for m in control.messages}):
                dead.append(DeadLetter(rec, str(exc), type(exc).__name__))
        await self.control.drain()  # control messages sent for this batch are acknowledged before it commits
        if dead:
            assert self.dlq is not None
            await self.dlq.publish(dead)

    def _reject(self, bucket: _Bucket, rejected: dict[str, str], dead: list[DeadLetter],
                error_class: str = "BadEvent") -> None:
        """Move the events a collector rejected (by id) from the bucket to the dead letters."""
        indexes = {i for i, event in enumerate(bucket.events) if event.id in rejected}
        for i in sorted(indexes):
            dead.append(DeadLetter(bucket.records[i], rejected[bucket.events[i].id], error_class))
        bucket.drop(indexes)

    def _narrow(self, bucket: _Bucket, pending: frozenset[str], rejected: dict[str, str],
                dead: list[DeadLetter]) -> None:
        """Keep in ``bucket`` only the ``pending`` events (the sink stored the others), dead-lettering ``rejected``."""
        if rejected:
            self._reject(bucket, rejected, dead)
        bucket.drop({i for i, event in enumerate(bucket.events) if event.id not in pending})

    async def _pause_for(self, delay: float) -> None:
        """Wait ``delay`` with fetching paused, still polling so the group does not think we hung."""
        consumer = self.consumer
        assert consumer is not None
        if self._stopping.is_set() and time.monotonic() + delay > self._stop_deadline:
            raise ShutdownTimeout("shutdown grace period ran out while retrying; the batch stays uncommitted "
                                  "and will be handled again after the restart")
        self._retrying = True
        consumer.pause(*consumer.assignment())
        end = time.monotonic() + delay
        while (remaining := end - time.monotonic()) > 0:
            got = await consumer.getmany(timeout_ms=max(1, int(remaining * 1000)))
            for tp, recs in got.items():
                # Partitions assigned by a rebalance during the wait are not paused yet: put them back.
                consumer.seek(tp, recs[0].offset)
                consumer.pause(tp)

    async def _commit(self, records: list[Record]) -> None:
        consumer = self.consumer
        assert consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for rec in records:
            offsets[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        assigned = consumer.assignment()
        owned = {tp: OffsetAndMetadata(off, "") for tp, off in offsets.items() if tp in assigned}
        if len(owned) < len(offsets):
            self.logger.info("not committing %d revoked partition(s); their new owner handles them again",
                             len(offsets) - len(owned))
        if not owned:
            return
        try:
            await consumer.commit(owned)
        except (CommitFailedError, IllegalStateError) as exc:
            # A rebalance took the partitions: the new owner starts from the last commit (duplicates, no loss).
            self.logger.warning("commit failed (%s); the batch will be handled again by the partitions' owner", exc)
            return
        for tp, offset in offsets.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(self.name, tp.topic, str(tp.partition)).set(max(0, highwater - offset))

    def _observe(self, records: list[Record], buckets: dict[EventType, _Bucket], dead: list[DeadLetter],
                 started: float, control: _ControlBucket) -> None:
        m = self.metrics
        now = time.time()
        m.batch_size_c.observe(len(records))
        for event_type, bucket in buckets.items():
            events = bucket.events
            m.handled_by_type[event_type].inc(len(events))
            m.consumed_by_type[event_type].inc(len(events))
            step = max(1, len(events) // FRESHNESS_SAMPLES)
            hist = m.freshness_by_type[event_type]
            for event in events[::step]:
                hist.observe(max(0.0, now - event.emitted_at.timestamp()))
        if control.messages:
            m.handled.labels(self.name, "control").inc(len(control.messages))
            m.consumed.labels(self.name, "control").inc(len(control.messages))
        for letter in dead:
            kind = self.topic_types.get(letter.record.topic, "control")
            m.consumed.labels(self.name, kind).inc()
            m.dead_letter(kind, letter.error_class)
        if dead:
            self.logger.warning("%d event(s) dead-lettered, first: %s[%d]@%d: %s", len(dead),
                                dead[0].record.topic, dead[0].record.partition, dead[0].record.offset,
                                dead[0].reason)
        m.batch_duration_c.observe(time.monotonic() - started)

    # -- bounded ranges (replay) ------------------------------------------------------------------------------

    @property
    def ranges_done(self) -> bool:
        """True in bounded mode once every range was fetched to its stop offset."""
        return self.ranges is not None and not self._open_ranges

    def _assign_ranges(self) -> None:
        assert self.consumer is not None and self.ranges is not None
        todo = {tp: start for tp, (start, stop) in self.ranges.items() if start < stop}
        self._open_ranges = set(todo)
        if todo:
            self.consumer.assign(list(todo))
            for tp, start in todo.items():
                self.consumer.seek(tp, start)

    def _close_range(self, tp: TopicPartition) -> None:
        assert self.consumer is not None
        self._open_ranges.discard(tp)
        self.consumer.pause(tp)

    def _clip_to_ranges(self, got: dict[TopicPartition, list[Record]]) -> dict[TopicPartition, list[Record]]:
        """Drop records at or past their partition's stop offset; a partition that reached it is done."""
        assert self.ranges is not None
        clipped: dict[TopicPartition, list[Record]] = {}
        for tp, recs in got.items():
            stop = self.ranges[tp][1]
            if recs and recs[-1].offset + 1 >= stop:
                self._close_range(tp)
                recs = [r for r in recs if r.offset < stop]
            if recs:
                clipped[tp] = recs
        return clipped

    async def _close_passed_ranges(self) -> None:
        """Close ranges whose position passed the stop offset without a record at stop - 1
        (transaction markers or compaction leave such gaps)."""
        assert self.consumer is not None and self.ranges is not None
        for tp in list(self._open_ranges):
            if await self.consumer.position(tp) >= self.ranges[tp][1]:
                self._close_range(tp)

    # -- rebalance ----------------------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in hand finish and commit (it commits itself), unless it is stuck retrying."""
        if not revoked:
            return
        if self._retrying:
            self.logger.warning("partitions revoked while a batch is retrying; it stays uncommitted")
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.shutdown_grace_s)
        except TimeoutError:
            self.logger.warning("partitions revoked before the batch in hand finished; it stays uncommitted")
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(self.name, tp.topic, str(tp.partition))


def build_runtime(name: str, config_path: str | None, group_id: str | None = None,
                  group_instance_id: str | None = None) -> CollectorRuntime:
    """A runtime for collector NAME from the config file (or defaults), with CLI overrides.

    :raises ConfigFileError: the file is invalid.
    :raises ConfigError: NAME cannot be resolved or its config does not match the schema.
    """
    from gateway_tap.settings import load_config

    config = load_config(config_path) if config_path else GatewayConfig()
    settings = config.collectors.get(name) or CollectorSettings.model_validate({})
    overrides = {k: v for k, v in (("group_id", group_id), ("group_instance_id", group_instance_id)) if v}
    if overrides:
        settings = settings.model_copy(update=overrides)
    collector_cls = resolve_collector(settings.plugin or name)
    # Validate now so a bad config fails before any connection is made.
    validate_collector_config(name, collector_cls, settings.config)
    return CollectorRuntime(name, collector_cls, settings, config.kafka.client_options(),
                            config.kafka.topic_prefix, config.kafka.client_id, root=config,
                            config_path=config_path, overrides=overrides)


def tune_gc() -> None:
    """Make CPython's cycle collector cheap for a decode-heavy worker.

    Decoding allocates about ten container objects per event and events hold no cycles,
    yet with the default thresholds (700, 10, 10) the collector runs every ~70 events and
    keeps re-walking the live batch: ~30% of decode time in measurements. Freezing what
    start-up allocated and raising the thresholds removes most of that.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def run_collector(runtime: CollectorRuntime) -> int:
    """Run ``runtime`` on a fresh event loop with SIGTERM/SIGINT handlers; returns the exit code."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            runtime.request_stop()
            # Hard cap: whatever hangs, the process ends shortly after the grace period.
            loop.call_later(runtime.settings.shutdown_grace_s + 5, task.cancel)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, runtime.request_reload)
        tune_gc()
        try:
            return await runtime.run()
        except asyncio.CancelledError:
            log.error("shutdown grace period exceeded; exiting without a final commit")
            return 1

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main())
