"""One class for both runtimes: ``TeamUsage`` (a ``DataCollector`` with a ``post_auth`` hook and one ``Config``)
tags requests in the tap, driven by the official SDKs, and is then run by ``gateway-tap collect`` on the events
that tap published, into its SQLite ledger."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from collectors import ConfigError
from collectors.config import validate_collector_config
from gateway_tap.dev.servers import free_port
from gateway_tap.examples.plugins.team_usage import TeamUsage
from gateway_tap.plugins.loader import validate_plugin_configs
from gateway_tap.settings import PluginConfig
from tests.support.collectors import collect_process, wait_for
from tests.support.tap import APP_KEY, LIMITED_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
USE = "gateway_tap.examples.plugins.team_usage:TeamUsage"
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


def _ledger(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT team, COUNT(*), SUM(cost) FROM usage GROUP BY team ORDER BY team").fetchall()
        except sqlite3.OperationalError:  # the table is not created yet
            return []


async def test_one_class_tags_in_the_tap_and_collects_the_events(mock_llm: str, kafka_bootstrap: str,
                                                                 topic_prefix: str, tmp_path: Path) -> None:
    plugin = {"name": "team_usage", "use": USE, "config": {"tag": "team"}}
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", plugins=[plugin])
    document["apps"][0]["metadata"] = {"team": "search"}  # "limited" has none: the default
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)
        claude = anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=LIMITED_KEY, max_retries=0)
        await claude.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=MESSAGES)

    ledger = tmp_path / "ledger.sqlite3"
    config = {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
              "collectors": {USE: {"metrics": {"port": free_port()}, "batch": {"max_wait_ms": 20},
                                   "config": {"tag": "team", "ledger_path": str(ledger)}}}}
    proc = collect_process("team-usage", USE, config, tmp_path)
    await asyncio.to_thread(proc.start)
    try:
        await wait_for(lambda: sum(n for _, n, _ in _ledger(ledger)) >= 4, "4 ledger rows")
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.log_tail()
    rows = _ledger(ledger)
    assert [(team, n) for team, n, _ in rows] == [("search", 3), ("unassigned", 1)]
    assert all(cost > 0 for _, _, cost in rows)


def test_one_config_schema_for_both_runtimes() -> None:
    """The same ``Config`` checks the plugin's config and the collector's, defaults included."""
    problems = validate_plugin_configs([PluginConfig(name="tu", use=USE, config={"tag": "", "colour": 1})])
    assert problems == ["plugins[0].config.tag: String should have at least 1 character",
                        "plugins[0].config.colour: Extra inputs are not permitted"]
    with pytest.raises(ConfigError) as refused:
        validate_collector_config("tu", TeamUsage, {"tag": "", "colour": 1})
    assert str(refused.value).splitlines() == ["collectors.tu.config.tag: String should have at least 1 character",
                                               "collectors.tu.config.colour: Extra inputs are not permitted"]
    assert validate_collector_config("tu", TeamUsage, {}) == {"tag": "team", "default": "unassigned",
                                                              "ledger_path": None}


def test_a_collector_without_hooks_is_refused_as_a_plugin() -> None:
    problems = validate_plugin_configs([PluginConfig(
        name="audit", use="gateway_tap.examples.collectors.control_counters:ControlCounters")])
    assert problems == ["plugins[0] (audit): 'gateway_tap.examples.collectors.control_counters:ControlCounters' is a "
                        "collector without a hook or endpoints: it would do nothing in the tap; run it with "
                        "gateway-tap collect, or define a hook to use it as a plugin too"]
