"""Plugins by API (issue 22, item 3), against the real tap (``serve --workers 2``) on SQLite and PostgreSQL, driven by
``gateway-tap admin plugins ...``: a plugin is created, attached to LLMs, reordered, disabled and deleted, with the
validation the YAML file gets, and an admin token never becomes code execution: only classes the operator allowed
(an installed entry point, a class the file's plugins use, ``tap.admin.allowed_plugins``) may be named, and a
refused class is never imported."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway_tap.settings import BudgetStoreSettings
from tests.support.admin import ADMIN_TOKEN, AdminTap, admin_document, admin_tap
from tests.support.tap import APP_KEY, EXAMPLE_PLUGINS

pytestmark = pytest.mark.integration

FIREWALL = "gateway_tap.examples.plugins.prompt_firewall:PromptFirewall"
MODIFIER = "gateway_tap.examples.plugins.response_modifier:ResponseModifier"


def _cli(tap: AdminTap, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_TAP_ADMIN_URL": tap.admin_url, "GATEWAY_TAP_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "gateway_tap", "admin", *args], env=env, capture_output=True,
                          text=True, timeout=60)


async def _ask(tap: AdminTap, llm: str, text: str) -> list[tuple[int, str]]:
    """(status, the error message or the x-served-by header) of 6 requests over fresh connections."""
    path = "v1/chat/completions" if llm == "openai" else "v1/messages"
    body = {"model": "gpt-4o-mini" if llm == "openai" else "claude-3-5-haiku-latest", "max_tokens": 4,
            "messages": [{"role": "user", "content": text}]}
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(6):
            async with http.post(f"{tap.url}/llm/{llm}/{path}", json=body,
                                 headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
                answer = await resp.json()
                out.append((resp.status, answer["error"]["message"].split(":")[0] if resp.status >= 400 else
                            resp.headers.get("x-served-by", "")))
    return out


async def _applied(tap: AdminTap) -> None:
    _, status = await tap.call("GET", "/v1/status")
    await tap.wait_version(status["version"])


def _installed_entry_point(root: Path, name: str, target: str) -> None:
    """An installed distribution (as pip leaves it) declaring entry point ``name`` of group gateway_tap.plugins."""
    info = root / "demo_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[gateway_tap.plugins]\n{name} = {target}\n")


async def test_plugins_created_attached_reordered_disabled_and_deleted(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    site = tmp_path / "site"
    _installed_entry_point(site, "demo_modifier", MODIFIER)
    marker = tmp_path / "imported"
    (site / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n\nclass Evil:\n"
                                         "    async def post_auth(self, request, ctx):\n        return None\n")
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                              plugins=[EXAMPLE_PLUGINS[0]])  # prompt_firewall, order 10
    document["tap"]["admin"]["allowed_plugins"] = ["evil_plugin:Allowed"]
    async with admin_tap(document, tmp_path, env={"PYTHONPATH": str(site)}) as tap:
        # Create (a class the file uses), attached to openai only, before the file's firewall.
        result = await asyncio.to_thread(
            _cli, tap, "plugins", "create", "guard", "--use", FIREWALL, "--llm", "openai", "--order", "5",
            '{"patterns": ["secret-word", "ignore previous instructions"], "message": "guard"}')
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "the secret-word") == [(403, "guard")] * 6
        assert await _ask(tap, "anthropic", "the secret-word") == [(200, "")] * 6
        # Order: the guard (5) answers before the file's firewall (10); moved to 20, the file's answers.
        assert await _ask(tap, "openai", "ignore previous instructions") == [(403, "guard")] * 6
        result = await asyncio.to_thread(_cli, tap, "plugins", "update", "guard", "--order", "20")
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "ignore previous instructions") == \
            [(403, "request blocked by the prompt firewall")] * 6
        # Attached elsewhere, then disabled.
        result = await asyncio.to_thread(_cli, tap, "plugins", "update", "guard", "--llm", "anthropic")
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "the secret-word") == [(200, "")] * 6
        assert await _ask(tap, "anthropic", "the secret-word") == [(403, "guard")] * 6
        result = await asyncio.to_thread(_cli, tap, "plugins", "update", "guard", "--disable")
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "anthropic", "the secret-word") == [(200, "")] * 6

        # An installed entry point may be named by its name.
        result = await asyncio.to_thread(_cli, tap, "plugins", "create", "stamp", "--use", "demo_modifier",
                                         '{"headers": {"x-served-by": "stamped"}}')
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "hello") == [(200, "stamped")] * 6

        result = await asyncio.to_thread(_cli, tap, "plugins", "get", "--json")
        listed = {p["name"]: p for p in json.loads(result.stdout)["data"]}
        assert listed["prompt_firewall"]["source"] == "yaml"
        assert (listed["guard"]["source"], listed["guard"]["enabled"], listed["guard"]["llms"],
                listed["guard"]["order"]) == ("api", False, ["anthropic"], 20)
        assert listed["stamp"]["config_schema"]["type"] == "object"

        # Never code execution: neither an arbitrary module:Class nor an unlisted class of the allowed module.
        before = (await tap.call("GET", "/v1/status"))[1]["version"]
        for use in ("evil_plugin:Evil", "os:system", "subprocess:Popen", "evil_plugin", MODIFIER):
            status, answer = await tap.call("POST", "/v1/plugins", {"name": "x", "use": use})
            assert status == 422 and answer["error"]["code"] == "plugin_not_allowed", (use, answer)
            assert answer["error"]["param"] == "use"
        result = await asyncio.to_thread(_cli, tap, "plugins", "create", "x", "--use", "evil_plugin:Evil")
        assert result.returncode == 1 and "422 plugin_not_allowed" in result.stderr, result.stderr
        assert not marker.exists()
        # What the operator listed is imported (so the refusals above are what kept the module out).
        status, answer = await tap.call("POST", "/v1/plugins", {"name": "x", "use": "evil_plugin:Allowed"})
        assert status == 422 and answer["error"]["code"] == "invalid_plugin_config", answer
        assert marker.exists()

        # The YAML's validation, each with its field.
        cases = [
            ({"name": "x", "use": FIREWALL, "config": {"patterns": "x"}}, 422, "invalid_plugin_config",
             "config.patterns"),
            ({"name": "x", "use": FIREWALL, "config": {"patterns": ["(x"]}}, 422, "invalid_plugin_config",
             "config.patterns[0]"),
            ({"name": "x", "use": FIREWALL, "llms": ["nope"], "config": {"patterns": []}}, 422, "unknown_llm",
             "llms[0]"),
            ({"name": "x", "use": FIREWALL, "timeout_ms": 0, "config": {"patterns": []}}, 422, "validation_error",
             "timeout_ms"),
            ({"name": "x", "use": FIREWALL, "colour": "red"}, 422, "validation_error", "colour"),
            ({"name": "../x", "use": FIREWALL}, 422, "validation_error", "name"),
            ({"name": "prompt_firewall", "use": FIREWALL, "config": {"patterns": []}}, 409, "declared_in_file",
             "name"),
            ({"name": "guard", "use": FIREWALL, "config": {"patterns": []}}, 409, "conflict", None),
        ]
        for body, want, code, param in cases:
            status, answer = await tap.call("POST", "/v1/plugins", body)
            assert (status, answer["error"]["code"], answer["error"]["param"]) == (want, code, param), (body, answer)
        status, answer = await tap.call("PATCH", "/v1/plugins/prompt_firewall", {"enabled": False})
        assert (status, answer["error"]["code"]) == (409, "declared_in_file")
        status, answer = await tap.call("PATCH", "/v1/plugins/guard", {"llms": ["nope"]})
        assert (status, answer["error"]["code"], answer["error"]["param"]) == (422, "unknown_llm", "llms[0]")
        status, answer = await tap.call("PUT", "/v1/plugins/guard/config", {"config": {"patterns": ["[x"]}})
        assert (status, answer["error"]["param"]) == (422, "config.patterns[0]"), answer
        assert (await tap.call("GET", "/v1/status"))[1]["version"] == before  # nothing stored

        # An API plugin's config is replaced like a file plugin's; deleting it removes it from the chain.
        result = await asyncio.to_thread(_cli, tap, "plugins", "set", "stamp", '{"headers": {"x-served-by": "v2"}}')
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "hello") == [(200, "v2")] * 6
        result = await asyncio.to_thread(_cli, tap, "plugins", "delete", "stamp")
        assert result.returncode == 0, result.stderr
        await _applied(tap)
        assert await _ask(tap, "openai", "hello") == [(200, "")] * 6
        _, state = await tap.call("GET", "/v1/status")
        assert all(t["rejected"] == [] for t in state["taps"])
