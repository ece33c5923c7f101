"""Collector services (#16 item 5): ``kv``, ``gateway`` lookups from the config in force and ``send_to_control``,
in the CollectorHarness and in a real collector runtime against the broker (the alert reaches the control topic,
acknowledged before the batch commits; a SIGHUP reload changes what ``gateway`` answers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from collectors.control import ControlOutbox
from collectors.runtime import build_runtime
from collectors.sdk import CollectorServices, RetryLater
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import free_port
from gateway_tap.examples.collectors.error_alerts import ErrorAlerts
from gateway_tap.settings import AppConfig, LLMConfig
from schemas import Latency, ProxyLog, control_topic, decode_control
from tests.support.collectors import create_topics, produce_events, read_topic

WINDOW_START = 1_780_000_000 // 60 * 60


def errors(app_id: str, n: int, status: int = 502, window_start: int = WINDOW_START) -> list[ProxyLog]:
    at = datetime.fromtimestamp(window_start + 5, UTC)
    return [ProxyLog(gateway_id="tap-1", request_id=f"r-{app_id}-{status}-{i}", app_id=app_id, emitted_at=at,
                     method="POST", path="/llm/openai/v1/chat/completions", status_code=status,
                     latency=Latency(total_ms=3.0)) for i in range(n)]


async def test_harness_gives_collectors_kv_gateway_lookups_and_the_control_channel() -> None:
    apps = [AppConfig(id="team-a", name="Team A")]
    llms = [LLMConfig.model_validate({"id": "openai", "vendor": "openai", "upstream_url": "http://127.0.0.1:1",
                                      "prices": {"gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.6}}})]
    async with CollectorHarness(ErrorAlerts, {"threshold": 3, "window_s": 60}, name="error-alerts",
                                apps=apps, llms=llms) as h:
        services: CollectorServices = h.services
        team = services.gateway.get_app("team-a")
        assert team is not None and (team.id, team.name, team.metadata) == ("team-a", "Team A", {})
        assert [llm.id for llm in services.gateway.list_llms()] == ["openai"]
        price = services.gateway.price_for("openai", "gpt-4o-mini")
        assert price is not None and price.output_per_1m == 0.6
        assert await services.gateway.budget_status("team-a") is None

        batch = [*errors("team-a", 5), *errors("team-a", 4, status=200), *errors("team-b", 2)]
        await h.feed(batch)
        await h.feed(batch)  # a redelivered batch (same ids) must not count twice
        await h.flush()
        assert len(h.control_messages) == 1
        alert = h.control_messages[0]
        assert (alert.plugin, alert.kind, alert.gateway_id) == ("error-alerts", "error_rate", "collector/harness")
        assert alert.payload == {"app_id": "team-a", "app_name": "Team A", "window_start": WINDOW_START,
                                 "window_s": 60, "errors": 3, "threshold": 3, "last_status": 502}
        with pytest.raises(TypeError):
            services.send_to_control("bad", {"not json": object()})


async def test_collector_without_a_control_channel_says_so() -> None:
    services = CollectorServices(name="x", logger=logging.getLogger("x"))
    await services.kv.set("k", 1)
    assert await services.kv.get("k") == 1
    assert services.gateway.list_apps() == []
    with pytest.raises(RuntimeError, match="no control channel"):
        services.send_to_control("k", {})


async def test_outbox_keeps_an_unacknowledged_message_and_sends_it_again() -> None:
    sent: list[bytes] = []
    fail = [True]

    async def send(topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Awaitable[Any]:
        sent.append(value)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if fail[0]:
            ack.set_exception(ConnectionError("broker gone"))
        else:
            ack.set_result(None)
        return ack

    outbox = ControlOutbox("collector/w1", "gw", max_pending_messages=2)
    message_id = outbox.send("c", "alert", {"n": 1})  # before a producer is attached: queued
    assert outbox.pending == 1 and sent == []
    outbox.attach(send)
    with pytest.raises(RetryLater, match="not acknowledged"):
        await outbox.drain()
    assert outbox.pending == 1  # kept for the next drain, not lost
    fail[0] = False
    await outbox.drain()
    assert outbox.pending == 0
    assert len(sent) == 2 and sent[0] == sent[1] and message_id.encode() in sent[1]
    outbox.detach()
    outbox.send("c", "alert", {"n": 2})
    outbox.send("c", "alert", {"n": 3})
    with pytest.raises(OverflowError):
        outbox.send("c", "alert", {"n": 4})


async def test_runtime_sends_the_alert_before_committing_and_follows_a_reload(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    path = tmp_path / "gateway-tap.yaml"
    document: dict[str, Any] = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
        "apps": [{"id": "team-a", "name": "Team A"}],
        "collectors": {"error-alerts": {
            "plugin": "gateway_tap.examples.collectors.error_alerts:ErrorAlerts",
            "group_instance_id": "alerts-1", "group_id": f"alerts-{topic_prefix}",
            "batch": {"max_wait_ms": 20}, "metrics": {"port": free_port()},
            "config": {"threshold": 3, "window_s": 60}}}}
    path.write_text(yaml.safe_dump(document))
    runtime = build_runtime("error-alerts", str(path))
    task = asyncio.create_task(runtime.run())
    try:
        await produce_events(kafka_bootstrap, topic_prefix, errors("team-a", 4))
        first = await read_topic(kafka_bootstrap, control_topic(topic_prefix), 1)
        alert = decode_control(first[0].value)
        assert (alert.plugin, alert.kind, alert.gateway_id) == ("error-alerts", "error_rate", "collector/alerts-1")
        assert alert.payload["app_name"] == "Team A"

        document["apps"] = [{"id": "team-a", "name": "Team A (renamed)"}]
        path.write_text(yaml.safe_dump(document))
        runtime.request_reload()  # applied between batches
        assert runtime.reloader is not None
        async with asyncio.timeout(30):  # bounds a hang; not a timing assertion
            while runtime.reloader.generation < 1:  # noqa: ASYNC110 - the reloader exposes a counter, no event
                await asyncio.sleep(0.02)
        await produce_events(kafka_bootstrap, topic_prefix, errors("team-a", 3, window_start=WINDOW_START + 60))
        both = await read_topic(kafka_bootstrap, control_topic(topic_prefix), 2)
        renamed = decode_control(both[1].value)
        assert renamed.payload["app_name"] == "Team A (renamed)"
        assert renamed.payload["window_start"] == WINDOW_START + 60
    finally:
        runtime.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
