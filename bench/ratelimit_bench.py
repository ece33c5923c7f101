"""The shared rate limiter in process: CPU per request of ``SharedLimiter.admit`` plus its settlement, one
client after the other (c=1), against a ``redis-server`` this bench starts on a free port.

    .venv/bin/python -m bench.ratelimit_bench [--requests 5000] [--rounds 3] [--profile]

The plan has the three counters of the tap bench's ``ratelimit-shared`` variant (requests, tokens, in flight: every
request is admitted and settled, its concurrency claim ended by the settlement flush). CPU time is the process's
(``time.process_time``), so the load of the machine moves it less than wall time; Redis runs in its own process and
is not counted. ``--profile`` prints cProfile's top functions (which inflates the time per request).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway_tap.dev.servers import RedisServer
from gateway_tap.ratelimits.limiter import Limits
from gateway_tap.ratelimits.shared import SharedLimiter
from gateway_tap.redis_link import RedisLink
from gateway_tap.settings import RateLimitSettings, RedisSettings

WARMUP = 300


async def measure(url: str, requests: int, rounds: int, profile: bool) -> None:
    link = RedisLink(RedisSettings(url=url, key_prefix="bench:"), registry=CollectorRegistry())
    limiter = SharedLimiter(link)
    plan = Limits([RateLimitSettings(app_id="app", requests_per_minute=10**9, tokens_per_minute=10**12,
                                     max_concurrent=10**6)]).plan("app", None, "llm", None)

    async def run(n: int, tag: str) -> None:
        for i in range(n):
            decision = await limiter.admit(plan, f"{tag}{i}", 10)
            assert decision.admission is not None, decision
            decision.admission.settle(12)

    await run(WARMUP, "w")
    try:
        for r in range(rounds):
            await asyncio.sleep(0.05)  # the warm-up's (or the last round's) settlements are out
            profiler = cProfile.Profile() if profile and r == rounds - 1 else None
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            await run(requests, f"r{r}-")
            await asyncio.sleep(SharedLimiter.FLUSH_DELAY_S * 2)  # the last settlements are sent in the window
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"round {r + 1}: {cpu / requests * 1e6:.1f} us CPU per request (admission + settlement), "
                  f"{wall / requests * 1e6:.1f} us wall{' (profiled)' if profiler is not None else ''}")
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    finally:
        await limiter.close()
        await link.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="Profile the last round with cProfile.")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="ratelimit-bench-"))
    server = RedisServer(data_dir=data, log_path=data / "redis.log").start()
    try:
        asyncio.run(measure(server.url, args.requests, args.rounds, args.profile))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
