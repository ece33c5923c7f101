"""Helpers shared by the benchmarks."""

from __future__ import annotations

import asyncio
import time


async def fill_topic(bootstrap: str, topic: str, partitions: int, values: list[bytes]) -> float:
    """Create ``topic`` with ``partitions`` and produce ``values`` into it; returns the seconds it took.

    Keys spread the values over 64 keys (so over every partition); sends go out in groups
    of 5,000 awaited together, which is what the broker, not the client, limits.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1)
    await producer.start()
    started = time.monotonic()
    try:
        step = 5000
        for offset in range(0, len(values), step):
            futures = [await producer.send(topic, value, key=str(i % 64).encode())
                       for i, value in enumerate(values[offset:offset + step], offset)]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - started
