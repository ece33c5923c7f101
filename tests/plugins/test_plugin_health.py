"""An optional ``health()`` on a plugin feeds the tap's ``/readyz``: 503 naming the plugin and why while it is not
ready (False, an exception, too slow, blocking), 200 again once it is; plugins without it are not asked."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

from gateway_tap.hooks import Endpoint, EndpointContext, HookContext, HookResult, TapRequest
from gateway_tap.plugins.loader import validate_plugin_configs
from gateway_tap.settings import PluginConfig
from tests.support.tap import UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET


class Store:
    """A plugin depending on an outside store; ``state`` says how its health check behaves."""

    state: ClassVar[str] = "up"

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None

    async def health(self) -> bool | None:
        if Store.state == "down":
            return False
        if Store.state == "error":
            raise ConnectionError("store unreachable")
        if Store.state == "slow":
            await asyncio.sleep(5)
        if Store.state == "blocking":
            time.sleep(0.2)  # noqa: ASYNC251 (what the tap must notice)
        return True


class NoHealth:
    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None


class HealthEndpoint:
    """An endpoint handler that happens to be called ``health``: an endpoint, not the plugin's health check."""

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "health", self.health, public=True)]

    async def health(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        return web.json_response({"ok": True})


class SyncHealth:
    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None

    def health(self) -> bool:
        return True


async def _readyz(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
        return resp.status, await resp.json()


async def test_plugin_health_feeds_readyz(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                          tmp_path: Path) -> None:
    Store.state = "up"
    plugins = [{"name": "store", "use": f"{__name__}:Store", "timeout_ms": 100},
               {"name": "plain", "use": f"{__name__}:NoHealth"},
               {"name": "web", "use": f"{__name__}:HealthEndpoint"}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    async with running_tap(document) as tap:
        status, body = await _readyz(tap.url)
        assert (status, body["ready"], body["plugins"]) == (200, True, {"store": "ok"})
        for state, why in [("down", "health() answered False"),
                           ("error", "health() raised ConnectionError('store unreachable')"),
                           ("slow", "health() timed out after 100 ms"),
                           ("blocking", "health() ran 2")]:
            Store.state = state
            status, body = await _readyz(tap.url)
            assert (status, body["ready"]) == (503, False), state
            assert body["plugins"]["store"].startswith(why), body
            assert set(body["plugins"]) == {"store"}
        Store.state = "up"
        assert (await _readyz(tap.url))[0] == 200


def test_health_must_be_an_async_method_without_arguments() -> None:
    problems = validate_plugin_configs([PluginConfig(name="s", use=f"{__name__}:SyncHealth")])
    assert problems == ["plugins[0] (s).health: is a plain def; expected async def health(self)"]
