"""The budget store, on SQLite and on a real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from gateway_tap.budgets import migrations
from gateway_tap.budgets.periods import period_end, period_start, resets_at, usage_day, usd_to_micros
from gateway_tap.budgets.store import BudgetStore, Spend, StoreUnavailable, UsageRecord, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import BudgetSettings, BudgetStoreSettings
from tests.support.budget import usage

MARCH = date(2026, 3, 1)


def records(events: list) -> list[UsageRecord]:  # type: ignore[type-arg]
    return [UsageRecord.from_event(e) for e in events]


def test_money_rounding_is_defined_once() -> None:
    assert usd_to_micros(0.1) == 100_000
    assert usd_to_micros(0.0000015) == 2  # half up on the decimal repr, not on the binary float
    assert usd_to_micros(0.0000004) == 0
    assert usd_to_micros(12.345678) == 12_345_678
    assert sum(usd_to_micros(0.1) for _ in range(10)) == 1_000_000


def test_periods_are_utc_calendar_months_and_days() -> None:
    now = datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert period_start("monthly", now) == date(2026, 12, 1)
    assert period_end("monthly", date(2026, 12, 1)) == date(2027, 1, 1)
    assert resets_at("daily", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_start("daily", datetime(2026, 3, 1, 0, 30, tzinfo=UTC)) == date(2026, 3, 1)
    # A call counted against January that finished on Feb 1 still lands on a January day.
    assert usage_day("monthly", date(2026, 1, 1), datetime(2026, 2, 1, 0, 0, 5, tzinfo=UTC)) == date(2026, 1, 31)


def test_budget_settings_validation() -> None:
    with pytest.raises(ValueError, match="limit_usd and/or limit_tokens"):
        BudgetSettings(app_id="a")
    assert BudgetSettings(app_id="a", llm_id="gpt", limit_usd=1, period="daily").key == "a/gpt:daily"
    assert BudgetSettings(app_id="a", limit_tokens=5).alert_thresholds == (0.8, 1.0)


async def test_migrations_are_versioned_and_applied_once(budget_store_settings: BudgetStoreSettings) -> None:
    backend = budget_store_settings.backend
    versions = [m.version for m in migrations.load(backend)]
    assert versions and versions == sorted(versions)
    first = await open_store(budget_store_settings, migrate=False)
    try:
        assert await first.migrate() == versions
        assert await first.migrate() == []
    finally:
        await first.close()
    async with await open_store(budget_store_settings) as again:  # a second process migrating finds nothing to do
        assert await again.migrate() == []


async def test_recording_is_idempotent(budget_store: BudgetStore) -> None:
    rng = random.Random(6)
    events = [usage(app_id=f"app{i % 3}", llm_id=f"llm{i % 2}", cost=round(rng.uniform(0, 0.05), 7),
                    tokens=rng.randint(1, 5000)) for i in range(300)]
    expected = {}
    for e in events:
        key = (e.app_id, e.llm_id)
        s = expected.get(key, Spend())
        expected[key] = s + Spend(usd_to_micros(e.cost), e.total_tokens, 1)

    result = await budget_store.record_batch(records(events))
    assert (result.inserted, result.duplicates) == (300, 0)
    assert await budget_store.summary("monthly", MARCH) == expected

    again = await budget_store.record_batch(records(events))
    assert (again.inserted, again.duplicates) == (0, 300)
    assert await budget_store.summary("monthly", MARCH) == expected

    fresh = [usage(app_id="app0", llm_id="llm0", cost=0.25, tokens=10) for _ in range(5)]
    mixed = await budget_store.record_batch(records(events[:50] + fresh))
    assert (mixed.inserted, mixed.duplicates) == (5, 50)
    expected[("app0", "llm0")] += Spend(5 * 250_000, 50, 5)
    assert await budget_store.summary("monthly", MARCH) == expected


async def test_usage_with_a_key_is_also_totalled_per_key_idempotently(budget_store: BudgetStore) -> None:
    """The ledger keeps each event's key; a key's totals hold exactly its events' cost, apart from the app's (which
    hold every event), and redelivering changes neither."""
    rng = random.Random(23)
    keys = ["key_aaaa", "sha256:9f86d081884c", None]
    events = [usage(app_id=f"app{i % 2}", llm_id=f"llm{i % 3}", cost=round(rng.uniform(0, 0.05), 7),
                    tokens=rng.randint(1, 900), key_id=keys[i % 3]) for i in range(240)]
    await budget_store.record_batch(records(events))
    again = await budget_store.record_batch(records(events[::2]))
    assert again.inserted == 0
    for app in ("app0", "app1"):
        for key in ("key_aaaa", "sha256:9f86d081884c"):
            mine = [e for e in events if e.app_id == app and e.key_id == key]
            expected = Spend(sum(usd_to_micros(e.cost) for e in mine), sum(e.total_tokens for e in mine), len(mine))
            assert await budget_store.spend(app, None, "monthly", MARCH, key_id=key) == expected
            one_llm = [e for e in mine if e.llm_id == "llm1"]
            assert (await budget_store.spend(app, "llm1", "monthly", MARCH, key_id=key)).requests == len(one_llm)
        every = [e for e in events if e.app_id == app]
        assert await budget_store.spend(app, None, "monthly", MARCH) == Spend(
            sum(usd_to_micros(e.cost) for e in every), sum(e.total_tokens for e in every), len(every))
    assert await budget_store.spend("app0", None, "monthly", MARCH, key_id="key_other") == Spend()
    rows = await budget_store.key_totals(MARCH, None, [("app1", "key_aaaa")])
    assert rows and {(r.app_id, r.key_id) for r in rows} == {("app1", "key_aaaa")}
    snap = await budget_store.snapshot(MARCH, ["app0"], [], [("app0", "key_aaaa")])
    assert {r.scope for r in snap.totals} == {("app0", ""), ("app0", "key_aaaa")}


async def test_repeats_inside_one_batch_count_once(budget_store: BudgetStore) -> None:
    event = usage(cost=0.5, tokens=7)
    result = await budget_store.record_batch(records([event, event, event]))
    assert (result.inserted, result.duplicates) == (1, 2)
    assert await budget_store.spend("app", None, "monthly", MARCH) == Spend(500_000, 7, 1)


async def test_concurrent_overlapping_batches_count_each_event_once(budget_store_settings: BudgetStoreSettings) -> None:
    events = [usage(app_id="a", llm_id=f"l{i % 4}", cost=0.000123 * (i % 7 + 1), tokens=i) for i in range(2000)]
    # Eight writers on their own connections; every event is in three of the batches, in different orders.
    batches = []
    for w in range(8):
        chunk = [e for i, e in enumerate(events) if (i + w) % 8 < 3]
        random.Random(w).shuffle(chunk)
        batches.append([chunk[i:i + 250] for i in range(0, len(chunk), 250)])
    stores = [await open_store(budget_store_settings) for _ in range(8)]
    try:
        async def writer(s: BudgetStore, chunks: list) -> int:  # type: ignore[type-arg]
            return sum([(await s.record_batch(records(c))).inserted for c in chunks])

        inserted = await asyncio.gather(*(writer(s, b) for s, b in zip(stores, batches, strict=True)))
        assert sum(inserted) == len(events)
        total = await stores[0].spend("a", None, "monthly", MARCH)
        assert total == Spend(sum(usd_to_micros(e.cost) for e in events), sum(e.total_tokens for e in events),
                              len(events))
    finally:
        for s in stores:
            await s.close()


async def test_period_boundaries(budget_store: BudgetStore) -> None:
    jan_last = datetime(2026, 1, 31, 23, 59, 59, 999000, tzinfo=UTC)
    feb_first = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
    events = [
        usage(cost=1.0, at=jan_last),
        usage(cost=2.0, at=feb_first),
        # admitted in January, finished in February: counts for January (its declared period)
        usage(cost=4.0, at=datetime(2026, 2, 1, 0, 0, 3, tzinfo=UTC), start=date(2026, 1, 1)),
        usage(cost=8.0, at=feb_first, period="daily"),
    ]
    await budget_store.record_batch(records(events))
    jan, feb = date(2026, 1, 1), date(2026, 2, 1)
    assert (await budget_store.spend("app", None, "monthly", jan)).cost_micros == 5_000_000
    assert (await budget_store.spend("app", None, "monthly", feb)).cost_micros == 10_000_000
    assert (await budget_store.spend("app", None, "daily", date(2026, 1, 31))).cost_micros == 5_000_000
    assert (await budget_store.spend("app", None, "daily", feb)).cost_micros == 10_000_000
    assert (await budget_store.spend("app", "other-llm", "monthly", feb)).cost_micros == 0


async def test_alert_claims_are_persisted_once_per_period(budget_store: BudgetStore) -> None:
    spend = Spend(800_000, 10, 1)
    assert await budget_store.claim_alert("app:monthly", MARCH, 0.8, spend)
    assert not await budget_store.claim_alert("app:monthly", MARCH, 0.8, spend)
    assert await budget_store.claim_alert("app:monthly", MARCH, 1.0, spend)
    assert await budget_store.claim_alert("app:monthly", date(2026, 4, 1), 0.8, spend)


async def test_unreachable_postgres_is_retriable() -> None:
    settings = BudgetStoreSettings(backend="postgres", postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                                   timeout_s=1)
    with pytest.raises(StoreUnavailable) as info:
        await open_store(settings)
    assert info.value.retriable


async def test_unopenable_sqlite_is_retriable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        await open_store(BudgetStoreSettings(sqlite_path=str(tmp_path / "file" / "budgets.sqlite3")))


def test_budget_config_sections_name_the_key_path() -> None:
    from gateway_tap.settings import ConfigFileError, parse_config

    cfg = parse_config({"budgets": [{"app_id": "a", "limit_usd": 5}],
                        "budget_store": {"backend": "postgres", "postgres_dsn_env": "X"},
                        "budget_enforcement": {"on_store_error": "fail_closed"}})
    assert cfg.budgets[0].mode == "hard" and cfg.budget_store.backend == "postgres"
    assert cfg.budget_enforcement.staleness_s == 1.0
    with pytest.raises(ConfigFileError) as info:
        parse_config({"budgets": [{"app_id": "a", "limit_usd": -1, "perod": "daily"}],
                      "budget_enforcement": {"on_store_error": "maybe"}})
    text = str(info.value)
    assert "budgets[0].limit_usd: Input should be greater than or equal to 0" in text
    assert "budgets[0].perod: Extra inputs are not permitted" in text
    assert "budget_enforcement.on_store_error: Input should be 'fail_open' or 'fail_closed'" in text
    with pytest.raises(ConfigFileError) as info:
        parse_config({"budgets": [{"app_id": "a", "limit_usd": 5}, {"app_id": "a", "limit_usd": 6},
                                  {"app_id": "a", "limit_usd": 6, "period": "daily"}]})
    assert str(info.value).count("duplicate budget") == 1
    assert "budgets[1]: duplicate budget for app 'a' (monthly)" in str(info.value)


async def test_sqlite_store_opens_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    # A tap worker and the budget collector open the same new file: `PRAGMA journal_mode = WAL` against another
    # opener's RESERVED lock fails at once in SQLite (no busy handler); the store waits for it instead.
    path = tmp_path / "budgets.sqlite3"
    held = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
        held.set()
        time.sleep(0.3)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert await asyncio.to_thread(held.wait, 10)
    try:
        async with await open_store(BudgetStoreSettings(sqlite_path=str(path))) as store:
            assert store is not None
    finally:
        holder.join()
