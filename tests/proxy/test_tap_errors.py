"""Every request is recorded: an error nobody anticipated (a bug) still ends as a JSON 500, an event and a metric."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas import ProxyLog
from tests.support.tap import (
    APP_KEY,
    EXAMPLE_PLUGINS,
    UPSTREAM_SECRET,
    by_request,
    read_events,
    running_tap,
    tap_config,
)

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _engine_bug(*args: Any, **kwargs: Any) -> Any:
    raise KeyError("a bug in the hook engine")


async def test_unexpected_error_before_the_response_is_a_recorded_json_500(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway_tap.proxy.handler.run_response_header_hooks", _engine_bug)
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[EXAMPLE_PLUGINS[2]])
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=BODY,
                             headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
            assert resp.status == 500 and resp.content_type == "application/json"
            error = (await resp.json())["error"]
            request_id = resp.headers["x-request-id"]
        async with http.get(tap.metrics_url) as resp:
            metrics = await resp.text()
    assert error["type"] == "internal_error" and error["code"] == "internal_error"
    assert error["request_id"] == request_id
    assert ('gateway_tap_requests_total{app="test",llm="openai",model="gpt-4o-mini",status_class="5xx"} 1.0'
            in metrics)
    log = by_request(await read_events(kafka_bootstrap, topic_prefix, count=2))[request_id]["proxy_log"]
    assert isinstance(log, ProxyLog) and log.status_code == 500
    assert log.error is not None and log.error.type == "internal_error"


async def test_unexpected_error_mid_stream_ends_the_stream_and_is_recorded(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    from gateway_tap.proxy import handler

    real = handler.run_chunk_hooks

    async def breaks_on_third(*args: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("a bug in the hook engine")
        return await real(*args)

    monkeypatch.setattr("gateway_tap.proxy.handler.run_chunk_hooks", breaks_on_third)
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[EXAMPLE_PLUGINS[2]])
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json={**BODY, "stream": True,
                                                                                 "max_tokens": 10},
                             headers={"authorization": f"Bearer {APP_KEY}",
                                      "x-mock-chunk-delay-ms": "20"}) as resp:
            assert resp.status == 200  # the status line was out before the bug struck
            payload = await resp.read()
            request_id = resp.headers["x-request-id"]
        async with http.get(tap.metrics_url) as resp:
            metrics = await resp.text()
    assert calls == 3 and b"[DONE]" not in payload and payload.count(b"chat.completion.chunk") == 2
    assert 'gateway_tap_requests_total{app="test",llm="openai",model="gpt-4o-mini",status_class="2xx"} 1.0' in metrics
    log = by_request(await read_events(kafka_bootstrap, topic_prefix, count=2))[request_id]["proxy_log"]
    assert isinstance(log, ProxyLog) and log.status_code == 200 and log.streamed
    assert log.error is not None and log.error.type == "internal_error"
