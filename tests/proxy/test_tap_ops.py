"""The tap as an operator runs it: ``gateway-tap serve --workers 2`` in a child process, with its own broker
stopped mid-traffic and the tap itself restarted, with one worker fewer, while events wait in its spools:
no event is lost."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway_tap.dev.servers import NoidaServer, free_port
from tests.support.tap import APP_KEY, by_request, metrics_url, read_events, serve_process, tap_config

pytestmark = pytest.mark.integration
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}


async def _traffic(url: str, n: int) -> list[str]:
    ids = []
    # A new connection per request: the kernel spreads connections (not requests) over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(n):
            async with http.post(f"{url}/llm/openai/v1/chat/completions", json=BODY,
                                 headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
                assert resp.status == 200
                ids.append(resp.headers["x-request-id"])
    return ids


async def _metric_sum(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
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
    tap = serve_process(config, port, tmp_path / "tap.log").start()
    try:
        # /readyz answers once one worker is up; on a loaded machine the other can take seconds more (each
        # worker opens its spool while starting). A hang guard, not a timing assertion.
        for _ in range(600):
            if all((tmp_path / "spool" / f"worker-{i}").is_dir() for i in range(2)):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the worker's Kafka probe, then it listens
        ids = await _traffic(url, 20)
        # Both workers share /metrics: the count covers every request whichever worker served it.
        assert await _metric_sum(metrics_url(document), "gateway_tap_requests_total") == 20
        await asyncio.to_thread(noida.stop)  # clean stop (SIGINT): noida keeps what it acknowledged
        ids += await _traffic(url, 20)
        await asyncio.to_thread(tap.stop)  # SIGTERM with the broker down: events go to the spools
        spooled = sum(f.stat().st_size for f in (tmp_path / "spool").rglob("*") if f.is_file())
        assert spooled > 0
        assert list((tmp_path / "spool" / "worker-1").glob("*.seg")), "worker 1 spooled nothing"
        # Restarted with one worker: worker 1's spool has no owner any more and must be adopted.
        tap = serve_process(config, port, tmp_path / "tap-1w.log", workers=1)
        await asyncio.to_thread(tap.start)
        assert not list((tmp_path / "spool" / "worker-1").glob("*.seg"))
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


async def test_a_worker_that_dies_is_replaced(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                              tmp_path: Path) -> None:
    import psutil

    port = free_port()
    config = tmp_path / "tap.yaml"
    config.write_text(yaml.safe_dump(tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool",
                                                port=port, tap={"access_log": False})))
    url = f"http://127.0.0.1:{port}"
    tap = serve_process(config, port, tmp_path / "tap.log").start()
    try:
        assert tap.pid is not None
        def workers() -> set[int]:
            alive = set()
            for child in psutil.Process(tap.pid).children():
                try:
                    if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                        alive.add(child.pid)
                except psutil.Error:  # exited between listing and reading
                    pass
            return alive
        before = workers()
        assert len(before) == 2
        victim = min(before)
        psutil.Process(victim).kill()
        for _ in range(150):  # up to ~30 s: bounds a hang; not a timing assertion
            if len(after := workers() - {victim}) == 2:
                break
            await asyncio.sleep(0.2)
        assert len(after) == 2, "no replacement worker"
        assert len(await _traffic(url, 10)) == 10  # every request answered 200 by the two workers
        assert "worker exited, restarting" in tap.log_tail(200)
    finally:
        await asyncio.to_thread(tap.stop)
    assert victim not in after
