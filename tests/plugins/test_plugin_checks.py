"""No silent plugins: a plugin that does nothing, a hook that cannot be called as the tap calls it, or a bad endpoint
declaration fails `check-config` and `serve` start-up, naming plugins[i], the method and what is expected."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from gateway_tap.dev.servers import cli_argv
from gateway_tap.hooks import Endpoint, HookContext, HookResult, TapRequest, TapResponse
from gateway_tap.plugins.loader import validate_plugin_configs

ROOT = Path(__file__).resolve().parents[2]


class SchemaOnly:
    """Declares a config schema and nothing the tap could attach."""

    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object"}


class TooFewArgs:
    async def post_auth(self, request: TapRequest) -> HookResult | None:
        return None


class SyncHook:
    def pre_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None


class BodyHookTwoArgs:
    async def on_response_body(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        return None


class AsyncEndpoints:
    async def endpoints(self) -> list[Endpoint]:
        return []


class BadEndpoints:
    def sync_handler(self, request: web.Request, ctx: HookContext) -> web.StreamResponse:
        return web.Response()

    async def good(self, request: web.Request, ctx: HookContext) -> web.StreamResponse:
        return web.Response()

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "sync", self.sync_handler),  # type: ignore[arg-type]
                Endpoint("GET", "broken/{", self.good),
                Endpoint("GET", "twice", self.good), Endpoint("get", "/twice", self.good),
                Endpoint("BAD METHOD", "x", self.good), Endpoint("GET", "seed", self.seed_order)]

    async def seed_order(self, ctx: HookContext, request: web.Request) -> web.StreamResponse:
        return web.Response()


class SeedOrder:
    """Written in the seed's order, ``(ctx, req)``: would fail on its first request, so it never loads."""

    async def post_auth(self, ctx: HookContext, req: TapRequest) -> HookResult | None:
        return None

    async def initialize(self, services: Any, config: Mapping[str, Any]) -> None:
        return None


class UnknownNames:
    """Parameter names that name no argument the tap passes: only the arity can be checked, and it is right."""

    async def post_auth(self, r: TapRequest, c: HookContext) -> HookResult | None:
        return None

    async def on_response_body(self, _response: TapResponse, payload: bytes, _ctx: HookContext) -> None:
        return None


class HeadersOnly:
    """Only on_response_headers: a capability on its own (no companion needed)."""

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        response.headers["x-alone"] = "yes"
        return None


class WorkerOnly:
    """Does its work from initialize (a background task sending control messages, say): allowed."""

    async def initialize(self, config: Mapping[str, Any], services: Any) -> None:
        self.started = True


class MisspeltWithHook:
    """A misspelt hook name is not detected (only names the tap knows are checked); the real hook loads."""

    async def post_auht(self, request: TapRequest, ctx: HookContext) -> None:
        return None

    async def pre_auth(self, request: TapRequest, ctx: HookContext, extra: int = 0) -> HookResult | None:
        return None  # an optional extra argument is fine


def _plugins(*classes: str) -> list[dict[str, Any]]:
    return [{"name": cls.lower(), "use": f"tests.plugins.test_plugin_checks:{cls}"} for cls in classes]


BAD = ("SchemaOnly", "TooFewArgs", "SyncHook", "BodyHookTwoArgs", "AsyncEndpoints", "BadEndpoints", "SeedOrder")
GOOD = ("HeadersOnly", "WorkerOnly", "MisspeltWithHook", "UnknownNames")
EXPECTED = [
    "plugins[0] (schemaonly): 'tests.plugins.test_plugin_checks:SchemaOnly' implements no capability: "
    "define at least one of async def pre_auth(self, request, ctx)",
    "plugins[1] (toofewargs).post_auth: takes (request), 1 required; expected async def post_auth(self, request, ctx)",
    "plugins[2] (synchook).pre_auth: is a plain def; expected async def pre_auth(self, request, ctx)",
    "plugins[3] (bodyhooktwoargs).on_response_body: takes (response, ctx), 2 required; expected async def "
    "on_response_body(self, response, body, ctx)",
    "plugins[4] (asyncendpoints).endpoints: is an async def; expected def endpoints(self) (read once, at load)",
    "plugins[5] (badendpoints).endpoints()[0] (GET sync): handler 'sync_handler' is a plain def; expected async def "
    "handler(request, ctx) -> web.StreamResponse",
    "plugins[5] (badendpoints).endpoints()[1]: path 'broken/{' is not a valid route pattern",
    "plugins[5] (badendpoints).endpoints()[3]: GET twice is declared twice",
    "plugins[5] (badendpoints).endpoints()[4]: method 'BAD METHOD' is not an HTTP method (or '*' for any)",
    "plugins[5] (badendpoints).endpoints()[5] (GET seed): handler 'seed_order' takes (ctx, request): 'ctx' is where "
    "the tap passes 'request' (arguments in another order); expected async def handler(request, ctx)",
    "plugins[6] (seedorder).post_auth: takes (ctx, req): 'ctx' is where the tap passes 'request' (arguments in "
    "another order); expected async def post_auth(self, request, ctx)",
    "plugins[6] (seedorder).initialize: takes (services, config): 'services' is where the tap passes 'config' "
    "(arguments in another order); expected async def initialize(self, config, services)",
]


def test_validation_names_plugin_method_and_expectation() -> None:
    from gateway_tap.settings import parse_config

    config = parse_config({"plugins": _plugins(*BAD, *GOOD)})
    problems = validate_plugin_configs(config.plugins)
    for expected in EXPECTED:
        assert any(p.startswith(expected) for p in problems), f"{expected!r} not in {problems}"
    assert len(problems) == len(EXPECTED)  # the good ones load


def test_check_config_and_serve_refuse_to_start(tmp_path: Path) -> None:
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump({"plugins": _plugins(*GOOD, "TooFewArgs", "SyncHook", "SeedOrder"),
                                    "tap": {"publisher": {"spool_dir": str(tmp_path / "spool")}}}))
    for argv in (cli_argv("check-config", str(path)), cli_argv("serve", "--config", str(path), "--workers", "2")):
        result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 1, result
        assert "plugins[4] (toofewargs).post_auth: takes (request), 1 required" in result.stderr
        assert "plugins[5] (synchook).pre_auth: is a plain def; expected async def pre_auth(self, request, ctx)" \
            in result.stderr
        assert "plugins[6] (seedorder).post_auth: takes (ctx, req): 'ctx' is where the tap passes 'request' " \
            "(arguments in another order); expected async def post_auth(self, request, ctx)" in result.stderr
        assert "headersonly" not in result.stderr and "workeronly" not in result.stderr
