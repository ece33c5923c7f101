"""The shared limiter's lean path to Redis (one connection per script, hiredis-packed ``EVALSHA``), in process
against a real ``redis-server``: answers equal those of redis-py's own script call, a script the server lost is
loaded again, and an exchange cut by a cancelled caller never leaves the connection out of step."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway_tap.ratelimits.limiter import Limits
from gateway_tap.ratelimits.shared import _ADMIT, SharedLimiter
from gateway_tap.redis_link import RedisLink
from gateway_tap.settings import RateLimitSettings, RedisSettings


def limiter(url: str, prefix: str) -> SharedLimiter:
    return SharedLimiter(RedisLink(RedisSettings(url=url, key_prefix=prefix), registry=CollectorRegistry()))


LIMITS = Limits([RateLimitSettings(app_id="app", requests_per_minute=5, tokens_per_minute=1000, max_concurrent=3)])
PLAN = LIMITS.plan("app", None, "llm", None)


async def test_the_lane_answers_as_redis_py_does_and_keeps_limiting(redis_url: str, redis_prefix: str) -> None:
    lim = limiter(redis_url, redis_prefix)
    other = aioredis.from_url(redis_url)
    try:
        decisions = [await lim.admit(PLAN, f"r{i}", 100) for i in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]  # three in flight at most
        assert decisions[3].blocked is not None and decisions[3].blocked.kind == "concurrent"
        for d in decisions[:3]:
            assert d.admission is not None
            d.admission.settle(40)  # 60 tokens back each
        await asyncio.sleep(0.05)
        after = await lim.admit(PLAN, "r9", 100)
        assert after.allowed
        tokens = next(s for s in after.states if s.counter.kind == "tokens")
        # redis-py's own script call on the same keys agrees with what the lane reads back (3 x 40 + 100 used).
        keys = [lim.link.key("rl:" + c.name) for c in PLAN]
        args = ["probe", 1000]
        for c in PLAN:
            args += ("c" if c.kind == "concurrent" else "r", c.limit, 0)
        same = await other.register_script(_ADMIT)(keys, args)
        assert tokens.remaining == 1000 - 220 and int(same[2 + 2 * PLAN.index(tokens.counter)]) in (780, 781)
    finally:
        await other.aclose()
        await lim.close()
        await lim.link.close()


async def test_a_flushed_script_is_loaded_again(redis_url: str, redis_prefix: str) -> None:
    lim = limiter(redis_url, redis_prefix)
    other = aioredis.from_url(redis_url)
    try:
        assert (await lim.admit(PLAN, "a", 1)).allowed
        await other.script_flush()  # as after a restart of the server
        again = await lim.admit(PLAN, "b", 1)
        assert again.allowed and again.outcome == "allowed"
    finally:
        await other.aclose()
        await lim.close()
        await lim.link.close()


async def test_a_cancelled_admission_leaves_no_answer_behind(redis_url: str, redis_prefix: str) -> None:
    """Cancelled while its answer is on the way, the call closes its connection: the next call reads its own
    answer, not the cancelled one's (which would show another counter's remaining)."""
    lim = limiter(redis_url, redis_prefix)
    wide = Limits([RateLimitSettings(app_id="wide", max_concurrent=1000)]).plan("wide", None, "llm", None)
    try:
        for i in range(20):
            task = asyncio.create_task(lim.admit(PLAN, f"c{i}", 1))
            await asyncio.sleep(0)  # sent, not answered yet
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            decision = await lim.admit(wide, f"n{i}", 7)
            assert decision.allowed and decision.states[0].counter.scope == "app=wide"
            assert decision.states[0].remaining == 1000 - 1 - i, decision.states  # in flight: 1 more each time
    finally:
        await lim.close()
        await lim.link.close()
