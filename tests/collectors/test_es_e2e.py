"""End to end: events on the real broker -> ``gateway-tap collect elasticsearch`` -> documents and dead letters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from elasticsearch import AsyncElasticsearch, Elasticsearch

from collectors.sinks import es_templates as tpl
from collectors.sinks.elasticsearch import ElasticsearchCollector
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import free_port
from schemas import topic_for
from schemas.events import Event
from tests.support.collectors import collect_process, create_topics, produce_events, read_topic, wait_for
from tests.support.es import analytics, budget_usage, open_collector, proxy_log

NOW = datetime.now(UTC).replace(microsecond=0)


def es_count(es_url: str, index: str) -> int:
    with Elasticsearch(es_url) as es:
        if not es.indices.exists_alias(name=index):
            return 0
        es.indices.refresh(index=index)
        return int(es.count(index=index)["count"])


async def test_topic_to_searchable_documents_with_rejections_dead_lettered(
        kafka_bootstrap: str, es_url: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    good = [analytics(i, NOW, id=f"e2e-{i}") for i in range(30)]
    bad = analytics(99, NOW, id="e2e-bad", choices=3_000_000_000)
    others: list[Event] = [*(proxy_log(i, NOW) for i in range(10)), *(budget_usage(i, NOW) for i in range(5))]
    # The first 10 twice: a redelivered stretch of the topic must not add documents.
    await produce_events(kafka_bootstrap, topic_prefix, [*good[:15], bad, *good[15:], *good[:10], *others])

    config = {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
              "collectors": {"elasticsearch": {
                  "metrics": {"port": free_port()}, "batch": {"max_wait_ms": 20, "max_events": 8},
                  "config": {"hosts": [es_url], "index_prefix": topic_prefix, "bulk_max_events": 4}}}}
    proc = collect_process("es", "elasticsearch", config, tmp_path)
    await asyncio.to_thread(proc.start)
    try:
        dead = await read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix) + ".dlq", 1)
        alias = tpl.alias_name(topic_prefix, "analytics")
        await wait_for(lambda: es_count(es_url, alias) >= 30, "analytics documents")
        await wait_for(lambda: es_count(es_url, tpl.alias_name(topic_prefix, "proxy_log")) >= 10, "proxy logs")
        await wait_for(lambda: es_count(es_url, tpl.alias_name(topic_prefix, "budget_usage")) >= 5, "budget usage")
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.log_tail()

    headers = dict(dead[0].headers)
    assert dead[0].value == bad.to_json()
    assert headers["collector"] == b"elasticsearch"
    assert b"choices" in headers["error"] and headers["error_class"] == b"BadEvent"
    assert es_count(es_url, alias) == 30
    async with AsyncElasticsearch(es_url) as es:
        found = await es.mget(index=alias, ids=[e.id for e in good] + [bad.id])
        docs = {d["_id"]: d for d in found["docs"] if d.get("found")}
    assert set(docs) == {e.id for e in good}
    assert docs["e2e-3"]["_source"]["status_class"] == "2xx"
    assert docs["e2e-3"]["_source"]["prompt_tokens"] == good[3].prompt_tokens


async def test_raw_values_and_typed_events_index_the_same_source(es_url: str, topic_prefix: str) -> None:
    """The runtime path splices ``_source`` from the Kafka value; it must equal the typed path's document."""
    raw_event = analytics(1, NOW, id="raw-1", tags={"team": "a"}, extra_field=[1, 2])
    typed_event = raw_event.model_copy(update={"id": "typed-1"})
    config = {"hosts": [es_url], "index_prefix": topic_prefix}
    async with CollectorHarness(ElasticsearchCollector, config, name="elasticsearch") as harness:
        await harness.feed([raw_event])  # the harness hands values over like the runtime
        await harness.flush()
    collector = await open_collector(es_url, topic_prefix)
    await collector.handle_analytics_batch([typed_event])
    await collector.close()
    async with AsyncElasticsearch(es_url) as es:
        index = tpl.index_name(topic_prefix, "analytics", NOW)
        raw_doc = (await es.get(index=index, id="raw-1"))["_source"]
        typed_doc = (await es.get(index=index, id="typed-1"))["_source"]
    assert {**raw_doc, "id": "typed-1"} == typed_doc
    assert raw_doc["status_class"] == "2xx" and raw_doc["extra_field"] == [1, 2]
