"""The tap as an operator runs it: ``gateway-tap serve --workers 2`` in a child process, with its own broker
stopped mid-traffic and the tap itself restarted while events wait in its spool: no event is lost."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway_tap.devstack import ManagedProcess, NoidaServer, cli_argv, free_port, http_ok
from tests.tap_support import APP_KEY, UPSTREAM_SECRET, by_request, read_events, tap_config

pytestmark = pytest.mark.integration
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}


def _tap_process(config: Path, port: int, log: Path) -> ManagedProcess:
    return ManagedProcess("tap", cli_argv("serve", "--config", str(config), "--workers", "2"),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                          env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET}, log_path=log, start_timeout=60,
                          stop_signal=15, stop_timeout=60)


async def _traffic(url: str, n: int) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.post(f"{url}/llm/openai/v1/chat/completions", json=BODY,
                                 headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
                assert resp.status == 200
                ids.append(resp.headers["x-request-id"])
    return ids


async def _metric_sum(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


async def test_broker_outage_and_tap_restart_lose_no_event(mock_llm: str, topic_prefix: str,
                                                           tmp_path: Path) -> None:
    noida = NoidaServer(tmp_path / "noida", log_path=tmp_path / "noida.log").start()
    port = free_port()
    config = tmp_path / "tap.yaml"
    document = tap_config(mock_llm, noida.bootstrap, topic_prefix, tmp_path / "spool", port=port,
                          tap={"access_log": False})
    document["tap"]["publisher"].update({"retry_interval_s": 0.3, "delivery_timeout_s": 3.0})
    config.write_text(yaml.safe_dump(document))
    url = f"http://127.0.0.1:{port}"
    tap = _tap_process(config, port, tmp_path / "tap.log").start()
    try:
        ids = await _traffic(url, 20)
        # Both workers share /metrics: the count covers every request whichever worker served it.
        assert await _metric_sum(url, "gateway_tap_requests_total") == 20
        await asyncio.to_thread(noida.stop)  # clean stop (SIGINT): noida keeps what it acknowledged
        ids += await _traffic(url, 20)
        await asyncio.to_thread(tap.stop)  # SIGTERM with the broker down: events go to the spools
        spooled = sum(f.stat().st_size for f in (tmp_path / "spool").rglob("*") if f.is_file())
        assert spooled > 0
        await asyncio.to_thread(tap.start)
        await asyncio.to_thread(noida.start)
        ids += await _traffic(url, 10)
        events = await read_events(noida.bootstrap, topic_prefix, count=len(ids) * 3, wait_s=60)
    finally:
        await asyncio.to_thread(tap.stop)
        await asyncio.to_thread(noida.stop)
    grouped = by_request(events)
    missing = [rid for rid in ids if set(grouped.get(rid, {})) != {"proxy_log", "analytics", "budget_usage"}]
    assert not missing, f"{len(missing)} of {len(ids)} requests lack events; tap log:\n{tap.log_tail()}"
    assert len(events) == len(ids) * 3
