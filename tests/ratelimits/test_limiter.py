"""The rate-limit rule (token buckets, concurrency, settlement, headers) in both limiters: the per-worker one
with an injected clock, the Redis one against a real ``redis-server`` (atomic across limiters, as across taps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from gateway_tap.ratelimits import Limits, LocalLimiter, SharedLimiter, format_duration
from gateway_tap.redis_link import RedisLink
from gateway_tap.settings import RateLimitSettings, RedisSettings, parse_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(**entry: object) -> Limits:
    return Limits([RateLimitSettings.model_validate({"app_id": "a", **entry})])


def test_plan_resolves_app_llm_model_and_key_scopes_in_order() -> None:
    lim = Limits([RateLimitSettings(app_id="a", requests_per_minute=10),
                  RateLimitSettings(app_id="a", llm_id="openai", tokens_per_minute=100),
                  RateLimitSettings(app_id="a", llm_id="openai", model="gpt-4o", max_concurrent=2),
                  RateLimitSettings(key_id="sha256:" + "0" * 64, requests_per_minute=5),
                  RateLimitSettings(app_id="b", requests_per_minute=1)])
    plan = lim.plan("a", "sha256:" + "0" * 64, "openai", "gpt-4o")
    assert [c.name for c in plan] == ["app=a:requests", "app=a,llm=openai:tokens",
                                      "app=a,llm=openai,model=gpt-4o:concurrent", f"key=sha256:{'0' * 64}:requests"]
    assert [c.name for c in lim.plan("a", None, "anthropic", "gpt-4o")] == ["app=a:requests"]
    assert lim.plan("c", None, "openai", None) == ()
    assert lim.applies("a", None) and lim.applies(None, "sha256:" + "0" * 64) and not lim.applies("c", "x")


def test_a_key_is_limited_by_its_id_or_by_its_whole_hash() -> None:
    whole = "sha256:" + "ab" * 32
    by_hash = Limits([RateLimitSettings(key_id=whole, requests_per_minute=5)])
    by_id = Limits([RateLimitSettings(key_id="ci-bot", requests_per_minute=5)])
    by_short_id = Limits([RateLimitSettings(key_id=whole[:19], requests_per_minute=5)])
    assert by_hash.key_name(whole, "ci-bot") == whole
    assert by_id.key_name(whole, "ci-bot") == "ci-bot"
    assert by_short_id.key_name(whole, whole[:19]) == whole[:19]
    assert by_id.key_name(whole, "other") is None and by_hash.key_name(None, None) is None
    assert [c.name for c in by_id.plan(None, "ci-bot", "openai", None)] == ["key=ci-bot:requests"]


def test_settings_reject_ambiguous_or_empty_entries() -> None:
    for bad, message in (({"app_id": "a", "key_id": "k", "requests_per_minute": 1}, "exactly one of app_id"),
                         ({"app_id": "a"}, "set requests_per_minute"),
                         ({"app_id": "a", "model": "m", "requests_per_minute": 1}, "model needs llm_id"),
                         ({"key_id": "k", "llm_id": "x", "requests_per_minute": 1}, "narrow an app"),
                         ({"app_id": "a", "requests_per_minute": 0}, "greater than or equal to 1")):
        with pytest.raises(ValueError, match=message):
            RateLimitSettings.model_validate(bad)
    with pytest.raises(ValueError, match=r"rate_limits\[1\]: duplicate limits for app=a"):
        parse_config({"rate_limits": [{"app_id": "a", "requests_per_minute": 1},
                                      {"app_id": "a", "tokens_per_minute": 1}]})
    with pytest.raises(ValueError, match=r"rate_limits\[0\].app_id: unknown app 'x'"):
        parse_config({"apps": [{"id": "a"}], "rate_limits": [{"app_id": "x", "requests_per_minute": 1}]})


def test_format_duration_like_openai() -> None:
    assert [format_duration(s) for s in (0.0204, 0.9999, 1.0, 1.5, 59.9991, 60, 360, 3723)] == [
        "21ms", "1000ms", "1s", "1.5s", "60s", "1m0s", "6m0s", "1h2m3s"]


def test_local_requests_per_minute_refill_and_retry_after() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    plan = limits(requests_per_minute=3).plan("a", None, "llm", None)
    decisions = [limiter.check(plan, 0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[0].headers() == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
                                      "x-ratelimit-reset-requests": "20s"}
    refused = decisions[3]
    assert refused.outcome == "limited" and refused.blocked is not None and refused.blocked.kind == "requests"
    assert refused.retry_after_s == pytest.approx(20.0)
    assert refused.admission is None
    clock.now += 19.9
    assert not limiter.check(plan, 0).allowed  # nothing taken by a refusal, and not refilled yet
    clock.now += 0.2
    assert limiter.check(plan, 0).allowed
    assert not limiter.check(plan, 0).allowed


def test_local_tokens_settle_with_actual_usage_and_large_requests_wait_for_a_full_bucket() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    plan = limits(tokens_per_minute=1000).plan("a", None, "llm", None)
    first = limiter.check(plan, 800)
    assert first.allowed and first.headers()["x-ratelimit-remaining-tokens"] == "200"
    assert not limiter.check(plan, 300).allowed  # 200 left
    assert first.admission is not None
    first.admission.settle(150)  # used 150 of the 800 estimated: 650 come back
    second = limiter.check(plan, 300)
    assert second.allowed and second.headers()["x-ratelimit-remaining-tokens"] == "550"
    assert second.admission is not None
    second.admission.settle(None)  # nothing consumed: the whole estimate comes back
    second.admission.settle(10_000)  # settling twice changes nothing
    assert limiter.check(plan, 0).headers()["x-ratelimit-remaining-tokens"] == "850"
    # An estimate above the whole limit passes on a full bucket and leaves a debt that blocks the rest.
    clock.now += 60
    big = limiter.check(plan, 2500)
    assert big.allowed and big.headers()["x-ratelimit-remaining-tokens"] == "0"
    refused = limiter.check(plan, 1)
    assert not refused.allowed and refused.blocked is not None and refused.blocked.kind == "tokens"
    assert refused.retry_after_s == pytest.approx((1 + 1500) * 60 / 1000)


def test_local_concurrency_is_held_until_settled() -> None:
    limiter = LocalLimiter(Clock())
    plan = limits(max_concurrent=2, requests_per_minute=100).plan("a", None, "llm", None)
    a, b = limiter.check(plan, 0), limiter.check(plan, 0)
    c = limiter.check(plan, 0)
    assert a.allowed and b.allowed and not c.allowed
    assert c.blocked is not None and c.blocked.kind == "concurrent" and c.retry_after_s == 1.0
    # a refusal by concurrency takes no request either
    assert c.headers()["x-ratelimit-remaining-requests"] == "98"
    assert a.admission is not None
    a.admission.settle(None)
    assert limiter.check(plan, 0).allowed


@pytest.fixture
async def links(redis_url: str, redis_prefix: str) -> AsyncIterator[tuple[RedisLink, RedisLink]]:
    """Two links (two connection pools, as two taps have) to the session's Redis."""
    settings = RedisSettings(url=redis_url, key_prefix=redis_prefix, timeout_s=5)  # a loaded test machine
    one, two = RedisLink(settings, registry=CollectorRegistry()), RedisLink(settings, registry=CollectorRegistry())
    yield one, two
    await one.close()
    await two.close()


async def test_shared_limits_are_exact_across_limiters_under_concurrency(links: tuple[RedisLink, RedisLink]) -> None:
    lim = limits(requests_per_minute=50, max_concurrent=30)
    plan = lim.plan("a", None, "llm", None)
    taps = [SharedLimiter(link) for link in links]
    started = time.monotonic()
    decisions = await asyncio.gather(*(taps[i % 2].admit(plan, f"req-{i}", 0) for i in range(80)))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 30  # the concurrency limit binds first, exactly, across both limiters
    assert {d.blocked.kind for d in decisions if not d.allowed and d.blocked} == {"concurrent"}
    for d in admitted:
        assert d.admission is not None
        d.admission.settle(None)
    for tap in taps:
        await tap.close()  # the settlements are sent
    decisions = await asyncio.gather(*(taps[i % 2].admit(plan, f"again-{i}", 0) for i in range(40)))
    refilled = int((time.monotonic() - started) * 50 / 60)  # on a loaded machine the minute moves on meanwhile
    assert 20 <= sum(d.allowed for d in decisions) <= 20 + refilled  # 50 per minute: 30 taken before, 20 left
    refused = next(d for d in decisions if not d.allowed)
    assert refused.blocked is not None and refused.blocked.kind == "requests"
    assert 0.5 < refused.retry_after_s <= 1.3  # one request refills every 1.2 s
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"


async def test_shared_tokens_settle_and_refill(links: tuple[RedisLink, RedisLink]) -> None:
    plan = limits(tokens_per_minute=6000).plan("a", None, "llm", None)  # refills 100 per second
    one, two = SharedLimiter(links[0]), SharedLimiter(links[1])
    first = await one.admit(plan, "r1", 5000)
    assert first.allowed and 999 <= int(first.headers()["x-ratelimit-remaining-tokens"]) <= 1002
    refused = await two.admit(plan, "r2", 3000)
    assert not refused.allowed and refused.blocked is not None and refused.blocked.kind == "tokens"
    assert 19 < refused.retry_after_s <= 20.1
    assert first.admission is not None
    first.admission.settle(1000)  # 4000 of the estimate come back
    await one.close()
    second = await two.admit(plan, "r3", 3000)
    assert second.allowed
    assert 2000 <= int(second.headers()["x-ratelimit-remaining-tokens"]) <= 2100
    await asyncio.sleep(1.0)
    third = await two.admit(plan, "r4", 0)
    assert int(third.headers()["x-ratelimit-remaining-tokens"]) >= 2090  # refilled ~100 in the second


async def test_shared_fail_open_and_fail_closed_when_redis_is_down_then_recovers(own_redis: object,
                                                                                redis_prefix: str) -> None:
    from gateway_tap.dev.servers import RedisServer

    assert isinstance(own_redis, RedisServer)
    registry = CollectorRegistry()
    link = RedisLink(RedisSettings(url=own_redis.url, key_prefix=redis_prefix, retry_interval_s=0.2),
                     registry=registry)
    plan = limits(requests_per_minute=100).plan("a", None, "llm", None)
    open_, closed = SharedLimiter(link, on_error="fail_open"), SharedLimiter(link, on_error="fail_closed")
    try:
        assert (await open_.admit(plan, "r0", 0)).outcome == "allowed"
        own_redis.stop()
        down_open = await open_.admit(plan, "r1", 0)
        assert down_open.allowed and down_open.outcome == "redis_error_open" and down_open.admission is None
        down_closed = await closed.admit(plan, "r2", 0)
        assert not down_closed.allowed and down_closed.outcome == "redis_error_closed"
        assert registry.get_sample_value("gateway_tap_redis_errors_total", {"user": "ratelimit"}) == 1
        assert registry.get_sample_value("gateway_tap_redis_up") == 0
        own_redis.start()  # same port: the link reconnects by itself once retry_interval_s passed
        await asyncio.sleep(0.25)
        back = await closed.admit(plan, "r3", 0)
        assert back.outcome == "allowed"
        assert back.headers()["x-ratelimit-remaining-requests"] == "99"  # a fresh server: its counters are new
        assert registry.get_sample_value("gateway_tap_redis_up") == 1
    finally:
        await open_.close()
        await closed.close()
        await link.close()
