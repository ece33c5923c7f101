"""A test harness for collector authors: run a collector without a broker.

```python
async with CollectorHarness(MyCollector, {"url": "..."}) as h:
    await h.feed([event1, event2])
    await h.flush()
    assert h.rejected == {event2.id: "no user"}
    assert [e.id for e in h.flushed] == [event1.id]
```

It validates the config against the collector's declaration, calls ``initialize``, hands
events over exactly like the runtime (per type, as batches, the message value and the
position beside each event; :class:`BadEvent` / :class:`BadEvents` become :attr:`rejected`)
and calls ``flush`` (or ``precommit`` for a collector that holds records) and ``close``.
:class:`RetryLater` and other errors propagate to the test.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Self

from prometheus_client import CollectorRegistry

from collectors.config import validate_collector_config
from collectors.sdk import CollectorServices, DataCollector, Partition, Positions, hand_over, hand_over_control
from gateway_tap.services import Gateway, new_control_message
from gateway_tap.settings import AppConfig, CollectorDefaults, LLMConfig
from schemas import ControlMessage, Event, EventDecodeError, EventType, decode_event, encode_event, topic_for


class CollectorHarness:
    """Drives one collector instance in-process.

    :param collector_cls: the collector under test.
    :param config: its config (validated against ``Config`` or ``config_schema``; raises :class:`ConfigError`).
    :param name: the collector name passed in its services.
    :param defaults: the root config sections handed over as ``services.defaults`` (default: empty).
    :param extras: extra services (``CollectorServices.extras``).
    :param apps: the apps ``services.gateway`` knows (as in a config file's ``apps``).
    :param llms: the LLMs ``services.gateway`` knows (as in a config file's ``llms``).
    :ivar handed: events handed over and not rejected, since the last flush.
    :ivar flushed: events handed over and not rejected before a successful :meth:`flush`.
    :ivar rejected: event id -> reason, for every event the collector rejected.
    :ivar undecodable: reasons of raw values :meth:`feed_raw` could not decode (the runtime dead-letters them).
    :ivar handled_control: control messages handed over with :meth:`feed_control` and not rejected.
    :ivar control_messages: what the collector sent with ``services.send_to_control`` (envelope filled in,
        gateway id ``collector/harness``).
    :ivar next_offsets: per partition, the offset the next event fed there gets (events are numbered from 0 per
        ``(topic, partition)``, topics named with ``services.kafka_prefix``).
    :ivar durable: per partition, what :meth:`precommit` last reported durable (collectors that hold records).
    """

    def __init__(self, collector_cls: type[DataCollector], config: dict[str, Any] | None = None, *,
                 name: str = "test", defaults: CollectorDefaults | None = None,
                 extras: dict[str, Any] | None = None, apps: Iterable[AppConfig] = (),
                 llms: Iterable[LLMConfig] = ()) -> None:
        self.collector_cls = collector_cls
        self.name = name
        self.config = validate_collector_config(name, collector_cls, config or {})
        self.registry = CollectorRegistry()
        self.services = CollectorServices(name=name, logger=logging.getLogger(f"gateway_tap.collectors.{name}"),
                                          metrics=self.registry, defaults=defaults or CollectorDefaults(),
                                          extras=dict(extras or {}),
                                          gateway=Gateway.from_config(list(apps), list(llms)), control=self._control)
        self.collector = collector_cls()
        self.handed: list[Event] = []
        self.flushed: list[Event] = []
        self.rejected: dict[str, str] = {}
        self.undecodable: list[str] = []
        self.handled_control: list[ControlMessage] = []
        self.control_messages: list[ControlMessage] = []
        self.next_offsets: dict[Partition, int] = {}
        self.durable: dict[Partition, int] = {}

    def _control(self, collector: str, kind: str, payload: Mapping[str, Any]) -> str:
        message, _ = new_control_message("collector/harness", collector, kind, payload)  # the runtime's TypeError
        self.control_messages.append(message)
        return message.id

    async def __aenter__(self) -> Self:
        await self.collector.initialize(self.config, self.services)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.collector.close()

    async def feed(self, events: Iterable[Event], *, partition: int = 0, offsets: Iterable[int] | None = None) -> None:
        """Hand ``events`` over as one batch per event type (in order of first appearance), as read from
        ``partition`` at the next offsets (or at ``offsets``: e.g. the same ones again, as after a crash)."""
        await self._feed([(e, encode_event(e)) for e in events], partition, offsets)

    async def feed_raw(self, values: Iterable[bytes], expected_type: EventType | None = None, *, partition: int = 0,
                       offsets: Iterable[int] | None = None) -> None:
        """Decode message values as the runtime does, then hand the valid ones over (see :meth:`feed`)."""
        pairs = []
        for value in values:
            try:
                pairs.append((decode_event(value, expected_type), value))
            except EventDecodeError as exc:
                self.undecodable.append(str(exc))
        await self._feed(pairs, partition, offsets)

    async def _feed(self, pairs: list[tuple[Event, bytes]], partition: int, offsets: Iterable[int] | None) -> None:
        consumed = set(self.collector_cls.consumed_types())
        given = iter(offsets) if offsets is not None else None
        by_type: dict[EventType, list[tuple[Event, bytes, int]]] = {}
        for event, value in pairs:
            if event.type not in consumed:
                continue
            key = (topic_for(event.type, self.services.kafka_prefix), partition)
            offset = next(given) if given is not None else self.next_offsets.get(key, 0)
            self.next_offsets[key] = max(self.next_offsets.get(key, 0), offset + 1)
            by_type.setdefault(event.type, []).append((event, value, offset))
        for event_type, batch in by_type.items():
            events = [e for e, _, _ in batch]
            positions = Positions(topic_for(event_type, self.services.kafka_prefix), [partition] * len(batch),
                                  [o for _, _, o in batch])
            rejected = await hand_over(self.collector, event_type, events, [v for _, v, _ in batch], positions)
            self.rejected.update(rejected)
            self.handed.extend(e for e in events if e.id not in rejected)

    async def feed_control(self, messages: Iterable[ControlMessage]) -> None:
        """Hand control messages over as one batch, as the runtime does for ``<prefix>.control``."""
        batch = list(messages)
        rejected = await hand_over_control(self.collector, batch)
        self.rejected.update(rejected)
        self.handled_control.extend(m for m in batch if m.id not in rejected)

    async def flush(self) -> None:
        """Call the collector's ``flush``; on success everything handed over counts as flushed."""
        await self.collector.flush()
        self.flushed.extend(self.handed)
        self.handed = []

    async def precommit(self, force: bool = False) -> dict[Partition, int]:
        """Call the collector's ``precommit`` (collectors that hold records); returns and records in
        :attr:`durable` what it reported."""
        reported = dict(await self.collector.precommit(force))
        for tp, offset in reported.items():
            self.durable[tp] = max(offset, self.durable.get(tp, 0))
        return reported

    async def release(self, partitions: Collection[Partition]) -> None:
        """Tell the collector these partitions were revoked, as the runtime does on a rebalance."""
        await self.collector.release(partitions)
        for tp in partitions:
            self.durable.pop(tp, None)
