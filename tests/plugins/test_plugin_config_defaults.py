"""A plugin's ``config_schema()`` defaults are filled in wherever its config is applied: at load, on a reload of the
file and on an admin API change (the same function the collectors use, ``check_extension_config``)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import openai
import yaml

from collectors import DataCollector
from collectors.config import validate_collector_config
from gateway_tap.dev.servers import free_port
from gateway_tap.hooks import HookContext, HookResult, PluginServices, TapResponse
from gateway_tap.plugins.loader import effective_plugin_configs
from gateway_tap.proxy.admin_link import AdminLink
from gateway_tap.proxy.app import create_app
from gateway_tap.proxy.protocol import TapRunner
from gateway_tap.settings import BudgetStoreSettings, PluginConfig, parse_config
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
MESSAGES: Any = [{"role": "user", "content": "hello there"}]
SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "header": {"type": "string", "default": "x-stamp"},
        "value": {"type": "string", "default": "on"},
        "style": {"type": "object", "default": {},
                  "properties": {"suffix": {"type": "string", "default": "!"}, "upper": {"type": "boolean"}}},
    },
}
FILLED = {"header": "x-stamp", "value": "on", "style": {"suffix": "!"}}


class Stamp:
    """Stamps ``header: value + suffix`` on every answer, reading only ``ctx.config`` (no ``.get`` fallbacks)."""

    seen: ClassVar[list[tuple[str, Mapping[str, Any]]]] = []

    def config_schema(self) -> Mapping[str, Any]:
        return SCHEMA

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        Stamp.seen.append(("initialize", config))

    async def on_config_change(self, config: Mapping[str, Any]) -> None:
        Stamp.seen.append(("on_config_change", config))

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        config = ctx.config
        return HookResult.modify(headers={config["header"]: config["value"] + config["style"]["suffix"]})


async def _stamp(url: str) -> str:
    client = openai.AsyncOpenAI(base_url=f"{url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                 max_tokens=2)
    return raw.headers["x-stamp"]


async def test_defaults_at_load_on_reload_and_on_an_admin_change(mock_llm: str, kafka_bootstrap: str,
                                                                 topic_prefix: str, tmp_path: Path) -> None:
    Stamp.seen.clear()
    store = BudgetStoreSettings(backend="sqlite", sqlite_path=str(tmp_path / "budgets.sqlite3"))
    plugin = {"name": "stamp", "use": f"{__name__}:Stamp", "config": {}}
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", plugins=[plugin],
                          tap={"admin": {"sync": True}})
    document["budget_store"] = store.model_dump()
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    tap = await create_app(parse_config(document), config_path=path)
    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    port = free_port()
    from aiohttp import web

    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    assert tap.reloader is not None
    link = await AdminLink.open(tap)
    try:
        await link.start()
        # At load: initialize and ctx.config get every default, nested ones included.
        assert Stamp.seen == [("initialize", FILLED)]
        assert await _stamp(url) == "on!"

        # A reload of the file that changes one key: on_config_change gets the rest from the defaults.
        changed = copy.deepcopy(document)
        changed["plugins"][0]["config"] = {"value": "file", "style": {"upper": True}}
        path.write_text(yaml.safe_dump(changed))
        assert await tap.reloader.reload_file() is True
        assert Stamp.seen[-1] == ("on_config_change", {**FILLED, "value": "file", "style": {"suffix": "!",
                                                                                           "upper": True}})
        assert await _stamp(url) == "file!"

        # An admin API change (stored, then applied by the worker's sync): the same.
        await link.store.set_plugin_config("stamp", {"header": "x-stamp", "style": {"suffix": "?"}})
        await link.refresh()
        assert Stamp.seen[-1] == ("on_config_change", {**FILLED, "style": {"suffix": "?"}})
        assert tap.plugins[0].settings.config == {**FILLED, "style": {"suffix": "?"}}
        assert await _stamp(url) == "on?"
    finally:
        await link.stop()
        await runner.cleanup()


def test_effective_plugin_configs_is_what_the_tap_applies() -> None:
    """The admin API's check and check-config see the same filled config and problems as the tap."""
    good = PluginConfig(name="stamp", use=f"{__name__}:Stamp", config={"value": "x"})
    bad = PluginConfig(name="bad", use=f"{__name__}:Stamp", config={"style": {"suffix": 3}})
    off = PluginConfig(name="off", use=f"{__name__}:Stamp", enabled=False)
    plugins, problems = effective_plugin_configs([good, bad, off])
    assert plugins[0].config == {**FILLED, "value": "x"} and plugins[0].name == "stamp"
    assert [p.name for p in plugins] == ["stamp", "bad"]
    assert problems == ["plugins[1].config.style.suffix: 3 is not of type 'string'"]


def test_defaults_are_copies_and_collectors_fill_nested_ones_too() -> None:
    class Sink(DataCollector):
        config_schema: ClassVar[dict[str, Any]] = SCHEMA

    first = validate_collector_config("sink", Sink, {})
    second = validate_collector_config("sink", Sink, {"style": {"upper": False}})
    assert first == FILLED and second == {**FILLED, "style": {"suffix": "!", "upper": False}}
    first["style"]["suffix"] = "changed"
    assert validate_collector_config("sink", Sink, {}) == FILLED  # a default is never shared
