"""Shared helpers for the tap tests: a config builder, an in-process tap on a free port, an event reader."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.proxy.app import TapApp, create_app
from gateway_tap.proxy.protocol import TapRunner
from gateway_tap.settings import parse_config
from schemas import EVENT_TYPES, Event, ProxyLog, decode_event, topic_for

APP_KEY = "gt-test-key-0123456789"
LIMITED_KEY = "gt-limited-key-0123456789"
UPSTREAM_SECRET = "upstream-secret-value"
OPENAI_PRICE = {"input_per_1m": 0.15, "output_per_1m": 0.60}
ANTHROPIC_PRICE = {"input_per_1m": 0.80, "output_per_1m": 4.00}


def cost_micros(price: dict[str, float], prompt: int, completion: int, *, cache_read: int = 0, cache_write: int = 0,
                reasoning: int = 0) -> int:
    """What the tap charges, computed here independently in decimals: each token class (uncached input, cache
    read, cache write, output, reasoning) at its rate (a class without one at its parent's) rounded half up
    to micro-USD, then summed (docs/pricing.md)."""
    def rate(name: str, parent: str) -> Decimal:
        return Decimal(repr(float(price.get(name, price[parent]))))

    def micros(tokens: int, per_1m: Decimal) -> int:
        return int((tokens * per_1m).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    return (micros(prompt - cache_read - cache_write, rate("input_per_1m", "input_per_1m"))
            + micros(cache_read, rate("cache_read_per_1m", "input_per_1m"))
            + micros(cache_write, rate("cache_write_per_1m", "input_per_1m"))
            + micros(completion - reasoning, rate("output_per_1m", "output_per_1m"))
            + micros(reasoning, rate("reasoning_per_1m", "output_per_1m")))

EXAMPLE_PLUGINS: list[dict[str, Any]] = [
    {"name": "prompt_firewall", "use": "gateway_tap.examples.plugins.prompt_firewall:PromptFirewall",
     "order": 10, "config": {"patterns": ["ignore (all )?previous instructions", r"\b\d{3}-\d{2}-\d{4}\b"]}},
    {"name": "request_enricher", "use": "gateway_tap.examples.plugins.request_enricher:RequestEnricher",
     "order": 20, "config": {"headers": {"x-gateway": "gateway-tap"}, "metadata": {"team": "qa"},
                             "app_header": "x-gateway-app"}},
    {"name": "response_modifier", "use": "gateway_tap.examples.plugins.response_modifier:ResponseModifier",
     "order": 30, "config": {"headers": {"x-served-by": "gateway-tap"}}},
]


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tap_config(mock_url: str, kafka_bootstrap: str, topic_prefix: str, spool_dir: Path, *,
               plugins: list[dict[str, Any]] | None = None, port: int = 0, tap: dict[str, Any] | None = None,
               extra_llms: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A config document: LLMs ``openai`` and ``anthropic`` on the mock, apps ``test`` (all) and ``limited``."""
    return {
        "gateway_id": "tap-test",
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
        "tap": {"listen": {"host": "127.0.0.1", "port": port}, "access_log": True,
                "metrics": {"host": "127.0.0.1", "port": free_port()},
                "publisher": {"spool_dir": str(spool_dir), "linger_ms": 1}, **(tap or {})},
        "llms": [
            {"id": "openai", "vendor": "openai", "upstream_url": mock_url, "api_key_env": "TAP_TEST_UPSTREAM_KEY",
             "prices": {"gpt-4o-mini": OPENAI_PRICE}},
            {"id": "anthropic", "vendor": "anthropic", "upstream_url": mock_url,
             "api_key_env": "TAP_TEST_UPSTREAM_KEY", "prices": {"*": ANTHROPIC_PRICE}},
            *(extra_llms or []),
        ],
        "apps": [
            {"id": "test", "name": "Test", "key_hashes": [key_hash(APP_KEY)]},
            {"id": "limited", "key_hashes": [key_hash(LIMITED_KEY)], "allowed_llms": ["anthropic"]},
        ],
        "plugins": copy.deepcopy(plugins) if plugins is not None else [],  # a test may edit its document's
    }


def serve_process(config: Path, port: int, log: Path, workers: int = 2) -> ManagedProcess:
    """``gateway-tap serve --workers N`` of ``config`` listening on ``port`` (not started): ready once its
    ``/readyz`` answers, stopped with SIGTERM (a drain)."""
    return ManagedProcess("tap", cli_argv("serve", "--config", str(config), "--workers", str(workers)),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                          env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET}, log_path=log, start_timeout=60,
                          stop_signal=signal.SIGTERM, stop_timeout=60)


def metrics_url(document: dict[str, Any]) -> str:
    """The ``/metrics`` URL of a tap run with ``document`` (its ``tap.metrics`` listener, not the proxy's port)."""
    metrics = document["tap"]["metrics"]
    return f"http://{metrics.get('host', '127.0.0.1')}:{metrics['port']}/metrics"


@dataclass
class RunningTap:
    url: str
    tap: TapApp
    metrics_url: str = ""
    """``/metrics`` on the tap's own metrics listener (empty when ``tap.metrics.port`` is null)."""


@asynccontextmanager
async def running_tap(document: dict[str, Any]) -> AsyncIterator[RunningTap]:
    """The tap served in this event loop on a free port, with its metrics listener as configured; stopped
    (publisher drained) on exit."""
    if "metrics" not in document.get("tap", {}):  # never the default port: other taps may be running
        document = {**document, "tap": {**document.get("tap", {}), "metrics": {"port": free_port()}}}
    config = parse_config(document)
    tap = await create_app(config)
    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    metrics = config.tap.metrics
    metrics_runner = await tap.serve_metrics(metrics.host, metrics.port) if metrics.port is not None else None
    try:
        yield RunningTap(f"http://127.0.0.1:{port}", tap,
                         f"http://{metrics.host}:{metrics.port}/metrics" if metrics_runner is not None else "")
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


async def read_events(bootstrap: str, prefix: str, *, count: int, wait_s: float = 30.0) -> list[Event]:
    """Read events from the three topics until ``count`` distinct event ids were seen (or time runs out)."""
    topics = [topic_for(t, prefix) for t in EVENT_TYPES]
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, Event] = {}
    try:
        async with asyncio.timeout(wait_s):
            while len(seen) < count:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        assert record.value is not None
                        event = decode_event(record.value)
                        seen[event.id] = event
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return list(seen.values())


def by_request(events: list[Event]) -> dict[str, dict[str, Event]]:
    out: dict[str, dict[str, Event]] = {}
    for event in events:
        out.setdefault(event.request_id, {})[event.type] = event
    return out


async def events_for(bootstrap: str, prefix: str, request_ids: list[str], *, event_type: str = "proxy_log",
                     wait_s: float = 30.0) -> dict[str, Event]:
    """The ``event_type`` event of each of ``request_ids``, read until all arrived (or time runs out: the
    missing ones are absent from the result)."""
    wanted = set(request_ids)
    consumer = AIOKafkaConsumer(topic_for(event_type, prefix), bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, Event] = {}
    try:
        async with asyncio.timeout(wait_s):
            while not wanted <= found.keys():
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        assert record.value is not None
                        event = decode_event(record.value)
                        if event.request_id in wanted:
                            found[event.request_id] = event
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return found


async def all_proxy_logs(bootstrap: str, prefix: str, count: int, wait_s: float = 30.0) -> list[ProxyLog]:
    """Every proxy_log of the topic, read until ``count`` arrived and then a little longer (to catch extras)."""
    consumer = AIOKafkaConsumer(topic_for("proxy_log", prefix), bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    logs: list[ProxyLog] = []
    try:
        async with asyncio.timeout(wait_s):
            while len(logs) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    logs += [_proxy_log(r.value) for r in records]
        for records in (await consumer.getmany(timeout_ms=1500)).values():
            logs += [_proxy_log(r.value) for r in records]
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return logs


def _proxy_log(value: bytes | None) -> ProxyLog:
    assert value is not None
    event = decode_event(value)
    assert isinstance(event, ProxyLog)
    return event
