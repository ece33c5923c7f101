"""Plugin endpoints as real endpoints, through the real tap: path patterns with parameters and any method,
authentication like /llm/ (app keys and gateway-wide auth hooks; public opt-out), the timeout to the response start
and on_error, metrics and a proxy_log event per call; the budget_feed example streams server-sent events."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway_tap.apps import hash_key
from gateway_tap.hooks import Endpoint, EndpointContext, HookContext, HookResult, Identity, TapRequest
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import AppConfig
from schemas import ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
AUTH = {"authorization": f"Bearer {APP_KEY}"}


class Sessions:
    """An MCP-shaped plugin: POST/GET/DELETE per session, a catch-all, a public health check, slow and failing
    handlers, and a stream that outlives the timeout."""

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("POST", "mcp/{session}", self.post),
            Endpoint("DELETE", "mcp/{session}", self.delete),
            Endpoint("*", "any/{rest:.*}", self.echo),
            Endpoint("GET", "health", self.health, public=True),
            Endpoint("GET", "slow", self.slow, timeout_ms=100),
            Endpoint("GET", "slow-open", self.slow, timeout_ms=100, on_error="fail_open"),
            Endpoint("GET", "fails", self.fails),
            Endpoint("GET", "long-stream", self.long_stream, timeout_ms=100),
            Endpoint("GET", "breaks", self.breaks),
        ]

    async def post(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        message = await request.json()
        ctx.metadata["session"] = ctx.params["session"]
        return web.json_response({"session": ctx.params["session"], "echo": message, "app_id": ctx.app_id,
                                  "user_id": ctx.user_id, "claims": dict(ctx.claims), "plugin": ctx.plugin})

    async def delete(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        return web.Response(status=204)

    async def echo(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        return web.json_response({"method": request.method, "rest": ctx.params["rest"]})

    async def health(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        return web.json_response({"ok": True, "app_id": ctx.app_id})

    async def slow(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    async def fails(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        raise RuntimeError("handler bug")

    async def long_stream(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        for i in range(4):  # 4 x 80 ms: three times the 100 ms timeout, after the response started
            await asyncio.sleep(0.08)
            await resp.write(f"{i}\n".encode())
        await resp.write_eof()
        return resp

    async def breaks(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"partial\n")
        raise RuntimeError("broke mid-stream")


class TokenAuth:
    """Gateway-wide auth hook: `x-token: <user>` identifies app `test` with claims; `x-token: nobody` is refused."""

    async def authenticate(self, request: TapRequest, ctx: HookContext) -> Identity | HookResult | None:
        token = request.headers.get("x-token")
        if token == "nobody":
            return HookResult.stop(403, "nobody may call", code="refused")
        return Identity("test", token, {"roles": ["reader"], "sub": token}) if token else None


class LlmScopedAuth:
    """An auth hook attached to one LLM only: not used for plugin endpoints."""

    async def authenticate(self, request: TapRequest, ctx: HookContext) -> Identity | HookResult | None:
        return Identity("test", "scoped")


def _plugins(**extra: Any) -> list[dict[str, Any]]:
    return [{"name": "mcp", "use": "tests.plugins.test_plugin_endpoints:Sessions", **extra},
            {"name": "token_auth", "use": "tests.plugins.test_plugin_endpoints:TokenAuth"},
            {"name": "scoped_auth", "use": "tests.plugins.test_plugin_endpoints:LlmScopedAuth", "llms": ["anthropic"]},
            {"name": "feed", "use": "gateway_tap.examples.plugins.budget_feed:BudgetFeed",
             "config": {"interval_s": 0.25}}]


async def _call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with http.request(method, url, **kwargs) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_routing_auth_timeouts_and_events(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=_plugins())
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        base = f"{tap.url}/plugins/mcp"
        # Patterns, parameters, methods.
        status, headers, body = await _call(http, "POST", f"{base}/mcp/s-42", json={"ping": 1}, headers=AUTH)
        assert status == 200
        assert orjson.loads(body) == {"session": "s-42", "echo": {"ping": 1}, "app_id": "test", "user_id": None,
                                      "claims": {}, "plugin": "mcp"}
        ok_id = headers["x-request-id"]
        assert (await _call(http, "DELETE", f"{base}/mcp/s-42", headers=AUTH))[0] == 204
        status, headers, body = await _call(http, "GET", f"{base}/mcp/s-42", headers=AUTH)
        assert (status, headers["allow"]) == (405, "DELETE, POST")
        assert orjson.loads(body)["error"]["code"] == "method_not_allowed"
        status, _, body = await _call(http, "PATCH", f"{base}/any/a/b/c", headers=AUTH)
        assert (status, orjson.loads(body)) == (200, {"method": "PATCH", "rest": "a/b/c"})
        status, headers, body = await _call(http, "GET", f"{base}/nowhere", headers=AUTH)
        assert status == 404 and orjson.loads(body)["error"]["code"] == "route_not_found"
        missing_id = headers["x-request-id"]
        assert (await _call(http, "GET", f"{tap.url}/plugins/nobody/health"))[0] == 404
        assert (await _call(http, "HEAD", f"{base}/health"))[0] == 200
        # Authentication: the app key, or the gateway-wide auth hook with claims; public endpoints need nothing.
        status, headers, body = await _call(http, "POST", f"{base}/mcp/s1", json={})
        assert status == 401 and orjson.loads(body)["error"]["code"] == "missing_api_key"
        unauth_id = headers["x-request-id"]
        status, _, body = await _call(http, "POST", f"{base}/mcp/s1", json={}, headers={"x-api-key": "wrong"})
        assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_api_key"
        status, _, body = await _call(http, "POST", f"{base}/mcp/s1", json={}, headers={"x-token": "alice"})
        got = orjson.loads(body)
        assert (status, got["app_id"], got["user_id"]) == (200, "test", "alice")
        assert got["claims"] == {"roles": ["reader"], "sub": "alice"}
        status, headers, body = await _call(http, "POST", f"{base}/mcp/s1", json={}, headers={"x-token": "nobody"})
        assert status == 403 and orjson.loads(body)["error"]["code"] == "refused"
        refused_id = headers["x-request-id"]
        status, _, body = await _call(http, "GET", f"{base}/health")
        assert (status, orjson.loads(body)) == (200, {"ok": True, "app_id": None})
        # Timeouts to the response start, on_error, failures before and after the start.
        status, headers, body = await _call(http, "GET", f"{base}/slow", headers=AUTH)
        assert status == 500 and orjson.loads(body)["error"]["code"] == "plugin_failed"
        assert "timed out" in orjson.loads(body)["error"]["message"]
        slow_id = headers["x-request-id"]
        status, headers, body = await _call(http, "GET", f"{base}/slow-open", headers=AUTH)
        assert (status, headers["retry-after"]) == (503, "1")
        assert orjson.loads(body)["error"]["code"] == "plugin_unavailable"
        status, _, body = await _call(http, "GET", f"{base}/fails", headers=AUTH)
        assert status == 500 and orjson.loads(body)["error"]["code"] == "plugin_failed"
        started = time.monotonic()
        status, _, body = await _call(http, "GET", f"{base}/long-stream", headers=AUTH)
        assert (status, body) == (200, b"0\n1\n2\n3\n") and time.monotonic() - started >= 0.3
        async with http.get(f"{base}/breaks", headers=AUTH) as resp:
            assert resp.status == 200
            broke_id = resp.headers["x-request-id"]
            assert await resp.content.readline() == b"partial\n"
        async with http.get(tap.metrics_url) as resp:
            metrics = await resp.text()
    assert 'gateway_tap_endpoint_requests_total{endpoint="POST mcp/{session}",plugin="mcp",status_class="2xx"} 2.0' \
        in metrics
    assert 'gateway_tap_endpoint_requests_total{endpoint="none",plugin="none",status_class="4xx"} 3.0' in metrics
    assert 'gateway_tap_hook_errors_total{hook="endpoint",kind="timeout",plugin="mcp"} 2.0' in metrics
    assert 'gateway_tap_hook_errors_total{hook="endpoint",kind="exception",plugin="mcp"} 2.0' in metrics

    # One proxy_log per call (17 calls), never analytics or budget usage: waiting for an 18th event times out.
    events = await read_events(kafka_bootstrap, topic_prefix, count=18, wait_s=8)
    assert {e.type for e in events} == {"proxy_log"} and len(events) == 17
    logs = {rid: group["proxy_log"] for rid, group in by_request(events).items()}
    ok = logs[ok_id]
    assert isinstance(ok, ProxyLog) and ok.llm_id is None and ok.app_id == "test"
    assert (ok.method, ok.path, ok.status_code, ok.metadata) == ("POST", "/plugins/mcp/mcp/s-42", 200,
                                                                 {"session": "s-42"})
    assert ok.request_headers["authorization"] == "[REDACTED]" and ok.response_bytes > 0
    assert logs[missing_id].status_code == 404 and logs[missing_id].error.code == "route_not_found"  # type: ignore[union-attr]
    assert logs[unauth_id].error.code == "missing_api_key" and logs[unauth_id].app_id is None  # type: ignore[union-attr]
    assert logs[refused_id].blocked_by == "token_auth"
    assert logs[slow_id].error.code == "plugin_failed"  # type: ignore[union-attr]
    broke = logs[broke_id]
    assert broke.status_code == 200 and broke.streamed and broke.error.code == "plugin_failed"  # type: ignore[union-attr]


async def test_budget_feed_streams_events_as_they_happen(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                         tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=_plugins())
    async with running_tap(document) as tap, aiohttp.ClientSession() as http, \
            http.get(f"{tap.url}/plugins/feed/events?events=3", headers=AUTH) as resp:
        assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
        start = time.monotonic()
        arrivals: list[tuple[float, bytes]] = []
        buffer = b""
        async for chunk in resp.content.iter_any():  # read incrementally, as a browser's EventSource does
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                arrivals.append((time.monotonic() - start, event))
    kinds = [event.split(b"\n")[0] for _, event in arrivals]
    assert kinds == [b"event: budget"] * 3 + [b"event: end"]
    first = orjson.loads(arrivals[0][1].split(b"data: ")[1])
    assert first == {"app_id": "test", "seq": 0, "budget": None}
    # The first event arrived long before the stream ended (two 250 ms intervals later).
    assert arrivals[-1][0] - arrivals[0][0] >= 0.45


async def test_harness_calls_endpoints_by_the_same_rules() -> None:
    apps = [AppConfig(id="demo", key_hashes=[hash_key("k-demo-123")])]
    async with PluginHarness(Sessions, name="mcp", apps=apps) as h, h.endpoint_client() as client:
        resp = await client.post("/plugins/mcp/mcp/s9", json={"hi": 1}, headers={"x-api-key": "k-demo-123"})
        assert resp.status == 200 and (await resp.json())["app_id"] == "demo"
        resp = await client.post("/plugins/mcp/mcp/s9", json={})
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
        assert (await client.get("/plugins/mcp/health")).status == 200
        assert (await client.get("/plugins/mcp/mcp/s9", headers={"x-api-key": "k-demo-123"})).status == 405
        resp = await client.get("/plugins/mcp/slow-open", headers={"x-api-key": "k-demo-123"})
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "plugin_unavailable"
        resp = await client.get("/plugins/mcp/long-stream", headers={"x-api-key": "k-demo-123"})
        assert await resp.read() == b"0\n1\n2\n3\n"
