"""The ``budget`` collector: handlers through the SDK harness, then ``gateway-tap collect budget``
against the real broker (replay of the whole topic, SIGKILL mid-batch), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from collectors import RetryLater
from collectors.sinks.budget import BudgetCollector
from collectors.testing import CollectorHarness
from gateway_tap.admin.db import connect
from gateway_tap.admin.store import AdminStore
from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.budgets.store import BudgetStore, Spend, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import BudgetSettings, BudgetStoreSettings
from tests.support.budget import TcpRelay, usage
from tests.support.collectors import collect_process, create_topics, produce_events

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MARCH = date(2026, 3, 1)


def config(settings: BudgetStoreSettings, budgets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"store": settings.model_dump(mode="json")}
    if budgets is not None:
        out["budgets"] = budgets
    return out


def alert_count(h: CollectorHarness, threshold: str) -> float:
    value = h.registry.get_sample_value("gateway_tap_budget_alerts_total",
                                        {"app": "app", "llm": "*", "period": "monthly", "threshold": threshold,
                                         "scope": "app"})
    return value or 0.0


async def test_alerts_fire_once_per_threshold_per_period(budget_store_settings: BudgetStoreSettings,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    budgets = [{"app_id": "app", "limit_usd": 1.0}]
    caplog.set_level(logging.WARNING)
    async with CollectorHarness(BudgetCollector, config(budget_store_settings, budgets), name="budget") as h:
        await h.feed([usage(cost=0.5, at=NOW)])
        assert (alert_count(h, "0.8"), alert_count(h, "1")) == (0, 0)
        crossing = [usage(cost=0.2, at=NOW), usage(cost=0.1, at=NOW)]  # 0.8 exactly: reaching counts
        await h.feed(crossing)
        await h.feed(crossing)  # redelivered: no second alert
        assert (alert_count(h, "0.8"), alert_count(h, "1")) == (1, 0)
        await h.feed([usage(cost=0.3, at=NOW)])
        assert (alert_count(h, "0.8"), alert_count(h, "1")) == (1, 1)
        await h.feed([usage(cost=5.0, at=datetime(2026, 4, 1, tzinfo=UTC))])  # a new period alerts again
        assert (alert_count(h, "0.8"), alert_count(h, "1")) == (2, 2)
    # a restarted collector (new process, same store) does not repeat them
    async with CollectorHarness(BudgetCollector, config(budget_store_settings, budgets), name="budget") as h2:
        await h2.feed([usage(cost=0.01, at=NOW)])
        assert (alert_count(h2, "0.8"), alert_count(h2, "1")) == (0, 0)
    lines = [r.getMessage() for r in caplog.records if "budget alert" in r.getMessage()]
    assert len(lines) == 4
    assert "app:monthly reached 80% of its hard limit for the period starting 2026-03-01" in lines[0]


async def test_api_budgets_alert_and_a_keys_budget_counts_only_that_key(budget_store_settings: BudgetStoreSettings,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Budgets set through the admin API (an app's, a key's) alert like the file's, picked up when the admin state's
    version moves; a key's soft budget alerts on the usage of that key (its lineage: a rotation's successor too)
    and not on the app's other keys."""
    caplog.set_level(logging.WARNING)
    admin = AdminStore(await connect(budget_store_settings))
    try:
        await admin.create_app("app", "", ["*"], {})
        (key, _), _ = await admin.issue_key("app")
        await admin.set_budget(BudgetSettings(app_id="app", key_id=key.lineage, limit_usd=1.0, mode="soft"))
        async with CollectorHarness(BudgetCollector, config(budget_store_settings, []), name="budget") as h:
            def key_alerts(threshold: str) -> float:
                return h.registry.get_sample_value("gateway_tap_budget_alerts_total", {
                    "app": "app", "llm": "*", "period": "monthly", "threshold": threshold, "scope": "key"}) or 0
            await h.feed([usage(cost=5.0, at=NOW, key_id="key_someone_else"), usage(cost=5.0, at=NOW)])
            assert key_alerts("0.8") == 0
            await h.feed([usage(cost=0.85, at=NOW, key_id=key.lineage)])
            assert (key_alerts("0.8"), key_alerts("1")) == (1, 0)
            # An app budget set now is read with the next batch (the state's version moved) and alerts at once.
            await admin.set_budget(BudgetSettings(app_id="app", limit_usd=10.0, alert_thresholds=(0.5,)))
            (_, successor, _), _ = await admin.rotate_key("app", key.id, 60)
            assert successor.lineage == key.lineage
            await h.feed([usage(cost=0.2, at=NOW, key_id=successor.lineage)])
            assert key_alerts("1") == 1
            assert h.registry.get_sample_value("gateway_tap_budget_alerts_total", {
                "app": "app", "llm": "*", "period": "monthly", "threshold": "0.5", "scope": "app"}) == 1
    finally:
        await admin.close()
    lines = [r.getMessage() for r in caplog.records if "budget alert" in r.getMessage()]
    assert any(f"app@{key.lineage}:monthly reached 80% of its soft limit" in line for line in lines), lines


async def test_non_usd_usage_is_rejected_and_the_rest_recorded(budget_store_settings: BudgetStoreSettings) -> None:
    good, bad = usage(cost=0.25, at=NOW), usage(cost=9.0, at=NOW)
    bad.currency = "EUR"
    async with CollectorHarness(BudgetCollector, config(budget_store_settings), name="budget") as h:
        await h.feed([good, bad])
        assert list(h.rejected) == [bad.id] and "not USD" in h.rejected[bad.id]
    async with await open_store(budget_store_settings) as s:
        assert await s.spend("app", None, "monthly", MARCH) == Spend(250_000, 100, 1)


async def test_store_outage_is_retry_later(pg_dsn: str) -> None:
    relay = await TcpRelay("127.0.0.1", 5432).start()
    settings = BudgetStoreSettings(backend="postgres", timeout_s=1, postgres_schema="collector_outage",
                                   postgres_dsn=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
    async with CollectorHarness(BudgetCollector, config(settings), name="budget") as h:
        await relay.cut()
        with pytest.raises(RetryLater, match="unavailable"):
            await h.feed([usage(at=NOW)])


async def requests_recorded(s: BudgetStore) -> int:
    return sum(v.requests for v in (await s.summary("monthly", MARCH)).values())


async def wait_until(check: Any, what: str, limit: float = 60) -> None:
    """Poll an async ``check``; ``limit`` only bounds a hang."""
    try:
        async with asyncio.timeout(limit):
            while not await check():  # noqa: ASYNC110 - polling a database, no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


async def metric(port: int, line_prefix: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


async def test_collect_budget_end_to_end_sigkill_and_replay(
        budget_store_settings: BudgetStoreSettings, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    """Kill the collector mid-stream: nothing lost or double counted; replaying the topic changes nothing."""
    await create_topics(kafka_bootstrap, topic_prefix)
    events = [usage(app_id=f"app{i % 3}", llm_id=f"llm{i % 2}", cost=0.000137 * (i % 11 + 1), tokens=i % 97 + 1,
                    at=NOW) for i in range(8000)]
    duplicates = events[:500]  # the tap's at-least-once publisher may send an event twice
    expected: dict[tuple[str, str], Spend] = {}
    for e in events:
        key = (e.app_id, e.llm_id)
        expected[key] = expected.get(key, Spend()) + Spend(usd_to_micros(e.cost), e.total_tokens, 1)

    def worker_config(group_id: str, instance: str) -> dict[str, Any]:
        # The store comes from the root budget_store section, as in deploy/gateway-tap.compose.yaml.
        return {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
                "budget_store": budget_store_settings.model_dump(mode="json"),
                "collectors": {"budget": {"group_id": group_id, "group_instance_id": instance,
                                          "session_timeout_ms": 10_000,
                                          "batch": {"max_events": 200, "max_wait_ms": 10},
                                          "metrics": {"port": free_port()}}}}

    await produce_events(kafka_bootstrap, topic_prefix, events[:3000])
    store = await open_store(budget_store_settings)
    first = collect_process("budget-1", "budget", worker_config("budget", "budget-a"), tmp_path)
    await asyncio.to_thread(first.start)
    producing = asyncio.create_task(produce_in_chunks(kafka_bootstrap, topic_prefix, events[3000:] + duplicates))
    try:
        async def some_recorded() -> bool:
            return await requests_recorded(store) >= 1500
        await wait_until(some_recorded, "the first worker recorded part of the stream")
        await asyncio.to_thread(first.kill)  # SIGKILL: possibly mid-transaction, never committed offsets after it
        assert not producing.done(), "the kill must land mid-stream"
        second = collect_process("budget-2", "budget", worker_config("budget", "budget-a"), tmp_path)
        await asyncio.to_thread(second.start)
        await producing

        async def all_recorded() -> bool:
            return await requests_recorded(store) >= len(events)
        await wait_until(all_recorded, "every event recorded", limit=90)
        assert await asyncio.to_thread(second.stop) == 0, second.log_tail()
        assert await store.summary("monthly", MARCH) == expected  # exact: nothing lost, nothing twice

        # Replay the whole topic with a new consumer group: every event is a duplicate now.
        replay_cfg = worker_config("budget-replay", "budget-r")
        port = replay_cfg["collectors"]["budget"]["metrics"]["port"]
        replay = collect_process("budget-replay", "budget", replay_cfg, tmp_path)
        await asyncio.to_thread(replay.start)

        async def replayed() -> bool:
            return await metric(port, 'gateway_tap_budget_recorded_total{outcome="duplicate"}') >= len(
                events) + len(duplicates)
        await wait_until(replayed, "the replay went through the whole topic", limit=90)
        assert await metric(port, 'gateway_tap_budget_recorded_total{outcome="inserted"}') == 0
        assert await asyncio.to_thread(replay.stop) == 0, replay.log_tail()
        assert await store.summary("monthly", MARCH) == expected
    finally:
        producing.cancel()
        first.stop()
        await store.close()


async def produce_in_chunks(bootstrap: str, prefix: str, events: list[Any], chunk: int = 250) -> None:
    for i in range(0, len(events), chunk):
        await produce_events(bootstrap, prefix, events[i:i + chunk])


async def test_database_down_at_start_is_retry_later_until_it_is_up(pg_dsn: str) -> None:
    relay = TcpRelay("127.0.0.1", 5432)  # not started yet: the port refuses connections
    settings = BudgetStoreSettings(backend="postgres", timeout_s=1, postgres_schema="collector_late_db",
                                   postgres_dsn=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
    event = usage(cost=0.5, at=NOW)
    async with CollectorHarness(BudgetCollector, config(settings), name="budget") as h:
        with pytest.raises(RetryLater):
            await h.feed([event])
        await relay.start()
        await h.feed([event])  # the runtime's retry of the same batch
        async with await open_store(settings) as s:
            assert await s.spend("app", None, "monthly", MARCH) == Spend(500_000, 100, 1)
    await relay.cut()
