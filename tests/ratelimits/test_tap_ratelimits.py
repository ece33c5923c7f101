"""Rate limits in the tap, over real HTTP in front of the mock upstream: the OpenAI-style 429 and headers, what the
official ``openai`` SDK makes of them (``RateLimitError``, its retries honouring ``retry-after-ms``), tokens settled
with the actual usage, concurrency, per-key and per-model scopes, the step's position, and the refusal recorded
as a proxy_log event."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway_tap.apps import hash_key
from schemas import ProxyLog
from tests.support.tap import (
    APP_KEY,
    LIMITED_KEY,
    UPSTREAM_SECRET,
    RunningTap,
    events_for,
    running_tap,
    tap_config,
)

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET


def document(mock_llm: str, kafka: str, prefix: str, tmp_path: Path, limits: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:
    doc = tap_config(mock_llm, kafka, prefix, tmp_path / "spool", plugins=extra.pop("plugins", None))
    doc["rate_limits"] = limits
    doc.update(extra)
    return doc


def chat(chars: int = 40, max_tokens: int | None = 4, model: str = "gpt-4o-mini") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "x" * chars}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def post(http: aiohttp.ClientSession, tap: RunningTap, body: dict[str, Any], key: str = APP_KEY,
               llm: str = "openai", headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    path = "v1/chat/completions" if llm == "openai" else "v1/messages"
    async with http.post(f"{tap.url}/llm/{llm}/{path}", json=body,
                         headers={"authorization": f"Bearer {key}", **(headers or {})}) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


def sample(tap: RunningTap, name: str, labels: dict[str, str]) -> float:
    return tap.tap.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_requests_per_minute_429_body_headers_and_event(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                              tmp_path: Path) -> None:
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, [{"app_id": "test", "requests_per_minute": 2}])
    async with running_tap(doc) as tap, aiohttp.ClientSession() as http:
        answers = [await post(http, tap, chat()) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 429]
        first, second = answers[0][1], answers[1][1]
        assert (first["x-ratelimit-limit-requests"], first["x-ratelimit-remaining-requests"]) == ("2", "1")
        assert first["x-ratelimit-reset-requests"] == "30s"
        assert second["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-limit-tokens" not in first  # no token limit applies
        _, headers, body = answers[2]
        error = body["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert error["request_id"] == headers["x-request-id"]
        assert "Rate limit reached for app test on requests per minute (RPM): Limit 2, Remaining 0, Requested 1" \
            in error["message"]
        assert headers["Retry-After"] == "30" and 29_000 < int(headers["retry-after-ms"]) <= 30_000
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # Other apps are not limited.
        assert (await post(http, tap, chat(), key=LIMITED_KEY, llm="anthropic"))[0] == 200
        assert sample(tap, "gateway_tap_ratelimit_decisions_total", {"result": "limited"}) == 1
        assert sample(tap, "gateway_tap_ratelimit_limited_total", {"scope": "app", "kind": "requests"}) == 1
        assert sample(tap, "gateway_tap_rejected_requests_total", {"llm": "openai", "code": "rate_limit_exceeded"}) \
            == 1
    refused_id = headers["x-request-id"]
    events = await events_for(kafka_bootstrap, topic_prefix, [refused_id])
    log = events[refused_id]
    assert isinstance(log, ProxyLog) and log.status_code == 429
    assert log.error is not None and log.error.code == "rate_limit_exceeded"


async def test_openai_sdk_raises_rate_limit_error_and_its_retries_wait_for_the_limit(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    # 20 per minute: one more request every 3 s.
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, [{"app_id": "test", "requests_per_minute": 20}])
    async with running_tap(doc) as tap:
        base = f"{tap.url}/llm/openai/v1"
        strict = openai.AsyncOpenAI(base_url=base, api_key=APP_KEY, max_retries=0)
        # Drain the bucket (20 at once), then the next call is refused.
        answers = await asyncio.gather(*(strict.chat.completions.with_raw_response.create(**chat())
                                         for _ in range(20)))
        assert all(a.http_response.status_code == 200 for a in answers)
        with pytest.raises(openai.RateLimitError) as caught:
            await strict.chat.completions.create(**chat())
        err = caught.value
        assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
        assert err.response.headers["x-ratelimit-limit-requests"] == "20"
        assert 0 < int(err.response.headers["retry-after-ms"]) <= 3000
        # The SDK's retries (default 2) honour retry-after-ms: the call succeeds once the bucket refilled.
        patient = openai.AsyncOpenAI(base_url=base, api_key=APP_KEY, max_retries=2)
        start = time.monotonic()
        raw = await patient.chat.completions.with_raw_response.create(**chat())
        waited_s = time.monotonic() - start
        assert raw.http_response.status_code == 200
        if raw.retries_taken:  # (on a loaded machine the bucket may have refilled before the call)
            assert 0.2 < waited_s < 8, waited_s  # waited for the refill the header announced, not the SDK's backoff
        limited = sample(tap, "gateway_tap_ratelimit_decisions_total", {"result": "limited"})
        assert limited == 1 + raw.retries_taken
        await strict.close()
        await patient.close()


async def test_tokens_are_estimated_then_settled_with_the_actual_usage(mock_llm: str, kafka_bootstrap: str,
                                                                       topic_prefix: str, tmp_path: Path) -> None:
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, [{"app_id": "test", "tokens_per_minute": 1000}])
    async with running_tap(doc) as tap, aiohttp.ClientSession() as http:
        # 400 characters = 100 prompt tokens, no output limit: estimated 100, the mock then reports 100 + 16.
        status, headers, _ = await post(http, tap, chat(400, max_tokens=None))
        assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "900"
        # Settled with 116: the next request sees 1000 - 116 - its own estimate (10 + 500).
        status, headers, _ = await post(http, tap, chat(40, max_tokens=500))
        assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) in (374, 375)
        # An estimate larger than what is left is refused with type "tokens".
        status, headers, body = await post(http, tap, chat(40, max_tokens=600))
        assert status == 429 and body["error"]["type"] == "tokens"
        assert "tokens per minute (TPM): Limit 1000" in body["error"]["message"] and "Requested 610" in \
            body["error"]["message"]
        # An upstream error consumed nothing: its estimate comes back.
        status, headers, _ = await post(http, tap, chat(40, max_tokens=300), headers={"x-mock-status": "500"})
        assert status == 500 and int(headers["x-ratelimit-remaining-tokens"]) in range(64, 70)
        status, headers, _ = await post(http, tap, chat(40, max_tokens=300))
        assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) in range(64, 72)


async def test_concurrent_requests_in_flight_and_streams_hold_their_claim_until_the_end(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, [{"app_id": "test", "max_concurrent": 2}])
    async with running_tap(doc) as tap, aiohttp.ClientSession() as http:
        slow = {"x-mock-latency-ms": "400"}
        answers = await asyncio.gather(*(post(http, tap, chat(), headers=slow) for _ in range(5)))
        assert sorted(a[0] for a in answers) == [200, 200, 429, 429, 429]
        refused = next(a for a in answers if a[0] == 429)
        assert refused[2]["error"]["type"] == "requests" and "requests in flight: Limit 2" in \
            refused[2]["error"]["message"]
        assert refused[1]["Retry-After"] == "1"
        # A stream holds its claim until its last chunk.
        streamed = chat(max_tokens=10) | {"stream": True}
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=streamed,
                             headers={"authorization": f"Bearer {APP_KEY}", "x-mock-chunk-delay-ms": "40"}) as one, \
                http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=streamed,
                          headers={"authorization": f"Bearer {APP_KEY}", "x-mock-chunk-delay-ms": "40"}) as two:
            assert (one.status, two.status) == (200, 200)
            assert (await post(http, tap, chat()))[0] == 429
            await one.read()
            await two.read()
        assert (await post(http, tap, chat()))[0] == 200


async def test_key_and_model_scopes_and_position_after_plugins(mock_llm: str, kafka_bootstrap: str,
                                                               topic_prefix: str, tmp_path: Path) -> None:
    firewall = {"name": "firewall", "use": "gateway_tap.examples.plugins.prompt_firewall:PromptFirewall",
                "config": {"patterns": ["forbidden"]}}
    limits = [{"key_id": hash_key(LIMITED_KEY), "requests_per_minute": 1},
              {"app_id": "test", "llm_id": "openai", "model": "gpt-4o", "requests_per_minute": 1}]
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, limits, plugins=[firewall],
                   rate_limiting={"position": "after_plugins"})
    async with running_tap(doc) as tap, aiohttp.ClientSession() as http:
        assert (await post(http, tap, chat(), key=LIMITED_KEY, llm="anthropic"))[0] == 200
        status, _, body = await post(http, tap, chat(), key=LIMITED_KEY, llm="anthropic")
        assert status == 429 and f"key {hash_key(LIMITED_KEY)[:19]} on" in body["error"]["message"]
        # model scope: gpt-4o is limited, gpt-4o-mini is not
        assert (await post(http, tap, chat(model="gpt-4o")))[0] == 200
        assert (await post(http, tap, chat(model="gpt-4o")))[0] == 429
        assert [(await post(http, tap, chat()))[0] for _ in range(3)] == [200, 200, 200]
        # after_plugins: the firewall's 403 wins over the exhausted limit, and takes nothing from it
        body = chat(model="gpt-4o")
        body["messages"][0]["content"] = "forbidden words"
        status, headers, _ = await post(http, tap, body)
        assert status == 403 and "x-ratelimit-limit-requests" not in headers


async def test_rate_limits_reload_live(mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    from gateway_tap.settings import parse_config

    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, [{"app_id": "test", "requests_per_minute": 1}])
    async with running_tap(doc) as tap, aiohttp.ClientSession() as http:
        assert (await post(http, tap, chat()))[0] == 200
        assert (await post(http, tap, chat()))[0] == 429
        doc["rate_limits"] = [{"app_id": "test", "requests_per_minute": 600}]
        assert tap.tap.reloader is not None
        assert await tap.tap.reloader.apply(parse_config(doc))
        status, headers, _ = await post(http, tap, chat())
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "600"
        doc["rate_limits"] = []
        assert await tap.tap.reloader.apply(parse_config(doc))
        status, headers, _ = await post(http, tap, chat())
        assert status == 200 and "x-ratelimit-limit-requests" not in headers
