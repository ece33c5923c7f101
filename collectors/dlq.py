"""Dead letters: an event that can never be handled goes, unchanged, to ``<topic>.dlq``.

The message keeps its original key, value and headers; the runtime adds headers saying
which collector gave up on it, why, and where it came from, so it can be inspected and
replayed (``kcat -C -t gateway.analytics.dlq -f '%h %s\\n'``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas import dlq_topic

MAX_REASON_BYTES = 2000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record the collector could not handle, with why."""

    record: ConsumerRecord  # type: ignore[type-arg]
    reason: str
    error_class: str


def dlq_headers(letter: DeadLetter, collector: str) -> list[tuple[str, bytes]]:
    """The original headers followed by ours (collector, error, error_class, original_*)."""
    rec = letter.record
    return [
        *(rec.headers or ()),
        ("collector", collector.encode()),
        ("error", letter.reason.encode()[:MAX_REASON_BYTES]),
        ("error_class", letter.error_class.encode()),
        ("original_topic", rec.topic.encode()),
        ("original_partition", str(rec.partition).encode()),
        ("original_offset", str(rec.offset).encode()),
    ]


class DeadLetterPublisher:
    """The runtime's producer: publishes dead letters with ``acks=all`` and waits for every ack (commits depend
    on it); the collector's control messages go through it too (:meth:`send`)."""

    def __init__(self, collector: str, client_options: dict[str, Any], max_request_size: int = 64 * 1024 * 1024):
        self.collector = collector
        self._producer = AIOKafkaProducer(**client_options, acks="all", max_request_size=max_request_size,
                                          linger_ms=5)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[Any]:
        """Queue one message with ``acks=all``; returns the future of its acknowledgement."""
        future: asyncio.Future[Any] = await self._producer.send(topic, value, key=key, headers=headers)
        return future

    async def publish(self, letters: list[DeadLetter]) -> None:
        """Send every letter and wait until the broker acknowledged all of them.

        :raises aiokafka.errors.KafkaError: a send failed; the caller retries the whole list
            (a duplicate dead letter is harmless, a lost one is not).
        """
        futures = [
            await self._producer.send(dlq_topic(letter.record.topic), letter.record.value,
                                      key=letter.record.key, headers=dlq_headers(letter, self.collector))
            for letter in letters
        ]
        await asyncio.gather(*futures)
