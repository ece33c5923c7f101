"""``gateway-tap status`` against the real broker, a real in-process tap and a real budget store:
lag per collector group after a live collector ran, dead-letter counts, the tap's spool gauges,
budget use, the tables and JSON of the CLI, and a clear exit 2 when Kafka is down."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson

from collectors.registry import DEFAULT_COLLECTORS
from collectors.runtime import build_runtime
from gateway_tap.budgets.store import UsageRecord, open_store
from gateway_tap.cli import main
from gateway_tap.dev.servers import free_port
from gateway_tap.ops.status import gather_status
from gateway_tap.settings import BudgetStoreSettings, parse_config
from schemas import topic_for
from tests.support.budget import usage
from tests.support.collectors import analytics, create_topics, produce, produce_events, wait_for, written
from tests.support.ops import RUNNER, ops_config, write_config
from tests.support.tap import LIMITED_KEY, running_tap, tap_config


async def run_file_collector_until(config_path: str, directory: Path, lines: int) -> None:
    """Run the real file collector (its configured group) until ``lines`` analytics lines were written."""
    runtime = build_runtime("file", config_path)
    task = asyncio.create_task(runtime.run())
    await wait_for(lambda: len(written(directory, "analytics")) >= lines, f"{lines} analytics lines")
    runtime.request_stop()
    assert await task == 0


async def test_status_reports_lag_dead_letters_tap_spool_and_budgets(
        tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, mock_llm: str) -> None:
    document = {**tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool"),
                **ops_config(tmp_path, kafka_bootstrap, topic_prefix),
                "budgets": [{"app_id": "test", "limit_usd": 2.0}, {"app_id": "limited", "limit_tokens": 1000}]}
    config_path = write_config(tmp_path, document)
    await create_topics(kafka_bootstrap, topic_prefix)
    topic = topic_for("analytics", topic_prefix)
    await produce_events(kafka_bootstrap, topic_prefix, analytics(20))
    await produce(kafka_bootstrap, topic, [b"not json", b"{}"])
    await run_file_collector_until(config_path, tmp_path / "files", 20)
    await produce_events(kafka_bootstrap, topic_prefix, analytics(5, start=100))  # not consumed: the lag
    store = await open_store(BudgetStoreSettings(sqlite_path=str(tmp_path / "budgets.sqlite3")))
    try:
        await store.record_batch([UsageRecord.from_event(usage("test", "openai", cost=0.5, at=datetime.now(UTC)))])
    finally:
        await store.close()

    config = parse_config(document)
    async with running_tap(document):
        report = await gather_status(config)  # the tap found through tap.metrics

    assert report.kafka_error is None and report.exit_code == 0
    groups = {g.collector: g for g in report.groups}
    # the default built-ins, configured or not (elasticsearch is not: it shows everything behind); the opt-in
    # ones (lake, otlp) only when configured
    assert set(groups) == set(DEFAULT_COLLECTORS) | set(document.get("collectors", {}))
    assert "otlp" not in groups and "lake" not in groups
    assert groups["file"].group_id == f"{topic_prefix}-file"
    assert groups["elasticsearch"].group_id == f"{topic_prefix}.collector.elasticsearch"
    file_lag = {t.topic: t for t in groups["file"].topics}
    assert file_lag[topic].end == 27 and file_lag[topic].committed == 22 and file_lag[topic].lag == 5
    assert sum(p.lag for p in file_lag[topic].partitions) == 5 and len(file_lag[topic].partitions) == 3
    es_lag = {t.topic: t for t in groups["elasticsearch"].topics}
    assert es_lag[topic].lag == 27 and es_lag[topic].committed == 0  # never ran: everything is behind
    assert [t.topic for t in groups["budget"].topics] == [topic_for("budget_usage", topic_prefix)]
    dlq = {d.topic: d for d in report.dlq}
    assert dlq[topic + ".dlq"].records == 2 and dlq[topic + ".dlq"].exists
    [tap_status] = report.taps
    assert tap_status.error is None
    assert tap_status.spool_pending_events == 0 and tap_status.spool_bytes is not None
    assert tap_status.queue_depth_events == 0 and tap_status.kafka_connected == 1
    budgets = {b.app_id: b for b in report.budgets}
    assert report.budget_error is None
    assert budgets["test"].spent_usd == 0.5 and budgets["test"].used_pct == 25.0
    assert budgets["limited"].limit_tokens == 1000 and budgets["limited"].used_pct == 0.0


async def test_budget_use_is_read_for_the_current_period(tmp_path: Path, kafka_bootstrap: str,
                                                         topic_prefix: str) -> None:
    document = ops_config(tmp_path, kafka_bootstrap, topic_prefix,
                          budgets=[{"app_id": "a", "limit_usd": 2.0}, {"app_id": "b", "limit_tokens": 1000,
                                                                        "period": "daily"}])
    now = datetime.now(UTC)
    store = await open_store(BudgetStoreSettings(sqlite_path=str(tmp_path / "budgets.sqlite3")))
    try:
        await store.record_batch([UsageRecord.from_event(usage("a", "x", cost=0.5, at=now)), UsageRecord.from_event(
            usage("b", "x", cost=0.0, tokens=250, at=now, period="daily"))])
    finally:
        await store.close()
    report = await gather_status(parse_config(document), [f"http://127.0.0.1:{free_port()}"], now=now)
    budgets = {b.app_id: b for b in report.budgets}
    assert budgets["a"].spent_usd == 0.5 and budgets["a"].used_pct == 25.0
    assert budgets["b"].spent_tokens == 250 and budgets["b"].used_pct == 25.0
    [tap_status] = report.taps
    assert tap_status.error is not None and tap_status.error.startswith("unreachable")


def test_cli_tables_and_json(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str) -> None:
    config_path = write_config(tmp_path, ops_config(tmp_path, kafka_bootstrap, topic_prefix,
                                                    budgets=[{"app_id": "a", "limit_usd": 1.0}]))
    asyncio.run(create_topics(kafka_bootstrap, topic_prefix))
    tap_url = f"http://127.0.0.1:{free_port()}"
    result = RUNNER.invoke(main, ["status", "--config", config_path, "--tap-url", tap_url])
    assert result.exit_code == 0, result.output
    for text in ("Collector lag", f"{topic_prefix}-file", f"{topic_prefix}.collector.budget", "Dead letters",
                 f"{topic_prefix}.analytics.dlq", "unreachable", "no budget store yet"):
        assert text in result.output
    result = RUNNER.invoke(main, ["status", "--config", config_path, "--tap-url", tap_url, "--json"])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.output)
    assert doc["kafka_error"] is None and doc["exit_code"] == 0
    assert [g["collector"] for g in doc["groups"]] == list(DEFAULT_COLLECTORS)
    assert all(len(t["partitions"]) == 3 for g in doc["groups"] for t in g["topics"])
    assert doc["taps"][0]["url"] == tap_url + "/metrics"


def test_kafka_down_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    config_path = write_config(tmp_path, ops_config(tmp_path, bootstrap, "down"))
    result = RUNNER.invoke(main, ["status", "--config", config_path, "--tap-url", f"http://{bootstrap}"])
    assert result.exit_code == 2
    assert f"Kafka unreachable at {bootstrap}" in result.output and "Traceback" not in result.output
    result = RUNNER.invoke(main, ["status", "--config", config_path, "--json"])
    assert result.exit_code == 2 and orjson.loads(result.output)["kafka_error"].startswith("Kafka unreachable")


async def test_status_reports_rate_limits_and_refusals_per_tap(tmp_path: Path, kafka_bootstrap: str,
                                                               topic_prefix: str, mock_llm: str) -> None:
    document = {**tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool"),
                **ops_config(tmp_path, kafka_bootstrap, topic_prefix),
                "rate_limits": [{"app_id": "limited", "requests_per_minute": 1, "max_concurrent": 2}]}
    config = parse_config(document)
    path = write_config(tmp_path, document)
    async with running_tap(document) as tap:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):  # the second one is over the limit
                async with http.post(f"{tap.url}/llm/anthropic/v1/messages", headers={"x-api-key": LIMITED_KEY},
                                     json={"model": "m", "max_tokens": 5,
                                           "messages": [{"role": "user", "content": "hi"}]}) as resp:
                    await resp.read()
            assert resp.status == 429
        report = await gather_status(config)  # the tap found through tap.metrics
        # In a thread: the command runs its own event loop.
        result = await asyncio.to_thread(RUNNER.invoke, main, ["status", "--config", path,
                                                               "--tap-url", tap.metrics_url])
    [tap_status] = report.taps
    assert tap_status.rate_limited == 1 and tap_status.redis_up is None  # local mode: no Redis
    assert report.rate_limiting == "local"
    assert [(r.scope, r.requests_per_minute, r.tokens_per_minute, r.max_concurrent) for r in report.rate_limits] == [
        ("app=limited", 1, None, 2)]
    assert "Rate limits (local)" in result.output and "app=limited" in result.output
