"""Gateway services for plugins (list_apps, get_llm, list_llms, price_for) answer from the running configuration,
reloads included, and never expose an upstream's URL or credential; in the tap and in the harness."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway_tap.hooks import Endpoint, EndpointContext
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import LLMConfig, parse_config
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET


class ServicesProbe:
    """Reports what services.gateway answers, from an endpoint."""

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "probe", self.probe)]

    async def probe(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        gateway = ctx.services.gateway
        price = gateway.price_for("openai", "gpt-4o-mini")
        return web.json_response({
            "apps": [app.id for app in gateway.list_apps()],
            "llms": [dataclasses.asdict(llm) for llm in gateway.list_llms()],
            "openai": dataclasses.asdict(info) if (info := gateway.get_llm("openai")) else None,
            "ghost": gateway.get_llm("ghost"),
            "price": dataclasses.asdict(price) if price else None,
            "any_model": dataclasses.asdict(p) if (p := gateway.price_for("anthropic", "claude-x")) else None,
            "unpriced": gateway.price_for("openai", "unknown-model"),
        })


async def test_services_answer_from_the_running_config(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                       tmp_path: Path) -> None:
    plugins = [{"name": "probe", "use": "tests.plugins.test_gateway_services:ServicesProbe"}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        async def probe() -> Any:
            async with http.get(f"{tap.url}/plugins/probe/probe", headers={"x-api-key": APP_KEY}) as resp:
                assert resp.status == 200
                raw = await resp.read()
            assert UPSTREAM_SECRET.encode() not in raw and mock_llm.encode() not in raw
            assert b"TAP_TEST_UPSTREAM_KEY" not in raw  # not even the variable's name
            return orjson.loads(raw)

        got = await probe()
        assert got["apps"] == ["test", "limited"]
        assert [llm["id"] for llm in got["llms"]] == ["openai", "anthropic"]
        assert got["openai"] == {"id": "openai", "vendor": "openai", "currency": "USD",
                                 "priced_models": ["gpt-4o-mini"]}
        assert got["ghost"] is None and got["unpriced"] is None
        version = got["price"].pop("version")
        assert version.startswith("genai-prices-")  # the catalog's version, + the hash of the LLM's price settings
        assert got["price"] == {"input_per_1m": 0.15, "output_per_1m": 0.60, "currency": "USD",
                                "cache_read_per_1m": 0.15, "cache_write_per_1m": 0.15, "reasoning_per_1m": 0.60,
                                "source": "config:gpt-4o-mini"}  # the classes without a price of their own
        assert got["any_model"] == {"input_per_1m": 0.80, "output_per_1m": 4.00, "currency": "USD",  # "*": the
                                    "cache_read_per_1m": 0.80, "cache_write_per_1m": 0.80,  # catalog has no claude-x
                                    "reasoning_per_1m": 4.00, "source": "config:*",
                                    "version": got["any_model"]["version"]}
        # A reload changes the answers: a new app, a new price, an LLM gone.
        changed = dict(document)
        changed["apps"] = [*document["apps"], {"id": "newcomer"}]
        changed["llms"] = [{**document["llms"][0], "prices": {"gpt-4o-mini": {"input_per_1m": 1, "output_per_1m": 2}}}]
        changed["apps"] = [{**a, "allowed_llms": ["*"]} for a in changed["apps"]]
        assert tap.tap.reloader is not None and await tap.tap.reloader.apply(parse_config(changed))
        got = await probe()
        assert got["apps"] == ["test", "limited", "newcomer"]
        assert [llm["id"] for llm in got["llms"]] == ["openai"]
        assert (got["price"]["input_per_1m"], got["price"]["output_per_1m"]) == (1.0, 2.0)
        assert got["price"]["version"] != version  # other price settings, another price version
        assert got["any_model"] is None


async def test_services_in_the_harness() -> None:
    llm = LLMConfig(id="gpt", vendor="openai", upstream_url="https://user:pw@example.test/v1", api_key_env="K",
                    currency="EUR", prices={"*": {"input_per_1m": 1, "output_per_1m": 3}})  # type: ignore[dict-item]
    async with PluginHarness(ServicesProbe, llms=[llm]) as h:
        gateway = h.gateway
        assert gateway.list_llms()[0].priced_models == ("*",)
        price = gateway.price_for("gpt", "anything")
        assert price is not None and (price.output_per_1m, price.currency) == (3, "EUR")
        assert "example.test" not in repr(gateway.list_llms())
