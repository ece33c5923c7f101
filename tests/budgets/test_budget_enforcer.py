"""The tap's budget enforcer against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from gateway_tap.budgets.enforcer import BudgetEnforcer
from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.budgets.store import BudgetStore, StoreUnavailable, UsageRecord, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import BudgetEnforcementSettings, BudgetSettings, BudgetStoreSettings
from tests.support.budget import TcpRelay, usage

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MANUAL = BudgetEnforcementSettings(staleness_s=3600)  # tests refresh explicitly


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def enforcer(budgets: list[BudgetSettings], s: BudgetStore, settings: BudgetEnforcementSettings = MANUAL,
             clock: Clock | None = None) -> BudgetEnforcer:
    return BudgetEnforcer(budgets, s, settings, clock=clock or Clock(NOW), registry=CollectorRegistry())


async def test_cache_shows_store_spend_after_refresh(budget_store: BudgetStore) -> None:
    e = enforcer([BudgetSettings(app_id="app", limit_usd=1.0)], budget_store)
    await budget_store.record_batch([UsageRecord.from_event(usage(cost=0.6, at=NOW))])
    await e.start()
    try:
        assert e.status("app")[0].spent_usd == 0.6
        await budget_store.record_batch([UsageRecord.from_event(usage(cost=0.5, at=NOW))])
        assert e.check("app", "llm").allowed  # the cache has not been refreshed yet
        await e.refresh()
        decision = e.check("app", "llm")
        assert not decision.allowed and decision.reason == "budget_exceeded"
        assert decision.budget is not None and decision.budget.spent_usd == 1.1
        assert decision.retry_after == (datetime(2026, 4, 1, tzinfo=UTC) - NOW).total_seconds()
        assert e.check("other-app", "llm").allowed  # no budget, no limit
    finally:
        await e.stop()


async def test_background_refresh(budget_store: BudgetStore) -> None:
    e = enforcer([BudgetSettings(app_id="app", limit_tokens=100)], budget_store,
                 BudgetEnforcementSettings(staleness_s=0.05))
    async with e:
        await budget_store.record_batch([UsageRecord.from_event(usage(tokens=100, at=NOW))])
        for _ in range(200):  # bounded poll: the refresh runs every 50 ms
            if not e.check("app", "llm").allowed:
                break
            await asyncio.sleep(0.05)
        assert e.status("app")[0].spent_tokens == 100
        assert not e.check("app", "llm").allowed


async def test_own_spend_counts_until_the_store_has_it_and_never_twice(budget_store: BudgetStore) -> None:
    e = enforcer([BudgetSettings(app_id="app", limit_usd=10.0)], budget_store)
    await e.start()
    decision = e.admit("app", "llm", estimated_cost_usd=0.5, estimated_tokens=50)
    assert decision.allowed and decision.reservation is not None
    status = e.status("app")[0]
    assert (status.spent_usd, status.reserved_usd, status.reserved_tokens) == (0, 0.5, 50)
    event = usage(cost=0.75, tokens=30, at=NOW)
    decision.reservation.settle(event)
    decision.reservation.settle(event)  # idempotent
    status = e.status("app")[0]
    assert (status.spent_usd, status.reserved_usd, status.spent_tokens) == (0.75, 0, 30)
    await e.refresh()  # the pipeline has not delivered it yet: still counted, from the tap's own books
    assert e.status("app")[0].spent_usd == 0.75
    await budget_store.record_batch([UsageRecord.from_event(event)])
    await e.refresh()  # now the store has it: counted once
    assert e.status("app")[0].spent_usd == 0.75
    e.admit("app", "llm").reservation.release()  # type: ignore[union-attr]
    assert e.status("app")[0].reserved_usd == 0
    await e.stop()


@pytest.mark.parametrize("estimate", [False, True])
async def test_overspend_is_bounded_by_requests_in_flight(budget_store: BudgetStore, estimate: bool) -> None:
    """N concurrent requests against a small budget, the collector and the refresh running alongside.

    Documented bound: overspend <= sum of max(0, cost - estimate) over the requests in flight when the
    last one was admitted (that one included). Without estimates: their costs; with exact estimates: 0.
    """
    limit, cost, n = 1.0, 0.07, 80
    e = enforcer([BudgetSettings(app_id="app", limit_usd=limit)], budget_store)
    await e.start()
    rng = random.Random(estimate)
    inflight: set[int] = set()
    bound_at_last_admission = 0
    admitted: list[float] = []
    outbox: list[UsageRecord] = []
    done = asyncio.Event()

    async def request(i: int) -> None:
        nonlocal bound_at_last_admission
        await asyncio.sleep(rng.uniform(0, 0.02))
        d = e.admit("app", "llm", estimated_cost_usd=cost if estimate else 0.0)
        if not d.allowed:
            assert d.reason == "budget_exceeded"
            return
        inflight.add(i)
        bound_at_last_admission = usd_to_micros(0 if estimate else cost) * len(inflight)
        admitted.append(cost)
        await asyncio.sleep(rng.uniform(0, 0.03))
        event = usage(cost=cost, at=NOW)
        assert d.reservation is not None
        d.reservation.settle(event)
        inflight.discard(i)
        outbox.append(UsageRecord.from_event(event))

    async def collector_and_refresh() -> None:
        while not done.is_set():
            batch, outbox[:] = outbox[:], []
            await budget_store.record_batch(batch)
            await e.refresh()
            await asyncio.sleep(0.005)

    side = asyncio.create_task(collector_and_refresh())
    # Two waves, so that "it did start rejecting" never depends on how the machine schedules the admissions:
    # however the first wave interleaves, the second starts after the first settled well past the limit.
    await asyncio.gather(*(request(i) for i in range(n // 2)))
    await asyncio.gather(*(request(i) for i in range(n // 2, n)))
    done.set()
    await side
    await budget_store.record_batch(outbox)
    await e.stop()

    stored = (await budget_store.spend("app", None, "monthly", NOW.date().replace(day=1))).cost_micros
    assert stored == usd_to_micros(cost) * len(admitted)  # exact: every admitted request recorded once
    overspend = stored - usd_to_micros(limit)
    assert overspend <= bound_at_last_admission
    assert len(admitted) < n  # it did start rejecting
    if estimate:
        assert len(admitted) == int(limit // cost)  # with exact estimates it admits right up to the limit


async def test_new_period_starts_at_the_boundary(budget_store: BudgetStore) -> None:
    clock = Clock(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC))
    e = enforcer([BudgetSettings(app_id="app", limit_usd=1.0),
                  BudgetSettings(app_id="app", llm_id="llm", limit_tokens=1000, period="daily")],
                 budget_store, clock=clock)
    await budget_store.record_batch([UsageRecord.from_event(usage(cost=1.0, tokens=10, at=clock.now))])
    await e.start()
    blocked = e.check("app", "llm")
    assert not blocked.allowed and blocked.retry_after == 1  # one second to the new month
    clock.now = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
    fresh = e.check("app", "llm")
    assert fresh.allowed and [b.spent_usd for b in fresh.budgets] == [0, 0]
    assert fresh.budgets[0].resets_at == datetime(2026, 3, 1, tzinfo=UTC)
    await e.stop()


async def test_soft_budgets_never_block_and_token_limits_do(budget_store: BudgetStore) -> None:
    e = enforcer([BudgetSettings(app_id="soft", limit_usd=0.01, mode="soft"),
                  BudgetSettings(app_id="tok", limit_tokens=500)], budget_store)
    await budget_store.record_batch([UsageRecord.from_event(usage(app_id="soft", cost=5.0, at=NOW)),
                              UsageRecord.from_event(usage(app_id="tok", tokens=500, at=NOW))])
    await e.start()
    soft = e.check("soft", "llm")
    assert soft.allowed and soft.budgets[0].exceeded
    assert not e.check("tok", "llm").allowed
    d = e.admit("tok", "llm")
    assert not d.allowed and d.reservation is None
    await e.stop()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_store_unreachable_from_the_start(policy: str) -> None:
    settings = BudgetStoreSettings(backend="postgres", timeout_s=1,
                                   postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/closed")
    s = await open_store(settings, migrate=False)
    e = enforcer([BudgetSettings(app_id="app", limit_usd=1.0)], s,
                 BudgetEnforcementSettings(staleness_s=3600, on_store_error=policy))  # type: ignore[arg-type]
    await e.start()  # does not raise: the failure is recorded and counted
    assert not e.store_available and e.last_error
    d = e.admit("app", "llm")
    assert d.store_stale
    if policy == "fail_open":
        assert d.allowed
    else:
        assert not d.allowed and d.reason == "budget_store_unavailable" and d.retry_after == 3600
    assert e.check("no-budget-app", "llm").allowed  # apps without budgets are never affected
    await e.stop()
    await s.close()


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_store_outage_after_start(pg_dsn: str, policy: str) -> None:
    """PostgreSQL reached through a relay the test cuts: the last known spend keeps counting under fail_open."""
    relay = await TcpRelay("127.0.0.1", 5432).start()
    host_dsn = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    s = await open_store(BudgetStoreSettings(backend="postgres", postgres_dsn=host_dsn, timeout_s=1,
                                             postgres_schema=f"outage_{policy}"))
    await s.record_batch([UsageRecord.from_event(usage(app_id="hot", cost=2.0, at=NOW))])
    e = enforcer([BudgetSettings(app_id="app", limit_usd=1.0), BudgetSettings(app_id="hot", limit_usd=1.0)], s,
                 BudgetEnforcementSettings(staleness_s=3600, store_error_grace_s=0,
                                           on_store_error=policy))  # type: ignore[arg-type]
    await e.start()
    assert e.store_available
    d = e.admit("app", "llm")
    assert d.allowed and d.reservation is not None
    d.reservation.settle(usage(app_id="app", cost=1.0, at=NOW))
    await relay.cut()
    with pytest.raises(StoreUnavailable):
        await e.refresh()
    assert not e.store_available  # store_error_grace_s is 0
    over_own = e.admit("app", "llm")  # blocked by this tap's own admitted spend either way
    over_known = e.admit("hot", "llm")  # blocked by the last known store spend either way
    assert not over_own.allowed and not over_known.allowed
    if policy == "fail_open":
        assert over_own.reason == over_known.reason == "budget_exceeded"
    else:
        assert over_own.reason == over_known.reason == "budget_store_unavailable"
    await e.stop()
    await s.close()


def test_usd_to_micros_is_the_decimal_half_up_rule() -> None:
    """The integer rounding of the hot path equals Decimal(repr(usd)) scaled and rounded half up, memo or not."""
    from decimal import ROUND_HALF_UP, Decimal

    from gateway_tap.budgets import periods

    def decimal_rule(usd: float) -> int:
        return int(Decimal(repr(float(usd))).scaleb(6).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    rng = random.Random(7)
    values = [0.0, -0.0, 5e-7, 4.999999e-7, 1.5e-6, 2.5e-6, -2.5e-6, 1e-7, 0.002, 25, 1e16, 9.999999999999999e-7,
              (3 * 0.15 + 4 * 0.6) / 1e6, 0.1 + 0.2]
    for _ in range(20_000):
        tokens_in, tokens_out = rng.randint(0, 100_000), rng.randint(0, 10_000)
        values += [rng.random() * 10 ** rng.randint(-12, 8), rng.randint(0, 10**7) / 10 ** rng.randint(0, 9),
                   (tokens_in * rng.choice([0.15, 2.5, 0.8, 3.0]) + tokens_out * rng.choice([0.6, 10.0, 4.0])) / 1e6,
                   -rng.random()]
    for value in values:
        assert periods.usd_to_micros(value) == decimal_rule(value), value
        assert periods.usd_to_micros(value) == decimal_rule(value), value  # from the memo this time
    assert len(periods._MICROS) <= periods._MICROS_MAX


async def test_a_key_budget_limits_that_key_only_and_the_app_budget_every_key(budget_store: BudgetStore) -> None:
    """A key's own hard budget refuses that key's requests (429 budget_exceeded) while another key of the same app
    is admitted; its spend counts from the store (the key's totals), from this tap's pending usage and from its
    requests in flight, and also counts against the app's budget."""
    budgets = [BudgetSettings(app_id="app", limit_usd=10.0),
               BudgetSettings(app_id="app", key_id="key_small", limit_usd=1.0, period="daily")]
    await budget_store.record_batch([UsageRecord.from_event(usage(cost=0.7, at=NOW, key_id="key_small")),
                                     UsageRecord.from_event(usage(cost=2.0, at=NOW, key_id="key_big"))])
    e = enforcer(budgets, budget_store)
    await e.start()
    try:
        [app_budget, key_budget] = e.status("app", key_id="key_small")
        assert (app_budget.key_id, app_budget.spent_usd) == (None, 2.7)
        assert (key_budget.key_id, key_budget.spent_usd, key_budget.period) == ("key_small", 0.7, "daily")
        assert [b.key_id for b in e.status("app", key_id="key_big")] == [None]
        held = e.admit("app", "llm", estimated_cost_usd=0.25, key_id="key_small")
        assert held.allowed and held.reservation is not None
        refused = e.admit("app", "llm", estimated_cost_usd=0.1, key_id="key_small")  # 0.7 + 0.25 in flight + 0.1
        assert not refused.allowed and refused.reason == "budget_exceeded"
        assert refused.budget is not None and refused.budget.key_id == "key_small"
        assert refused.retry_after == MANUAL.staleness_s  # only the request in flight holds the rest (may settle lower)
        other = e.admit("app", "llm", estimated_cost_usd=0.1, key_id="key_big")
        assert other.allowed and other.reservation is not None
        other.reservation.settle(usage(cost=0.1, at=NOW, key_id="key_big"))
        held.reservation.settle(usage(cost=0.4, at=NOW, key_id="key_small"))  # 1.1 of 1.0 spent
        refused = e.admit("app", "llm", estimated_cost_usd=0.0, key_id="key_small")
        assert not refused.allowed and refused.retry_after == (datetime(2026, 3, 16, tzinfo=UTC) - NOW).total_seconds()
        assert e.check("app", "llm").allowed  # a request without that key (another key, a plugin's auth)
        assert e.status("app")[0].spent_usd == pytest.approx(3.2)
        await e.refresh()  # nothing recorded yet: the tap's own usage still counts, per key and per app
        assert e.status("app", key_id="key_small")[1].spent_usd == pytest.approx(1.1)
        assert e.status("app", key_id="key_small")[0].spent_usd == pytest.approx(3.2)
    finally:
        await e.stop()


async def test_a_soft_key_budget_never_refuses(budget_store: BudgetStore) -> None:
    e = enforcer([BudgetSettings(app_id="app", key_id="key_a", limit_tokens=10, mode="soft")], budget_store)
    await budget_store.record_batch([UsageRecord.from_event(usage(tokens=50, at=NOW, key_id="key_a"))])
    await e.start()
    try:
        decision = e.admit("app", "llm", estimated_tokens=20, key_id="key_a")
        assert decision.allowed
        assert e.status("app", key_id="key_a")[0].exceeded
    finally:
        await e.stop()
