"""Edge-to-control messages: a plugin's send_to_control through the tap's publisher and a real broker to a
collector's handle_control (the request enricher's counters and the control_counters receiver)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from collectors.registry import resolve_collector
from collectors.runtime import CollectorRuntime
from collectors.sdk import DataCollector
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import free_port
from gateway_tap.examples.collectors.control_counters import ControlCounters
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import CollectorSettings
from schemas import ControlMessage, control_topic, decode_control
from tests.support.collectors import produce, read_topic
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
ENRICHER = "gateway_tap.examples.plugins.request_enricher:RequestEnricher"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 2}


def enricher(every_requests: int) -> dict[str, Any]:
    return {"name": "request_enricher", "use": ENRICHER,
            "config": {"metadata": {"team": "qa"}, "report_every_s": 0, "report_every_requests": every_requests}}


async def send(url: str, llm: str, n: int) -> None:
    path = "v1/messages" if llm == "anthropic" else "v1/chat/completions"
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {APP_KEY}"}) as http:
        for _ in range(n):
            async with http.post(f"{url}/llm/{llm}/{path}", json=BODY) as resp:
                assert resp.status == 200, await resp.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(name + wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_for_published_control(metrics_url: str) -> None:
    series = 'gateway_tap_publisher_events_published_total{type="control"}'
    async with asyncio.timeout(20), aiohttp.ClientSession() as http:  # bounds a hang; not a timing assertion
        while True:
            async with http.get(metrics_url) as resp:
                text = await resp.text()
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)]
            assert values, f"{series} not exported"
            if values[0] >= 1:
                return
            await asyncio.sleep(0.1)


async def test_enricher_counters_reach_the_receiver_per_gateway(mock_llm: str, kafka_bootstrap: str,
                                                                topic_prefix: str, tmp_path: Path) -> None:
    # Two taps (gateway ids tap-a, tap-b); a report every 2 requests, the remainder at shutdown.
    for gateway_id, traffic in (("tap-a", {"openai": 3, "anthropic": 1}), ("tap-b", {"anthropic": 2})):
        document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / gateway_id,
                              plugins=[enricher(every_requests=2)])
        document["gateway_id"] = gateway_id
        async with running_tap(document) as tap:
            for llm, n in traffic.items():
                await send(tap.url, llm, n)
            # The publisher counts control messages under their own type, not as "other".
            await wait_for_published_control(tap.metrics_url)
    topic = control_topic(topic_prefix)
    records = await read_topic(kafka_bootstrap, topic, 3)  # tap-a: 2 + 2; tap-b: 2
    messages = [decode_control(r.value) for r in records]
    assert {m.gateway_id for m in messages} == {"tap-a", "tap-b"}
    first = next(r for r in records if r.key == b"tap-a")
    assert dict(first.headers)["type"] == b"control"
    message = decode_control(first.value)
    assert message.plugin == "request_enricher" and message.kind == "request_counts"
    assert message.id[14] == "7" and message.payload["requests"] == 2  # UUIDv7; a report per 2 requests
    # An undecodable message on the control topic goes to the dead-letter topic, like a bad event.
    await produce(kafka_bootstrap, topic, [b'{"type": "control", "schema_version": 1}'])

    port = free_port()
    settings = CollectorSettings.model_validate({
        "group_id": f"{topic_prefix}-control", "batch": {"max_events": 100, "max_wait_ms": 20},
        "metrics": {"port": port}, "shutdown_grace_s": 10})
    runtime = CollectorRuntime("control-counters", ControlCounters, settings, {"bootstrap_servers": kafka_bootstrap},
                               topic_prefix)
    assert runtime.topics == [topic]
    task = asyncio.create_task(runtime.run())
    try:
        expected = {("tap-a", "openai"): 3.0, ("tap-a", "anthropic"): 1.0, ("tap-b", "anthropic"): 2.0}
        text = ""
        async with asyncio.timeout(30), aiohttp.ClientSession() as http:  # bounds a hang; not a timing assertion
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientError:
                    text = ""
                got = {k: metric(text, "gateway_tap_control_requests_total", gateway_id=k[0], llm=k[1])
                       for k in expected}
                dead = metric(text, "gateway_tap_collector_events_dead_lettered_total", collector="control-counters",
                              type="control", error_class="EventDecodeError")
                if got == expected and dead == 1.0:
                    break
                await asyncio.sleep(0.1)
        assert metric(text, "gateway_tap_control_requests_total", gateway_id="tap-b", llm="openai") is None
        assert (metric(text, "gateway_tap_control_last_report_timestamp_seconds", gateway_id="tap-a") or 0) > 0
    finally:
        runtime.request_stop()
        assert await task == 0
    dlq = await read_topic(kafka_bootstrap, topic + ".dlq", 1)
    assert b"payload" in dict(dlq[0].headers)["error"] or b"Field required" in dict(dlq[0].headers)["error"]


async def test_send_to_control_in_the_plugin_harness() -> None:
    async with PluginHarness(ENRICHER, {"report_every_s": 0, "report_every_requests": 3}, name="enr",
                             llm_id="anthropic", vendor="anthropic") as h:
        for _ in range(4):
            await h.request(json=BODY, app_id="demo")
        assert [m.payload for m in h.control_messages] == [{"requests": 3, "by_llm": {"anthropic": 3}}]
        with pytest.raises(TypeError):
            h.plugin.services.send_to_control("bad", {"x": object()})
    # close() sends the remainder.
    assert [m.payload["requests"] for m in h.control_messages] == [3, 1]
    assert all(m.plugin == "enr" and m.kind == "request_counts" for m in h.control_messages)


class ControlOnly(DataCollector):
    async def handle_control(self, message: ControlMessage) -> None:
        if message.kind == "poison":
            from collectors.sdk import BadEvent

            raise BadEvent("poison pill")


def test_overriding_a_control_handler_subscribes_to_control_only() -> None:
    assert ControlOnly.consumes_control() and ControlOnly.consumed_types() == ()
    assert ControlCounters.consumes_control() and not DataCollector.consumes_control()
    assert resolve_collector("tests.examples.test_control_messages:ControlOnly") is ControlOnly
    settings = CollectorSettings.model_validate({})
    assert CollectorRuntime("x", ControlOnly, settings, {}, "acme").topics == ["acme.control"]
    from collectors.sinks.file import FileCollector

    assert "acme.control" not in CollectorRuntime("f", FileCollector, settings, {}, "acme").topics


async def test_control_handlers_reject_by_message_id() -> None:
    good = ControlMessage(gateway_id="g", plugin="p", kind="ok")
    bad = ControlMessage(gateway_id="g", plugin="p", kind="poison")
    async with CollectorHarness(ControlOnly) as h:
        await h.feed_control([good, bad])
    assert h.rejected == {bad.id: "poison pill"} and h.handled_control == [good]
    async with CollectorHarness(ControlCounters) as counters:
        broken = ControlMessage(gateway_id="g", plugin="p", kind="request_counts", payload={"by_llm": {"x": -1}})
        fine = ControlMessage(gateway_id="g", plugin="p", kind="request_counts", payload={"by_llm": {"x": 2}})
        await counters.feed_control([broken, fine, fine])  # the duplicate (same id) counts once
        assert set(counters.rejected) == {broken.id}
        value = counters.registry.get_sample_value("gateway_tap_control_requests_total",
                                                   {"gateway_id": "g", "llm": "x"})
        assert value == 2.0
    assert orjson.loads(fine.to_json())["type"] == "control"
