"""An idle consumer does not spin on a broker that answers empty fetches at once, and still gets a new record
within ``fetch_max_wait_ms`` (collectors/idle_fetch.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from collectors.idle_fetch import wait_out_empty_fetches
from tests.support.collectors import produce


class _Fetcher:
    """Stands in for aiokafka's fetcher: one fetch that answers after ``broker_wait_s`` with ``records``."""

    def __init__(self, broker_wait_s: float, records: bool, max_wait_ms: int = 300) -> None:
        self._fetch_max_wait_ms = max_wait_ms
        self.broker_wait_s = broker_wait_s
        self.records = records

    async def _proc_fetch_request(self, assignment: Any, node_id: int, request: Any) -> bool:
        await asyncio.sleep(self.broker_wait_s)
        return self.records


class _Consumer:
    def __init__(self, fetcher: _Fetcher) -> None:
        self._fetcher = fetcher


async def _fetch_s(fetcher: _Fetcher, cap_ms: float) -> float:
    assert wait_out_empty_fetches(_Consumer(fetcher), cap_ms=cap_ms)  # type: ignore[arg-type]
    started = time.perf_counter()
    await fetcher._proc_fetch_request(None, 0, None)
    return time.perf_counter() - started


async def test_an_empty_fetch_answered_at_once_waits_out_the_rest_up_to_the_cap() -> None:
    assert await _fetch_s(_Fetcher(0.0, records=False), cap_ms=100) >= 0.09
    assert await _fetch_s(_Fetcher(0.0, records=False), cap_ms=10_000) >= 0.29  # never past fetch_max_wait_ms
    assert await _fetch_s(_Fetcher(0.0, records=False), cap_ms=10_000) < 1.0


async def test_a_fetch_with_records_or_one_the_broker_held_never_waits() -> None:
    assert await _fetch_s(_Fetcher(0.0, records=True), cap_ms=10_000) < 0.1
    # A real broker parked the empty fetch for fetch_max_wait_ms: nothing is left to wait.
    assert await _fetch_s(_Fetcher(0.3, records=False), cap_ms=10_000) < 0.3 + 0.1


async def test_installing_twice_wraps_once() -> None:
    consumer = _Consumer(_Fetcher(0.0, records=False))
    assert wait_out_empty_fetches(consumer)  # type: ignore[arg-type]
    assert not wait_out_empty_fetches(consumer)  # type: ignore[arg-type]


@pytest.mark.integration
async def test_idle_consumer_on_noida_fetches_rarely_and_still_gets_a_record_in_time(kafka_bootstrap: str,
                                                                                     topic_prefix: str) -> None:
    topic = f"{topic_prefix}.idle"
    await produce(kafka_bootstrap, topic, [b"first"])  # creates the topic
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}-idle",
                                auto_offset_reset="earliest", fetch_max_wait_ms=500, enable_auto_commit=False)
    await consumer.start()
    try:
        assert (await consumer.getmany(timeout_ms=10_000))
        assert wait_out_empty_fetches(consumer)
        fetches = 0
        fetcher: Any = consumer._fetcher
        wrapped = fetcher._proc_fetch_request

        async def counting(*args: Any) -> bool:
            nonlocal fetches
            fetches += 1
            result: bool = await wrapped(*args)
            return result

        fetcher._proc_fetch_request = counting
        await consumer.getmany(timeout_ms=2000)  # idle: noida answers every fetch at once, with nothing
        # Without the wait, aiokafka sent a fetch per round trip here (hundreds a second); with it ~10/s.
        assert fetches <= 40, fetches
        for _ in range(3):
            await asyncio.sleep(0.05)  # land somewhere inside a client-side wait
            sent = time.perf_counter()
            await produce(kafka_bootstrap, topic, [b"late"])
            got = await consumer.getmany(timeout_ms=5000)
            delivered_s = time.perf_counter() - sent
            assert [r.value for rs in got.values() for r in rs] == [b"late"]
            assert delivered_s < 0.5 + 0.5, f"delivered {delivered_s:.3f} s after the produce (fetch_max_wait 0.5 s)"
    finally:
        await consumer.stop()
