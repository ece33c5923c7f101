"""The plugins' key-value store on a real Redis (``kv.backend: redis``): the same semantics as the memory and
SQLite stores (bytes and JSON, TTL, ``incr`` keeping the first write's expiry), atomic across links (as across
taps), the size bound, and what a plugin sees while Redis is down and after it is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from gateway_tap.dev.servers import RedisServer
from gateway_tap.plugins.redis_kv import KVUnavailable, RedisKV
from gateway_tap.redis_link import RedisLink
from gateway_tap.settings import RedisSettings


@pytest.fixture
async def link(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisLink]:
    link = RedisLink(RedisSettings(url=redis_url, key_prefix=redis_prefix, timeout_s=5), registry=CollectorRegistry())
    yield link
    await link.close()


async def test_values_ttl_and_namespaces(link: RedisLink) -> None:
    kv, other = RedisKV(link, "cache", 1 << 20), RedisKV(link, "other", 1 << 20)
    await kv.set("body", b"\x00raw bytes stay bytes")
    await kv.set("json", {"a": [1, 2], "s": "text"})
    await kv.set("str", "plain")
    assert await kv.get("body") == b"\x00raw bytes stay bytes"
    assert await kv.get("json") == {"a": [1, 2], "s": "text"}
    assert await kv.get("str") == "plain"
    assert await other.get("json") is None and await kv.get("missing") is None
    await kv.delete("json")
    assert await kv.get("json") is None
    await kv.set("short", 1, ttl_s=0.2)
    assert await kv.get("short") == 1
    await asyncio.sleep(0.3)
    assert await kv.get("short") is None
    assert await link.client.exists(link.key("kv:cache:body")) == 1  # where it lives: prefix, plugin, key
    with pytest.raises(OverflowError, match="larger than the store's max_bytes"):
        await RedisKV(link, "tiny", 10).set("k", b"x" * 20)


async def test_incr_is_atomic_across_links_and_keeps_the_first_expiry(link: RedisLink, redis_url: str,
                                                                      redis_prefix: str) -> None:
    second = RedisLink(RedisSettings(url=redis_url, key_prefix=redis_prefix, timeout_s=5), registry=CollectorRegistry())
    try:
        one, two = RedisKV(link, "counter", 1 << 20), RedisKV(second, "counter", 1 << 20)
        results = await asyncio.gather(*((one if i % 2 else two).incr("hits") for i in range(300)))
        assert sorted(results) == list(range(1, 301)) and await one.get("hits") == 300
        assert await one.incr("hits", 5) == 305
        # TTL is set by the increment that creates the key, and later increments keep it (as the other stores do).
        assert await one.incr("window", 1, ttl_s=0.4) == 1
        await asyncio.sleep(0.25)
        assert await two.incr("window", 1, ttl_s=10) == 2
        await asyncio.sleep(0.25)
        assert await one.get("window") is None
        assert await one.incr("window", 1, ttl_s=10) == 1
        await one.set("text", "not a number")
        with pytest.raises(ValueError, match="redis refused incr"):
            await one.incr("text")
        assert link.available  # a refused command is no outage
    finally:
        await second.close()


async def test_down_fails_fast_and_recovers_without_a_restart(own_redis: RedisServer, redis_prefix: str) -> None:
    registry = CollectorRegistry()
    link = RedisLink(RedisSettings(url=own_redis.url, key_prefix=redis_prefix, retry_interval_s=0.3),
                     registry=registry)
    kv = RedisKV(link, "cache", 1 << 20)
    try:
        await kv.set("k", "v")
        own_redis.stop()
        with pytest.raises(KVUnavailable):
            await kv.get("k")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for call in (kv.get("k"), kv.set("k", 1), kv.incr("n"), kv.delete("k")):
            with pytest.raises(KVUnavailable):  # marked down: no call waits for the timeout
                await call
        assert loop.time() - start < 0.1
        assert registry.get_sample_value("gateway_tap_redis_errors_total", {"user": "kv:cache"}) == 1
        own_redis.start()
        await asyncio.sleep(0.35)
        await kv.set("k", "again")
        assert await kv.get("k") == "again" and await kv.incr("n") == 1
        assert registry.get_sample_value("gateway_tap_redis_up") == 1
    finally:
        await link.close()
