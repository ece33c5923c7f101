"""The pipelined runtime against the real broker: batches in flight, ordered delivery, backpressure by
bytes (partitions paused, not buffered), a rebalance with batches in flight, commits only contiguous."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from collectors.runtime import CollectorRuntime
from collectors.sdk import DataCollector
from collectors.sinks.file import FileCollector
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import CollectorSettings
from schemas import Event, EventType, topic_for
from tests.support.collectors import analytics, create_topics, produce_events, wait_for, written


def complete_ids(directory: Path) -> list[str]:
    """Ids of the complete lines under directory/analytics (the file may be mid-write while a member runs)."""
    ids: list[str] = []
    folder = directory / "analytics"
    for path in sorted(folder.iterdir()) if folder.exists() else ():
        data = path.read_bytes()
        ids += [orjson.loads(line)["id"] for line in data[:data.rfind(b"\n") + 1].splitlines()]
    return ids


def settings(**overrides: Any) -> CollectorSettings:
    base: dict[str, Any] = {"batch": {"max_events": 50, "max_wait_ms": 5},
                            "retry": {"initial_backoff_ms": 10, "max_backoff_ms": 50},
                            "metrics": {"port": None}, "shutdown_grace_s": 10}
    return CollectorSettings.model_validate(base | overrides)


class Recording(DataCollector):
    """Records the order events arrive in and how many batches it holds at once; each batch takes 30 ms."""

    event_types = ("analytics",)
    concurrent_batches = 3
    seen: ClassVar[list[str]] = []
    busy: ClassVar[int] = 0
    most_busy: ClassVar[int] = 0

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        cls = type(self)
        cls.busy += 1
        cls.most_busy = max(cls.most_busy, cls.busy)
        try:
            await asyncio.sleep(0.03)
            cls.seen.extend(e.id for e in events)
        finally:
            cls.busy -= 1


class OrderedRecording(Recording):
    seen: ClassVar[list[str]] = []
    ordered_delivery = True


class UnorderedRecording(Recording):
    seen: ClassVar[list[str]] = []
    ordered_delivery = False


async def run_until(rt: CollectorRuntime, done: Any, what: str) -> None:
    task = asyncio.create_task(rt.run())
    try:
        await wait_for(done, what)
    finally:
        rt.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


async def test_ordered_sinks_get_a_partition_in_order_and_the_others_concurrently(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    events = analytics(1000)
    await produce_events(kafka_bootstrap, topic_prefix, events)
    for cls in (OrderedRecording, UnorderedRecording):
        rt = CollectorRuntime("rec", cls, settings(group_id=f"{topic_prefix}-{cls.__name__}"),
                              {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
        await run_until(rt, lambda cls=cls: len(cls.seen) >= len(events), f"{cls.__name__} got every event")
    assert OrderedRecording.seen == [e.id for e in events], "one partition: handed over in offset order"
    assert OrderedRecording.most_busy == 1
    assert sorted(UnorderedRecording.seen) == sorted(e.id for e in events)
    assert 1 < UnorderedRecording.most_busy <= 3, "unordered: up to concurrent_batches at once"


class Stalled(FileCollector):
    """The file sink, stalled until ``release`` is set."""

    release: ClassVar[asyncio.Event]

    async def flush(self) -> None:
        await self.release.wait()
        await super().flush()


async def committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def test_a_stalled_sink_pauses_the_partitions_within_the_byte_bound_and_loses_nothing(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=3)
    events = analytics(6000)
    await produce_events(kafka_bootstrap, topic_prefix, events)
    Stalled.release = asyncio.Event()
    bound = 40_000  # ~130 events of ~300 B
    s = settings(group_id=f"{topic_prefix}-stalled", max_in_flight_bytes=bound, max_in_flight_batches=100,
                 config={"directory": str(tmp_path)})
    rt = CollectorRuntime("file", Stalled, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    task = asyncio.create_task(rt.run())
    try:
        await wait_for(lambda: bool(rt.consumer and rt.consumer.assignment()
                                    and rt.consumer.paused() == rt.consumer.assignment()), "every partition paused")
        await asyncio.sleep(1.0)  # stays paused: nothing more is fetched or held
        held = rt._in_flight_bytes
        assert 0 < held <= bound + 50 * 400, "at most one batch past the bound"
        assert rt.consumer is not None and rt.consumer.paused() == rt.consumer.assignment()
        tps = [TopicPartition(topic_for("analytics", topic_prefix), p) for p in range(3)]
        assert set((await committed(kafka_bootstrap, s.group_id or "", tps)).values()) == {None}
        Stalled.release.set()
        await wait_for(lambda: len(written(tmp_path, "analytics")) >= len(events), "every event written")
    finally:
        Stalled.release.set()
        rt.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert {r["id"] for r in written(tmp_path, "analytics")} == {e.id for e in events}
    ends = await committed(kafka_bootstrap, s.group_id or "", tps)
    assert sum(v or 0 for v in ends.values()) == len(events), "everything committed, contiguously"


class SlowFile(FileCollector):
    """The file sink taking 20 ms per flush, so that batches queue up in flight."""

    async def flush(self) -> None:
        await asyncio.sleep(0.02)
        await super().flush()


async def test_a_member_joining_with_batches_in_flight_loses_nothing(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=4)
    events = analytics(6000)
    group = f"{topic_prefix}-join"

    def member(directory: str) -> CollectorRuntime:
        # Static membership, as deployed: noida-db answers a commit racing the rebalance with IllegalGeneration,
        # aiokafka then rejoins under a new member id, and only an instance id replaces the old one at once.
        s = settings(group_id=group, group_instance_id=f"{directory}-{group}", max_in_flight_batches=6,
                     session_timeout_ms=10_000, metrics={"port": free_port()},
                     config={"directory": str(tmp_path / directory)})
        return CollectorRuntime("file", SlowFile, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)

    one, two = member("one"), member("two")
    tasks = [asyncio.create_task(one.run())]
    try:
        await produce_events(kafka_bootstrap, topic_prefix, events[:3000])
        await wait_for(lambda: len(complete_ids(tmp_path / "one")) >= 500, "the first member is busy")
        assert one._in_flight, "batches are in flight when the second member joins"
        tasks.append(asyncio.create_task(two.run()))
        await wait_for(lambda: bool(two.consumer and two.consumer.assignment()), "second member assigned")
        await produce_events(kafka_bootstrap, topic_prefix, events[3000:])

        def ids() -> set[str]:
            return {i for d in ("one", "two") for i in complete_ids(tmp_path / d)}

        await wait_for(lambda: ids() >= {e.id for e in events}, "every event written by one of the members", 60)
        assert one.consumer is not None and two.consumer is not None
        assert not one.consumer.assignment() & two.consumer.assignment()
        assert complete_ids(tmp_path / "two"), "the second member took a share"
    finally:
        for rt in (one, two):
            rt.request_stop()
        assert [await asyncio.wait_for(t, 30) for t in tasks] == [0] * len(tasks)
    assert ids() == {e.id for e in events}
    tps = [TopicPartition(topic_for("analytics", topic_prefix), p) for p in range(4)]
    ends = await committed(kafka_bootstrap, group, tps)
    assert sum(v or 0 for v in ends.values()) == len(events), "every offset committed once all was written"


class Holding(DataCollector):
    """Holds every record until forced; counts what it holds and what it was forced to write."""

    event_types = ("analytics",)
    holds_records = True
    held: ClassVar[dict[tuple[str, int], int]] = {}
    seen: ClassVar[int] = 0
    written: ClassVar[int] = 0

    async def handle_records(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes],
                             positions: Any) -> None:
        for p, o in zip(positions.partitions, positions.offsets, strict=True):
            key = (positions.topic, p)
            if o >= type(self).held.get(key, 0):
                type(self).held[key] = o + 1
                type(self).seen += 1

    async def precommit(self, force: bool) -> dict[tuple[str, int], int]:
        if not force:
            return {}
        type(self).written = type(self).seen
        return dict(type(self).held)


async def test_held_batches_free_their_slot_at_once_and_are_committed_only_once_written(
        kafka_bootstrap: str, topic_prefix: str) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    await produce_events(kafka_bootstrap, topic_prefix, analytics(600))
    Holding.held, Holding.seen, Holding.written = {}, 0, 0
    s = settings(group_id=f"{topic_prefix}-hold", max_in_flight_batches=1, max_in_flight_bytes=64 * 1024 * 1024)
    rt = CollectorRuntime("hold", Holding, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    polls = 0
    poll_paused = rt._poll_paused

    async def counting() -> None:
        nonlocal polls
        polls += 1
        await poll_paused()

    rt._poll_paused = counting  # type: ignore[method-assign]
    task = asyncio.create_task(rt.run())
    await wait_for(lambda: Holding.seen >= 600, "every record handed over")
    assert polls == 0, "a batch the sink holds no longer counts towards max_in_flight_batches: no paused polls"
    assert Holding.written == 0 and not rt._offsets.committable(), "nothing committed before it is written"
    rt.request_stop()  # SIGTERM: the held records are written (forced precommit) and committed
    assert await task == 0
    assert Holding.written == 600
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}-hold")
    await consumer.start()
    try:
        tps = [TopicPartition(topic_for("analytics", topic_prefix), p) for p in range(3)]
        committed = [await consumer.committed(tp) or 0 for tp in tps]
    finally:
        await consumer.stop()
    assert sum(committed) == 600
