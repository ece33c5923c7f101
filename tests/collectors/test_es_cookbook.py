"""The analytics cookbook: every published query, run against the real server over a known data set.

The expected numbers are computed here from the events themselves, never read back from the server.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch

from collectors.sinks import es_queries as q
from schemas import Analytics, ProxyLog
from schemas.events import Latency
from tests.support.es import open_collector

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
APPS = ["app-a", "app-b", "app-c", "app-d"]
LLMS = {"gpt": ("openai", "gpt-4o-mini", 100.0), "claude": ("anthropic", "claude-3-5-haiku", 300.0),
        "local": ("openai", "llama-3", 50.0)}


def month_start() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def build_analytics() -> list[Analytics]:
    start = month_start()
    events = []
    per_llm: dict[str, int] = defaultdict(int)
    for i in range(120):
        llm = list(LLMS)[i % 3]
        vendor, model, base_latency = LLMS[llm]
        k = per_llm[llm]
        per_llm[llm] += 1
        streamed = i % 2 == 0
        status = 500 if i % 10 == 0 else 429 if i % 10 == 5 else 200
        prompt, completion = 10 * (i % 5 + 1), 3 * (i % 4 + 1)
        micros = 500 * (i % 7 + 1) * (APPS.index(APPS[i % 4]) + 1)
        # A split of the cost by token class, as the tap writes it (docs/pricing.md): the parts add up.
        split = {"cost_input_micros": micros // 2, "cost_cache_read_micros": micros // 10,
                 "cost_cache_write_micros": micros // 5, "cost_reasoning_micros": micros // 20}
        split["cost_output_micros"] = micros - sum(split.values())
        events.append(Analytics(
            id=f"cb-{i:04d}", emitted_at=start + timedelta(days=i % 3, hours=10, minutes=i),
            gateway_id="gw-1", request_id=f"r-{i}", app_id=APPS[i % 4], llm_id=llm, vendor=vendor, model=model,
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            cache_read_tokens=i % 5, cache_write_tokens=i % 3, reasoning_tokens=i % 2,
            cost=micros / 1_000_000, cost_micros=micros, **split, price_version="genai-prices-0.2.3+0123456789ab",
            latency_ms=base_latency + k, ttft_ms=(base_latency / 2 + k) if streamed else None,
            streamed=streamed, status_code=status,
        ))
    # Last month: outside every "this month" query.
    events.append(events[0].model_copy(update={"id": "cb-old", "emitted_at": start - timedelta(hours=1)}))
    return events


def build_proxy_logs() -> list[ProxyLog]:
    start = month_start()
    events = []
    for i in range(30):
        blocked = "pii-filter" if i % 5 == 0 else "rate-limit" if i % 7 == 0 else None
        events.append(ProxyLog(
            id=f"cbp-{i:04d}", emitted_at=start + timedelta(hours=5, minutes=i), gateway_id="gw-1",
            request_id=f"r-{i}", app_id=None if i == 25 else APPS[i % 4], method="POST",
            path="/v1/chat/completions", status_code=403 if blocked else 200,
            latency=Latency(total_ms=10.0), blocked_by=blocked,
        ))
    return events


@pytest.fixture(scope="module")
def dataset() -> tuple[list[Analytics], list[ProxyLog]]:
    return build_analytics(), build_proxy_logs()


@pytest.fixture(scope="module")
async def indexed(es_url: str, dataset: tuple[list[Analytics], list[ProxyLog]]) -> AsyncIterator[
        tuple[AsyncElasticsearch, str]]:
    """The data set indexed through the collector (module-wide prefix), and a client."""
    import uuid

    prefix = f"cb{uuid.uuid4().hex[:8]}"
    collector = await open_collector(es_url, prefix, bulk_max_events=50)
    await collector.handle_analytics_batch(dataset[0])
    await collector.handle_proxy_log_batch(dataset[1])
    await collector.close()
    es = AsyncElasticsearch(es_url)
    await es.indices.refresh(index=f"{prefix}-*")
    try:
        yield es, prefix
    finally:
        await es.close()


async def run(indexed: tuple[AsyncElasticsearch, str], query: q.CookbookQuery) -> dict[str, Any]:
    es, prefix = indexed
    resp = await es.search(index=query.index(prefix), body=query.body)
    return dict(resp.body)


def this_month(events: list[Analytics]) -> list[Analytics]:
    return [e for e in events if e.emitted_at >= month_start()]


def test_the_doc_publishes_every_query_verbatim() -> None:
    text = DOC.read_text()
    for query in q.COOKBOOK:
        assert query.curl() in text, f"docs/analytics.md is missing the curl line of {query.name}"
        assert query.pretty() in text, f"docs/analytics.md is missing the JSON body of {query.name}"


async def test_cost_and_tokens_per_app_per_day(indexed: tuple[AsyncElasticsearch, str],
                                               dataset: tuple[list[Analytics], list[ProxyLog]]) -> None:
    expected: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in this_month(dataset[0]):
        row = expected[(str(e.app_id), e.emitted_at.date().isoformat())]
        row["requests"] += 1
        for field in (*q.COST_FIELDS, *q.TOKEN_FIELDS):
            row[field] += getattr(e, field) or 0
    rows = q.cost_tokens_rows(await run(indexed, q.COST_TOKENS_PER_APP_PER_DAY))
    got = {(r["app_id"], r["day"]): r for r in rows}
    assert set(got) == set(expected) and len(rows) == 12
    for key, want in expected.items():
        for field, value in want.items():
            assert got[key][field] == value, (key, field)  # integer sums: exact
        assert got[key]["cost"] == want["cost_micros"] / 1_000_000
        assert want["cost_micros"] == sum(want[f] for f in q.COST_FIELDS[1:]) and want["cache_read_tokens"]


async def test_latency_and_ttft_percentiles_per_model(indexed: tuple[AsyncElasticsearch, str],
                                                      external_es: bool) -> None:
    if not external_es:
        pytest.skip("noida-db has no percentiles aggregation; set GATEWAY_TAP_TEST_ES to a real Elasticsearch")
    rows = q.latency_rows(await run(indexed, q.LATENCY_PER_MODEL))
    for vendor_model in LLMS.values():
        _, model, base = vendor_model
        # 40 calls per model with latencies base+0..base+39; every other one streamed with ttft base/2+k.
        assert rows[model]["latency_p50"] == pytest.approx(base + 19.5, abs=1.5)
        assert rows[model]["latency_p95"] == pytest.approx(base + 37.0, abs=1.5)
        assert rows[model]["ttft_p50"] is not None and rows[model]["ttft_p95"] is not None
        assert base / 2 + 15 <= rows[model]["ttft_p50"] <= base / 2 + 25


async def test_error_rate_per_llm(indexed: tuple[AsyncElasticsearch, str],
                                  dataset: tuple[list[Analytics], list[ProxyLog]]) -> None:
    totals: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    for e in this_month(dataset[0]):
        totals[str(e.llm_id)] += 1
        errors[str(e.llm_id)] += e.status_code >= 400
    rows = q.error_rate_rows(await run(indexed, q.ERROR_RATE_PER_LLM))
    assert set(rows) == set(totals)
    for llm, total in totals.items():
        assert rows[llm]["requests"] == total
        assert rows[llm]["errors"] == errors[llm]
        assert rows[llm]["error_rate"] == pytest.approx(errors[llm] / total)
        assert sum(rows[llm]["status_classes"].values()) == total
    assert any(rows[llm]["errors"] for llm in rows)  # the data set does exercise errors
    assert {"2xx", "4xx", "5xx"} <= {c for r in rows.values() for c in r["status_classes"]}


async def test_top_apps_by_spend_this_month(indexed: tuple[AsyncElasticsearch, str], external_es: bool,
                                            dataset: tuple[list[Analytics], list[ProxyLog]]) -> None:
    spend: dict[str, float] = defaultdict(float)
    for e in this_month(dataset[0]):
        spend[str(e.app_id)] += (e.cost_micros or 0) / 1_000_000
    expected_order = sorted(spend, key=lambda app: -spend[app])
    resp = await run(indexed, q.TOP_APPS_BY_SPEND)
    rows = q.top_apps_rows(resp)
    assert [r["app_id"] for r in rows] == expected_order
    for row in rows:
        assert row["spend"] == pytest.approx(spend[row["app_id"]])
    # Every app has 30 calls (ties in doc count, so key order); spend ranks them the other way round,
    # so a result left in doc-count order would fail the first assertion.
    assert expected_order != sorted(spend)
    if external_es:  # noida-db ignores ordering by a sub-aggregation; Elasticsearch must honour it
        assert [b["key"] for b in resp["aggregations"]["apps"]["buckets"]] == expected_order


async def test_requests_blocked_by_plugins(indexed: tuple[AsyncElasticsearch, str],
                                           dataset: tuple[list[Analytics], list[ProxyLog]]) -> None:
    expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in dataset[1]:
        if e.blocked_by:
            expected[e.blocked_by][e.app_id or "(no app)"] += 1
    rows = q.blocked_rows(await run(indexed, q.BLOCKED_BY_PLUGIN))
    assert rows == {plugin: dict(apps) for plugin, apps in expected.items()}
    assert "(no app)" in rows["pii-filter"]
