"""The request enricher runs in pre-auth and post-auth: the client headers it copies before authentication tag
every request, also one the key check refuses; the post-auth enrichment only those that got through (the tap, the
official ``openai`` SDK, the events on Kafka)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway_tap.plugins.loader import validate_plugin_configs
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import PluginConfig
from schemas import Analytics, ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
ENRICHER = "gateway_tap.examples.plugins.request_enricher:RequestEnricher"
CONFIG = {"client_headers": {"x-client-version": "client_version", "x-deployment": "deployment"},
          "metadata": {"team": "qa"}, "report_every_s": 0}
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


async def test_pre_auth_tags_every_request_post_auth_only_the_authenticated(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    plugin = {"name": "request_enricher", "use": ENRICHER, "config": CONFIG}
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[plugin])
    headers = {"x-client-version": "1.2.3", "x-deployment": "d" * 500}
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers=headers)
        ok = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                    max_tokens=2)
        stranger = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key="not-a-key", max_retries=0,
                                      default_headers={"x-client-version": "9.9"})
        with pytest.raises(openai.AuthenticationError) as refused:
            await stranger.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
    ok_id = ok.headers["x-request-id"]
    refused_id = refused.value.response.headers["x-request-id"]
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 + 2))
    log = events[ok_id]["proxy_log"]
    analytics = events[ok_id]["analytics"]
    assert isinstance(log, ProxyLog) and isinstance(analytics, Analytics)
    assert log.metadata == analytics.tags == {"client_version": "1.2.3", "deployment": "d" * 128, "team": "qa"}
    refused_log = events[refused_id]["proxy_log"]
    assert isinstance(refused_log, ProxyLog) and refused_log.status_code == 401
    assert refused_log.metadata == {"client_version": "9.9"}  # pre-auth ran; post-auth never did


def test_a_credential_header_cannot_become_a_tag() -> None:
    problems = validate_plugin_configs([PluginConfig(name="e", use=ENRICHER,
                                                     config={"client_headers": {"Authorization": "auth"}})])
    assert len(problems) == 1 and problems[0].startswith("plugins[0].config.client_headers: 'Authorization' should not")


async def test_pre_auth_in_the_harness() -> None:
    async with PluginHarness(ENRICHER, CONFIG, name="enricher") as h:
        sent = await h.request(json={"model": "m", "messages": []}, headers={"x-client-version": "2.0"},
                               app_id="demo")
        bare = await h.request(json={"model": "m", "messages": []}, app_id="demo")
    assert sent.metadata == {"client_version": "2.0", "team": "qa"} and bare.metadata == {"team": "qa"}
