"""Issue 21 item 10: the tap's ``/metrics`` (app ids, per-app spend) is not on the public proxy port.

``gateway-tap serve --workers 2`` serves it on ``tap.metrics`` (a listener of its own, loopback by default, the
port shared by the workers like the proxy's); the proxy port answers ``/metrics`` like any unknown path. A
config that puts it on the proxy's or the admin API's port fails naming the key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway_tap.dev.servers import free_port
from gateway_tap.settings import ConfigFileError, TapSettings, parse_config
from tests.support.tap import APP_KEY, metrics_url, serve_process, tap_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_metrics_are_served_on_their_own_listener_not_on_the_proxy_port(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", port=port)
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(path, port, tmp_path / "tap.log")
    await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/llm/openai/v1/chat/completions", json=CHAT,
                                 headers={"authorization": f"Bearer {APP_KEY}"}) as r:
                assert r.status == 200
            for target in ("/metrics", "/metrics/", "/METRICS", "//metrics"):
                async with http.get(url + target) as resp:
                    body = await resp.text()
                    assert resp.status == 404, (target, body[:200])
                    assert "gateway_tap_" not in body and 'app="test"' not in body
            async with http.get(metrics_url(document)) as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        await asyncio.to_thread(proc.stop)
    assert 'gateway_tap_requests_total{app="test",llm="openai"' in text


def test_the_metrics_listener_is_loopback_by_default_and_never_the_proxy_or_admin_port() -> None:
    settings = TapSettings()
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9464)
    assert settings.metrics.port != settings.listen.port
    with pytest.raises(ConfigFileError, match=r"tap.metrics.port 8080 is the proxy's port"):
        parse_config({"tap": {"listen": {"port": 8080}, "metrics": {"port": 8080}}})
    with pytest.raises(ConfigFileError, match=r"tap.metrics.port 9999 is tap.admin.listen.port"):
        parse_config({"tap": {"metrics": {"port": 9999}, "admin": {
            "listen": {"port": 9999}, "tokens": [{"id": "ops", "token_hash": "sha256:" + "0" * 64}]}}})
    assert parse_config({"tap": {"metrics": {"port": None}}}).tap.metrics.port is None
