"""The admin API against a real state database (SQLite and PostgreSQL) over real sockets: every call, auth,
and each bad-input case answered with its own 4xx and nothing half-applied."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from collectors import DataCollector
from gateway_tap.admin.api import AdminAPI
from gateway_tap.admin.db import connect
from gateway_tap.admin.store import AdminStore
from gateway_tap.examples.plugins.team_usage import TeamUsageConfig
from gateway_tap.hooks import HookContext, HookResult, TapRequest
from gateway_tap.plugins.loader import trial_plugin
from gateway_tap.services import Gateway
from gateway_tap.settings import AdminSettings, BudgetStoreSettings, GatewayConfig, PluginConfig, parse_config
from tests.support.tap import EXAMPLE_PLUGINS, tap_config

ADMIN_TOKEN = "admin-token-0123456789"
READ_TOKEN = "read-token-0123456789"


class DictSchemaBoth(DataCollector):
    """Usable by both runtimes, its config declared as a JSON Schema dict (the collectors' style)."""

    config_schema = {"type": "object", "properties": {"label": {"type": "string", "default": "x"}},
                     "additionalProperties": False}

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class FakeRuntime:
    """The worker side, without a tap: the file's config, and what was audited / refreshed."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.audits: list[Mapping[str, Any]] = []
        self.refreshes = 0

    def file_config(self) -> GatewayConfig:
        return self.config

    def applied_version(self) -> int:
        return 0

    async def refresh(self) -> None:
        self.refreshes += 1

    async def check_plugin(self, plugin: PluginConfig) -> list[str]:
        return await trial_plugin(plugin, Gateway.from_config(self.config.apps, self.config.llms))

    def budget_report(self, app_id: str, llm_id: str | None) -> dict[str, Any] | None:
        return {"app_id": app_id, "llm_id": llm_id, "enforced": False, "budgets": []}

    def audit(self, record: Mapping[str, Any]) -> None:
        self.audits.append(record)


class Admin:
    def __init__(self, url: str, runtime: FakeRuntime, store: AdminStore, http: aiohttp.ClientSession) -> None:
        self.url, self.runtime, self.store, self.http = url, runtime, store, http

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = ADMIN_TOKEN,
                   raw: bytes | None = None, params: dict[str, str] | None = None) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if raw is not None:
            kwargs["data"] = raw
            headers["content-type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            data = await resp.json() if resp.status != 204 else None
            return resp.status, data


@pytest.fixture
async def admin(budget_store_settings: BudgetStoreSettings, tmp_path: Path) -> AsyncIterator[Admin]:
    document = tap_config("http://127.0.0.1:9", "127.0.0.1:9", "t", tmp_path / "spool", plugins=[
        EXAMPLE_PLUGINS[0], {"name": "team_usage", "use": "gateway_tap.examples.plugins.team_usage:TeamUsage"},
        {"name": "dict_schema", "use": f"{__name__}:DictSchemaBoth"}])
    document["budgets"] = [{"app_id": "test", "limit_usd": 5}]
    config = parse_config(document)
    runtime = FakeRuntime(config)
    settings = AdminSettings.model_validate({
        "listen": {"port": 18081}, "max_body_bytes": 2048,
        "tokens": [{"id": "ops", "token_hash": _hash(ADMIN_TOKEN)}, {"id": "viewer", "role": "read",
                                                                      "token_hash": _hash(READ_TOKEN)}]})
    store = AdminStore(await connect(budget_store_settings))
    api = AdminAPI(settings, store, runtime)
    server = TestServer(api.web_app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Admin(str(server.make_url("")).rstrip("/"), runtime, store, http)
    finally:
        await server.close()
        await store.close()


async def test_app_key_budget_lifecycle(admin: Admin) -> None:
    status, app = await admin.call("POST", "/v1/apps", {"id": "team-a", "name": "Team A",
                                                        "allowed_llms": ["openai"], "metadata": {"team": "a"}})
    assert status == 201, app
    assert app["source"] == "api" and app["allowed_llms"] == ["openai"]
    status, apps = await admin.call("GET", "/v1/apps")
    assert {(a["id"], a["source"]) for a in apps["data"]} == {("test", "yaml"), ("limited", "yaml"),
                                                               ("team-a", "api")}
    status, issued = await admin.call("POST", "/v1/apps/team-a/keys")
    assert status == 201 and issued["key"].startswith(issued["prefix"]) and issued["state"] == "active"
    state = await admin.store.state()
    (stored,) = state.keys
    assert stored.key_hash == _hash(issued["key"]) and issued["key"] not in repr(state)
    status, keys = await admin.call("GET", "/v1/apps/team-a/keys")
    assert [k["prefix"] for k in keys["data"]] == [issued["prefix"]]
    assert "key" not in keys["data"][0] and issued["key"] not in str(keys)

    status, rotated = await admin.call("POST", f"/v1/apps/team-a/keys/{issued['id']}/rotate", {"overlap_s": 60})
    assert status == 201 and rotated["previous"]["state"] == "expiring"
    assert rotated["issued"]["key"] != issued["key"]
    status, revoked = await admin.call("DELETE", f"/v1/apps/team-a/keys/{rotated['issued']['id']}")
    assert status == 200 and revoked["state"] == "revoked"

    status, budget = await admin.call("PUT", "/v1/apps/team-a/budgets", {"limit_tokens": 10, "period": "daily"})
    assert status == 200 and budget["settings"]["app_id"] == "team-a"
    status, budgets = await admin.call("GET", "/v1/apps/team-a/budgets")
    assert [b["settings"]["limit_tokens"] for b in budgets["data"]] == [10] and budgets["spend"]["app_id"] == "team-a"
    status, _ = await admin.call("PUT", "/v1/apps/team-a/budgets", {"limit_tokens": 20, "period": "daily"})
    assert [b.limit_tokens for b in (await admin.store.state()).budgets] == [20]
    status, _ = await admin.call("DELETE", "/v1/apps/team-a/budgets", params={"period": "daily"})
    assert status == 204 and (await admin.store.state()).budgets == ()

    status, app = await admin.call("PATCH", "/v1/apps/team-a", {"enabled": False, "name": "A"})
    assert status == 200 and app["enabled"] is False and app["name"] == "A" and app["metadata"] == {"team": "a"}
    status, _ = await admin.call("DELETE", "/v1/apps/team-a")
    assert status == 204
    assert (await admin.store.state()).keys == ()
    actions = [a["action"] for a in admin.runtime.audits]
    assert actions == ["app.create", "key.issue", "key.rotate", "key.revoke", "budget.set", "budget.set",
                       "budget.delete", "app.update", "app.delete"]
    assert all(a["actor"] == "ops" for a in admin.runtime.audits)
    assert admin.runtime.refreshes == len(actions)
    assert await admin.store.version() == len(actions)
    for secret in (issued["key"], rotated["issued"]["key"], ADMIN_TOKEN):
        assert secret not in str(admin.runtime.audits)
    assert "sha256:" not in str(admin.runtime.audits)


async def test_auth(admin: Admin) -> None:
    status, body = await admin.call("GET", "/v1/apps", token=None)
    assert status == 401 and body["error"]["code"] == "missing_admin_token"
    assert body["error"]["type"] == "authentication_error" and body["error"]["request_id"]
    status, body = await admin.call("GET", "/v1/apps", token="wrong-token")
    assert status == 401 and body["error"]["code"] == "invalid_admin_token"
    status, body = await admin.call("GET", "/v1/apps", token=READ_TOKEN)
    assert status == 200
    status, body = await admin.call("POST", "/v1/apps", {"id": "x"}, token=READ_TOKEN)
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert await admin.store.version() == 0


async def test_bad_input_gets_a_specific_error_and_changes_nothing(admin: Admin) -> None:
    cases: list[tuple[str, str, Any, int, str, str | None]] = [
        ("POST", "/v1/apps", {"id": "a", "colour": "red"}, 422, "validation_error", "colour"),
        ("POST", "/v1/apps", {"id": "a", "name": 5}, 422, "validation_error", "name"),
        ("POST", "/v1/apps", {"id": "bad id!"}, 422, "validation_error", "id"),
        ("POST", "/v1/apps", {"id": "a", "allowed_llms": ["nope"]}, 422, "unknown_llm", "allowed_llms[0]"),
        ("POST", "/v1/apps", {"id": "test"}, 409, "declared_in_file", None),
        ("POST", "/v1/apps/test/keys", None, 409, "declared_in_file", None),
        ("PATCH", "/v1/apps/test", {"name": "x"}, 409, "declared_in_file", None),
        ("DELETE", "/v1/apps/nobody", None, 404, "not_found", None),
        ("PUT", "/v1/apps/test/budgets", {"limit_usd": 1}, 409, "declared_in_file", None),
        ("PUT", "/v1/apps/test/budgets", {"period": "weekly", "limit_usd": 1}, 422, "validation_error", "period"),
        ("PUT", "/v1/plugins/prompt_firewall/config", {"config": {"patterns": "not-a-list"}}, 422,
         "invalid_plugin_config", "config.patterns"),
        ("PUT", "/v1/plugins/nobody/config", {"config": {}}, 404, "not_found", None),
    ]
    for method, path, body, want, code, param in cases:
        status, answer = await admin.call(method, path, body)
        assert (status, answer["error"]["code"]) == (want, code), (method, path, body, answer)
        if param is not None:
            assert answer["error"]["param"] == param, answer
    assert await admin.store.version() == 0
    # A duplicate app id, a budget without a limit, revoking an unknown key, a non-JSON body, a body over the limit.
    assert (await admin.call("POST", "/v1/apps", {"id": "a"}))[0] == 201
    status, answer = await admin.call("POST", "/v1/apps", {"id": "a"})
    assert status == 409 and answer["error"]["code"] == "conflict"
    status, answer = await admin.call("PUT", "/v1/apps/a/budgets", {"period": "daily"})
    assert status == 422 and "limit_usd" in answer["error"]["message"]
    status, answer = await admin.call("DELETE", "/v1/apps/a/keys/key_unknown")
    assert status == 404 and "key_unknown" in answer["error"]["message"]
    status, answer = await admin.call("POST", "/v1/apps", raw=b"{not json")
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    status, answer = await admin.call("GET", "/v1/nothing-here")
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer = await admin.call("PUT", "/v1/apps", {"id": "x"})
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"
    status, answer = await admin.call("POST", "/v1/apps", {"id": "big", "metadata": {"x": "y" * 4096}})
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert await admin.store.version() == 1 and list((await admin.store.state()).apps) == ["a"]


async def test_plugins_and_llms(admin: Admin) -> None:
    status, plugin = await admin.call("GET", "/v1/plugins/prompt_firewall")
    assert status == 200 and plugin["config_source"] == "yaml" and plugin["config_schema"]["type"] == "object"
    status, plugin = await admin.call("PUT", "/v1/plugins/prompt_firewall/config", {"config": {"patterns": ["x"]}})
    assert status == 200 and plugin["config"] == {"patterns": ["x"]} and plugin["config_source"] == "api"
    assert (await admin.store.state()).plugin_configs == {"prompt_firewall": {"patterns": ["x"]}}
    status, plugin = await admin.call("DELETE", "/v1/plugins/prompt_firewall/config")
    assert status == 200 and plugin["config_source"] == "yaml"
    # A class usable by both runtimes shows the schema the tap validates its config against: its Config model's, or
    # its config_schema dict.
    status, plugin = await admin.call("GET", "/v1/plugins/team_usage")
    assert status == 200 and plugin["config_schema"] == TeamUsageConfig.model_json_schema()
    status, plugin = await admin.call("GET", "/v1/plugins/dict_schema")
    assert status == 200 and plugin["config_schema"] == DictSchemaBoth.config_schema
    status, answer = await admin.call("PUT", "/v1/plugins/dict_schema/config", {"config": {"colour": "red"}})
    assert status == 422 and "colour" in answer["error"]["message"], answer
    status, llms = await admin.call("GET", "/v1/llms")
    assert [llm["id"] for llm in llms["data"]] == ["openai", "anthropic"]
    assert "upstream_url" not in str(llms) and "api_key_env" not in str(llms)


async def test_openapi_is_generated_from_the_models(admin: Admin) -> None:
    status, doc = await admin.call("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    assert set(doc["paths"]["/v1/apps"]) == {"get", "post"}
    create = doc["paths"]["/v1/apps"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][create.rsplit("/", 1)[1]]
    assert schema["additionalProperties"] is False and schema["properties"]["id"]["pattern"]
    params = doc["paths"]["/v1/apps/{app_id}/budgets"]["delete"]["parameters"]
    assert [(p["name"], p["in"]) for p in params] == [("app_id", "path"), ("period", "query"), ("llm_id", "query")]
    from openapi_spec_validator import validate  # type: ignore[import-not-found]

    validate(doc)


async def test_cli_onboards_a_team(admin: Admin) -> None:
    """``gateway-tap admin ...`` against the API (run in a thread: the API serves from this event loop)."""
    import asyncio
    import json

    from click.testing import CliRunner

    from gateway_tap.cli import main

    def cli(*args: str, token: str = ADMIN_TOKEN) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["admin", "--url", admin.url, *args],
                                    env={"GATEWAY_TAP_ADMIN_TOKEN": token})
        return result.exit_code, result.output

    code, out = await asyncio.to_thread(cli, "apps", "create", "team-b", "--name", "Team B", "--llm", "openai",
                                        "--meta", "owner=b@example.com")
    assert code == 0 and "team-b" in out, out
    code, out = await asyncio.to_thread(cli, "keys", "issue", "team-b", "--json")
    issued = json.loads(out)
    assert code == 0 and issued["key"].startswith("gt-")
    code, out = await asyncio.to_thread(cli, "keys", "list", "team-b")
    assert code == 0 and issued["prefix"] in out and issued["key"] not in out
    code, out = await asyncio.to_thread(cli, "keys", "rotate", "team-b", issued["id"], "--overlap-s", "30")
    assert code == 0 and "valid until" in out
    code, out = await asyncio.to_thread(cli, "budgets", "set", "team-b", "--usd", "25", "--period", "monthly")
    assert code == 0, out
    code, out = await asyncio.to_thread(cli, "budgets", "get", "team-b", "--json")
    assert code == 0 and json.loads(out)["data"][0]["settings"]["limit_usd"] == 25
    code, out = await asyncio.to_thread(cli, "plugins", "set", "prompt_firewall", '{"patterns": ["x"]}')
    assert code == 0, out
    code, out = await asyncio.to_thread(cli, "plugins", "get", "--json")
    assert code == 0 and json.loads(out)["data"][0]["config"] == {"patterns": ["x"]}
    code, out = await asyncio.to_thread(cli, "llms", "list")
    assert code == 0 and "openai" in out and "gpt-4o-mini" in out
    code, out = await asyncio.to_thread(cli, "budgets", "delete", "team-b", "--period", "daily")
    assert code == 1 and "404 not_found" in out
    code, out = await asyncio.to_thread(cli, "apps", "list", token="bad")
    assert code == 1 and "401 invalid_admin_token" in out
    code, out = await asyncio.to_thread(cli, "apps", "delete", "team-b")
    assert code == 0 and (await admin.store.state()).apps == {}


def test_admin_settings_are_checked() -> None:
    from gateway_tap.settings import ConfigFileError

    base = tap_config("http://127.0.0.1:9", "127.0.0.1:9", "t", Path("/tmp/spool"), port=8080)
    bad = [
        ({"listen": {"port": 8080}, "tokens": [{"id": "a", "token_env": "X"}]}, "the proxy's port"),
        ({"listen": {"port": 8081}}, "no tokens are configured"),
        ({"listen": {"port": 8081}, "tokens": [{"id": "a", "token_env": "X", "token_hash": _hash("t")}]},
         "exactly one of token_hash and token_env"),
        ({"tokens": [{"id": "a", "token_hash": "sha256:short"}]}, "64 lowercase hex digits"),
        ({"tokens": [{"id": "a", "token_env": "X"}, {"id": "a", "token_env": "Y"}]}, "unique"),
    ]
    for admin_section, message in bad:
        document = {**base, "tap": {**base["tap"], "admin": admin_section}}
        with pytest.raises(ConfigFileError, match=message):
            parse_config(document)
    ok = parse_config({**base, "tap": {**base["tap"], "admin": {"sync": True}}})
    assert ok.tap.admin.enabled and ok.tap.admin.listen is None
    assert not parse_config(base).tap.admin.enabled
