"""A plugin's config replaced through the admin API under load (``serve --workers 2``): both workers switch to
the new behaviour, and no request fails while they do (requests in flight finish with the old config)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway_tap.settings import BudgetStoreSettings
from tests.support.admin import admin_document, admin_tap
from tests.support.tap import APP_KEY, EXAMPLE_PLUGINS

pytestmark = pytest.mark.integration

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
BLOCKED = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say forbidden-word"}]}


async def _post(http: aiohttp.ClientSession, url: str, body: Mapping[str, Any],
                headers: Mapping[str, str] | None = None) -> int:
    async with http.post(f"{url}/llm/openai/v1/chat/completions", json=body,
                         headers={"authorization": f"Bearer {APP_KEY}", **(headers or {})}) as resp:
        await resp.read()
        return resp.status


async def _hammer(url: str, stop: asyncio.Event, results: list[int]) -> None:
    """Benign requests, each 20 ms at the upstream so a change finds some in flight; every one must succeed."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                status = await _post(http, url, BODY, {"x-mock-latency-ms": "20"})
            except aiohttp.ClientError:
                status = 599
            results.append(status)


async def _probe(url: str, n: int = 8) -> list[int]:
    """The blocked-word request over ``n`` fresh connections (spread over the workers)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        return [await _post(http, url, BLOCKED) for _ in range(n)]


async def test_plugin_config_replaced_under_load_drops_nothing(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                              plugins=[EXAMPLE_PLUGINS[0]])
    patterns = EXAMPLE_PLUGINS[0]["config"]["patterns"]
    async with admin_tap(document, tmp_path) as tap:
        assert await _probe(tap.url) == [200] * 8
        stop = asyncio.Event()
        results: list[int] = []
        clients = [asyncio.create_task(_hammer(tap.url, stop, results)) for _ in range(8)]
        try:
            await asyncio.sleep(0.5)
            status, plugin = await tap.call("PUT", "/v1/plugins/prompt_firewall/config",
                                            {"config": {"patterns": [*patterns, "forbidden-word"]}})
            assert status == 200 and plugin["config_source"] == "api"
            await tap.wait_version(1)
            assert await _probe(tap.url) == [403] * 8
            await asyncio.sleep(0.5)
            status, plugin = await tap.call("DELETE", "/v1/plugins/prompt_firewall/config")
            assert status == 200 and plugin["config"]["patterns"] == patterns
            await tap.wait_version(2)
            assert await _probe(tap.url) == [200] * 8
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
    failed = [s for s in results if s != 200]
    print(f"plugin config replaced twice under load: {len(results)} requests from 8 clients, {len(failed)} failed")
    assert len(results) > 50 and not failed, f"{len(failed)} of {len(results)} failed: {sorted(set(failed))}"
    log = tap.log_path.read_text()
    assert log.count("configuration reloaded (admin state version 1)") == 2  # once per worker
