"""Read-only Kafka inspection for the operator commands: partitions, offsets, committed offsets, records.

One :class:`KafkaInspector` wraps a group-less consumer (metadata, offsets, reads by
manual assignment) and an admin client (committed offsets of any group). Every
failure to reach the cluster surfaces as :class:`KafkaUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Self, TypeAlias

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

Record: TypeAlias = ConsumerRecord  # type: ignore[type-arg]


class KafkaUnavailable(Exception):
    """The cluster cannot be reached (or answered with an error) at ``bootstrap``."""

    def __init__(self, bootstrap: str, cause: BaseException) -> None:
        self.bootstrap = bootstrap
        super().__init__(f"Kafka unreachable at {bootstrap}: {str(cause).strip() or type(cause).__name__}")


def quiet_client_logs() -> None:
    """Keep aiokafka's own error lines (connection refused...) off an operator's terminal: the commands
    report failures themselves, once."""
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    logging.getLogger("aiokafka").propagate = False


class KafkaInspector:
    """Metadata, offsets and record reads without joining any consumer group.

    :param client_options: aiokafka keyword arguments (``KafkaSettings.client_options()``).
    :param client_id: Kafka client id of both clients.

    Use as ``async with KafkaInspector(...) as kafka:``; every method raises
    :class:`KafkaUnavailable` when the cluster cannot be reached.
    """

    def __init__(self, client_options: dict[str, Any], client_id: str = "gateway-tap-ops") -> None:
        self.bootstrap = str(client_options.get("bootstrap_servers", ""))
        self._consumer = AIOKafkaConsumer(**client_options, client_id=client_id, enable_auto_commit=False,
                                          fetch_max_bytes=64 * 1024 * 1024,
                                          max_partition_fetch_bytes=64 * 1024 * 1024)
        self._admin = AIOKafkaAdminClient(**client_options, client_id=client_id)
        self._admin_started = False

    async def __aenter__(self) -> Self:
        try:
            await self._consumer.start()
        except (KafkaError, OSError) as exc:
            await self._consumer.stop()
            raise KafkaUnavailable(self.bootstrap, exc) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()
        if self._admin_started:
            await self._admin.close()

    async def topics(self) -> set[str]:
        """Every topic in the cluster (fresh metadata)."""
        try:
            return set(await self._consumer.topics())
        except KafkaError as exc:
            raise KafkaUnavailable(self.bootstrap, exc) from exc

    async def partitions(self, topics: Iterable[str]) -> dict[str, list[TopicPartition]]:
        """The partitions of each topic that exists (missing topics are left out)."""
        existing = await self.topics()
        out: dict[str, list[TopicPartition]] = {}
        for topic in topics:
            if topic in existing:
                ids = self._consumer.partitions_for_topic(topic) or set()
                out[topic] = [TopicPartition(topic, p) for p in sorted(ids)]
        return out

    async def offsets(self, tps: list[TopicPartition]) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """(beginning, end) offsets of ``tps``; end is the next offset to be written."""
        if not tps:
            return {}, {}
        try:
            return await self._consumer.beginning_offsets(tps), await self._consumer.end_offsets(tps)
        except KafkaError as exc:
            raise KafkaUnavailable(self.bootstrap, exc) from exc

    async def offsets_for_time(self, tps: list[TopicPartition], timestamp_ms: int) -> dict[TopicPartition, int | None]:
        """Per partition, the first offset whose record timestamp is >= ``timestamp_ms`` (None: no such record)."""
        if not tps:
            return {}
        try:
            found = await self._consumer.offsets_for_times({tp: timestamp_ms for tp in tps})
        except KafkaError as exc:
            raise KafkaUnavailable(self.bootstrap, exc) from exc
        return {tp: (hit.offset if hit is not None else None) for tp, hit in found.items()}

    async def committed(self, group_id: str) -> dict[TopicPartition, int]:
        """The committed offsets of ``group_id`` (empty when the group never committed)."""
        try:
            if not self._admin_started:
                await self._admin.start()
                self._admin_started = True
            offsets = await self._admin.list_consumer_group_offsets(group_id)
        except (KafkaError, OSError) as exc:
            raise KafkaUnavailable(self.bootstrap, exc) from exc
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def read(self, tp: TopicPartition, start: int, stop: int, timeout_s: float = 30.0) -> list[Record]:
        """The records of ``tp`` with ``start <= offset < stop`` (``stop`` at most the end offset).

        :raises KafkaUnavailable: the records could not be fetched within ``timeout_s``.
        """
        consumer = self._consumer
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Record] = []
        try:
            async with asyncio.timeout(timeout_s):
                while await consumer.position(tp) < stop:
                    got = await consumer.getmany(tp, timeout_ms=500)
                    out.extend(r for r in got.get(tp, ()) if r.offset < stop)
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailable(self.bootstrap, exc) from exc
        finally:
            consumer.unsubscribe()
        return out
