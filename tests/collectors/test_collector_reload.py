"""SIGHUP reload of ``gateway-tap collect file`` against the real broker: the new batch size and output directory
apply between batches, an invalid file is rejected with its key path, and no event is lost or doubled."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from collectors.runtime import CollectorRuntime
from collectors.sdk import CollectorServices, DataCollector
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import CollectorDefaults, load_config
from tests.support.collectors import analytics, collect_process, create_topics, produce_events, wait_for, written


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        return resp.read().decode()


def _value(text: str, name: str, labels: str = "") -> float:
    inner = rf"[^}}]*{re.escape(labels)}[^}}]*" if labels else r"[^}]*"
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{{inner}}})? (\S+)$", text, re.M))


def _singles(port: int) -> float:
    return _value(_metrics(port), "gateway_tap_collector_batch_size_bucket", 'le="1.0"')


async def test_sighup_reload_applies_between_batches_and_loses_nothing(kafka_bootstrap: str, topic_prefix: str,
                                                                      tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    port = free_port()
    first, second = tmp_path / "out-1", tmp_path / "out-2"
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
        # Own group: a static member stays in its group after it stopped, other tests must not share it.
        "collectors": {"file": {"metrics": {"port": port}, "group_instance_id": "reload-1",
                                "group_id": f"reload-{topic_prefix}",
                                "batch": {"max_wait_ms": 20}, "config": {"directory": str(first)}}}}
    proc = collect_process("reload", "file", config, tmp_path)
    path = tmp_path / "gateway-tap-0.yaml"
    events = analytics(20)
    await produce_events(kafka_bootstrap, topic_prefix, events)
    await asyncio.to_thread(proc.start)
    assert proc.pid is not None
    try:
        await wait_for(lambda: len(written(first, "analytics")) >= 20, "first 20 events in out-1")
        singles = await asyncio.to_thread(_singles, port)

        changed = copy.deepcopy(config)
        changed["collectors"]["file"]["batch"] = {"max_wait_ms": 20, "max_events": 1}
        changed["collectors"]["file"]["config"] = {"directory": str(second), "fsync": "never"}
        path.write_text(yaml.safe_dump(changed))
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for(lambda: _value(_metrics(port), "gateway_tap_collector_config_generation") == 1,
                       "generation 1")
        more = analytics(10, start=100)
        await produce_events(kafka_bootstrap, topic_prefix, more)
        await wait_for(lambda: len(written(second, "analytics")) >= 10, "10 events in out-2")
        # Every event after the reload came in a batch of one.
        assert await asyncio.to_thread(_singles, port) - singles == 10

        broken = copy.deepcopy(changed)
        broken["collectors"]["file"]["config"] = {"directory": ""}
        path.write_text(yaml.safe_dump(broken))
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for(lambda: _value(_metrics(port), "gateway_tap_collector_config_reloads_total",
                                      'result="invalid"') == 1, "the invalid reload counted")
        text = await asyncio.to_thread(_metrics, port)
        assert _value(text, "gateway_tap_collector_config_last_reload_success") == 0
        assert _value(text, "gateway_tap_collector_config_generation") == 1
        last = analytics(10, start=200)
        await produce_events(kafka_bootstrap, topic_prefix, last)
        await wait_for(lambda: len(written(second, "analytics")) >= 20, "10 more events in out-2")
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.log_tail()
    log_text = (tmp_path / "collect-reload.log").read_text()
    assert "collectors.file.config.directory" in log_text and "reload rejected" in log_text
    assert sorted(r["id"] for r in written(first, "analytics")) == sorted(e.id for e in events)
    assert sorted(r["id"] for r in written(second, "analytics")) == sorted(e.id for e in more + last)


class RemembersDefaults(DataCollector):
    """Records the ``services.defaults`` of every instance initialised."""

    event_types = ("budget_usage",)
    initialised: ClassVar[list[CollectorDefaults]] = []

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        self.initialised.append(services.defaults)


async def test_reload_hands_changed_root_budgets_to_the_collector_and_reports_kafka(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The collector sees the root sections it falls back on (services.defaults), never the whole file; a
    changed ``budgets`` re-initialises it between batches, a changed ``kafka`` is reported as needing a restart."""
    path = tmp_path / "gateway-tap.yaml"
    doc: dict[str, Any] = {"apps": [{"id": "a"}], "budgets": [{"app_id": "a", "limit_usd": 1.0}],
                           "collectors": {"remember": {}}}
    path.write_text(yaml.safe_dump(doc))
    root = load_config(path)
    rt = CollectorRuntime("remember", RemembersDefaults, root.collectors["remember"], {}, root=root,
                          config_path=path)
    assert rt.reloader is not None
    # What run() sets up before the first batch (no broker needed to reload between batches).
    rt.services = CollectorServices("remember", logging.getLogger("test"), defaults=root.collector_defaults())
    rt.collector = RemembersDefaults()
    await rt.collector.initialize({}, rt.services)

    doc["budgets"][0]["limit_usd"] = 2.0
    doc["kafka"] = {"bootstrap_servers": "elsewhere:9092"}
    path.write_text(yaml.safe_dump(doc))
    with caplog.at_level(logging.WARNING, logger="gateway_tap.collectors.reload"):
        assert await rt.reloader.apply()
    assert [d.budgets[0].limit_usd for d in RemembersDefaults.initialised] == [1.0, 2.0]
    assert rt.collector.services.defaults.budgets[0].limit_usd == 2.0
    assert "take effect only after a restart: kafka" in caplog.text

    # Unchanged defaults and config: the instance in force stays.
    before = rt.collector
    assert await rt.reloader.apply()
    assert rt.collector is before and len(RemembersDefaults.initialised) == 2
