"""A hook that blocks the event loop past its ``timeout_ms`` is a timeout, although no timer could interrupt it:
its result is discarded, ``on_error`` applies, the timeout is counted and logged with the plugin's name
(the tap, with the official SDKs)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway_tap.hooks import HookContext, HookResult, TapRequest
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


class Blocking:
    """Sleeps synchronously (blocking the whole worker), then asks for a header and a tag."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        time.sleep(0.3)  # noqa: ASYNC251 (the point of this test)
        return HookResult.modify(headers={"x-blocking": "ran"}, metadata={"blocking": "ran"})


class YieldsThenBlocks:
    """Yields once (so the timer is armed), then blocks past the deadline before returning."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 (the point of this test)
        request.headers["x-yields-then-blocks"] = "ran"  # an in-place change cannot be taken back (documented)
        return HookResult.modify(headers={"x-yields": "ran"})


class OffThread:
    """The documented way: the blocking call in a thread; the hook yields and finishes in time."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        await asyncio.to_thread(time.sleep, 0.01)
        return HookResult.modify(headers={"x-off-thread": "ran"})


def _plugin(name: str, cls: type, **extra: Any) -> dict[str, Any]:
    return {"name": name, "use": f"{__name__}:{cls.__name__}", "timeout_ms": 50, **extra}


async def test_a_hook_blocking_past_its_timeout_is_a_timeout(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugins = [_plugin("blocking_open", Blocking, on_error="fail_open", llms=["openai"]),
               _plugin("yields_open", YieldsThenBlocks, on_error="fail_open", llms=["openai"]),
               _plugin("off_thread", OffThread, llms=["openai"], timeout_ms=2000),
               _plugin("blocking_closed", Blocking, on_error="fail_closed", llms=["anthropic"])]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    caplog.set_level(logging.WARNING, logger="gateway_tap.plugins.chain")
    async with running_tap(document) as tap:
        # fail_open: the request goes through as if the blocking hooks had not run (their results discarded).
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                     max_tokens=2)
        assert raw.parse().choices[0].message.content
        async with aiohttp.ClientSession() as http, http.get(f"{mock_llm}/_mock/stats") as resp:
            upstream_saw = (await resp.json())["last_headers"]
        assert "x-blocking" not in upstream_saw and "x-yields" not in upstream_saw
        assert upstream_saw["x-off-thread"] == "ran"

        # fail_closed: the client gets the plugin failure, naming the plugin.
        claude = anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=APP_KEY, max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as failed:
            await claude.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=MESSAGES)
        error = failed.value.body
        assert isinstance(error, dict) and error["error"]["code"] == "plugin_failed"
        assert error["error"]["message"] == "plugin 'blocking_closed' failed in post_auth: timed out"

        async with aiohttp.ClientSession() as http, http.get(tap.metrics_url) as resp:
            text = await resp.text()
    for plugin in ("blocking_open", "yields_open", "blocking_closed"):
        assert f'gateway_tap_hook_errors_total{{hook="post_auth",kind="timeout",plugin="{plugin}"}} 1.0' in text
    assert 'gateway_tap_hook_errors_total{hook="post_auth",kind="timeout",plugin="off_thread"} 0.0' in text
    logged = {r.plugin: r.reason for r in caplog.records if r.getMessage() == "hook failed"}  # type: ignore[attr-defined]
    assert set(logged) == {"blocking_open", "yields_open", "blocking_closed"}
    assert all("past its 50 ms timeout" in reason and "asyncio.to_thread" in reason for reason in logged.values())
