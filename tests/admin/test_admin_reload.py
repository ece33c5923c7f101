"""The admin state and the file together in one tap worker (in-process): a SIGHUP reload of a changed file
keeps the API's apps, keys and plugin configs on top of it, and the file wins a clash."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway_tap.proxy.admin_link import AdminLink
from gateway_tap.proxy.app import create_app
from gateway_tap.proxy.protocol import TapRunner
from gateway_tap.settings import BudgetStoreSettings, parse_config
from tests.support.tap import APP_KEY, EXAMPLE_PLUGINS, key_hash, tap_config

NEW_FILE_KEY = "gt-file-key-added-later-0123"


async def test_file_reload_keeps_the_api_state_on_top(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                      tmp_path: Path) -> None:
    store = BudgetStoreSettings(backend="sqlite", sqlite_path=str(tmp_path / "budgets.sqlite3"))
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool",
                          plugins=[EXAMPLE_PLUGINS[0]], tap={"admin": {"sync": True}})
    document["budget_store"] = store.model_dump()
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    tap = await create_app(parse_config(document), config_path=path)
    runner = TapRunner(tap.web_app, access_log=None)
    await runner.setup()
    assert tap.reloader is not None
    link = await AdminLink.open(tap)
    try:
        await link.start()
        await link.store.create_app("team", "Team", ["openai"], {})
        (_, secret), _ = await link.store.issue_key("team")
        await link.store.set_plugin_config("prompt_firewall", {"patterns": ["api-pattern"]})
        await link.refresh()
        assert tap.apps.app_for_key(secret) is not None and tap.apps.app_for_key(APP_KEY) is not None
        assert tap.plugins[0].settings.config == {"patterns": ["api-pattern"]}
        generation = tap.snapshot.generation

        document["apps"].append({"id": "later", "key_hashes": [key_hash(NEW_FILE_KEY)]})
        document["llms"][0]["prices"]["gpt-4o-mini"] = {"input_per_1m": 9.0, "output_per_1m": 9.0}
        path.write_text(yaml.safe_dump(document))
        assert await tap.reloader.reload_file()
        assert tap.snapshot.generation == generation + 1
        assert tap.apps.app_for_key(secret) is not None  # the API's app and key survive the file reload
        assert tap.apps.app_for_key(NEW_FILE_KEY) is not None
        assert tap.plugins[0].settings.config == {"patterns": ["api-pattern"]}
        assert tap.config.llms[0].prices["gpt-4o-mini"].input_per_1m == 9.0
        assert link.file_config().apps[-1].id == "later"  # what the API reads as the file's

        # The file now declares an app of the same id: the file's wins (its key, not the API's).
        document["apps"].append({"id": "team", "key_hashes": [key_hash(NEW_FILE_KEY + "x")]})
        path.write_text(yaml.safe_dump(document))
        assert await tap.reloader.reload_file()
        assert tap.apps.app_for_key(secret) is None
        assert tap.apps.app_for_key(NEW_FILE_KEY + "x") is not None
    finally:
        await link.stop()
        await runner.cleanup()
