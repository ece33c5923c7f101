"""The tap end to end over real HTTP: official SDKs, streaming, accounting, events on a real broker, errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict

from gateway_tap.dev.servers import free_port
from schemas import Analytics, BudgetUsage, ProxyLog
from tests.support.tap import (
    APP_KEY,
    LIMITED_KEY,
    OPENAI_PRICE,
    UPSTREAM_SECRET,
    RunningTap,
    by_request,
    cost_micros,
    read_events,
    running_tap,
    tap_config,
)

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
MESSAGES = [{"role": "user", "content": "Say hello to the tap test suite please"}]  # 38 chars -> 9 tokens
PROMPT_TOKENS = len(MESSAGES[0]["content"]) // 4


@pytest.fixture
async def tap(mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> AsyncIterator[RunningTap]:
    dead_port = free_port()
    extra = [
        {"id": "dead", "vendor": "openai", "upstream_url": f"http://127.0.0.1:{dead_port}"},
        {"id": "slow", "vendor": "openai", "upstream_url": mock_llm, "timeouts": {"first_byte_s": 0.3}},
    ]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", extra_llms=extra,
                          tap={"limits": {"max_body_bytes": 4096}, "capture_bodies": True})
    async with running_tap(document) as running:
        yield running


def _openai(tap: RunningTap, llm: str = "openai", key: str = APP_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{tap.url}/llm/{llm}/v1", api_key=key, max_retries=0)


def _anthropic(tap: RunningTap, key: str = APP_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=key, max_retries=0)


def _cost(prompt: int, completion: int, price: dict[str, float]) -> float:
    return cost_micros(price, prompt, completion) / 1_000_000


async def test_openai_sdk_non_streaming_and_its_three_events(tap: RunningTap, mock_llm: str,
                                                             kafka_bootstrap: str, topic_prefix: str) -> None:
    client = _openai(tap)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                                 max_tokens=5)
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.choices[0].message.content == "tok tok tok tok tok"
    assert completion.usage is not None and completion.usage.prompt_tokens == PROMPT_TOKENS
    # The upstream got the tap's credential, never the app key.
    async with aiohttp.ClientSession() as http, http.get(f"{mock_llm}/_mock/stats") as resp:
        seen = (await resp.json())["last_headers"]
    assert seen["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert APP_KEY not in str(seen)

    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    log, analytics, budget = events["proxy_log"], events["analytics"], events["budget_usage"]
    assert isinstance(log, ProxyLog) and isinstance(analytics, Analytics) and isinstance(budget, BudgetUsage)
    assert log.status_code == 200 and log.app_id == "test" and log.llm_id == "openai" and not log.streamed
    assert log.request_headers["authorization"] == "[REDACTED]" and APP_KEY not in log.model_dump_json()
    assert log.latency.upstream_ms is not None and log.latency.tap_overhead_ms is not None
    assert log.response_body is not None and "tok" in log.response_body
    assert (analytics.prompt_tokens, analytics.completion_tokens, analytics.total_tokens) == (
        PROMPT_TOKENS, 5, PROMPT_TOKENS + 5)
    assert not analytics.tokens_estimated and analytics.model == "gpt-4o-mini" and analytics.choices == 1
    assert analytics.cost == pytest.approx(_cost(PROMPT_TOKENS, 5, OPENAI_PRICE))
    assert budget.total_tokens == PROMPT_TOKENS + 5 and budget.cost == pytest.approx(analytics.cost)
    assert budget.period == "monthly" and budget.period_start.day == 1


async def test_openai_stream_usage_is_accounted_and_hidden_unless_asked(tap: RunningTap, kafka_bootstrap: str,
                                                                        topic_prefix: str) -> None:
    client = _openai(tap)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=7,  # type: ignore[arg-type]
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["tok"] * 7
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)  # injected usage chunk stripped

    asked = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3,  # type: ignore[arg-type]
                                                 stream=True, stream_options={"include_usage": True})
    usage_chunks = [c.usage for c in [chunk async for chunk in asked] if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].completion_tokens == 3

    events = await read_events(kafka_bootstrap, topic_prefix, count=6)
    analytics = sorted((e for e in events if isinstance(e, Analytics)), key=lambda e: e.completion_tokens)
    assert [(a.prompt_tokens, a.completion_tokens, a.streamed, a.tokens_estimated) for a in analytics] == [
        (PROMPT_TOKENS, 3, True, False), (PROMPT_TOKENS, 7, True, False)]
    assert analytics[1].cost == pytest.approx(_cost(PROMPT_TOKENS, 7, OPENAI_PRICE))


async def test_anthropic_sdk_streaming_and_not(tap: RunningTap, mock_llm: str, kafka_bootstrap: str,
                                               topic_prefix: str) -> None:
    client = _anthropic(tap)
    message = await client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=MESSAGES)  # type: ignore[arg-type]
    assert message.content[0].text == "tok tok tok tok"  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as http, http.get(f"{mock_llm}/_mock/stats") as resp:
        seen = (await resp.json())["last_headers"]
    assert seen["x-api-key"] == UPSTREAM_SECRET
    async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=6, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text.split() == ["tok"] * 6 and final.usage.output_tokens == 6

    events = await read_events(kafka_bootstrap, topic_prefix, count=6)
    analytics = sorted((e for e in events if isinstance(e, Analytics)), key=lambda e: e.completion_tokens)
    assert [(a.vendor, a.prompt_tokens, a.completion_tokens, a.streamed) for a in analytics] == [
        ("anthropic", PROMPT_TOKENS, 4, False), ("anthropic", PROMPT_TOKENS, 6, True)]
    # The catalog prices claude-sonnet-4-5 ($3 / $15 per 1M in genai-prices 0.2.3), ahead of the LLM's "*" price.
    assert analytics[1].price_source == "catalog:anthropic/claude-sonnet-4-5"
    assert analytics[1].cost == _cost(PROMPT_TOKENS, 6, {"input_per_1m": 3.0, "output_per_1m": 15.0})
    assert len([e for e in events if isinstance(e, BudgetUsage)]) == 2


async def test_missing_usage_is_estimated(tap: RunningTap, kafka_bootstrap: str, topic_prefix: str) -> None:
    client = _openai(tap)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                         extra_headers={"x-mock-no-usage": "1"})
    events = await read_events(kafka_bootstrap, topic_prefix, count=3)
    analytics = next(e for e in events if isinstance(e, Analytics))
    assert analytics.tokens_estimated and analytics.prompt_tokens == PROMPT_TOKENS
    assert analytics.completion_tokens == len(" ".join(["tok"] * 8)) // 4


async def _call(tap: RunningTap, path: str, *, headers: dict[str, str] | None = None, data: bytes | None = None,
                method: str = "POST") -> tuple[int, CIMultiDict[str], dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.request(method, tap.url + path, headers=headers,
                                                             data=data) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json(content_type=None)


CHAT = "/llm/openai/v1/chat/completions"
GOOD_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
AUTH = {"authorization": f"Bearer {APP_KEY}", "content-type": "application/json"}


@pytest.mark.parametrize(("path", "headers", "body", "status", "code"), [
    (CHAT, AUTH, b'{"model": "gpt-4o-mini", "messages": [', 400, "invalid_json"),
    (CHAT, {"content-type": "application/json"}, GOOD_BODY, 401, "missing_api_key"),
    (CHAT, {"x-api-key": "gt-wrong-key", "content-type": "application/json"}, GOOD_BODY, 401, "invalid_api_key"),
    (CHAT, {"x-api-key": LIMITED_KEY, "content-type": "application/json"}, GOOD_BODY, 403, "llm_not_allowed"),
    ("/llm/nope/v1/chat/completions", AUTH, GOOD_BODY, 404, "unknown_llm"),
    ("/not/a/route", AUTH, GOOD_BODY, 404, "route_not_found"),
    (CHAT, AUTH, b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}', 413,
     "request_too_large"),
    ("/llm/dead/v1/chat/completions", AUTH, GOOD_BODY, 502, "upstream_unreachable"),
    ("/llm/slow/v1/chat/completions", {**AUTH, "x-mock-latency-ms": "2000"}, GOOD_BODY, 504, "upstream_timeout"),
])
async def test_error_statuses(tap: RunningTap, path: str, headers: dict[str, str], body: bytes, status: int,
                              code: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    got, resp_headers, payload = await _call(tap, path, headers=headers, data=body)
    assert got == status
    error = payload["error"]
    assert isinstance(error, dict) and error["code"] == code and error["type"] and error["message"]
    assert error["request_id"] == resp_headers["x-request-id"]
    if path.startswith("/llm/"):  # every rejected LLM request is still logged as events
        events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=2))[str(error["request_id"])]
        log = events["proxy_log"]
        assert isinstance(log, ProxyLog) and log.status_code == status and log.error is not None
        assert log.error.code == code and "budget_usage" not in events


async def test_upstream_errors_pass_through(tap: RunningTap) -> None:
    status, headers, payload = await _call(tap, CHAT, headers={**AUTH, "x-mock-status": "429"}, data=GOOD_BODY)
    assert status == 429 and payload["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert headers["x-request-id"].startswith("req_")
    with pytest.raises(anthropic.InternalServerError):
        await _anthropic(tap).messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=MESSAGES,  # type: ignore[arg-type]
                                              extra_headers={"x-mock-status": "503"})


async def test_health_ready_and_metrics(tap: RunningTap) -> None:
    await _openai(tap).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as http:
        async with http.get(tap.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(tap.url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True
        async with http.get(tap.metrics_url) as resp:
            text = await resp.text()
    assert 'gateway_tap_requests_total{app="test",llm="openai",model="gpt-4o-mini",status_class="2xx"}' in text
    assert 'gateway_tap_request_duration_seconds_bucket{le="0.0001",llm="openai",status_class="2xx"}' in text
    assert "gateway_tap_tokens_total" in text and "gateway_tap_overhead_seconds_bucket" in text
    assert "req_" not in text
