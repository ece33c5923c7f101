"""SIGKILL the file, elasticsearch and budget collectors with batches in flight, again and again, while
events keep coming; after the last restart every id is in Elasticsearch and the budget ledger exactly once
and in the files at least once (the file sink may repeat what was in flight, never lose a line)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
from elasticsearch import AsyncElasticsearch

from collectors.sinks import es_templates as tpl
from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.budgets.store import Spend, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import BudgetStoreSettings
from schemas import Event
from tests.support.budget import usage
from tests.support.collectors import analytics, collect_process, create_topics, produce_events, wait_for

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MARCH = date(2026, 3, 1)
KILLS = 4


def file_ids(directory: Path) -> list[str]:
    """Ids of every line the file collector wrote; a torn line would fail to parse here."""
    ids: list[str] = []
    for kind in ("analytics", "budget_usage"):
        folder = directory / kind
        if folder.exists():
            for path in sorted(folder.iterdir()):
                ids += [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    return ids


async def es_ids(es: AsyncElasticsearch, prefix: str) -> list[str]:
    ids: list[str] = []
    for kind in ("analytics", "budget_usage"):
        alias = tpl.alias_name(prefix, kind)
        if not await es.indices.exists_alias(name=alias):
            continue
        await es.indices.refresh(index=alias)
        resp = await es.search(index=alias, size=10_000, source=False)
        ids += [hit["_id"] for hit in resp["hits"]["hits"]]
    return ids


async def test_repeated_sigkill_with_batches_in_flight_loses_and_doubles_nothing(
        kafka_bootstrap: str, es_url: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    store_settings = BudgetStoreSettings(backend="sqlite", sqlite_path=str(tmp_path / "budget.sqlite3"))
    out = tmp_path / "files"

    def config(name: str, own: dict[str, Any]) -> dict[str, Any]:
        return {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
                "budget_store": store_settings.model_dump(mode="json"),
                "collectors": {name: {"group_instance_id": f"{name}-1", "session_timeout_ms": 10_000,
                                      "batch": {"max_events": 100, "max_wait_ms": 5}, "max_in_flight_batches": 4,
                                      "metrics": {"port": free_port()}, "config": own}}}

    configs = {"file": config("file", {"directory": str(out)}),
               "elasticsearch": config("elasticsearch", {"hosts": [es_url], "index_prefix": topic_prefix}),
               "budget": config("budget", {})}
    events: list[Event] = []
    for i in range(4000):
        events.append(analytics(1, start=i)[0])
        events.append(usage(app_id=f"app{i % 3}", cost=0.000137 * (i % 11 + 1), tokens=i % 97 + 1, at=NOW))
    expected: dict[tuple[str, str], Spend] = {}
    for e in events:
        if e.type == "budget_usage":
            key = (e.app_id, e.llm_id)
            expected[key] = expected.get(key, Spend()) + Spend(usd_to_micros(e.cost), e.total_tokens, 1)

    await produce_events(kafka_bootstrap, topic_prefix, events[:3000])  # a backlog: batches queue up in flight

    async def produce_rest() -> None:
        for i in range(3000, len(events), 250):
            await produce_events(kafka_bootstrap, topic_prefix, events[i:i + 250])
            await asyncio.sleep(0.8)

    producing = asyncio.create_task(produce_rest())
    rng = random.Random(15)
    procs: list[Any] = []
    try:
        for round_ in range(KILLS):
            procs = [collect_process(f"{name}-{round_}", name, cfg, tmp_path) for name, cfg in configs.items()]
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            await asyncio.gather(*(asyncio.to_thread(p.kill) for p in procs))  # SIGKILL: no flush, no commit
            if round_ == 0:
                assert not producing.done(), "the kills land mid-stream"
        procs = [collect_process(f"{name}-last", name, cfg, tmp_path) for name, cfg in configs.items()]
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        await producing
        wanted = {e.id for e in events}
        await wait_for(lambda: set(file_ids(out)) >= wanted, "every event in the files", limit=120)
        async with AsyncElasticsearch(es_url) as es:
            for _ in range(600):
                if len(await es_ids(es, topic_prefix)) >= len(events):
                    break
                await asyncio.sleep(0.2)
            indexed = await es_ids(es, topic_prefix)
        store = await open_store(store_settings)
        try:
            for _ in range(600):
                if sum(v.requests for v in (await store.summary("monthly", MARCH)).values()) >= 4000:
                    break
                await asyncio.sleep(0.2)
            ledger = await store.summary("monthly", MARCH)
        finally:
            await store.close()
        codes = [await asyncio.to_thread(p.stop) for p in procs]
        assert codes == [0, 0, 0], [p.log_tail() for p in procs]
    finally:
        producing.cancel()
        for p in procs:
            p.stop()
    assert sorted(indexed) == sorted(wanted), "Elasticsearch: every id exactly once"
    assert ledger == expected, "budget ledger: every usage event counted exactly once"
    assert set(file_ids(out)) == wanted, "files: nothing lost (repeats allowed)"
