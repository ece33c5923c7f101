"""Shared helpers for the Elasticsearch sink tests: an initialised collector, events on fixed days, counting
documents (the client fixture ``es`` is in tests/collectors/conftest.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from elasticsearch import AsyncElasticsearch

from collectors.sdk import CollectorServices
from collectors.sinks.elasticsearch import ElasticsearchCollector
from schemas import Analytics, BudgetUsage, ProxyLog
from schemas.events import Latency

DAY1 = datetime(2026, 3, 14, 23, 59, 30, tzinfo=UTC)


async def open_collector(es_url: str, prefix: str, **config: Any) -> ElasticsearchCollector:
    collector = ElasticsearchCollector()
    services = CollectorServices(name="elasticsearch", logger=logging.getLogger("test.es"))
    await collector.initialize({"hosts": [es_url], "index_prefix": prefix, **config}, services)
    return collector


def analytics(i: int, when: datetime = DAY1, **fields: Any) -> Analytics:
    base: dict[str, Any] = {
        "id": f"an-{i:05d}", "emitted_at": when, "gateway_id": "gw-1", "request_id": f"req-{i}",
        "app_id": f"app-{i % 3}", "llm_id": "gpt", "vendor": "openai", "model": "gpt-4o-mini",
        "prompt_tokens": 10 + i, "completion_tokens": 5, "total_tokens": 15 + i, "cost": 0.001 * i,
        "latency_ms": 100.0 + i, "status_code": 200,
    }
    return Analytics(**{**base, **fields})


def proxy_log(i: int, when: datetime = DAY1, **fields: Any) -> ProxyLog:
    base: dict[str, Any] = {
        "id": f"pl-{i:05d}", "emitted_at": when, "gateway_id": "gw-1", "request_id": f"req-{i}",
        "app_id": f"app-{i % 3}", "llm_id": "gpt", "method": "POST", "path": "/v1/chat/completions",
        "vendor": "openai", "status_code": 200, "latency": Latency(total_ms=120.0),
    }
    return ProxyLog(**{**base, **fields})


def budget_usage(i: int, when: datetime = DAY1) -> BudgetUsage:
    return BudgetUsage(id=f"bu-{i:05d}", emitted_at=when, gateway_id="gw-1", request_id=f"req-{i}",
                       app_id="app-0", llm_id="gpt", model="gpt-4o-mini", total_tokens=15, cost=0.01,
                       period_start=when.date().replace(day=1))


async def count(es: AsyncElasticsearch, index: str, **query: Any) -> int:
    await es.indices.refresh(index=index)
    resp = await es.count(index=index, query=query or {"match_all": {}})
    return int(resp["count"])
