"""``rate_limiting.mode: shared`` with real tap processes (``gateway-tap serve``) and a real ``redis-server``: limits
are exact across two taps of two workers each, and stopping and restarting Redis under load does what
``on_redis_error`` says, then limits again without restarting the taps. The response cache on
``kv.backend: redis`` is shared by two taps, and a Redis outage costs it misses, never a request."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from gateway_tap.dev.servers import ManagedProcess, RedisServer, cli_argv, free_port, http_ok
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, tap_config

ROOT = Path(__file__).resolve().parents[2]
CACHE = "gateway_tap.examples.plugins.response_cache:ResponseCache"


def chat(content: str = "x" * 40) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 4}


@contextmanager
def tap_process(document: dict[str, Any], tmp_path: Path, name: str, redis_url: str,
                metrics_port: int | None = None) -> Iterator[str]:
    """A tap (``serve``) of ``document`` on a free port, its /metrics on ``metrics_port`` (else a free one);
    yields its base URL."""
    port = free_port()
    document = {**document, "tap": {**document["tap"], "listen": {"host": "127.0.0.1", "port": port},
                                    "metrics": {"host": "127.0.0.1", "port": metrics_port or free_port()}}}
    document["tap"]["publisher"] = {**document["tap"]["publisher"], "spool_dir": str(tmp_path / f"spool-{name}")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    proc = ManagedProcess(name, cli_argv("serve", "--config", str(path)), cwd=ROOT,
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), log_path=tmp_path / f"{name}.log",
                          env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET, "GATEWAY_TAP_REDIS_URL": redis_url},
                          stop_signal=signal.SIGTERM, start_timeout=60, stop_timeout=30)
    proc.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def shared_document(mock_llm: str, kafka: str, prefix: str, tmp_path: Path, limits: list[dict[str, Any]],
                    **rate_limiting: Any) -> dict[str, Any]:
    doc = tap_config(mock_llm, kafka, prefix, tmp_path / "spool", tap={"workers": 2, "access_log": False})
    doc["rate_limits"] = limits
    doc["rate_limiting"] = {"mode": "shared", **rate_limiting}
    doc["redis"] = {"key_prefix": f"{prefix}:", "timeout_s": 1.0, "retry_interval_s": 0.3}
    return doc


@asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # A new connection per request: with SO_REUSEPORT each one may land on either worker of a tap.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        yield http


async def post(http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None) -> tuple[int, Any, bytes]:
    async with http.post(f"{base}/llm/openai/v1/chat/completions", json=body or chat(),
                         headers={"authorization": f"Bearer {APP_KEY}", **(headers or {})}) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_limits_are_exact_across_two_taps_of_two_workers(own_redis: RedisServer, mock_llm: str,
                                                              kafka_bootstrap: str, topic_prefix: str,
                                                              tmp_path: Path) -> None:
    doc = shared_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                          [{"app_id": "test", "requests_per_minute": 20, "max_concurrent": 3}])
    with tap_process(doc, tmp_path, "tap-a", own_redis.url) as a, \
            tap_process(doc, tmp_path, "tap-b", own_redis.url) as b:
        async with client() as http:
            # Concurrency: 12 slow requests over both taps at once, 3 pass.
            slow = {"x-mock-latency-ms": "1500"}
            answers = await asyncio.gather(*(post(http, (a, b)[i % 2], slow) for i in range(12)))
            assert sorted(s for s, _, _ in answers).count(200) == 3, [s for s, _, _ in answers]
            # Requests per minute: 3 taken; 17 more pass, whichever tap they reach, and then none.
            start = time.monotonic()
            statuses = [(await post(http, (a, b)[i % 2]))[0] for i in range(30)]
            elapsed = time.monotonic() - start
            refill = int(elapsed * 20 / 60) + 1  # what the bucket regained meanwhile
            assert 17 <= statuses.count(200) <= 17 + refill, (statuses, elapsed)
            assert set(statuses) == {200, 429}
            status, headers, _ = await post(http, b)
            assert status == 429 and headers["x-ratelimit-limit-requests"] == "20"
    keys = aioredis.from_url(own_redis.url)
    try:
        assert await keys.exists(f"{topic_prefix}:rl:app=test:requests") == 1
        assert await keys.zcard(f"{topic_prefix}:rl:app=test:concurrent") == 0  # every claim was settled
    finally:
        await keys.aclose()


@pytest.mark.parametrize("on_redis_error", ["fail_open", "fail_closed"])
async def test_redis_stopped_and_restarted_under_load(on_redis_error: str, own_redis: RedisServer, mock_llm: str,
                                                     kafka_bootstrap: str, topic_prefix: str,
                                                     tmp_path: Path) -> None:
    doc = shared_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                          [{"app_id": "test", "requests_per_minute": 100_000}], on_redis_error=on_redis_error)
    metrics_port = free_port()
    with tap_process(doc, tmp_path, "tap", own_redis.url, metrics_port) as base:
        phases: dict[str, list[int]] = {"before": [], "down": [], "after": []}
        phase = "before"
        bodies: list[bytes] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with client() as http:
                while not stop.is_set():
                    status, _, body = await post(http, base)
                    phases[phase].append(status)
                    if status != 200:
                        bodies.append(body)

        workers = [asyncio.create_task(load()) for _ in range(6)]
        try:
            await asyncio.sleep(1.5)
            phase = "down"
            await asyncio.to_thread(own_redis.stop)
            await asyncio.sleep(2.5)
            phase = "restarting"
            phases["restarting"] = []
            await asyncio.to_thread(own_redis.start)  # the same port: the taps reconnect by themselves
            await asyncio.sleep(1.0)  # the workers' retry_interval_s (0.3 s) passes
            phase = "after"
            await asyncio.sleep(1.5)
            # Counting again: the fresh server holds the counter the requests since the restart wrote (it expires
            # about a second after the last request, so this is read while the load runs).
            keys = aioredis.from_url(own_redis.url)
            try:
                assert await keys.exists(f"{topic_prefix}:rl:app=test:requests") == 1
            finally:
                await keys.aclose()
        finally:
            stop.set()
            await asyncio.gather(*workers)
        assert phases["before"] and set(phases["before"]) == {200}
        assert phases["after"] and set(phases["after"]) == {200}, phases["after"]
        if on_redis_error == "fail_open":
            assert phases["down"] and set(phases["down"]) == {200}
        else:
            assert 503 in phases["down"] and set(phases["down"]) <= {200, 503}  # 200: admitted just before
            assert all(b'"rate_limit_unavailable"' in body for body in bodies)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            text = await resp.text()
        assert any(line.startswith('gateway_tap_redis_errors_total{user="ratelimit"}') and float(line.split()[-1]) > 0
                   for line in text.splitlines())
        result = "redis_error_open" if on_redis_error == "fail_open" else "redis_error_closed"
        assert any(line.startswith(f'gateway_tap_ratelimit_decisions_total{{result="{result}"}}') for line in
                   text.splitlines())


async def test_response_cache_on_redis_is_shared_by_two_taps_and_survives_an_outage(
        own_redis: RedisServer, mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    doc = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", tap={"access_log": False},
                     plugins=[{"name": "cache", "use": CACHE, "kv": {"backend": "redis"},
                               "config": {"ttl_s": 300, "local_max_entries": 0}}])
    doc["redis"] = {"key_prefix": f"{topic_prefix}:", "timeout_s": 1.0, "retry_interval_s": 0.3}
    with tap_process(doc, tmp_path, "tap-a", own_redis.url) as a, \
            tap_process(doc, tmp_path, "tap-b", own_redis.url) as b:
        async with client() as http:
            status, headers, first = await post(http, a, body=chat("shared across taps"))
            assert status == 200 and headers["x-cache"] == "miss"
            answered = {first}  # a miss on b before a's entry landed stores b's answer instead: either is served
            for _ in range(100):  # the entry is written in the background, just after the answer
                status, headers, body = await post(http, b, body=chat("shared across taps"))
                if headers["x-cache"] == "hit":
                    break
                answered.add(body)
                await asyncio.sleep(0.05)
            assert headers["x-cache"] == "hit" and body in answered
            await asyncio.to_thread(own_redis.stop)
            status, headers, _ = await post(http, b, body=chat("shared across taps"))
            assert status == 200 and headers["x-cache"] == "miss"  # the cache is away: a miss, not an error
            await asyncio.to_thread(own_redis.start)
            await asyncio.sleep(0.5)
            assert (await post(http, a, body=chat("after the outage")))[1]["x-cache"] == "miss"
            for _ in range(100):
                status, headers, _ = await post(http, b, body=chat("after the outage"))
                if headers["x-cache"] == "hit":
                    break
                await asyncio.sleep(0.05)
            assert headers["x-cache"] == "hit"
