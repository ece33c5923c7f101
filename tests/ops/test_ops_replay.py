"""``gateway-tap replay`` against the real broker: the file collector re-exports exactly the chosen
range (by event id; from/to as times, offsets, earliest) under its own group, and replaying into
the budget collector leaves the store's totals unchanged."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from collectors.runtime import build_runtime
from gateway_tap.budgets.store import open_store
from gateway_tap.cli import main
from gateway_tap.ops.replay import ReplayError, parse_position
from gateway_tap.settings import BudgetStoreSettings
from schemas import ProxyLog, topic_for
from tests.support.budget import usage
from tests.support.collectors import analytics, create_topics, produce_events, read_topic, wait_for, written
from tests.support.ops import RUNNER, ops_config, write_config


def event_id(value: bytes) -> str:
    return str(orjson.loads(value)["id"])


def file_ids(directory: Path, event_type: Any) -> list[str]:
    return [e["id"] for e in written(directory, event_type)]


def proxy_logs(n: int) -> list[ProxyLog]:
    return [ProxyLog(gateway_id="g", request_id=f"p{i}", app_id="app", method="POST", path="/v1/x",
                     status_code=200, latency={"total_ms": 1.0}) for i in range(n)]


def replay(config_path: str, *args: str) -> str:
    result = RUNNER.invoke(main, ["replay", "--config", config_path, "--collector", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_positions() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_position("42").offset == 42
    assert parse_position("earliest").edge == "earliest" and parse_position("latest").edge == "latest"
    assert parse_position("2h", now).timestamp_ms == int((now - timedelta(hours=2)).timestamp() * 1000)
    assert parse_position("2026-11-25T11:00:00", now).timestamp_ms == int((now - timedelta(hours=1)).timestamp() * 1000)
    assert parse_position("2026-11-25T12:00:00+01:00") == parse_position("2026-11-25T11:00:00Z")
    for bad in ("yesterday", "-5", "5w"):
        try:
            parse_position(bad)
        except ReplayError as exc:
            assert "not an offset" in str(exc)
        else:
            raise AssertionError(f"{bad!r} parsed")


def test_file_replay_reproduces_the_chosen_range(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> None:
    first, later, logs = analytics(40), analytics(30, start=100), proxy_logs(10)

    async def setup() -> str:
        await create_topics(kafka_bootstrap, topic_prefix)
        await produce_events(kafka_bootstrap, topic_prefix, [*first, *logs])
        await asyncio.sleep(0.05)  # record timestamps are in ms: keep the split point between the two batches
        split = datetime.now(UTC).isoformat()
        await asyncio.sleep(0.05)
        await produce_events(kafka_bootstrap, topic_prefix, later)
        return split

    split = asyncio.run(setup())

    def config_for(name: str) -> tuple[str, Path]:
        directory = tmp_path / name
        document = ops_config(tmp_path, kafka_bootstrap, topic_prefix)
        document["collectors"]["file"]["config"]["directory"] = str(directory)
        (tmp_path / name).mkdir()
        path = tmp_path / name / "gateway-tap.yaml"
        path.write_text(yaml.safe_dump(document))
        return str(path), directory

    everything, d_all = config_for("all")
    out = replay(everything, "file", "--from", "earliest")
    assert "done: 80 record(s)" in out
    assert sorted(file_ids(d_all, "analytics")) == sorted(e.id for e in [*first, *later])
    assert sorted(file_ids(d_all, "proxy_log")) == sorted(e.id for e in logs)

    since, d_since = config_for("since")
    replay(since, "file", "--from", split, "--types", "analytics")
    assert sorted(file_ids(d_since, "analytics")) == sorted(e.id for e in later)
    assert file_ids(d_since, "proxy_log") == []

    until, d_until = config_for("until")
    replay(until, "file", "--from", "earliest", "--to", split, "--types", "analytics")
    assert sorted(file_ids(d_until, "analytics")) == sorted(e.id for e in first)

    offsets, d_offsets = config_for("offsets")
    replay(offsets, "file", "--from", "5", "--to", "7", "--types", "analytics")
    records = asyncio.run(read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix), 70))
    expected = sorted(event_id(r.value) for r in records if 5 <= r.offset < 7)
    assert len(expected) >= 2 and sorted(file_ids(d_offsets, "analytics")) == expected  # 2 per non-empty partition

    async def groups() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            return [g for g, _ in await admin.list_consumer_groups() if g.startswith(f"{topic_prefix}-file")]
        finally:
            await admin.close()

    # Replays commit under their own groups; the live collector's group never appears.
    found = asyncio.run(groups())
    assert found and all(g.startswith(f"{topic_prefix}-file-replay-") for g in found)


def test_budget_replay_leaves_totals_unchanged(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> None:
    now = datetime.now(UTC)
    events = [usage(f"app{i % 3}", "llm", cost=0.001 * (i + 1), tokens=10 + i, at=now) for i in range(30)]
    document = ops_config(tmp_path, kafka_bootstrap, topic_prefix)
    document["collectors"] = {"budget": {"group_id": f"{topic_prefix}-budget", "metrics": {"port": None},
                                         "batch": {"max_events": 100, "max_wait_ms": 20}}}
    config_path = write_config(tmp_path, document)
    settings = BudgetStoreSettings(sqlite_path=str(tmp_path / "budgets.sqlite3"))

    async def totals() -> list[Any]:
        async with await open_store(settings) as store:
            return sorted(await store.daily_totals(now.date() - timedelta(days=1)), key=lambda t: t.app_id)

    async def live_export() -> list[Any]:
        await create_topics(kafka_bootstrap, topic_prefix)
        await produce_events(kafka_bootstrap, topic_prefix, events)
        runtime = build_runtime("budget", config_path)
        task = asyncio.create_task(runtime.run())

        def all_recorded() -> bool:
            return sum(t.requests for t in asyncio.run(totals())) == 30

        await wait_for(all_recorded, "30 usage events recorded")
        runtime.request_stop()
        assert await task == 0
        return await totals()

    before = asyncio.run(live_export())
    assert sum(t.cost_micros for t in before) == sum(round(e.cost * 1_000_000) for e in events)
    out = replay(config_path, "budget", "--from", "earliest")
    assert "done: 30 record(s)" in out, out
    assert asyncio.run(totals()) == before


def test_elasticsearch_replay_raises_the_refresh_interval_for_its_duration_only(
        tmp_path: Path, kafka_bootstrap: str, es_url: str, topic_prefix: str) -> None:
    from elasticsearch import AsyncElasticsearch

    from collectors.sinks.elasticsearch import EsConfig, refresh_interval_raised

    es_config = {"hosts": [es_url], "index_prefix": topic_prefix}
    one, two = f"{topic_prefix}-analytics-2026.01.01", f"{topic_prefix}-analytics-2026.01.02"

    async def settings_of() -> dict[str, Any]:
        async with AsyncElasticsearch(es_url) as es:
            got = await es.indices.get_settings(index=f"{topic_prefix}-*")
            return {i: b["settings"]["index"].get("refresh_interval") for i, b in got.body.items()}

    async def prepare_and_raise() -> tuple[dict[str, Any], dict[str, Any]]:
        async with AsyncElasticsearch(es_url) as es:
            await es.indices.create(index=one, settings={"index": {"refresh_interval": "2s"}})
            await es.indices.create(index=two)
        async with refresh_interval_raised(EsConfig.model_validate(es_config), "30s") as previous:
            during = await settings_of()
        return previous, during

    previous, during = asyncio.run(prepare_and_raise())
    assert previous == {one: "2s", two: None}
    assert during == {one: "30s", two: "30s"}
    assert asyncio.run(settings_of()) == {one: "2s", two: None}, "each index's own value is put back"

    events = analytics(20)
    asyncio.run(create_topics(kafka_bootstrap, topic_prefix))
    asyncio.run(produce_events(kafka_bootstrap, topic_prefix, events))
    document = ops_config(tmp_path, kafka_bootstrap, topic_prefix)
    document["collectors"]["elasticsearch"] = {"group_id": f"{topic_prefix}-es", "metrics": {"port": None},
                                               "batch": {"max_events": 100, "max_wait_ms": 20}, "config": es_config}
    config_path = write_config(tmp_path, document)
    out = replay(config_path, "elasticsearch", "--from", "earliest", "--refresh-interval", "-1")
    assert "done: 20 record(s)" in out and "refresh_interval" in out, out
    assert asyncio.run(settings_of())[one] == "2s"
    refused = RUNNER.invoke(main, ["replay", "--config", config_path, "--collector", "file", "--from", "earliest",
                                   "--refresh-interval", "30s"])
    assert refused.exit_code == 2 and "applies to an elasticsearch collector" in refused.output
