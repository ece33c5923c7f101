"""A hook that blocks the event loop past its ``timeout_ms`` is a timeout, although no timer could interrupt it:
its result is discarded, ``on_error`` applies, the timeout is counted and logged with the plugin's name
(the tap, with the official SDKs). A plugin endpoint's handler is held to the same rule until its response
starts."""

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
from aiohttp import web

from gateway_tap.apps import hash_key
from gateway_tap.hooks import Endpoint, EndpointContext, HookContext, HookResult, TapRequest
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import AppConfig
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


class BlockingEndpoints:
    """Endpoints (50 ms timeout) that block the loop for 300 ms before answering or starting a stream, and one that
    does its blocking work in a thread."""

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "answer", self.answer),
                Endpoint("GET", "answer-open", self.answer, on_error="fail_open"),
                Endpoint("GET", "stream", self.stream), Endpoint("GET", "refuse", self.refuse),
                Endpoint("GET", "off-thread", self.off_thread, timeout_ms=2000)]

    async def answer(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        time.sleep(0.3)  # noqa: ASYNC251 (the point of this test)
        return web.json_response({"late": True})

    async def stream(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        time.sleep(0.3)  # noqa: ASYNC251 (the point of this test)
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"late\n")
        return resp

    async def refuse(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        time.sleep(0.3)  # noqa: ASYNC251 (the point of this test)
        raise web.HTTPNotFound()

    async def off_thread(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        await asyncio.to_thread(time.sleep, 0.01)
        return web.json_response({"in_time": True})


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


async def test_an_endpoint_blocking_past_its_timeout_is_a_timeout(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                          plugins=[_plugin("blocker", BlockingEndpoints)])
    caplog.set_level(logging.WARNING, logger="gateway_tap.plugins.endpoints")
    headers = {"authorization": f"Bearer {APP_KEY}"}
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        base = f"{tap.url}/plugins/blocker"
        for path in ("answer", "stream", "refuse"):  # fail_closed: the late answer is discarded, never sent
            async with http.get(f"{base}/{path}", headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 500, (path, body)
                assert body["error"]["code"] == "plugin_failed" and "timed out" in body["error"]["message"]
                assert resp.headers["x-request-id"] == body["error"]["request_id"]
        async with http.get(f"{base}/answer-open", headers=headers) as resp:
            assert (resp.status, resp.headers["retry-after"]) == (503, "1")
            assert (await resp.json())["error"]["code"] == "plugin_unavailable"
        async with http.get(f"{base}/off-thread", headers=headers) as resp:
            assert (resp.status, await resp.json()) == (200, {"in_time": True})
        async with http.get(tap.metrics_url) as resp:
            text = await resp.text()
    assert 'gateway_tap_hook_errors_total{hook="endpoint",kind="timeout",plugin="blocker"} 4.0' in text
    reasons = [r.reason for r in caplog.records if r.getMessage() == "endpoint failed"]  # type: ignore[attr-defined]
    assert len(reasons) == 4 and all("past its 50 ms timeout" in r and "asyncio.to_thread" in r for r in reasons)


async def test_the_harness_holds_endpoints_to_the_same_rule() -> None:
    apps = [AppConfig(id="demo", key_hashes=[hash_key(APP_KEY)])]
    async with PluginHarness(BlockingEndpoints, name="blocker", apps=apps, timeout_ms=50) as h, \
            h.endpoint_client() as client:
        for path in ("answer", "stream"):
            resp = await client.get(f"/plugins/blocker/{path}", headers={"x-api-key": APP_KEY})
            assert resp.status == 500 and (await resp.json())["error"]["code"] == "plugin_failed"
        resp = await client.get("/plugins/blocker/off-thread", headers={"x-api-key": APP_KEY})
        assert resp.status == 200
