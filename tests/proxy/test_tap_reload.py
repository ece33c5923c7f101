"""Live configuration reload of the tap: in-process against a real TapApp (plugin state, in-flight requests,
rejection of invalid files), and ``gateway-tap serve --workers 2`` reloaded by SIGHUP under steady traffic."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.hooks import HookContext, HookResult, PluginServices, TapRequest, TapResponse
from schemas import Analytics, decode_event, topic_for
from tests.support.tap import APP_KEY, EXAMPLE_PLUGINS, UPSTREAM_SECRET, key_hash, metrics_url, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
NEW_KEY = "gt-new-key-after-reload-0123"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}
BLOCKED = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say forbidden-word"}]}


class Counting:
    """Counts initialize/close calls per config value (class-level: instances come and go)."""

    initialized: ClassVar[list[Any]] = []
    closed: ClassVar[list[Any]] = []

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.value = config.get("value")
        self.seen = 0  # instance state that must survive a reload that does not touch this plugin
        Counting.initialized.append(self.value)

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        self.seen += 1
        return HookResult.modify(headers={f"x-{ctx.plugin}": str(self.value)})

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        return chunk

    async def close(self) -> None:
        Counting.closed.append(self.value)


class Notified(Counting):
    """Takes config changes through on_config_change instead of being re-initialised."""

    changes: ClassVar[list[Any]] = []

    async def on_config_change(self, config: Mapping[str, Any]) -> None:
        if config.get("value") == "reject":
            raise ValueError("I do not like this value")
        self.value = config.get("value")
        Notified.changes.append(self.value)


class Gate:
    """post_auth holds the request until the test opens the gate: a request in flight across a reload."""

    entered: ClassVar[asyncio.Event]
    release: ClassVar[asyncio.Event]
    closed: ClassVar[bool] = False

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        Gate.entered.set()
        await Gate.release.wait()
        return None

    async def close(self) -> None:
        Gate.closed = True


def _plugin(name: str, cls: type, value: Any = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "use": f"{__name__}:{cls.__name__}", "config": {} if value is None else {"value": value},
            **extra}


async def _post(http: aiohttp.ClientSession, url: str, body: Any = None, key: str = APP_KEY,
                headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str]]:
    async with http.post(f"{url}/llm/openai/v1/chat/completions", json=body or BODY,
                         headers={"authorization": f"Bearer {key}", **(headers or {})}) as resp:
        await resp.read()
        return resp.status, resp.headers


def _metric(text: str, name: str, labels: str = "") -> float:
    inner = rf"[^}}]*{re.escape(labels)}[^}}]*" if labels else r"[^}]*"
    pattern = rf"^{name}(?:{{{inner}}})? (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


async def test_reload_keeps_unchanged_plugins_and_swaps_the_rest(mock_llm: str, kafka_bootstrap: str,
                                                                 topic_prefix: str, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    Counting.initialized.clear()
    Counting.closed.clear()
    Notified.changes.clear()
    Gate.entered, Gate.release, Gate.closed = asyncio.Event(), asyncio.Event(), False
    plugins = [_plugin("kept", Counting, "k1", order=1), _plugin("reinit", Counting, "r1", order=2),
               _plugin("told", Notified, "t1", order=3),
               _plugin("gate", Gate, order=4, llms=["anthropic"], timeout_ms=60_000),
               EXAMPLE_PLUGINS[0]]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", plugins=plugins)
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    from gateway_tap.proxy.app import create_app
    from gateway_tap.proxy.protocol import TapRunner
    from gateway_tap.settings import load_config

    tap = await create_app(load_config(path), config_path=path)
    from aiohttp import web

    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    metrics_runner = await tap.serve_metrics("127.0.0.1", document["tap"]["metrics"]["port"])
    url = f"http://127.0.0.1:{port}"
    assert tap.reloader is not None
    try:
        async with aiohttp.ClientSession() as http:
            status, headers = await _post(http, url)
            assert (status, headers["x-kept"], headers["x-reinit"], headers["x-told"]) == (200, "k1", "r1", "t1")
            assert (await _post(http, url, key=NEW_KEY))[0] == 401
            assert (await _post(http, url, BLOCKED))[0] == 200
            kept = next(p.instance for p in tap.plugins if p.name == "kept")
            told = next(p.instance for p in tap.plugins if p.name == "told")
            # A request held inside the gate plugin (anthropic only) while the reload removes that plugin.
            held = asyncio.create_task(http.post(f"{url}/llm/anthropic/v1/messages", headers={"x-api-key": APP_KEY},
                                                 json={"model": "claude-3-5-haiku", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hi"}]}))
            await asyncio.wait_for(Gate.entered.wait(), 10)

            changed = copy.deepcopy(document)
            changed["apps"].append({"id": "newapp", "key_hashes": [key_hash(NEW_KEY)], "allowed_llms": ["openai"]})
            changed["plugins"] = [_plugin("kept", Counting, "k1", order=5),  # reordered only: same instance
                                  _plugin("reinit", Counting, "r2", order=2), _plugin("told", Notified, "t2", order=3),
                                  _plugin("added", Counting, "a1", order=4),
                                  {**EXAMPLE_PLUGINS[0], "config": {"patterns": ["forbidden-word"]}}]
            changed["llms"][0]["prices"]["gpt-4o-mini"] = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
            path.write_text(yaml.safe_dump(changed))
            assert await tap.reloader.reload_file() is True
            assert tap.snapshot.generation == 1

            status, headers = await _post(http, url)
            assert (status, headers["x-kept"], headers["x-reinit"], headers["x-told"], headers["x-added"]) == \
                (200, "k1", "r2", "t2", "a1")
            assert (await _post(http, url, key=NEW_KEY))[0] == 200
            assert (await _post(http, url, BLOCKED))[0] == 403
            assert next(p.instance for p in tap.plugins if p.name == "kept") is kept and kept.seen == 4
            assert next(p.instance for p in tap.plugins if p.name == "told") is told and Notified.changes == ["t2"]
            assert sorted(Counting.initialized) == ["a1", "k1", "r1", "r2", "t1"]
            # The held request started with the old snapshot: the instances it may still call ("reinit" r1 on
            # its response, the gate) stay open until it finished, and it finishes with the old chain.
            await asyncio.sleep(0.2)
            assert Counting.closed == [] and not Gate.closed
            Gate.release.set()
            async with await held as resp:
                assert resp.status == 200 and resp.headers["x-reinit"] == "r1"
            for _ in range(250):
                if Gate.closed:
                    break
                await asyncio.sleep(0.02)
            assert Gate.closed and Counting.closed == ["r1"]

            # Invalid: an unknown key and a plugin config failing its schema. Rejected, old config stays.
            broken = copy.deepcopy(changed)
            broken["tap"]["nonsense"] = 1
            path.write_text(yaml.safe_dump(broken))
            caplog.set_level(logging.ERROR, logger="gateway_tap.reload")
            assert await tap.reloader.reload_file() is False
            assert "tap.nonsense" in caplog.text
            broken = copy.deepcopy(changed)
            broken["plugins"][4]["config"] = {"patterns": "not-a-list"}
            path.write_text(yaml.safe_dump(broken))
            assert await tap.reloader.reload_file() is False
            assert "plugins[4].config.patterns" in caplog.text
            broken = copy.deepcopy(changed)
            broken["plugins"][2]["config"] = {"value": "reject"}  # on_config_change refuses it
            path.write_text(yaml.safe_dump(broken))
            assert await tap.reloader.reload_file() is False
            assert "plugins[2].config: on_config_change failed" in caplog.text
            assert tap.snapshot.generation == 1 and told.value == "t2"
            assert (await _post(http, url, key=NEW_KEY))[0] == 200
            assert (await _post(http, url, BLOCKED))[0] == 403
            async with http.get(metrics_url(document)) as resp:
                text = await resp.text()
            assert _metric(text, "gateway_tap_config_generation") == 1
            assert _metric(text, "gateway_tap_config_last_reload_success") == 0
            assert _metric(text, "gateway_tap_config_reloads_total", 'result="invalid"') == 3
            assert _metric(text, "gateway_tap_config_reloads_total", 'result="ok"') == 1
    finally:
        await runner.cleanup()
        await metrics_runner.cleanup()
    # Shutdown closes what is in force: every instance initialised was closed exactly once ("told" as t2).
    assert sorted(Counting.closed) == ["a1", "k1", "r1", "r2", "t2"]


# -- gateway-tap serve --workers 2 under traffic ------------------------------------------------------------------

async def _hammer(url: str, stop: asyncio.Event, results: list[int]) -> None:
    """One client: benign requests with the original key, each 20 ms at the upstream so reloads find some in
    flight. Every one must succeed whatever the reloads do; connection errors count as 599."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                status, _ = await _post(http, url, headers={"x-mock-latency-ms": "20"})
            except aiohttp.ClientError:
                status = 599
            results.append(status)


async def _metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def _wait_reloads(url: str, result: str, count: int) -> str:
    """Until both workers counted ``count`` reloads with ``result`` in total (the counter sums workers); ``url``:
    the tap's /metrics."""
    for _ in range(300):
        text = await _metrics_text(url)
        if _metric(text, "gateway_tap_config_reloads_total", f'result="{result}"') >= count:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"workers did not report {count} {result} reloads")


async def _analytics_of(bootstrap: str, prefix: str, request_ids: set[str]) -> list[Analytics]:
    """The analytics events of ``request_ids`` (read until all are found, at most 60 s)."""
    consumer = AIOKafkaConsumer(topic_for("analytics", prefix), bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, Analytics] = {}
    try:
        async with asyncio.timeout(60):
            while len(found) < len(request_ids):
                for records in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                    for record in records:
                        assert record.value is not None
                        event = decode_event(record.value)
                        if isinstance(event, Analytics) and event.request_id in request_ids:
                            found[event.request_id] = event
    finally:
        await consumer.stop()
    return list(found.values())


async def test_sighup_reload_under_traffic_drops_nothing(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                         tmp_path: Path) -> None:
    port = free_port()
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", port=port,
                          plugins=[EXAMPLE_PLUGINS[0]], tap={"access_log": False})
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess("tap", cli_argv("serve", "--config", str(path), "--workers", "2"),
                          ready=lambda: http_ok(f"{url}/readyz"), env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET},
                          log_path=tmp_path / "tap.log", start_timeout=60, stop_signal=signal.SIGTERM,
                          stop_timeout=60)
    await asyncio.to_thread(proc.start)
    stop = asyncio.Event()
    results: list[int] = []
    clients = [asyncio.create_task(_hammer(url, stop, results)) for _ in range(8)]
    try:
        assert proc.pid is not None
        await asyncio.sleep(0.5)
        # 1: a new app key.
        document["apps"].append({"id": "newapp", "key_hashes": [key_hash(NEW_KEY)]})
        path.write_text(yaml.safe_dump(document))
        os.kill(proc.pid, signal.SIGHUP)
        await _wait_reloads(metrics_url(document), "ok", 2)
        async with aiohttp.ClientSession() as http:
            assert [(await _post(http, url, key=NEW_KEY))[0] for _ in range(6)] == [200] * 6
            assert (await _post(http, url, BLOCKED))[0] == 200
        await asyncio.sleep(0.5)
        # 2: the firewall learns a pattern.
        document["plugins"][0]["config"]["patterns"].append("forbidden-word")
        path.write_text(yaml.safe_dump(document))
        os.kill(proc.pid, signal.SIGHUP)
        await _wait_reloads(metrics_url(document), "ok", 4)
        async with aiohttp.ClientSession() as http:
            assert [(await _post(http, url, BLOCKED))[0] for _ in range(6)] == [403] * 6
        await asyncio.sleep(0.5)
        # 3: a price change.
        document["llms"][0]["prices"]["gpt-4o-mini"] = {"input_per_1m": 1000.0, "output_per_1m": 2000.0}
        path.write_text(yaml.safe_dump(document))
        os.kill(proc.pid, signal.SIGHUP)
        await _wait_reloads(metrics_url(document), "ok", 6)
        async with aiohttp.ClientSession() as http:
            priced = [(await _post(http, url, headers={"x-probe": "price"}))[1]["x-request-id"] for _ in range(4)]
        await asyncio.sleep(0.5)
        # 4: an invalid file is rejected by both workers; the old config keeps serving.
        broken = copy.deepcopy(document)
        broken["llms"][0]["timeouts"] = {"total_s": -1}
        path.write_text(yaml.safe_dump(broken))
        os.kill(proc.pid, signal.SIGHUP)
        text = await _wait_reloads(metrics_url(document), "invalid", 2)
        assert _metric(text, "gateway_tap_config_last_reload_success") == 0
        assert _metric(text, "gateway_tap_config_generation") == 3
        async with aiohttp.ClientSession() as http:
            assert (await _post(http, url, key=NEW_KEY))[0] == 200
            assert (await _post(http, url, BLOCKED))[0] == 403
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.to_thread(proc.stop)
    log_text = (tmp_path / "tap.log").read_text()
    assert len(re.findall(r"configuration reload rejected.*llms\[0\]\.timeouts\.total_s", log_text)) == 2
    failed = [s for s in results if not 200 <= s < 300]
    print(f"reload under traffic: {len(results)} requests from 8 clients across 4 SIGHUPs, {len(failed)} failed")
    assert len(results) > 100 and not failed, f"{len(failed)} of {len(results)} failed: {sorted(set(failed))}"
    costs = await _analytics_of(kafka_bootstrap, topic_prefix, set(priced))
    assert len(costs) == 4
    for e in costs:
        assert e.cost == pytest.approx((e.prompt_tokens * 1000.0 + e.completion_tokens * 2000.0) / 1e6)
        assert e.cost > 0


async def test_watch_reloads_when_the_content_changes(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                      tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool",
                          tap={"reload": {"watch": True, "interval_s": 0.05}})
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))

    from gateway_tap.proxy.app import create_app
    from gateway_tap.proxy.protocol import TapRunner
    from gateway_tap.settings import load_config

    tap = await create_app(load_config(path), config_path=path)
    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    try:
        path.touch()  # same content: not a reload
        await asyncio.sleep(0.3)
        assert tap.snapshot.generation == 0
        document["apps"].append({"id": "newapp", "key_hashes": [key_hash(NEW_KEY)]})
        path.write_text(yaml.safe_dump(document))
        for _ in range(200):
            if tap.snapshot.generation == 1:
                break
            await asyncio.sleep(0.05)
        assert tap.snapshot.generation == 1 and "newapp" in tap.apps.by_id
    finally:
        await runner.cleanup()
