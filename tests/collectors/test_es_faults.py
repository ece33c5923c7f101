"""Transient trouble: 429/5xx items and requests (through a fault-injecting proxy), and a server outage."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from elasticsearch import AsyncElasticsearch

from collectors.sdk import BadEvents, RetryLater
from collectors.sinks import es_templates as tpl
from gateway_tap.dev.servers import NoidaServer, free_port
from tests.support.es import analytics, count, open_collector

PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch", "Content-Type": "application/json"}


class FaultProxy:
    """An HTTP proxy in front of Elasticsearch that fails chosen ``_bulk`` requests or items.

    ``faults`` is consumed one entry per bulk request: ``None`` forwards untouched,
    ``("request", status)`` answers the whole request with ``status`` without forwarding,
    ``("items", status, ids)`` forwards and then reports the items of ``ids`` as ``status``.
    ``bulk_ids`` records the ids each bulk request carried.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: deque[tuple[Any, ...] | None] = deque()
        self.sticky: tuple[Any, ...] | None = None
        self.bulk_ids: list[list[str]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = None
        if request.path.endswith("/_bulk"):
            lines = body.splitlines()
            self.bulk_ids.append([orjson.loads(a)["index"]["_id"] for a in lines[0::2]])
            fault = self.faults.popleft() if self.faults else self.sticky
        if fault is not None and fault[0] == "request":
            error = {"error": {"type": "injected", "reason": f"injected {fault[1]}"}, "status": fault[1]}
            return web.Response(status=fault[1], body=orjson.dumps(error), headers=PRODUCT_HEADER)
        async with self.session.request(request.method, self.upstream + request.path_qs, data=body,
                                        headers={"Content-Type": request.content_type}) as resp:
            payload = await resp.read()
            status = resp.status
        if fault is not None and fault[0] == "items":
            _, item_status, ids = fault
            result = orjson.loads(payload)
            for item in result["items"]:
                outcome = next(iter(item.values()))
                if outcome["_id"] in ids:
                    outcome["status"] = item_status
                    outcome["error"] = {"type": "es_rejected_execution_exception", "reason": "injected"}
                    result["errors"] = True
            payload = orjson.dumps(result)
        return web.Response(status=status, body=payload, headers=PRODUCT_HEADER)

    async def __aenter__(self) -> FaultProxy:
        self.session = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.session.close()


@pytest.fixture
async def proxy(es_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(es_url) as p:
        yield p


FAST_RETRIES = {"retry_initial_backoff_ms": 5, "retry_max_backoff_ms": 20}


async def test_429_and_5xx_items_and_requests_are_retried_alone_until_indexed(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix, **FAST_RETRIES)
    batch = [analytics(i) for i in range(10)]
    ids = [e.id for e in batch]
    proxy.faults.extend([("request", 503), ("items", 429, set(ids[2:5])), ("items", 503, {ids[3]}), None])
    try:
        await collector.handle_analytics_batch(batch)
    finally:
        await collector.close()
    assert proxy.bulk_ids == [ids, ids, ids[2:5], [ids[3]]]
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 10


async def test_items_failing_past_max_retries_raise_retry_later_then_succeed(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix, max_retries=2, **FAST_RETRIES)
    batch = [analytics(i) for i in range(6)]
    proxy.sticky = ("items", 429, {batch[0].id})
    try:
        with pytest.raises(RetryLater, match="429"):
            await collector.handle_analytics_batch(batch)
        assert len(proxy.bulk_ids) == 3  # first attempt + 2 retries of the one item
        assert proxy.bulk_ids[1:] == [[batch[0].id], [batch[0].id]]
        proxy.sticky = None
        await collector.handle_analytics_batch(batch)  # the runtime hands the batch over again
    finally:
        await collector.close()
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 6


async def test_rejections_are_reported_after_retried_items_are_indexed(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix, **FAST_RETRIES)
    batch = [analytics(i) for i in range(5)]
    batch[1] = analytics(1, tool_calls=5_000_000_000)
    proxy.faults.append(("items", 429, {batch[3].id}))
    try:
        with pytest.raises(BadEvents) as info:
            await collector.handle_analytics_batch(batch)
    finally:
        await collector.close()
    assert set(info.value.rejected) == {batch[1].id}
    assert "tool_calls" in info.value.rejected[batch[1].id]
    assert proxy.bulk_ids[1] == [batch[3].id]
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 4


async def test_unreachable_cluster_is_retry_later(topic_prefix: str) -> None:
    collector = await open_collector(f"http://127.0.0.1:{free_port()}", topic_prefix, request_timeout_s=2)
    try:
        with pytest.raises(RetryLater, match="unreachable"):
            await collector.handle_analytics_batch([analytics(1)])
    finally:
        await collector.close()


async def test_server_down_then_back_loses_nothing(tmp_path: Path, topic_prefix: str) -> None:
    """Batches keep coming while the server is stopped (SIGINT) and restarted: RetryLater, then all indexed."""
    server = NoidaServer(data_dir=tmp_path / "noida", services=("elasticsearch",), log_path=tmp_path / "noida.log")
    await asyncio.to_thread(server.start)
    collector = await open_collector(server.es_url, topic_prefix, request_timeout_s=2, **FAST_RETRIES)
    retry_laters = 0
    outage_done = asyncio.Event()

    async def outage() -> None:
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        outage_done.set()

    try:
        batches = [[analytics(b * 100 + i) for i in range(50)] for b in range(8)]
        outage_task = None
        for n, batch in enumerate(batches):
            if n == 2:
                outage_task = asyncio.create_task(outage())
                await asyncio.sleep(0.3)
            while True:  # what the runtime does: same batch again after a backoff
                try:
                    await collector.handle_analytics_batch(batch)
                    break
                except RetryLater:
                    retry_laters += 1
                    await asyncio.sleep(0.2)
        assert outage_task is not None
        await outage_task
        assert outage_done.is_set()
        assert retry_laters > 0
        async with AsyncElasticsearch(server.es_url) as client:
            assert await count(client, tpl.alias_name(topic_prefix, "analytics")) == 400
    finally:
        await collector.close()
        await asyncio.to_thread(server.stop)
