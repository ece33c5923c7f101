"""A batch in the runtime's pipeline: the records of one fetch, decoded and grouped by event type."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from collectors.dlq import DeadLetter
from schemas import ControlMessage, EventDecodeError, EventType, decode_control
from schemas.wire import LazyEvents, validate_event_bytes

Record: TypeAlias = ConsumerRecord  # type: ignore[type-arg]


@dataclass
class Bucket:
    """The validated events of one type in a batch, with their raw values and records (parallel lists).

    ``events`` builds each pydantic model on first access only: sinks that write the
    raw values (file, Elasticsearch) never pay for models they do not read.
    """

    event_type: EventType
    values: list[bytes] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    events: LazyEvents = field(init=False)
    stored: int = 0  # events the sink stored before a per-event retry narrowed the bucket

    def __post_init__(self) -> None:
        self.events = LazyEvents(self.event_type, self.values)

    def drop(self, indexes: set[int]) -> None:
        keep = [i for i in range(len(self.values)) if i not in indexes]
        self.values = [self.values[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        self.events = LazyEvents(self.event_type, self.values)


@dataclass
class ControlBucket:
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


@dataclass
class Batch:
    """One fetched batch on its way through the pipeline (decoded -> delivered -> acknowledged -> committed).

    ``ends`` holds, per partition, one past the batch's last offset: what the offset tracker
    may commit once this batch and every earlier one of the partition are acknowledged.
    """

    seq: int
    records: list[Record]
    buckets: dict[EventType, Bucket]
    dead: list[DeadLetter]
    control: ControlBucket
    ends: dict[TopicPartition, int]
    size_bytes: int
    fetched_at: float
    done: asyncio.Event = field(default_factory=asyncio.Event)  # left the pipeline (delivered or not)
    acked: asyncio.Event = field(default_factory=asyncio.Event)  # delivered: its offsets may be committed
    started: bool = False  # handed to the sink (handlers called)
    abandoned: bool = False  # revoked before it reached the sink: never delivered, never committed
    retrying: bool = False
    tick: bool = False  # no records: only the sink's precommit (collectors that hold records)
    force: bool = False  # a tick that asks the sink to write everything it holds
    durable: dict[tuple[str, int], int] = field(default_factory=dict)  # what the sink's precommit reported
    need: dict[TopicPartition, int] = field(default_factory=dict)  # held: per partition, durable offset to reach


def decode_batch(seq: int, records: list[Record], topic_types: Mapping[str, EventType], control_topic: str | None,
                 fetched_at: float) -> Batch:
    """Validate ``records`` into per-type buckets; undecodable ones become dead letters."""
    buckets: dict[EventType, Bucket] = {}
    dead: list[DeadLetter] = []
    control = ControlBucket()
    ends: dict[TopicPartition, int] = {}
    size = 0
    for rec in records:
        ends[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        value = rec.value
        if value is None:  # a tombstone: nothing to decode
            dead.append(DeadLetter(rec, "empty message value", "EventDecodeError"))
            continue
        size += len(value)
        if rec.topic == control_topic:
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
            bucket = buckets[event_type] = Bucket(event_type)
        bucket.values.append(value)  # bucket.events shares this list
        bucket.records.append(rec)
    return Batch(seq, records, buckets, dead, control, ends, size, fetched_at)
