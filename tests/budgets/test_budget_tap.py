"""Budget enforcement in the tap, end to end over real HTTP: the tap (in-process, injected clock) in front of
the mock upstream, events on the real broker, ``gateway-tap collect budget`` writing the store (SQLite and
PostgreSQL) that the tap reads back.

Replaying the whole budget topic leaving the totals unchanged, and killing the collector mid-batch, are
covered by tests/collectors/test_budget_collector.py::test_collect_budget_end_to_end_sigkill_and_replay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway_tap.apps import hash_key
from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.budgets.store import Spend, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.proxy.app import create_app
from gateway_tap.proxy.protocol import TapRunner
from gateway_tap.settings import BudgetStoreSettings, default_key_id, parse_config
from schemas import Analytics, BudgetUsage, ProxyLog
from tests.support.budget import TcpRelay
from tests.support.collectors import collect_process, create_topics
from tests.support.tap import (
    APP_KEY,
    LIMITED_KEY,
    OPENAI_PRICE,
    UPSTREAM_SECRET,
    RunningTap,
    by_request,
    metrics_url,
    read_events,
    tap_config,
)

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
MARCH = date(2026, 3, 1)
AUTH = {"authorization": f"Bearer {APP_KEY}"}


class Clock:
    """The tap's notion of now (the enforcer's periods, Retry-After, the events' period_start)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def document(mock_llm: str, kafka: str, prefix: str, tmp_path: Path, store: BudgetStoreSettings,
             budgets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc = tap_config(mock_llm, kafka, prefix, tmp_path / "spool", plugins=extra.pop("plugins", None))
    doc["budgets"] = budgets
    doc["budget_store"] = store.model_dump(mode="json")
    doc["budget_enforcement"] = {"staleness_s": 0.1, **extra.pop("enforcement", {})}
    doc.update(extra)
    return doc


@asynccontextmanager
async def budget_tap(doc: dict[str, Any], clock: Clock) -> AsyncIterator[RunningTap]:
    """The tap on a free port with the injected clock; stopped (publisher drained, store closed) on exit."""
    tap = await create_app(parse_config(doc), budget_clock=clock)
    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    metrics_runner = await tap.serve_metrics("127.0.0.1", doc["tap"]["metrics"]["port"])
    try:
        yield RunningTap(f"http://127.0.0.1:{port}", tap, metrics_url(doc))
    finally:
        await runner.cleanup()
        await metrics_runner.cleanup()


def chat(chars: int, max_tokens: int | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * chars}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def cost_micros(prompt: int, completion: int) -> int:
    """What the mock reports for a request priced like the tap does, rounded like the store does."""
    return usd_to_micros((prompt * OPENAI_PRICE["input_per_1m"] + completion * OPENAI_PRICE["output_per_1m"])
                         / 1_000_000)


class Answer:
    def __init__(self, status: int, headers: Any, body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.request_id: str = headers["x-request-id"]


async def post(http: aiohttp.ClientSession, tap: RunningTap, body: dict[str, Any], key: str = APP_KEY,
               llm: str = "openai") -> Answer:
    async with http.post(f"{tap.url}/llm/{llm}/v1/chat/completions", json=body,
                         headers={"authorization": f"Bearer {key}"}) as resp:
        return Answer(resp.status, resp.headers, await resp.json())


async def get_budget(http: aiohttp.ClientSession, tap: RunningTap, headers: dict[str, str]) -> tuple[int, Any]:
    async with http.get(f"{tap.url}/budget", headers=headers) as resp:
        return resp.status, await resp.json()


async def metrics_text(http: aiohttp.ClientSession, tap: RunningTap) -> str:
    async with http.get(tap.metrics_url) as resp:
        return await resp.text()


def sample(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, limit: float = 60) -> None:
    """Poll ``check``; ``limit`` only bounds a hang."""
    try:
        async with asyncio.timeout(limit):
            while not await check():  # noqa: ASYNC110 - polling other processes, no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


def assert_budget_refusal(answer: Answer) -> int:
    assert answer.status == 429, answer.body
    error = answer.body["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert error["request_id"] == answer.request_id and "budget" in error["message"]
    return int(answer.headers["Retry-After"])


async def test_concurrent_requests_exact_spend_bounded_overspend_and_get_budget(
        budget_store_settings: BudgetStoreSettings, mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    """60 concurrent requests against a small budget: the store's spend is exactly the admitted requests' cost,
    the tap answers 429 for the rest, and (estimates never undershoot the mock's usage) nothing is overspent."""
    limit_usd = 0.002
    limit = usd_to_micros(limit_usd)
    shapes = [(200 + 40 * (i % 7), 100 + 20 * (i % 5)) for i in range(60)]  # (prompt chars, max_tokens)
    expected = {i: cost_micros(chars // 4, max_tokens) for i, (chars, max_tokens) in enumerate(shapes)}
    largest = max(expected.values())
    assert sum(expected.values()) > 2 * limit  # a small budget: most requests must be refused
    clock = Clock(datetime(2026, 3, 31, 23, 0, tzinfo=UTC))  # one hour before the monthly reset
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                   [{"app_id": "test", "limit_usd": limit_usd, "period": "monthly"}])
    # Group ids unique to the test: noida keeps every member a group ever had, so a shared group wedges.
    doc["collectors"] = {"budget": {"group_id": f"{topic_prefix}-budget",
                                    "group_instance_id": f"{topic_prefix}-budget-1",
                                    "session_timeout_ms": 10_000, "batch": {"max_events": 20, "max_wait_ms": 10},
                                    "metrics": {"port": free_port()}}}
    await create_topics(kafka_bootstrap, topic_prefix)
    collector = collect_process("budget-tap", "budget", doc, tmp_path)
    await asyncio.to_thread(collector.start)
    store = await open_store(budget_store_settings)
    try:
        async with budget_tap(doc, clock) as tap, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100)) as http:
            answers = await asyncio.gather(*(post(http, tap, chat(c, m)) for c, m in shapes))
            admitted = {i for i, a in enumerate(answers) if a.status == 200}
            refused = {i for i, a in enumerate(answers) if a.status != 200}
            assert admitted and refused
            for i in refused:
                assert 1 <= assert_budget_refusal(answers[i]) <= 3600
            spent = sum(expected[i] for i in admitted)
            # Documented bound: overspend <= sum of max(0, actual - estimate) over requests in flight = 0 here.
            assert spent <= limit
            # ...and the budget is used up to within one request (a refusal means it did not fit).
            assert spent > limit - largest

            async def all_recorded() -> bool:
                return (await store.spend("test", None, "monthly", MARCH)).requests >= len(admitted)
            await wait_until(all_recorded, "the collector recorded every admitted request")
            assert await store.spend("test", None, "monthly", MARCH) == Spend(
                spent, sum(c // 4 + m for c, m in (shapes[i] for i in admitted)), len(admitted))

            # Cross-check with the events the tap published, by request id.
            ids = {answers[i].request_id: i for i in range(60)}
            events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=120 + len(admitted)))
            for rid, i in ids.items():
                log, analytics = events[rid]["proxy_log"], events[rid]["analytics"]
                assert isinstance(log, ProxyLog) and isinstance(analytics, Analytics)
                if i in admitted:
                    usage = events[rid]["budget_usage"]
                    assert isinstance(usage, BudgetUsage)
                    assert usd_to_micros(analytics.cost) == usd_to_micros(usage.cost) == expected[i]
                    assert (usage.period, usage.period_start) == ("monthly", MARCH)
                else:
                    assert "budget_usage" not in events[rid] and analytics.cost == 0
                    assert log.status_code == 429 and log.error is not None
                    assert (log.error.type, log.error.code) == ("insufficient_quota", "budget_exceeded")

            # Everything settled: the recorded spend alone leaves no room, so only the period reset helps.
            again = await post(http, tap, chat(*shapes[max(expected, key=lambda k: expected[k])]))
            assert assert_budget_refusal(again) == 3600

            status, report = await get_budget(http, tap, AUTH)
            assert status == 200 and report["app_id"] == "test" and report["enforced"]
            [budget] = report["budgets"]
            assert budget["spent_usd"] == spent / 1_000_000 and budget["limit_usd"] == limit_usd
            assert budget["percent_used"] == round(spent / limit * 100, 2) and budget["reserved_usd"] == 0
            assert (budget["period"], budget["period_start"]) == ("monthly", "2026-03-01")
            assert budget["resets_at"] == "2026-04-01T00:00:00+00:00"
            assert report["key_id"] == default_key_id(hash_key(APP_KEY))  # the file key, named by its hash's prefix
            # The plugins' services: the same data for the app (no key of its own).
            assert await tap.tap.gateway.budget_status("test") == {**report, "key_id": None}

            gauge = 'gateway_tap_budget_used_ratio{app="test",llm="",period="monthly"}'

            async def gauge_current() -> bool:
                return sample(await metrics_text(http, tap), gauge) == pytest.approx(spent / limit, rel=1e-12)
            await wait_until(gauge_current, "the used-ratio gauge shows the spend")
            text = await metrics_text(http, tap)
            assert sample(text, 'gateway_tap_budget_decisions_total{result="allowed"}') == len(admitted)
            assert sample(text, 'gateway_tap_budget_decisions_total{result="blocked"}') == len(refused) + 1
        assert await asyncio.to_thread(collector.stop) == 0, collector.log_tail()
    finally:
        collector.stop()
        await store.close()


async def test_overspend_without_output_limits_is_bounded_by_requests_in_flight(
        budget_store_settings: BudgetStoreSettings, mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    """Without max_tokens the estimate is the prompt only: overspend <= in-flight x (actual - estimate)."""
    in_flight, limit_usd = 6, 0.0005
    estimate, actual = cost_micros(100, 0), cost_micros(100, 16)  # the mock answers 16 tokens by default
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                   [{"app_id": "test", "limit_usd": limit_usd}])
    gate = asyncio.Semaphore(in_flight)

    async def one(http: aiohttp.ClientSession, tap: RunningTap) -> int:
        async with gate:
            return (await post(http, tap, chat(400, None))).status

    async with budget_tap(doc, Clock(datetime(2026, 3, 15, tzinfo=UTC))) as tap, aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(one(http, tap) for _ in range(60)))
        admitted = statuses.count(200)
        assert statuses.count(429) == 60 - admitted > 0
        assert tap.tap.budget is not None
        [budget] = tap.tap.budget.enforcer.status("test")
        assert budget.reserved_usd == 0 and usd_to_micros(budget.spent_usd) == admitted * actual
        assert admitted * actual <= usd_to_micros(limit_usd) + in_flight * (actual - estimate)


async def test_a_new_period_starts_at_the_boundary(budget_store_settings: BudgetStoreSettings, mock_llm: str,
                                                   kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 3, 31, 23, 59, 30, tzinfo=UTC))
    one = cost_micros(25, 10)
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                   [{"app_id": "test", "limit_usd": 1.0},  # monthly, far away
                    {"app_id": "test", "limit_usd": 3 * one / 1_000_000, "period": "daily"}])
    async with budget_tap(doc, clock) as tap, aiohttp.ClientSession() as http:
        march = [await post(http, tap, chat(100, 10)) for _ in range(3)]
        assert [a.status for a in march] == [200, 200, 200]
        assert assert_budget_refusal(await post(http, tap, chat(100, 10))) == 30  # the daily budget resets in 30 s
        clock.now = datetime(2026, 4, 1, tzinfo=UTC)
        april = await post(http, tap, chat(100, 10))
        assert april.status == 200
        _, report = await get_budget(http, tap, AUTH)
        by_period = {b["period"]: b for b in report["budgets"]}
        for period in ("daily", "monthly"):
            assert by_period[period]["period_start"] == "2026-04-01"
            assert by_period[period]["spent_usd"] == one / 1_000_000
        assert by_period["daily"]["resets_at"] == "2026-04-02T00:00:00+00:00"
        assert by_period["monthly"]["resets_at"] == "2026-05-01T00:00:00+00:00"
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=5 * 2 + 4))
    # The events carry the shortest budget period the call was counted against.
    for answer, start in [(a, date(2026, 3, 31)) for a in march] + [(april, date(2026, 4, 1))]:
        usage = events[answer.request_id]["budget_usage"]
        assert isinstance(usage, BudgetUsage) and (usage.period, usage.period_start) == ("daily", start)


@pytest.mark.parametrize(("on_store_error", "lease_fraction"),
                         [("fail_open", 1e-9), ("fail_closed", 1e-9), ("fail_closed", 0.5)])
async def test_store_unreachable_follows_on_store_error(on_store_error: str, lease_fraction: float, pg_dsn: str,
                                                        mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                        tmp_path: Path) -> None:
    """A tiny lease_fraction leases each request just its estimate: once the store is away there is no lease left
    and on_store_error decides. With a larger one, what was leased before the outage is still admitted (it was
    granted against every tap's claims, so it cannot overspend), also with fail_closed."""
    relay = await TcpRelay("127.0.0.1", 5432).start()
    store = BudgetStoreSettings(backend="postgres", timeout_s=1,
                                postgres_schema=f"tap_{on_store_error}_{int(lease_fraction * 10)}",
                                postgres_dsn=pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, store,
                   [{"app_id": "test", "limit_usd": 1.0}],
                   enforcement={"on_store_error": on_store_error, "store_error_grace_s": 0, "staleness_s": 0.05,
                                "lease_fraction": lease_fraction})
    leased = lease_fraction > 0.1
    async with budget_tap(doc, Clock(datetime(2026, 3, 15, tzinfo=UTC))) as tap, aiohttp.ClientSession() as http:
        assert tap.tap.budget is not None and tap.tap.budget.enforcer.store_available
        assert (await post(http, tap, chat(100, 10))).status == 200
        await relay.cut()
        enforcer = tap.tap.budget.enforcer

        async def store_down() -> bool:
            return not enforcer.store_available
        await wait_until(store_down, "the enforcer noticed the outage")
        answer = await post(http, tap, chat(100, 10))
        if on_store_error == "fail_open" or leased:
            assert answer.status == 200
        else:
            assert answer.status == 503 and answer.headers["Retry-After"] == "1"
            assert (answer.body["error"]["type"], answer.body["error"]["code"]) == (
                "service_unavailable", "budget_store_unavailable")
        # An app without a budget is never affected.
        assert (await post(http, tap, {"model": "m", "max_tokens": 5, "messages": [{"role": "user",
                                                                                   "content": "hi"}]},
                           key=LIMITED_KEY, llm="anthropic")).status == 200
        _, report = await get_budget(http, tap, AUTH)
        assert report["store_available"] is False
        text = await metrics_text(http, tap)
        result = "store_error_open" if on_store_error == "fail_open" else "store_error_closed"
        assert sample(text, f'gateway_tap_budget_decisions_total{{result="{result}"}}') == (0 if leased else 1)
        assert (sample(text, "gateway_tap_budget_store_errors_total") or 0) >= 1


@pytest.mark.parametrize("position", ["before_plugins", "after_plugins"])
async def test_position_relative_to_plugins(position: str, mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                            tmp_path: Path) -> None:
    firewall = {"name": "prompt_firewall", "use": "gateway_tap.examples.plugins.prompt_firewall:PromptFirewall",
                "config": {"patterns": ["ignore previous instructions"]}}
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                   BudgetStoreSettings(sqlite_path=str(tmp_path / "b.sqlite3")),
                   [{"app_id": "test", "limit_usd": 0}], plugins=[firewall], enforcement={"position": position})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ignore previous instructions"}]}
    async with budget_tap(doc, Clock(datetime(2026, 3, 15, tzinfo=UTC))) as tap, aiohttp.ClientSession() as http:
        answer = await post(http, tap, body)
    assert answer.status == (429 if position == "before_plugins" else 403)


async def test_get_budget_auth_and_streams_cut_off_release_their_reservation(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                   BudgetStoreSettings(sqlite_path=str(tmp_path / "b.sqlite3")),
                   [{"app_id": "test", "limit_usd": 1.0}, {"app_id": "test", "llm_id": "openai",
                                                           "limit_tokens": 10_000, "period": "daily"}])
    async with budget_tap(doc, Clock(datetime(2026, 3, 15, 12, tzinfo=UTC))) as tap, \
            aiohttp.ClientSession() as http:
        assert (await get_budget(http, tap, {}))[0] == 401
        status, body = await get_budget(http, tap, {"authorization": "Bearer gt-wrong-key-0123456789"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, report = await get_budget(http, tap, {"x-api-key": APP_KEY})
        assert status == 200 and len(report["budgets"]) == 2
        status, report = await get_budget(http, tap, {"x-api-key": LIMITED_KEY})
        assert status == 200 and report == {"app_id": "limited", "key_id": default_key_id(hash_key(LIMITED_KEY)),
                                            "llm_id": None, "enforced": True, "store_available": True, "budgets": []}

        # The client reads the first chunk of a slow stream and hangs up.
        assert tap.tap.budget is not None
        enforcer = tap.tap.budget.enforcer
        stream = chat(100, 40, stream=True)
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=stream,
                             headers={**AUTH, "x-mock-chunk-delay-ms": "20"}) as resp:
            assert resp.status == 200
            await resp.content.readany()
            [_, daily] = enforcer.status("test", "openai")
            assert daily.reserved_tokens == 25 + 40  # the estimate is held while the stream runs
            resp.close()

        async def released() -> bool:
            return all(b.reserved_tokens == 0 and b.reserved_usd == 0 for b in enforcer.status("test"))
        await wait_until(released, "the cut-off stream settled its reservation")
        assert sample(await metrics_text(http, tap), "gateway_tap_budget_inflight_reservations") == 0


async def test_budgets_reconfigured_live(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                         tmp_path: Path) -> None:
    """What a config reload calls: new limits apply to the next request; the spend seen so far is kept."""
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                   BudgetStoreSettings(sqlite_path=str(tmp_path / "b.sqlite3")), [{"app_id": "test", "limit_usd": 1}])
    async with budget_tap(doc, Clock(datetime(2026, 3, 15, tzinfo=UTC))) as tap, aiohttp.ClientSession() as http:
        assert tap.tap.budget is not None
        assert (await post(http, tap, chat(100, 10))).status == 200
        tighter = parse_config({**doc, "budgets": [{"app_id": "test", "llm_id": "openai", "limit_tokens": 40}]})
        tap.tap.budget.reconfigure(tighter.budgets, tighter.budget_enforcement)
        assert_budget_refusal(await post(http, tap, chat(100, 10)))  # 35 tokens spent + 35 estimated > 40
        _, report = await get_budget(http, tap, AUTH)
        [budget] = report["budgets"]
        assert (budget["llm_id"], budget["limit_tokens"], budget["spent_tokens"]) == ("openai", 40, 35)
        text = await metrics_text(http, tap)
        assert sample(text, 'gateway_tap_budget_used_ratio{app="test",llm="",period="monthly"}') is None
