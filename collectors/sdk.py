"""The collector SDK: what a plugin author subclasses to export events somewhere.

Lifecycle (driven by the runtime, like Kafka Connect's SinkTask):

1. the config is validated against :attr:`DataCollector.Config` (a pydantic model), or else
   against :attr:`DataCollector.config_schema` (JSON Schema);
2. :meth:`DataCollector.initialize` is called once with the config and services;
3. per batch, the batch handler of each event type is awaited
   (:meth:`handle_proxy_log_batch`, ...), then :meth:`handle_control_batch` for the
   plugins' control messages (topic ``<prefix>.control``), then :meth:`flush`;
   only after ``flush`` returns are the batch's offsets committed;
4. :meth:`close` on shutdown.

On SIGHUP the runtime re-reads the config file between batches (:mod:`collectors.reload`): a changed
``config`` is passed to ``async def on_config_change(self, config)`` when the collector defines it,
else the collector is closed and a fresh instance initialised with the new config.

Delivery is at-least-once: a batch may be handed over again after a crash or a
rebalance, so sinks must be idempotent by ``event.id``.

Errors a handler raises decide what the runtime does:

- :class:`RetryLater`: a transient problem (sink down, timeout, 429). The runtime
  retries the batch with backoff (``collectors.<NAME>.retry``); nothing is skipped.
  With ``pending=ids`` only those events are retried (the others of the call are stored).
- :class:`BadEvent` (from a per-event handler) or :class:`BadEvents` (from a batch
  handler): those events can never be handled. They go to the dead-letter topic
  with the reason and the rest of the batch counts as handled.
- another :class:`CollectorError` whose ``retriable`` is False: every event of that call
  goes to the dead-letter topic.
- anything else: treated as retriable (with a logged traceback); the runtime never
  commits past an event that was not handled.

Sinks only classify failures; the runtime alone decides backoff and dead letters
(:mod:`collectors.delivery`): a sink never sleeps and retries on its own.

Where each event came from (topic, partition, offset) reaches :meth:`DataCollector.handle_records`.
A sink that writes on its own schedule rather than per batch (objects rolled by size or time,
like Kafka Connect's S3 sink) sets :attr:`DataCollector.holds_records`: the runtime then commits
only what :meth:`DataCollector.precommit` reports durable (Kafka Connect's ``preCommit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from pydantic import BaseModel

from gateway_tap.services import Gateway, GatewayServices, KeyValueStore, MemoryKV
from gateway_tap.settings import CollectorDefaults
from schemas import Analytics, BudgetUsage, ControlMessage, Event, EventType, ProxyLog


class CollectorError(Exception):
    """Base of the errors a collector raises. ``retriable`` tells the runtime what to do."""

    retriable: ClassVar[bool] = True


class RetryLater(CollectorError):
    """Transient failure: retry later. ``retry_after`` (seconds) is a hint (a floor of the backoff).

    :param pending: the ids of the events still to retry, when the sink knows per event
        (e.g. bulk items answered 429); every other event of the call is stored for good and
        is not handed over again. None: the whole batch is retried.
    :param rejected: events of the call that can never be stored (id -> reason), dead-lettered.
    """

    retriable = True

    def __init__(self, reason: str, retry_after: float | None = None, *, pending: Collection[str] | None = None,
                 rejected: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.pending = frozenset(pending) if pending is not None else None
        self.rejected = dict(rejected or {})


class BadEvent(CollectorError):
    """This event can never be handled (raise from a per-event handler)."""

    retriable = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadEvents(CollectorError):
    """Some events of a batch can never be handled; every other event of the batch was.

    :param rejected: event id -> reason.
    """

    retriable = False

    def __init__(self, rejected: Mapping[str, str]) -> None:
        super().__init__(f"{len(rejected)} bad event(s)")
        self.rejected = dict(rejected)


Partition: TypeAlias = tuple[str, int]
"""A Kafka topic partition, ``(topic, partition)``."""


@dataclass(frozen=True, slots=True)
class Positions:
    """Where the events of one hand-over came from: their topic, and per event (parallel to the events) the
    partition and the offset. Offsets only grow within a partition of one hand-over."""

    topic: str
    partitions: Sequence[int]
    offsets: Sequence[int]

    def __len__(self) -> int:
        return len(self.offsets)

    def take(self, indexes: Iterable[int]) -> Positions:
        """The positions of the events at ``indexes``."""
        picked = list(indexes)
        return Positions(self.topic, [self.partitions[i] for i in picked], [self.offsets[i] for i in picked])


class ConfigError(ValueError):
    """The collector's configuration is invalid; the message names the key path."""


ControlSink = Callable[[str, str, Mapping[str, Any]], str]
"""``(collector, kind, payload) -> message id``: how :meth:`CollectorServices.send_to_control` reaches Kafka."""


@dataclass
class CollectorServices:
    """What the runtime hands a collector at :meth:`DataCollector.initialize`: the same shape as a tap plugin's
    services where it makes sense (``kv``, ``logger``, ``gateway``, ``send_to_control``).

    :param name: the collector's name (as given to ``gateway-tap collect``).
    :param logger: a logger bound to the collector.
    :param metrics: a prometheus registry the collector may register its own metrics on.
    :param kafka_prefix: topic prefix in use.
    :param defaults: the root sections of the config file a collector may fall back on (``budgets``,
        ``budget_store``); empty defaults when the runtime was not started from a file.
    :param extras: runtime-specific services (``group_instance_id``: the worker's static membership id).
    :param gateway: lookups in the config file in force (apps, LLMs, prices), as a plugin's
        ``services.gateway`` (``budget_status`` answers ``None``); a reload of the file updates them.
    :param kv: a key-value store of this collector's own, in this worker process (kept across reloads).
    :param control: where :meth:`send_to_control` goes (the runtime's acknowledged producer).
    """

    name: str
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    metrics: Any = None
    kafka_prefix: str = "gateway"
    defaults: CollectorDefaults = field(default_factory=CollectorDefaults)
    extras: dict[str, Any] = field(default_factory=dict)
    gateway: GatewayServices = field(default_factory=lambda: Gateway.from_config((), ()))
    kv: KeyValueStore = field(default_factory=lambda: MemoryKV({}, "collector"))
    control: ControlSink | None = None

    def send_to_control(self, kind: str, payload: Mapping[str, Any]) -> str:
        """Send ``payload`` (a JSON object) to the control plane: topic ``<prefix>.control``, ``plugin`` = this
        collector's name, ``gateway_id`` = ``collector/<instance>``. Never blocks; returns the message id.

        A message sent while a batch is handled is acknowledged by Kafka before that batch is committed;
        when it cannot be, the batch is retried (so a reader may see a message twice; ``id`` tells).

        :raises TypeError: ``payload`` is not JSON-serialisable.
        :raises OverflowError: too many messages are waiting for Kafka.
        :raises RuntimeError: the collector runs without a control channel.
        """
        if self.control is None:
            raise RuntimeError("no control channel: send_to_control works inside a collector runtime or a "
                               "CollectorHarness")
        return self.control(self.name, kind, payload)


class DataCollector:
    """Base class for collectors. Override any subset of the handlers.

    :attr:`event_types` declares what the collector consumes; the runtime
    subscribes only to those topics. When it is left empty it is derived from
    which handlers the subclass overrides.
    """

    event_types: ClassVar[tuple[EventType, ...]] = ()
    concurrent_batches: ClassVar[int] = 1
    """How many batches the runtime may hand over at once (handlers + ``flush`` of different batches
    overlapping). Above 1 only for a sink whose handlers store each batch on their own (``flush`` a no-op or
    safe to overlap), like the ``elasticsearch`` collector."""
    ordered_delivery: ClassVar[bool] = True
    """With ``concurrent_batches`` above 1: batches sharing a partition are still delivered one after the
    other, in offset order. False when order does not matter (idempotent upserts by id)."""
    holds_records: ClassVar[bool] = False
    """True: the collector keeps what it was handed after the batch (it writes on its own schedule, e.g. objects
    rolled by size or time) and the runtime commits only what :meth:`precommit` reports durable, instead of
    everything once :meth:`flush` returns. Such a collector keeps ``concurrent_batches = 1``."""
    precommit_interval_s: ClassVar[float] = 1.0
    """With :attr:`holds_records`: while records are held, :meth:`precommit` is called at least this often, also
    when no batch arrives (time-based rolling)."""
    Config: ClassVar[type[BaseModel] | None] = None
    """This collector's config as a pydantic model (preferred). When set, ``collectors.<NAME>.config`` is
    validated with it (defaults filled in) and :attr:`config_schema` is derived from it."""
    config_schema: ClassVar[dict[str, Any]] = {"type": "object"}
    """JSON Schema (draft 2020-12) of this collector's config; validated before initialize when there is no
    :attr:`Config`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.Config is not None and "config_schema" not in cls.__dict__:
            cls.config_schema = cls.Config.model_json_schema()

    config: dict[str, Any]
    services: CollectorServices

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        """Open connections, create files or tables. Called once, after config validation."""
        self.config = config
        self.services = services

    # Per-event handlers, as in the seed's DataCollector.
    async def handle_proxy_log(self, event: ProxyLog) -> None:
        raise NotImplementedError

    async def handle_analytics(self, event: Analytics) -> None:
        raise NotImplementedError

    async def handle_budget_usage(self, event: BudgetUsage) -> None:
        raise NotImplementedError

    # Batch handlers: default to looping over the per-event handler. Sinks override them for throughput.
    async def handle_proxy_log_batch(self, events: Sequence[ProxyLog]) -> None:
        await _loop(self.handle_proxy_log, events)

    async def handle_analytics_batch(self, events: Sequence[Analytics]) -> None:
        await _loop(self.handle_analytics, events)

    async def handle_budget_usage_batch(self, events: Sequence[BudgetUsage]) -> None:
        await _loop(self.handle_budget_usage, events)

    # Edge-to-control messages (``services.send_to_control`` in a tap's plugin). Overriding either handler
    # subscribes the collector to ``<prefix>.control``. Reject a message with BadEvent / BadEvents by its id.
    async def handle_control(self, message: ControlMessage) -> None:
        raise NotImplementedError

    async def handle_control_batch(self, messages: Sequence[ControlMessage]) -> None:
        await _loop(self.handle_control, messages)

    async def flush(self) -> None:
        """Make everything handed over so far durable. Offsets are committed after this returns.

        Not called on a collector that :attr:`holds_records` (its :meth:`precommit` is)."""

    async def precommit(self, force: bool) -> Mapping[Partition, int]:
        """(:attr:`holds_records` collectors) Write what is due and say what is durable.

        Return, per partition, the offset below which every record handed over is stored for good (records a
        handler rejected count as handled); partitions left out keep their previous answer. The runtime commits
        up to there. Called after every batch's handlers, every :attr:`precommit_interval_s` while records are
        held, and with ``force=True`` when everything held must be written: the runtime reached
        ``max_in_flight_bytes`` (held records count towards it), a stop, or a config reload. Raise
        :class:`RetryLater` when the store fails: the runtime retries with its backoff (handing the current batch
        over again: ignore offsets already held) and pauses fetching meanwhile.
        """
        return {}

    async def release(self, partitions: Collection[Partition]) -> None:
        """(:attr:`holds_records` collectors) These partitions were revoked: drop what is held of them (it is
        not committed; their new owner is handed it again). May be called while :meth:`precommit` runs."""

    async def close(self) -> None:
        """Release resources. Called once at shutdown, after the last flush."""

    @classmethod
    def consumed_types(cls) -> tuple[EventType, ...]:
        """The event types this collector consumes (declared, or derived from overridden handlers)."""
        if cls.event_types:
            return cls.event_types
        found: list[EventType] = []
        for event_type in ("proxy_log", "analytics", "budget_usage"):
            for method in (f"handle_{event_type}", f"handle_{event_type}_batch"):
                if getattr(cls, method) is not getattr(DataCollector, method):
                    found.append(event_type)  # type: ignore[arg-type]
                    break
        return tuple(found)

    @classmethod
    def consumes_control(cls) -> bool:
        """True when the collector overrides a control handler (it then reads ``<prefix>.control``)."""
        return any(getattr(cls, m) is not getattr(DataCollector, m) for m in ("handle_control", "handle_control_batch"))

    async def handle_batch(self, event_type: EventType, events: Sequence[Event]) -> None:
        """Dispatch one batch of one event type to the matching batch handler."""
        handler = getattr(self, f"handle_{event_type}_batch")
        await handler(events)

    async def handle_records(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes],
                             positions: Positions) -> None:
        """What the runtime calls: ``values[i]`` is the Kafka message value ``events[i]`` was decoded from, and
        ``positions`` says where each came from (topic, partition, offset).

        The default hands over to :meth:`handle_raw_batch`. A sink whose writes must be named or deduplicated by
        position (exactly-once objects, offsets stored with the data) overrides this one.
        """
        await self.handle_raw_batch(event_type, events, values)

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        """``values[i]`` is the Kafka message value ``events[i]`` was decoded from.

        The default hands the typed events to :meth:`handle_batch`. A sink that stores the
        JSON as it is (the file sink) overrides this to write the already validated bytes
        without serialising again.
        """
        await self.handle_batch(event_type, events)


async def _loop(handler: Any, events: Sequence[Event] | Sequence[ControlMessage]) -> None:
    rejected: dict[str, str] = {}
    for event in events:
        try:
            await handler(event)
        except BadEvent as exc:
            rejected[event.id] = exc.reason
    if rejected:
        raise BadEvents(rejected)


async def hand_over(collector: DataCollector, event_type: EventType, events: Sequence[Event],
                    values: Sequence[bytes], positions: Positions) -> dict[str, str]:
    """Hand one batch to ``collector`` the way the runtime does; returns the rejected events (id -> reason).

    A bare :class:`BadEvent` from a batch handler does not say which event was bad, so
    the events are then handed over one at a time to find out (sinks are idempotent).
    :class:`RetryLater` and any other error propagate.
    """
    try:
        await collector.handle_records(event_type, events, values, positions)
        return {}
    except BadEvents as exc:
        return exc.rejected
    except BadEvent as exc:
        if len(events) == 1:
            return {events[0].id: exc.reason}
    rejected: dict[str, str] = {}
    for i, (event, value) in enumerate(zip(events, values, strict=True)):
        rejected.update(await hand_over(collector, event_type, [event], [value], positions.take([i])))
    return rejected


async def hand_over_control(collector: DataCollector, messages: Sequence[ControlMessage]) -> dict[str, str]:
    """:func:`hand_over` for control messages: returns the rejected ones (id -> reason)."""
    try:
        await collector.handle_control_batch(messages)
        return {}
    except BadEvents as exc:
        return exc.rejected
    except BadEvent as exc:
        if len(messages) == 1:
            return {messages[0].id: exc.reason}
    rejected: dict[str, str] = {}
    for message in messages:
        rejected.update(await hand_over_control(collector, [message]))
    return rejected
