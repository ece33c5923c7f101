"""Hard budgets across taps: several enforcers (as several tap workers) on one real store (SQLite and PostgreSQL),
with no budget collector at all (the pipeline's lag is unbounded): admission against leases holds the budget,
and the stated overspend bound (docs/budgets.md) is measured against the requests that were actually in flight.
Without leases the same load overspends by about the number of workers, which shows the test can fail."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from gateway_tap.budgets.enforcer import BudgetEnforcer
from gateway_tap.budgets.store import BudgetStore, UsageRecord
from gateway_tap.settings import BudgetEnforcementSettings, BudgetSettings
from tests.support.budget import usage

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
LIMIT = 2000


@dataclass
class Run:
    admitted: int = 0
    refused: int = 0
    spent: int = 0
    finished_at: list[float] = field(default_factory=list)  # per admitted request, when it settled
    admitted_at: list[float] = field(default_factory=list)
    misestimate: list[int] = field(default_factory=list)  # max(0, actual - estimate) per admitted request


async def load(enforcers: list[BudgetEnforcer], estimate: int, actual: int, clients: int = 48,
               duration_s: float = 2.5) -> Run:
    """``clients`` concurrent clients, each on one of the enforcers, sending until ``duration_s`` is over."""
    run = Run()
    deadline = time.monotonic() + duration_s

    async def client(n: int) -> None:
        e = enforcers[n % len(enforcers)]
        while time.monotonic() < deadline:
            d = await e.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=estimate, now=NOW)
            if not d.allowed:
                run.refused += 1
                await asyncio.sleep(0.01)
                continue
            assert d.reservation is not None
            run.admitted += 1
            run.admitted_at.append(time.monotonic())
            await asyncio.sleep(random.uniform(0.001, 0.03))  # the upstream call
            d.reservation.settle(usage(tokens=actual, cost=0.0, at=NOW))
            run.spent += actual
            run.finished_at.append(time.monotonic())
            run.misestimate.append(max(0, actual - estimate))

    await asyncio.gather(*(client(n) for n in range(clients)))
    return run


def enforcers_on(store: BudgetStore, n: int, **settings: object) -> list[BudgetEnforcer]:
    budgets = [BudgetSettings(app_id="app", limit_tokens=LIMIT, period="daily")]
    s = BudgetEnforcementSettings.model_validate({"staleness_s": 0.05, **settings})
    return [BudgetEnforcer(budgets, store, s, clock=lambda: NOW, registry=CollectorRegistry(), holder=f"tap-{i}")
            for i in range(n)]


async def test_exact_estimates_never_overspend_across_workers(budget_store: BudgetStore) -> None:
    workers = enforcers_on(budget_store, 3)
    for e in workers:
        await e.start()
    try:
        run = await load(workers, estimate=30, actual=30)
    finally:
        for e in workers:
            await e.stop()
    # Bound (docs/budgets.md): sum of max(0, actual - estimate) over the requests in flight = 0 here.
    assert run.spent <= LIMIT
    assert run.spent >= LIMIT - 3 * 30 * 2, run  # leases come back: the budget is used up, not stranded
    assert run.refused > 0


async def test_undershooting_estimates_stay_within_the_stated_bound(budget_store: BudgetStore) -> None:
    staleness_s = 0.05
    workers = enforcers_on(budget_store, 3, staleness_s=staleness_s)
    for e in workers:
        await e.start()
    try:
        run = await load(workers, estimate=20, actual=30)
    finally:
        for e in workers:
            await e.stop()
    last = max(run.admitted_at)
    # The stated bound: requests in flight, or finished less than staleness_s earlier, at the last admission.
    window = [m for m, a, f in zip(run.misestimate, run.admitted_at, run.finished_at, strict=False)
              if a <= last and f > last - staleness_s]
    bound = sum(window)
    assert run.spent - LIMIT <= bound, (run.spent - LIMIT, bound)
    assert bound < 48 * 10 * 2  # never more than twice the clients' worth of misestimates


async def test_without_leases_each_worker_spends_the_whole_budget(budget_store: BudgetStore) -> None:
    workers = enforcers_on(budget_store, 3, leases=False)
    for e in workers:
        await e.start()
    try:
        run = await load(workers, estimate=30, actual=30, duration_s=1.5)
    finally:
        for e in workers:
            await e.stop()
    assert run.spent > 2 * LIMIT  # no collector: each worker only knows its own spend


async def test_recorded_usage_leaves_the_claims_and_stopped_workers_free_theirs(budget_store: BudgetStore) -> None:
    """A worker's claim covers its unrecorded usage until the ledger has it (never counted twice for long), and a
    stopped worker gives its unused lease back."""
    one, two = enforcers_on(budget_store, 2, staleness_s=3600)
    await one.refresh()
    await two.refresh()
    d = await one.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=100, now=NOW)
    assert d.allowed and d.reservation is not None
    event = usage(tokens=100, cost=0.0, at=NOW)
    d.reservation.settle(event)
    claims = one._claims()
    assert claims == {("app", "", "llm", NOW.date()): (0, 200)}  # 100 used + 100 left of a 200 lease (10% of the room)
    await budget_store.record_batch([UsageRecord.from_event(event)])
    one._drawn.clear()  # no request drew from the lease since: the next refresh returns it
    await one.refresh()
    assert one._claims() == {}
    # The other worker can now lease everything but the recorded 100.
    big = await two.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=LIMIT - 100, now=NOW)
    assert big.allowed
    refused = await one.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=1, now=NOW)
    assert not refused.allowed and refused.reason == "budget_exceeded"
    assert refused.retry_after == 3600  # only requests in flight hold the rest: staleness_s
    assert big.reservation is not None
    big.reservation.release()
    await two.stop()  # not started: nothing to stop, the claims stay until they expire


@pytest.mark.parametrize("budget_store_settings", ["postgres"], indirect=True)
async def test_claims_of_a_dead_worker_expire(budget_store: BudgetStore) -> None:
    one, two = enforcers_on(budget_store, 2, staleness_s=3600, claim_ttl_s=0.3, lease_fraction=1.0)
    await one.refresh()
    await two.refresh()
    assert (await one.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=10, now=NOW)).allowed
    # one leased the whole room and died (never renews); two must wait for its claims to expire.
    assert not (await two.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=10, now=NOW)).allowed
    await asyncio.sleep(0.4)
    assert (await two.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=10, now=NOW)).allowed


async def test_key_budgets_hold_across_workers_next_to_the_apps(budget_store: BudgetStore) -> None:
    """Three workers, no collector: a key's own hard budget is admitted against leases of its own (claims with the
    key's id), so its exact estimates never overspend it across the workers, while the app's budget, which every
    request of the app draws from too, holds as well and the app's other key keeps being admitted."""
    budgets = [BudgetSettings(app_id="app", limit_tokens=4 * LIMIT, period="daily"),
               BudgetSettings(app_id="app", key_id="key_small", limit_tokens=LIMIT // 4, period="daily")]
    s = BudgetEnforcementSettings(staleness_s=0.05)
    workers = [BudgetEnforcer(budgets, budget_store, s, clock=lambda: NOW, registry=CollectorRegistry(),
                              holder=f"tap-{i}") for i in range(3)]
    spent = {"key_small": 0, "key_big": 0}
    admitted_after_small_refused = []
    small_refused = asyncio.Event()
    deadline = time.monotonic() + 2.0

    async def client(n: int) -> None:
        e, key = workers[n % 3], ("key_small", "key_big")[n % 2]
        while time.monotonic() < deadline:
            d = await e.admit_leased("app", "llm", estimated_cost_micros=0, estimated_tokens=25, now=NOW, key_id=key)
            if not d.allowed:
                if key == "key_small":
                    small_refused.set()
                await asyncio.sleep(0.01)
                continue
            assert d.reservation is not None
            await asyncio.sleep(random.uniform(0.001, 0.02))
            d.reservation.settle(usage(tokens=25, cost=0.0, at=NOW, key_id=key))
            spent[key] += 25
            if key == "key_big" and small_refused.is_set():
                admitted_after_small_refused.append(1)

    for e in workers:
        await e.start()
    try:
        await asyncio.gather(*(client(n) for n in range(24)))
        assert await budget_store.key_totals(NOW.date(), None, [("app", "key_small")]) == []  # no collector
    finally:
        for e in workers:
            await e.stop()
    assert LIMIT // 4 - 3 * 25 * 2 <= spent["key_small"] <= LIMIT // 4, spent
    assert spent["key_small"] + spent["key_big"] <= 4 * LIMIT, spent
    assert admitted_after_small_refused, spent  # the app's other key went on after the small one was refused
