"""The collector runtime: one Kafka consumer-group member driving one :class:`DataCollector`.

It owns, once for every sink: batching, decoding, retries with backoff, dead letters,
offset commits, rebalances, metrics and shutdown. It is a pipeline: while a batch is
being delivered (handed over, flushed, dead letters acknowledged) the next ones are
fetched and decoded, up to ``max_in_flight_batches`` / ``max_in_flight_bytes``; past
either bound the partitions are paused (not buffered) and polled only as often as group
liveness requires. The sink gets at most ``DataCollector.concurrent_batches`` batches at
once (one unless it says otherwise), in fetch order per partition when it declares
``ordered_delivery``.

Guarantees: per partition an offset is committed only when every record below it was
handled and flushed or its dead letter acknowledged by the broker (contiguous offsets,
:mod:`collectors.offsets`), so a crash re-delivers at most what was in flight; retriable
failures are retried forever (:mod:`collectors.delivery`) and never skipped; a revoke
waits for the in-flight batches of the revoked partitions (or abandons them uncommitted).

A collector that ``holds_records`` (writes on its own schedule) gets ``precommit`` instead of
``flush``: a delivered batch stays held (its bytes count towards ``max_in_flight_bytes``, it
no longer counts as a batch in flight) until the sink reports its partitions durable; ticks
call ``precommit`` while records are held and no batch arrives, and force it when the bytes
bound is reached with everything held, on a stop and before a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from collectors.batch import Batch, Bucket, Record, decode_batch
from collectors.config import validate_collector_config
from collectors.control import ControlOutbox
from collectors.delivery import retry_delay_s
from collectors.dlq import DeadLetter, DeadLetterPublisher
from collectors.idle_fetch import wait_out_empty_fetches
from collectors.metrics import CollectorMetrics, serve_metrics
from collectors.offsets import OffsetTracker
from collectors.registry import resolve_collector
from collectors.reload import CollectorReloader
from collectors.sdk import (
    CollectorError,
    CollectorServices,
    DataCollector,
    Positions,
    RetryLater,
    hand_over,
    hand_over_control,
)
from gateway_tap.eventloop import LoopHealth, tune_gc
from gateway_tap.services import Gateway
from gateway_tap.settings import CollectorDefaults, CollectorSettings, GatewayConfig, LoopMonitorSettings, group_id_for
from schemas import EventType, control_topic, topic_for

log = logging.getLogger("gateway_tap.collectors")

FRESHNESS_SAMPLES = 32
"""Events per type and batch whose freshness is observed (observing all would cost more than decoding)."""

PAUSED_POLL_MAX_S = 5.0
"""While paused, poll at least this often (and 4x per ``max_poll_interval_ms``): enough for group liveness."""


class BatchLogger(logging.LoggerAdapter[logging.Logger]):
    """The logger a collector gets: every line names the collector and the current batch."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[collector={extra.get('collector')} batch={extra.get('batch')}] {msg}", kwargs


class ShutdownTimeout(Exception):
    """The batch in hand could not be finished within the shutdown grace period (it stays uncommitted)."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: CollectorRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.runtime.assignments += 1
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
        self._batches = 0
        self._in_flight: dict[int, Batch] = {}
        self._in_flight_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # set whenever a batch leaves the pipeline or stops retrying
        self._retrying = 0  # batches waiting for a retry
        self._paused_by_us = False
        self.assignments = 0  # bumped by every assignment: records fetched before it belong to the old one
        self._offsets = OffsetTracker()
        self._commit_lock = asyncio.Lock()
        self._sink_slots = asyncio.Semaphore(max(1, collector_cls.concurrent_batches))
        self._ordered = collector_cls.ordered_delivery and collector_cls.concurrent_batches > 1
        self._last_done: dict[TopicPartition, asyncio.Event] = {}  # ordered delivery: per partition, the last batch
        self._crashed: BaseException | None = None
        self._holds = collector_cls.holds_records
        self._held: dict[int, Batch] = {}  # delivered, waiting for the sink to report them durable
        self._durable: dict[TopicPartition, int] = {}  # what the sink reported durable, per partition
        self._ticking = 0  # precommit-only batches in flight (0 or 1)
        self._last_precommit = time.monotonic()
        self._commit_timeout_s = max(5.0, settings.session_timeout_ms / 1000)
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
        """Stop fetching; the batches at the sink are finished, flushed and committed within the grace period
        (the ones not handed over yet are dropped uncommitted)."""
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
        dlq = self.dlq = DeadLetterPublisher(self.name, {**self.kafka_options,
                                                         "client_id": f"{self.client_id}-{self.name}-dlq"})
        runner = None
        code = 0
        loop_health = LoopHealth(self.metrics.loop, self.root.loop_monitor if self.root is not None
                                 else LoopMonitorSettings(), (self.name,))
        try:
            await dlq.start()
            self.control.attach(dlq.send)  # what the collector sent from initialize goes out now
            await self._start_consumer()
            if self.ranges is not None:
                self._assign_ranges()
            if s.metrics.port is not None:
                runner = await serve_metrics(self.metrics, s.metrics.host, s.metrics.port, lambda: self.healthy)
            self._healthy = True
            loop_health.start()
            log.info("collector %s consuming %s as group %s (instance %s)", self.name, sorted(self.topics),
                     self.group_id, s.group_instance_id)
            await self._pipeline()
        except ShutdownTimeout as exc:
            log.error("%s", exc)
            code = 1
        finally:
            self._healthy = False
            await loop_health.stop()
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await (self.collector or collector).close()  # a reload may have replaced the instance
            if self.consumer is not None:
                await self.consumer.stop()  # static members do not leave the group: a restart takes over at once
            with contextlib.suppress(Exception):  # what close() sent; at most a few seconds, it is best effort
                await asyncio.wait_for(self.control.drain(), timeout=5)
            self.control.detach()
            await dlq.stop()
            if runner is not None:
                await runner.cleanup()
        log.info("collector %s stopped (exit %d)", self.name, code)
        return code

    # -- the pipeline -------------------------------------------------------------------------------------

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        consumer = AIOKafkaConsumer(
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
        return consumer

    async def _start_consumer(self) -> None:
        """Start a consumer, retrying transient Kafka errors (a coordinator still settling after a restart)."""
        attempt = 0
        while True:
            consumer = self.consumer = self._new_consumer()
            try:
                await consumer.start()
                wait_out_empty_fetches(consumer)  # a broker that answers empty fetches at once must not spin us
                return
            except KafkaError as exc:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                self.consumer = None
                attempt += 1
                if self._stopping.is_set() or attempt > 20:
                    raise
                delay = retry_delay_s(exc, attempt, self.settings.retry)
                log.warning("consumer start failed (attempt %d), retrying in %.2fs: %s: %s", attempt, delay,
                            type(exc).__name__, exc)
                await asyncio.sleep(delay)

    async def _pipeline(self) -> None:
        """Fetch and decode batches while earlier ones are delivered; then drain what is in flight."""
        while not self._stopping.is_set() and not self.ranges_done:
            await self._wait_for_room()
            if self._stopping.is_set():
                break
            records = await self._fetch_batch()
            if records:
                self._launch(records)
            else:
                self._maybe_tick(force=False)
                if self.ranges is not None:
                    await self._close_passed_ranges()
            if self._crashed is not None:
                raise self._crashed
            if self.reloader is not None and self.reloader.requested:
                await self._drain(float("inf"))  # between batches: every one in flight flushed and committed
                await self._write_held(float("inf"))
                await self.reloader.apply()
        if self._stopping.is_set():
            # Batches not yet handed to the sink are dropped (uncommitted: the next owner gets them): a stop
            # waits for what the sink holds only, as fast as before the pipeline.
            for batch in self._in_flight.values():
                if not batch.started:
                    batch.abandoned = True
        deadline = self._stop_deadline if self._stopping.is_set() else float("inf")
        await self._drain(deadline)
        await self._write_held(deadline)
        if self._crashed is not None:
            raise self._crashed

    async def _write_held(self, deadline: float) -> None:
        """A collector that holds records writes all of them (a forced precommit), and what it wrote is committed."""
        if self._holds and self._held and self._crashed is None:
            self._maybe_tick(force=True)
            await self._drain(deadline)

    def _maybe_tick(self, force: bool) -> None:
        """Start a precommit-only batch: forced (write everything held), or when records are held and
        ``precommit_interval_s`` passed since the last precommit. At most one at a time."""
        if not self._holds or self._ticking or not self._held:
            return
        if not force and time.monotonic() - self._last_precommit < self.collector_cls.precommit_interval_s:
            return
        self._launch([], tick=True, force=force)

    def _has_room(self) -> bool:
        s = self.settings
        active = len(self._in_flight) - len(self._held) - self._ticking  # held batches count by their bytes only
        return active < s.max_in_flight_batches and self._in_flight_bytes < s.max_in_flight_bytes and not self._retrying

    async def _wait_for_room(self) -> None:
        """Past a bound (or while a batch is retrying), pause the partitions and poll only for group liveness.

        Pausing at once (rather than only stopping to poll) measured better freshness under a slow sink: the
        fetch after the resume brings the whole backlog at once, so batches are full. Polling at once as well
        was measured worse: aiokafka drops a paused partition's prefetched answer and, under steady
        backpressure, fetched the same records again and again (noida-db answers up to ~90 MiB per fetch).
        """
        consumer = self.consumer
        assert consumer is not None
        if self._has_room():
            self._resume()
            return
        poll_s = min(PAUSED_POLL_MAX_S, self.settings.max_poll_interval_ms / 4000)
        while not self._has_room() and not self._stopping.is_set() and self._crashed is None:
            if self._holds:
                # Past the bound with every batch held by the sink: only a write frees room.
                everything_held = len(self._in_flight) == len(self._held) + self._ticking
                self._maybe_tick(force=everything_held and not self._retrying)
            self._pause_all()
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=poll_s)
            if not self._has_room():
                await self._poll_paused()
        if self._has_room():
            self._resume()

    def _resume(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        if not self._paused_by_us:
            return
        self._paused_by_us = False
        paused = consumer.paused()
        if self.ranges is not None:
            paused = paused & self._open_ranges  # a finished range stays paused
        if paused:
            consumer.resume(*paused)

    def _pause_all(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        assigned = consumer.assignment()
        if self.ranges is not None:
            assigned = assigned & self._open_ranges
        if assigned - consumer.paused():
            # Prefetched data of a paused partition is dropped by aiokafka (refetched on resume): memory stays bounded.
            consumer.pause(*assigned)
        self._paused_by_us = True

    async def _poll_paused(self) -> None:
        """One poll of paused partitions: keeps the member alive; partitions a rebalance assigned meanwhile are
        not paused yet, so whatever they return is put back."""
        consumer = self.consumer
        assert consumer is not None
        got = await consumer.getmany(timeout_ms=0)
        for tp, recs in got.items():
            consumer.seek(tp, recs[0].offset)
        self._pause_all()

    async def _fetch_batch(self) -> list[Record]:
        """Up to max_events / max_bytes, waiting at most max_wait_ms once the first record arrived."""
        assert self.consumer is not None
        b = self.settings.batch
        records: list[Record] = []
        size = 0
        deadline: float | None = None
        while not self._stopping.is_set():
            wait = b.max_wait_ms if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000)
            assignments = self.assignments
            got = await self.consumer.getmany(timeout_ms=int(wait), max_records=b.max_events - len(records))
            if self.assignments != assignments:
                # A rebalance completed during this poll: aiokafka waited for it, so ``got`` is from the new
                # assignment (positions reset to the committed offsets), and what was gathered before is from
                # the old one: drop that, it will be fetched again by whoever owns it now.
                records, size, deadline = [], 0, None
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
            if self._in_flight_bytes + size >= self.settings.max_in_flight_bytes:
                break  # do not hold more than the bound, whatever the broker's fetch returned
        return records

    def _launch(self, records: list[Record], tick: bool = False, force: bool = False) -> None:
        """Decode ``records`` into a batch, track its offsets and start delivering it (``tick``: no records, only
        the sink's precommit)."""
        self._batches += 1
        batch = decode_batch(self._batches, records, self.topic_types, self.control_topic, time.monotonic())
        batch.tick, batch.force = tick, force
        self._ticking += tick
        for tp, end in batch.ends.items():
            self._offsets.add(batch.seq, tp, end)
        self._in_flight[batch.seq] = batch
        self._in_flight_bytes += batch.size_bytes
        after: list[asyncio.Event] = []
        if self._ordered:
            after = [self._last_done[tp] for tp in batch.ends if tp in self._last_done]
            for tp in batch.ends:
                self._last_done[tp] = batch.done
        task = asyncio.create_task(self._run_batch(batch, after))
        self._tasks.add(task)
        task.add_done_callback(self._batch_finished)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and self._crashed is None:
            self._crashed = exc  # the pipeline loop re-raises it: a bug must not leave a batch silently behind

    async def _run_batch(self, batch: Batch, after: list[asyncio.Event]) -> None:
        held = False
        try:
            for event in after:  # ordered delivery: earlier batches of the same partitions first
                await event.wait()
            async with self._sink_slots:
                if batch.abandoned:
                    return
                batch.started = True
                assert self.logger.extra is not None
                self.logger.extra["batch"] = batch.seq  # type: ignore[index]
                started = time.monotonic()
                await self._deliver_with_retry(batch)
            if not batch.tick:
                self._observe(batch, started)
                if self.on_batch_done is not None:
                    self.on_batch_done(len(batch.records))
            held = self._holds and self._hold(batch)
            if held:
                self._room.set()  # no longer counts as a batch in flight (only its bytes do)
            if not held:
                self._offsets.ack(batch.seq, batch.ends)
                batch.acked.set()
            if self._holds:
                self._apply_durable(batch.durable)
            await self._commit_ready()
        finally:
            batch.done.set()
            self._ticking -= batch.tick
            if not held:
                self._leave(batch)

    def _leave(self, batch: Batch) -> None:
        self._in_flight.pop(batch.seq, None)
        self._in_flight_bytes -= batch.size_bytes
        self._room.set()

    # -- collectors that hold records -------------------------------------------------------------------

    def _hold(self, batch: Batch) -> bool:
        """Keep a delivered batch until the sink reports its records durable; False when nothing is to wait for.

        Per partition the batch waits for one past its last record the sink was handed; partitions whose records
        were all dead-lettered (or control messages) are acknowledged at once. Only the offsets are kept."""
        last: dict[tuple[str, int], int] = {}
        for bucket in batch.buckets.values():
            for rec in bucket.records:  # offsets grow within a partition: the last one wins
                last[(rec.topic, rec.partition)] = rec.offset
        need = {TopicPartition(topic, partition): offset + 1 for (topic, partition), offset in last.items()}
        free = [tp for tp in batch.ends if tp not in need]
        if free:
            self._offsets.ack(batch.seq, free)
        batch.records, batch.buckets, batch.dead = [], {}, []
        batch.control.messages, batch.control.records = [], []
        if not need:
            return False
        batch.need = need
        self._held[batch.seq] = batch
        return True

    def _apply_durable(self, durable: dict[tuple[str, int], int]) -> None:
        """Record what the sink reported durable; held batches it covers are acknowledged and leave the pipeline."""
        for (topic, partition), offset in durable.items():
            tp = TopicPartition(topic, partition)
            if offset > self._durable.get(tp, -1):
                self._durable[tp] = offset
        for seq in sorted(self._held):
            batch = self._held[seq]
            done = [tp for tp, need in batch.need.items() if self._durable.get(tp, -1) >= need]
            if done:
                self._offsets.ack(seq, done)
                for tp in done:
                    del batch.need[tp]
            if not batch.need:
                del self._held[seq]
                batch.acked.set()
                self._leave(batch)

    async def _drain(self, deadline: float) -> None:
        """Wait for every batch in flight to be delivered and committed, until ``deadline`` (monotonic).

        :raises ShutdownTimeout: some were not; they stay uncommitted.
        """
        tasks = set(self._tasks)
        if not tasks:
            return
        timeout = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending or any(not t.cancelled() and isinstance(t.exception(), ShutdownTimeout) for t in tasks):
            for task in pending:
                task.cancel()
            raise ShutdownTimeout(f"shutdown grace period ran out with {len(pending) or 1} batch(es) in flight; "
                                  "they stay uncommitted and will be handled again after the restart")

    async def _deliver_with_retry(self, batch: Batch) -> None:
        logger = BatchLogger(log, {"collector": self.name, "batch": batch.seq})  # batches overlap: name this one
        attempt = 0
        while True:
            try:
                await self._deliver(batch)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.metrics.retries_c.inc()
                delay = retry_delay_s(exc, attempt, self.settings.retry)
                if isinstance(exc, RetryLater | KafkaError):
                    logger.warning("retry %d in %.2fs: %s: %s", attempt, delay, type(exc).__name__, exc)
                else:
                    logger.warning("retry %d in %.2fs after an unexpected error", attempt, delay, exc_info=exc)
                if self._stopping.is_set() and time.monotonic() + delay > self._stop_deadline:
                    raise ShutdownTimeout("shutdown grace period ran out while retrying; the batch stays "
                                          "uncommitted and will be handled again after the restart") from exc
                if not batch.retrying:
                    batch.retrying = True
                    self._retrying += 1  # fetching pauses until it went through
                await asyncio.sleep(delay)
        if batch.retrying:
            batch.retrying = False
            self._retrying -= 1
            self._room.set()

    async def _deliver(self, batch: Batch) -> None:
        """Hand every bucket over, flush (or precommit), then publish the dead letters and wait for their acks."""
        collector = self.collector
        assert collector is not None
        buckets, dead, control = batch.buckets, batch.dead, batch.control
        for event_type, bucket in buckets.items():
            if not bucket.events:
                continue
            positions = Positions(bucket.records[0].topic, [r.partition for r in bucket.records],
                                  [r.offset for r in bucket.records])
            try:
                rejected = await hand_over(collector, event_type, bucket.events, bucket.values, positions)
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
        if self._holds:
            # Errors here are retried whatever their class: what is held came from earlier batches too.
            batch.durable = dict(await collector.precommit(batch.force))
            self._last_precommit = time.monotonic()
        else:
            await self._flush(batch)
        await self.control.drain()  # control messages sent for this batch are acknowledged before it commits
        if dead:
            assert self.dlq is not None
            await self.dlq.publish(dead)

    async def _flush(self, batch: Batch) -> None:
        collector = self.collector
        assert collector is not None
        buckets, dead, control = batch.buckets, batch.dead, batch.control
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

    def _reject(self, bucket: Bucket, rejected: dict[str, str], dead: list[DeadLetter],
                error_class: str = "BadEvent") -> None:
        """Move the events a collector rejected (by id) from the bucket to the dead letters."""
        indexes = {i for i, event in enumerate(bucket.events) if event.id in rejected}
        for i in sorted(indexes):
            dead.append(DeadLetter(bucket.records[i], rejected[bucket.events[i].id], error_class))
        bucket.drop(indexes)

    def _narrow(self, bucket: Bucket, pending: frozenset[str], rejected: dict[str, str],
                dead: list[DeadLetter]) -> None:
        """Keep in ``bucket`` only the ``pending`` events (the sink stored the others), dead-lettering ``rejected``."""
        if rejected:
            self._reject(bucket, rejected, dead)
        stored = {i for i, event in enumerate(bucket.events) if event.id not in pending}
        bucket.stored += len(stored)
        bucket.drop(stored)

    async def _commit_ready(self, tps: set[TopicPartition] | None = None) -> None:
        """Commit, per partition, the end of the acknowledged prefix of batches (never past an unacknowledged one)."""
        consumer = self.consumer
        assert consumer is not None
        async with self._commit_lock:  # commits go out in order, each covering everything acknowledged so far
            offsets = self._offsets.committable(tps)
            assigned = consumer.assignment()
            owned = {tp: OffsetAndMetadata(off, "") for tp, off in offsets.items() if tp in assigned}
            if not owned:
                return
            try:
                # aiokafka retries a retriable commit error forever; bounded here so that neither the pipeline
                # nor a revoke (which commits too) can hang on it. The next commit covers these offsets.
                await asyncio.wait_for(consumer.commit(owned), timeout=self._commit_timeout_s)
            except TimeoutError:
                self.logger.warning("commit timed out after %.0fs; retried with the next batch", self._commit_timeout_s)
                return
            except (CommitFailedError, IllegalStateError) as exc:
                # A rebalance took the partitions: the new owner starts from the last commit (duplicates, no loss).
                self.logger.warning("commit failed (%s); the partitions' owner handles those batches again", exc)
                return
            except KafkaError as exc:
                # Transient (coordinator moving): the next commit covers these offsets too.
                self.logger.warning("commit failed (%s: %s); retried with the next batch", type(exc).__name__, exc)
                return
            self._offsets.committed(offsets)
        for tp, offset in offsets.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(self.name, tp.topic, str(tp.partition)).set(max(0, highwater - offset))

    def _observe(self, batch: Batch, started: float) -> None:
        m = self.metrics
        now = time.time()
        m.batch_size_c.observe(len(batch.records))
        for event_type, bucket in batch.buckets.items():
            events = bucket.events
            m.handled_by_type[event_type].inc(len(events) + bucket.stored)
            m.consumed_by_type[event_type].inc(len(events) + bucket.stored)
            step = max(1, len(events) // FRESHNESS_SAMPLES)
            hist = m.freshness_by_type[event_type]
            for event in events[::step]:
                hist.observe(max(0.0, now - event.emitted_at.timestamp()))
        control, dead = batch.control, batch.dead
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
        """Before the partitions move: batches of only revoked partitions not yet at the sink are abandoned, those
        at the sink are waited for (not while retrying), what they acknowledged is committed, the partitions are
        forgotten. Bounded by half the session timeout (and the grace period): a member slow to rejoin is evicted.
        Nothing of a revoked partition is committed after this returns; its new owner redelivers the rest."""
        if not revoked:
            return
        budget_s = min(self.settings.shutdown_grace_s, self.settings.session_timeout_ms / 2000)
        deadline = time.monotonic() + budget_s
        touched = [b for b in self._in_flight.values() if revoked & b.ends.keys() and b.seq not in self._held]
        for b in touched:
            if not b.started and b.ends.keys() <= revoked:
                b.abandoned = True
        waiting = [b for b in touched if b.started and not b.retrying and not b.acked.is_set()]
        self.logger.info("%d partition(s) revoked: waiting for %d batch(es) at the sink", len(revoked), len(waiting))
        if waiting:
            waits = [asyncio.ensure_future(b.acked.wait()) for b in waiting]
            _, pending = await asyncio.wait(waits, timeout=budget_s)
            for w in pending:
                w.cancel()
            if pending:
                self.logger.warning("partitions revoked with %d batch(es) still at the sink; they stay uncommitted "
                                    "and their new owner handles them again", len(pending))
        try:
            await asyncio.wait_for(self._commit_ready(revoked), timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            self.logger.warning("revoke: the final commit did not finish in time; the new owner may redeliver")
        if self._holds:
            await self._release_held(revoked)
        self._offsets.forget(revoked)
        for tp in revoked:
            self._last_done.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(self.name, tp.topic, str(tp.partition))


    async def _release_held(self, revoked: set[TopicPartition]) -> None:
        """Revoked partitions of a collector that holds records: the sink drops what it holds of them (it was not
        committed: the new owner redelivers it) and held batches stop waiting for them."""
        collector = self.collector
        assert collector is not None
        try:
            await collector.release([(tp.topic, tp.partition) for tp in revoked])
        except Exception:
            self.logger.exception("release of revoked partitions failed")
        for tp in revoked:
            self._durable.pop(tp, None)
        for seq in sorted(self._held):
            batch = self._held[seq]
            for tp in revoked & batch.need.keys():
                del batch.need[tp]
            if not batch.need:
                del self._held[seq]
                self._leave(batch)


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
