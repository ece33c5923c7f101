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

from collectors.runtime import CollectorRuntime
from collectors.sdk import BadEvents, ConfigError, RetryLater
from collectors.sinks import es_templates as tpl
from collectors.sinks.elasticsearch import ElasticsearchCollector
from gateway_tap.dev.servers import NoidaServer, free_port
from gateway_tap.settings import CollectorSettings
from schemas import topic_for
from tests.support.collectors import create_topics, produce_events, read_topic, wait_for
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


async def test_429_and_5xx_items_are_handed_back_alone_for_the_runtime_to_resend(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix)
    batch = [analytics(i) for i in range(10)]
    ids = [e.id for e in batch]
    proxy.faults.extend([("request", 503), ("items", 429, set(ids[2:5])), ("items", 503, {ids[3]}), None])
    pendings: list[set[str]] = []
    try:
        todo = batch
        while True:  # what the runtime does: hand over only what is pending (its backoff left out here)
            try:
                await collector.handle_analytics_batch(todo)
                break
            except RetryLater as exc:
                assert exc.pending is not None and not exc.rejected
                pendings.append(set(exc.pending))
                todo = [e for e in todo if e.id in exc.pending]
    finally:
        await collector.close()
    assert pendings == [set(ids), set(ids[2:5]), {ids[3]}]
    assert proxy.bulk_ids == [ids, ids, ids[2:5], [ids[3]]]
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 10


async def test_the_sink_sends_once_per_hand_over_and_never_sleeps_on_its_own(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix, bulk_max_events=3)
    batch = [analytics(i) for i in range(6)]
    proxy.sticky = ("items", 429, {batch[0].id})
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RetryLater, match="429") as info:
            await collector.handle_analytics_batch(batch)
        assert asyncio.get_running_loop().time() - started < 5
        assert info.value.pending == {batch[0].id}
        assert len(proxy.bulk_ids) == 2  # two chunks of three, each sent once
        proxy.sticky = None
        await collector.handle_analytics_batch([batch[0]])
    finally:
        await collector.close()
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 6


async def test_rejections_travel_with_the_retriable_items(
        proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix)
    batch = [analytics(i) for i in range(5)]
    batch[1] = analytics(1, tool_calls=5_000_000_000)
    proxy.faults.append(("items", 429, {batch[3].id}))
    try:
        with pytest.raises(RetryLater) as info:
            await collector.handle_analytics_batch(batch)
        await collector.handle_analytics_batch([batch[3]])
    finally:
        await collector.close()
    assert info.value.pending == {batch[3].id}
    assert set(info.value.rejected) == {batch[1].id}
    assert "tool_calls" in info.value.rejected[batch[1].id]
    assert proxy.bulk_ids[1] == [batch[3].id]
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 4


async def test_rejections_alone_are_bad_events(proxy: FaultProxy, es: AsyncElasticsearch, topic_prefix: str) -> None:
    collector = await open_collector(proxy.url, topic_prefix)
    batch = [analytics(i) for i in range(3)]
    batch[1] = analytics(1, tool_calls=5_000_000_000)
    try:
        with pytest.raises(BadEvents) as info:
            await collector.handle_analytics_batch(batch)
    finally:
        await collector.close()
    assert set(info.value.rejected) == {batch[1].id}
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 2


async def test_the_runtime_resends_only_the_failed_items_and_dead_letters_the_rejected(
        proxy: FaultProxy, es: AsyncElasticsearch, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    events = [analytics(i) for i in range(20)]
    events[7] = analytics(7, tool_calls=5_000_000_000)
    proxy.faults.extend([("items", 429, {events[3].id, events[11].id}), ("request", 503)])
    await produce_events(kafka_bootstrap, topic_prefix, events)
    settings = CollectorSettings.model_validate({
        "group_id": f"{topic_prefix}-es-retry", "batch": {"max_events": 100, "max_wait_ms": 200},
        "retry": {"initial_backoff_ms": 10, "max_backoff_ms": 50}, "metrics": {"port": None},
        "config": {"hosts": [proxy.url], "index_prefix": topic_prefix}})
    rt = CollectorRuntime("elasticsearch", ElasticsearchCollector, settings,
                          {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    task = asyncio.create_task(rt.run())
    try:
        dead = await read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix) + ".dlq", 1)
        await wait_for(lambda: sum(map(len, proxy.bulk_ids)) >= 20 + 2 + 2, "the retried items resent")
        await es.indices.refresh(index=tpl.alias_name(topic_prefix, "analytics"))
        assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 19
    finally:
        rt.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert [set(b) for b in proxy.bulk_ids[1:]] == [{events[3].id, events[11].id}] * 2
    assert dict(dead[0].headers)["original_offset"] == b"7"
    assert rt.metrics.registry.get_sample_value("gateway_tap_collector_retries_total",
                                                {"collector": "elasticsearch"}) == 2


async def test_an_old_retry_key_names_the_runtimes_setting(topic_prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"config.max_retries: renamed to collectors.<NAME>.retry"):
        await open_collector("http://127.0.0.1:9", topic_prefix, max_retries=2)


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
    collector = await open_collector(server.es_url, topic_prefix, request_timeout_s=2)
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
