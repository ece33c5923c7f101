"""The elasticsearch collector against the real test server: templates, mappings, idempotency, rejections."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch

from collectors.config import parse_collector_config
from collectors.sdk import BadEvents, ConfigError
from collectors.sinks import es_templates as tpl
from collectors.sinks.elasticsearch import ElasticsearchCollector, EsConfig, redact_url
from tests.support.es import DAY1, analytics, budget_usage, count, open_collector, proxy_log


@pytest.fixture
async def collector(es_url: str, topic_prefix: str) -> AsyncIterator[ElasticsearchCollector]:
    c = await open_collector(es_url, topic_prefix)
    try:
        yield c
    finally:
        await c.close()


async def test_templates_installed_and_daily_indices_have_documented_mappings(
        collector: ElasticsearchCollector, es: AsyncElasticsearch, topic_prefix: str) -> None:
    await collector.handle_analytics_batch([analytics(1)])
    await collector.handle_proxy_log_batch([proxy_log(1)])
    await collector.handle_budget_usage_batch([budget_usage(1)])

    component = await es.cluster.get_component_template(name=tpl.common_component_name(topic_prefix))
    assert component["component_templates"][0]["component_template"]["version"] == tpl.TEMPLATE_VERSION
    for event_type in ("proxy_log", "analytics", "budget_usage"):
        name = tpl.alias_name(topic_prefix, event_type)
        found = await es.indices.get_index_template(name=name)
        template = found["index_templates"][0]["index_template"]
        assert template["index_patterns"] == [f"{topic_prefix}-{event_type}-*"]
        assert template["composed_of"] == [tpl.common_component_name(topic_prefix)]

        index = f"{topic_prefix}-{event_type}-2026.03.14"
        mapping = (await es.indices.get_mapping(index=index))[index]["mappings"]
        assert mapping["dynamic"] in (False, "false")
        assert _normalise(mapping["properties"]) == _normalise(tpl.expected_properties(event_type))
        aliases = await es.indices.get_alias(index=index)
        assert name in aliases[index]["aliases"]


def _normalise(properties: dict[str, Any]) -> dict[str, Any]:
    """Servers echo booleans and numbers as strings in some places; compare on strings."""
    return {k: _normalise(v) if isinstance(v, dict) else str(v).lower() for k, v in properties.items()}


async def test_batch_is_searchable_per_utc_day_and_redelivery_overwrites(
        collector: ElasticsearchCollector, es: AsyncElasticsearch, topic_prefix: str) -> None:
    # DAY1 is 23:59:30 UTC: the +1 min events belong to the next day's index.
    batch = [analytics(i, DAY1 + timedelta(minutes=i % 2)) for i in range(40)]
    await collector.handle_analytics_batch(batch)
    alias = tpl.alias_name(topic_prefix, "analytics")
    assert await count(es, alias) == 40
    assert await count(es, f"{topic_prefix}-analytics-2026.03.14") == 20
    assert await count(es, f"{topic_prefix}-analytics-2026.03.15") == 20

    await collector.handle_analytics_batch(batch)  # at-least-once: the same batch again
    await collector.handle_analytics_batch(batch[:7])
    assert await count(es, alias) == 40

    doc = await es.get(index=f"{topic_prefix}-analytics-2026.03.14", id="an-00002")
    assert doc["_source"]["status_class"] == "2xx"
    assert doc["_source"]["type"] == "analytics"
    assert doc["_source"]["emitted_at"] == "2026-03-14T23:59:30Z"
    assert await count(es, alias, term={"app_id": "app-1"}) == 13
    assert await count(es, alias, range={"cost": {"gte": 0.030}}) == 10


async def test_unknown_fields_are_kept_in_source_but_not_mapped(
        collector: ElasticsearchCollector, es: AsyncElasticsearch, external_es: bool, topic_prefix: str) -> None:
    event = analytics(1, future_field="kept", tags={"team": "search"})
    await collector.handle_analytics_batch([event])
    index = f"{topic_prefix}-analytics-2026.03.14"
    doc = await es.get(index=index, id=event.id)
    assert doc["_source"]["future_field"] == "kept"
    mapping = (await es.indices.get_mapping(index=index))[index]["mappings"]
    assert "future_field" not in mapping["properties"]
    assert await count(es, index, term={"tags.team": "search"}) == 1
    if external_es:  # noida-db indexes unmapped fields anyway; Elasticsearch must not
        assert await count(es, index, term={"future_field": "kept"}) == 0


async def test_rejected_document_is_a_bad_event_with_the_reason_and_the_rest_is_indexed(
        collector: ElasticsearchCollector, es: AsyncElasticsearch, topic_prefix: str) -> None:
    # Valid per the event schema, but `choices` is mapped as integer: the server refuses 3e9 (400).
    batch = [analytics(i) for i in range(10)]
    batch[4] = analytics(4, choices=3_000_000_000)
    with pytest.raises(BadEvents) as info:
        await collector.handle_analytics_batch(batch)
    assert list(info.value.rejected) == ["an-00004"]
    reason = info.value.rejected["an-00004"]
    assert "choices" in reason and "rejected" in reason
    assert await count(es, tpl.alias_name(topic_prefix, "analytics")) == 9


async def test_bulk_requests_are_split_by_events_and_bytes(es_url: str, es: AsyncElasticsearch,
                                                           topic_prefix: str) -> None:
    collector = await open_collector(es_url, topic_prefix, bulk_max_events=7, bulk_max_bytes=2048,
                                     bulk_concurrency=3)
    try:
        batch = [proxy_log(i, response_body="x" * 300) for i in range(50)]
        await collector.handle_proxy_log_batch(batch)
    finally:
        await collector.close()
    assert await count(es, tpl.alias_name(topic_prefix, "proxy_log")) == 50


async def test_lifecycle_policy_installed_or_skipped_with_a_notice(
        es_url: str, es: AsyncElasticsearch, external_es: bool, topic_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "test.es")
    collector = await open_collector(es_url, topic_prefix, delete_after_days=30)
    await collector.close()
    if external_es:
        assert collector.lifecycle_supported is True
        policy = await es.ilm.get_lifecycle(name=tpl.policy_name(topic_prefix))
        assert policy[tpl.policy_name(topic_prefix)]["policy"]["phases"]["delete"]["min_age"] == "30d"
    else:
        assert collector.lifecycle_supported is False
        assert "no index lifecycle management" in caplog.text
    # Templates are installed either way.
    assert await es.indices.exists_index_template(name=tpl.alias_name(topic_prefix, "analytics"))


async def test_secrets_come_from_the_environment_and_are_never_logged(
        es_url: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_ES_PASSWORD", "s3cret-pw-value")
    settings = EsConfig(hosts=[es_url], username="elastic", password_env="TEST_ES_PASSWORD")
    assert settings.client_options()["basic_auth"] == ("elastic", "s3cret-pw-value")
    host_with_creds = es_url.replace("http://", "http://elastic:s3cret-pw-value@")
    assert "s3cret" not in redact_url(host_with_creds)
    collector = await open_collector(host_with_creds, topic_prefix, username="elastic",
                                     password_env="TEST_ES_PASSWORD")
    await collector.handle_analytics_batch([analytics(1)])
    await collector.close()
    assert "s3cret-pw-value" not in caplog.text

    monkeypatch.delenv("TEST_ES_PASSWORD")
    with pytest.raises(ConfigError, match="password_env"):
        settings.client_options()
    with pytest.raises(ConfigError, match=r"collectors\.es\.config\.hostz: Extra inputs are not permitted"):
        parse_collector_config("es", EsConfig, {"hostz": []})
