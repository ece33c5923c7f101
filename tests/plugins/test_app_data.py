"""App data for enrichment: an app's metadata (from the file or the admin API) reaches hooks through
``ctx.app`` and ``services.gateway.get_app()``, and an app's key hashes never do (``serve --workers 2``, the
official ``openai`` SDK)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway_tap.hooks import HookContext, HookResult, TapResponse
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import AppConfig, BudgetStoreSettings
from tests.support.admin import admin_document, admin_tap
from tests.support.tap import APP_KEY

pytestmark = pytest.mark.integration
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


class AppStamp:
    """Stamps what the calling app's metadata says, and which fields an app has for a plugin."""

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        app = ctx.app
        assert app is not None
        looked_up = ctx.services.gateway.get_app(app.id)
        assert looked_up == app
        listed = {a.id: a for a in ctx.services.gateway.list_apps()}
        assert listed[app.id] == app
        response.headers["x-app-team"] = app.metadata["team"]
        response.headers["x-app-tier"] = str(app.metadata.get("limits", {}).get("tier"))
        response.headers["x-app-fields"] = ",".join(f.name for f in dataclasses.fields(app))
        return None


def _stamp(url: str, key: str) -> Any:
    client = openai.OpenAI(base_url=f"{url}/llm/openai/v1", api_key=key, max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                            max_tokens=2).headers


async def test_app_metadata_from_the_file_and_the_admin_api_reaches_hooks(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    import asyncio

    plugin = {"name": "stamp", "use": f"{__name__}:AppStamp"}
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                              plugins=[plugin])
    document["apps"][0]["metadata"] = {"team": "search", "limits": {"tier": 2}}
    async with admin_tap(document, tmp_path) as tap:
        headers = await asyncio.to_thread(_stamp, tap.url, APP_KEY)
        assert (headers["x-app-team"], headers["x-app-tier"]) == ("search", "2")
        assert headers["x-app-fields"] == "id,name,allowed_llms,metadata"  # no key_hashes

        status, _ = await tap.call("POST", "/v1/apps", {"id": "ads", "metadata": {"team": "ads"}})
        assert status == 201
        status, issued = await tap.call("POST", "/v1/apps/ads/keys")
        assert status == 201
        await tap.wait_version(2)
        for _ in range(4):  # fresh connections: both workers
            headers = await asyncio.to_thread(_stamp, tap.url, issued["key"])
            assert (headers["x-app-team"], headers["x-app-tier"]) == ("ads", "None")

        status, _ = await tap.call("PATCH", "/v1/apps/ads", {"metadata": {"team": "ads-2"}})
        assert status == 200
        await tap.wait_version(3)
        headers = await asyncio.to_thread(_stamp, tap.url, issued["key"])
        assert headers["x-app-team"] == "ads-2"


async def test_app_data_is_read_only_in_the_harness() -> None:
    apps = [AppConfig(id="demo", metadata={"team": "search", "tags": ["a"]})]
    async with PluginHarness(AppStamp, apps=apps) as h:
        app = h.gateway.get_app("demo")
        assert app is not None and not hasattr(app, "key_hashes")
        with pytest.raises(TypeError):
            app.metadata["team"] = "other"  # type: ignore[index]
        assert app.metadata["tags"] == ("a",)
        sent = await h.request(json={"model": "m", "messages": []}, app_id="demo")
        got = await h.response(sent, headers={"content-type": "application/json"}, body=b"{}")
    assert got.headers["x-app-team"] == "search"
