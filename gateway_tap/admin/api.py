"""The admin HTTP API: apps, keys, budgets, plugin configs and LLMs, on its own listener.

Every call needs ``Authorization: Bearer <admin token>``: the token's sha256 is compared in
constant time with every configured one (``tap.admin.tokens``); a ``read`` token may only
GET. A change is validated with the models the YAML uses, written in one transaction that
bumps the state's version (:class:`~gateway_tap.admin.store.AdminStore`), applied by this
worker before the answer (the others follow within ``poll_interval_s``), logged and
published as an audit record on the control topic. Entries declared in the YAML file are
read-only here (409).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway_tap.admin import models as m
from gateway_tap.admin.openapi import Route, openapi_document
from gateway_tap.admin.state import ManagedApp, ManagedKey
from gateway_tap.admin.store import AdminStore, Conflict, NotFound, app_view, key_view
from gateway_tap.budgets.store import BudgetStoreError, StoreUnavailable
from gateway_tap.plugins.loader import resolve_class, validate_plugin_configs
from gateway_tap.settings import AdminSettings, AdminTokenSettings, BudgetSettings, GatewayConfig
from gateway_tap.settings.base import key_path

log = logging.getLogger("gateway_tap.admin")

M = TypeVar("M", bound=BaseModel)


class AdminRuntime(Protocol):
    """What the API needs from the tap worker serving it (:mod:`gateway_tap.proxy.admin_link`)."""

    def file_config(self) -> GatewayConfig:
        """The YAML file's configuration in force (without the API's state)."""

    def applied_version(self) -> int:
        """The state version this worker runs."""

    async def refresh(self) -> None:
        """Apply the newest state in this worker now."""

    def budget_report(self, app_id: str, llm_id: str | None) -> dict[str, Any] | None:
        """What ``GET /budget`` shows for the app (None when this tap enforces no budget)."""

    def audit(self, record: Mapping[str, Any]) -> None:
        """Publish one audit record (control topic)."""


class ApiError(Exception):
    """Answered as an OpenAI-style error body."""

    def __init__(self, status: int, type_: str, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.message, self.param = status, type_, code, message, param


def _error_response(exc: ApiError, request_id: str) -> web.Response:
    body = {"error": {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param,
                      "request_id": request_id}}
    return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/json",
                        headers={"x-request-id": request_id})


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
    """aiohttp's own errors (unknown path 404, wrong method 405) as the API's JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        if exc.status == 404:
            error = _not_found(f"no route for {request.path}")
        elif exc.status == 405:
            error = ApiError(405, "invalid_request_error", "method_not_allowed",
                             f"{request.method} is not allowed on {request.path}")
        else:
            error = ApiError(exc.status, "invalid_request_error", "http_error", exc.reason)
        return _error_response(error, rid)


def _not_found(message: str) -> ApiError:
    return ApiError(404, "not_found_error", "not_found", message)


def _read_only(what: str) -> ApiError:
    return ApiError(409, "invalid_request_error", "declared_in_file",
                    f"{what} is declared in the configuration file and is read-only through the API; "
                    "change the file instead")


@dataclass(frozen=True)
class _Token:
    id: str
    role: str
    digest: str


def _tokens(settings: list[AdminTokenSettings]) -> list[_Token]:
    out = []
    for t in settings:
        digest = t.digest()
        if digest is None:
            log.warning("admin token %r: $%s is empty; the token is disabled", t.id, t.token_env)
            continue
        out.append(_Token(t.id, t.role, digest))
    return out


Handler = Callable[[web.Request, "Caller"], Awaitable[BaseModel | web.Response | None]]


@dataclass(frozen=True)
class Caller:
    token_id: str
    request_id: str


class AdminAPI:
    """The aiohttp application of the admin API (``web_app``)."""

    def __init__(self, settings: AdminSettings, store: AdminStore, runtime: AdminRuntime) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self._tokens = _tokens(settings.tokens)
        self.routes: list[Route] = []
        self.web_app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_json_errors])
        self._add_routes()
        self._openapi = orjson.dumps(openapi_document(self.routes))

    # -- plumbing --------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, handler: Handler, summary: str, *, body: type[BaseModel] | None = None,
               response: type[BaseModel] | None = None, status: int = 200, write: bool | None = None,
               query: tuple[tuple[str, str], ...] = ()) -> None:
        self.routes.append(Route(method, path, summary, body, response, status, query))
        writes = method != "GET" if write is None else write

        async def endpoint(request: web.Request) -> web.Response:
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                caller = self._authenticate(request, rid, writes)
                result = await handler(request, caller)
            except ApiError as exc:
                return _error_response(exc, rid)
            except NotFound as exc:
                return _error_response(_not_found(str(exc)), rid)
            except Conflict as exc:
                return _error_response(ApiError(409, "invalid_request_error", "conflict", str(exc)), rid)
            except StoreUnavailable as exc:
                log.warning("admin call failed: the state database is unavailable: %s", exc)
                return _error_response(ApiError(503, "api_error", "state_store_unavailable",
                                                "the admin state database is unavailable; retry later"), rid)
            except BudgetStoreError:
                log.exception("admin call failed")
                return _error_response(ApiError(500, "api_error", "internal_error", "the change failed"), rid)
            if result is None:
                return web.Response(status=204, headers={"x-request-id": rid})
            if isinstance(result, web.Response):
                result.headers["x-request-id"] = rid
                return result
            return web.Response(status=status, body=result.model_dump_json().encode(),
                                content_type="application/json", headers={"x-request-id": rid})

        self.web_app.router.add_route(method, path, endpoint)

    def _authenticate(self, request: web.Request, rid: str, writes: bool) -> Caller:
        value = request.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "authentication_error", "missing_admin_token",
                           "no admin token: send 'Authorization: Bearer <token>'")
        digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        found: _Token | None = None
        for candidate in self._tokens:  # all of them, whatever matches: the time taken never depends on which
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate
        if found is None:
            raise ApiError(401, "authentication_error", "invalid_admin_token", "the admin token is not valid")
        if writes and found.role != "admin":
            raise ApiError(403, "permission_error", "read_only_token",
                           f"admin token {found.id!r} may only read ({request.method} needs role admin)")
        return Caller(found.id, rid)

    @staticmethod
    async def _body(request: web.Request, model: type[M]) -> M:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, "invalid_request_error", "request_too_large",
                           f"request body is larger than the {request.app._client_max_size} byte limit") from exc
        try:
            data = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "invalid_request_error", "invalid_json", f"request body is not valid JSON: {exc}") \
                from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _unprocessable(exc) from None

    async def _changed(self, caller: Caller, action: str, target: str, version: int, before: Any,
                       after: Any) -> None:
        """After a committed change: apply it here, log it, publish the audit record."""
        record = {"actor": caller.token_id, "action": action, "target": target, "version": version,
                  "before": before, "after": after, "request_id": caller.request_id}
        log.info("admin change: %s %s by %s (version %d)", action, target, caller.token_id, version,
                 extra={"admin_audit": record})
        self.runtime.audit(record)
        await self.runtime.refresh()

    def _yaml_app(self, app_id: str) -> bool:
        return any(a.id == app_id for a in self.runtime.file_config().apps)

    async def _api_app(self, app_id: str) -> ManagedApp:
        state = await self.store.state()
        app = state.apps.get(app_id)
        if app is None:
            if self._yaml_app(app_id):
                raise _read_only(f"app {app_id!r}")
            raise _not_found(f"no app {app_id!r}")
        return app

    def _check_llms(self, ids: list[str], field: str) -> None:
        known = {llm.id for llm in self.runtime.file_config().llms}
        for i, llm_id in enumerate(ids):
            if llm_id != "*" and llm_id not in known:
                raise ApiError(422, "invalid_request_error", "unknown_llm", f"{field}[{i}]: unknown LLM {llm_id!r}",
                               f"{field}[{i}]")

    # -- routes ----------------------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        r = self._route
        r("GET", "/v1/openapi.json", self._get_openapi, "This document (OpenAPI 3.1).")
        r("GET", "/v1/status", self._status, "The state's version and the version each tap worker runs.",
          response=m.Status)
        r("GET", "/v1/apps", self._list_apps, "Every app (from the file and from the API).", response=m.AppList)
        r("POST", "/v1/apps", self._create_app, "Create an app.", body=m.AppCreate, response=m.App, status=201)
        r("GET", "/v1/apps/{app_id}", self._get_app, "One app.", response=m.App)
        r("PATCH", "/v1/apps/{app_id}", self._update_app, "Change an app's name, allowed LLMs, metadata or "
          "enabled flag.", body=m.AppUpdate, response=m.App)
        r("DELETE", "/v1/apps/{app_id}", self._delete_app, "Delete an app with its keys and budgets.", status=204)
        r("GET", "/v1/apps/{app_id}/keys", self._list_keys, "The app's keys (prefixes, never secrets).",
          response=m.KeyList)
        r("POST", "/v1/apps/{app_id}/keys", self._issue_key, "Issue a key; the secret is in this answer only.",
          response=m.IssuedKey, status=201)
        r("DELETE", "/v1/apps/{app_id}/keys/{key_id}", self._revoke_key, "Revoke a key at once.", response=m.Key)
        r("POST", "/v1/apps/{app_id}/keys/{key_id}/rotate", self._rotate_key, "Issue a successor; the old key "
          "stays valid for overlap_s.", body=m.KeyRotate, response=m.RotatedKey, status=201)
        r("GET", "/v1/apps/{app_id}/budgets", self._list_budgets, "The app's budgets and current spend.",
          response=m.BudgetList, query=(("llm_id", "Only the spend of this LLM's budgets."),))
        r("PUT", "/v1/apps/{app_id}/budgets", self._set_budget, "Create or replace the app's budget for "
          "(llm_id, period).", body=m.BudgetSet, response=m.Budget)
        r("DELETE", "/v1/apps/{app_id}/budgets", self._delete_budget, "Delete one of the app's budgets.",
          status=204, query=(("period", "monthly (default) or daily."),
                             ("llm_id", "The LLM of an app x LLM budget (default: the app-wide one).")))
        r("GET", "/v1/budgets", self._all_budgets, "Every budget.", response=m.BudgetList)
        r("GET", "/v1/plugins", self._list_plugins, "Each plugin's effective config.", response=m.PluginList)
        r("GET", "/v1/plugins/{name}", self._get_plugin, "One plugin's effective config and schema.",
          response=m.Plugin)
        r("PUT", "/v1/plugins/{name}/config", self._set_plugin_config, "Replace a plugin's config (validated "
          "against its config_schema; requests in flight finish with the old one).", body=m.PluginConfigSet,
          response=m.Plugin)
        r("DELETE", "/v1/plugins/{name}/config", self._reset_plugin_config, "Back to the file's config.",
          response=m.Plugin)
        r("GET", "/v1/llms", self._list_llms, "The LLMs (ids, vendor, prices; never upstream secrets).",
          response=m.LLMList)

    async def _get_openapi(self, request: web.Request, caller: Caller) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def _status(self, request: web.Request, caller: Caller) -> BaseModel:
        taps = await self.store.taps()
        return m.Status(version=await self.store.version(), applied_version=self.runtime.applied_version(),
                        taps=[m.TapState(gateway_id=t.gateway_id, worker=t.worker, pid=t.pid, version=t.version,
                                         seen_at=m.datetime_of(t.seen_s)) for t in taps])

    # apps

    @staticmethod
    def _app_out(app: ManagedApp) -> m.App:
        return m.App(id=app.id, name=app.name, allowed_llms=list(app.allowed_llms), metadata=dict(app.metadata),
                     enabled=app.enabled, source="api", created_at=m.at(app.created_s),
                     updated_at=m.at(app.updated_s))

    async def _list_apps(self, request: web.Request, caller: Caller) -> BaseModel:
        state = await self.store.state()
        out = [m.App(id=a.id, name=a.name, allowed_llms=a.allowed_llms, metadata={}, enabled=True, source="yaml")
               for a in self.runtime.file_config().apps]
        out += [self._app_out(a) for a in state.apps.values()]
        return m.AppList(data=out)

    async def _get_app(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        for a in self.runtime.file_config().apps:
            if a.id == app_id:
                return m.App(id=a.id, name=a.name, allowed_llms=a.allowed_llms, metadata={}, enabled=True,
                             source="yaml")
        app = (await self.store.state()).apps.get(app_id)
        if app is None:
            raise _not_found(f"no app {app_id!r}")
        return self._app_out(app)

    async def _create_app(self, request: web.Request, caller: Caller) -> BaseModel:
        body = await self._body(request, m.AppCreate)
        if self._yaml_app(body.id):
            raise ApiError(409, "invalid_request_error", "declared_in_file",
                           f"app {body.id!r} is declared in the configuration file")
        self._check_llms(body.allowed_llms, "allowed_llms")
        app, version = await self.store.create_app(body.id, body.name, body.allowed_llms, body.metadata,
                                                   body.enabled)
        await self._changed(caller, "app.create", f"apps/{app.id}", version, None, app_view(app))
        return self._app_out(app)

    async def _update_app(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.AppUpdate)
        await self._api_app(app_id)
        changes = body.model_dump(exclude_none=True)
        if "allowed_llms" in changes:
            self._check_llms(changes["allowed_llms"], "allowed_llms")
        (before, after), version = await self.store.update_app(app_id, changes)
        await self._changed(caller, "app.update", f"apps/{app_id}", version, app_view(before), app_view(after))
        return self._app_out(after)

    async def _delete_app(self, request: web.Request, caller: Caller) -> None:
        app_id = request.match_info["app_id"]
        await self._api_app(app_id)
        before, version = await self.store.delete_app(app_id)
        await self._changed(caller, "app.delete", f"apps/{app_id}", version, app_view(before), None)

    # keys

    @staticmethod
    def _key_out(key: ManagedKey, now_s: float) -> m.Key:
        created = m.at(key.created_s)
        assert created is not None
        return m.Key(id=key.id, app_id=key.app_id, prefix=key.prefix, state=key.state(now_s),  # type: ignore[arg-type]
                     created_at=created, expires_at=m.at(key.expires_s), revoked_at=m.at(key.revoked_s),
                     last_used_at=m.at(key.last_used_s))

    def _issued(self, key: ManagedKey, secret: str) -> m.IssuedKey:
        return m.IssuedKey(**self._key_out(key, self.store.clock()).model_dump(), key=secret)

    async def _list_keys(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        await self._api_app(app_id)
        now = self.store.clock()
        return m.KeyList(data=[self._key_out(k, now) for k in await self.store.keys(app_id)])

    async def _issue_key(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        await self._body(request, m.Request)  # no fields: only an empty object (or nothing) is accepted
        await self._api_app(app_id)
        (key, secret), version = await self.store.issue_key(app_id)
        await self._changed(caller, "key.issue", f"apps/{app_id}/keys/{key.id}", version, None, key_view(key))
        return self._issued(key, secret)

    async def _revoke_key(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id, key_id = request.match_info["app_id"], request.match_info["key_id"]
        await self._api_app(app_id)
        (before, after), version = await self.store.revoke_key(app_id, key_id)
        await self._changed(caller, "key.revoke", f"apps/{app_id}/keys/{key_id}", version, key_view(before),
                            key_view(after))
        return self._key_out(after, self.store.clock())

    async def _rotate_key(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id, key_id = request.match_info["app_id"], request.match_info["key_id"]
        body = await self._body(request, m.KeyRotate)
        await self._api_app(app_id)
        (old, new, secret), version = await self.store.rotate_key(app_id, key_id, body.overlap_s)
        await self._changed(caller, "key.rotate", f"apps/{app_id}/keys/{key_id}", version, None,
                            {"previous": key_view(old), "issued": key_view(new)})
        return m.RotatedKey(previous=self._key_out(old, self.store.clock()), issued=self._issued(new, secret))

    # budgets

    def _budgets(self, app_id: str | None, api: tuple[BudgetSettings, ...]) -> list[m.Budget]:
        out = [m.Budget(settings=b, source="yaml") for b in self.runtime.file_config().budgets
               if app_id is None or b.app_id == app_id]
        out += [m.Budget(settings=b, source="api") for b in api if app_id is None or b.app_id == app_id]
        return out

    async def _list_budgets(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        state = await self.store.state()
        if app_id not in state.apps and not self._yaml_app(app_id):
            raise _not_found(f"no app {app_id!r}")
        llm_id = request.query.get("llm_id") or None
        return m.BudgetList(data=self._budgets(app_id, state.budgets),
                            spend=self.runtime.budget_report(app_id, llm_id))

    async def _all_budgets(self, request: web.Request, caller: Caller) -> BaseModel:
        return m.BudgetList(data=self._budgets(None, (await self.store.state()).budgets))

    async def _set_budget(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.BudgetSet)
        try:
            budget = BudgetSettings(app_id=app_id, **body.model_dump())
        except ValidationError as exc:
            raise _unprocessable(exc) from None
        if budget.llm_id is not None:
            self._check_llms([budget.llm_id], "llm_id")
        if any(b.key == budget.key for b in self.runtime.file_config().budgets):
            raise _read_only(f"the {budget.period} budget of {budget.key.rsplit(':', 1)[0]!r}")
        await self._api_app(app_id)
        before, version = await self.store.set_budget(budget)
        await self._changed(caller, "budget.set", f"apps/{app_id}/budgets/{budget.key}", version,
                            before.model_dump() if before else None, budget.model_dump())
        return m.Budget(settings=budget, source="api")

    async def _delete_budget(self, request: web.Request, caller: Caller) -> None:
        app_id = request.match_info["app_id"]
        period = request.query.get("period", "monthly")
        if period not in ("monthly", "daily"):
            raise ApiError(422, "invalid_request_error", "validation_error",
                           f"period: expected 'monthly' or 'daily', got {period!r}", "period")
        llm_id = request.query.get("llm_id") or None
        key = f"{app_id}{'/' + llm_id if llm_id else ''}:{period}"
        if any(b.key == key for b in self.runtime.file_config().budgets):
            raise _read_only(f"the {period} budget of {key.rsplit(':', 1)[0]!r}")
        before, version = await self.store.delete_budget(app_id, llm_id, period)
        await self._changed(caller, "budget.delete", f"apps/{app_id}/budgets/{key}", version, before.model_dump(),
                            None)

    # plugins

    def _plugin_out(self, name: str, api_configs: Mapping[str, Mapping[str, Any]]) -> m.Plugin:
        for p in self.runtime.file_config().plugins:
            if p.name == name:
                config = api_configs.get(name)
                return m.Plugin(name=p.name, use=p.use, enabled=p.enabled, llms=p.llms, order=p.order,
                                config=dict(config) if config is not None else p.config,
                                config_source="api" if config is not None else "yaml",
                                config_schema=_config_schema(p.use))
        raise _not_found(f"no plugin {name!r} in the configuration file")

    async def _list_plugins(self, request: web.Request, caller: Caller) -> BaseModel:
        configs = (await self.store.state()).plugin_configs
        return m.PluginList(data=[self._plugin_out(p.name, configs) for p in self.runtime.file_config().plugins])

    async def _get_plugin(self, request: web.Request, caller: Caller) -> BaseModel:
        return self._plugin_out(request.match_info["name"], (await self.store.state()).plugin_configs)

    async def _set_plugin_config(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        body = await self._body(request, m.PluginConfigSet)
        plugin = next((p for p in self.runtime.file_config().plugins if p.name == name), None)
        if plugin is None:
            raise _not_found(f"no plugin {name!r} in the configuration file")
        candidate = plugin.model_copy(update={"config": body.config})
        problems = validate_plugin_configs([candidate])
        if problems:
            first = problems[0].removeprefix("plugins[0].")
            raise ApiError(422, "invalid_request_error", "invalid_plugin_config",
                           "; ".join(p.removeprefix("plugins[0].") for p in problems),
                           first.split(":", 1)[0])
        before, version = await self.store.set_plugin_config(name, body.config)
        await self._changed(caller, "plugin.config.set", f"plugins/{name}", version,
                            dict(before) if before is not None else plugin.config, body.config)
        return self._plugin_out(name, {name: body.config})

    async def _reset_plugin_config(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        if not any(p.name == name for p in self.runtime.file_config().plugins):
            raise _not_found(f"no plugin {name!r} in the configuration file")
        before, version = await self.store.delete_plugin_config(name)
        await self._changed(caller, "plugin.config.reset", f"plugins/{name}", version, dict(before), None)
        return self._plugin_out(name, {})

    async def _list_llms(self, request: web.Request, caller: Caller) -> BaseModel:
        return m.LLMList(data=[m.LLM(id=llm.id, vendor=llm.vendor, currency=llm.currency, prices=llm.prices,
                                     timeouts=llm.timeouts) for llm in self.runtime.file_config().llms])


def _unprocessable(exc: ValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    param = key_path(loc)
    messages = []
    for err in errors:
        where = key_path(tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        messages.append(f"{where}: {err['msg']}")
    return ApiError(422, "invalid_request_error", "validation_error", "; ".join(messages), param)


def _config_schema(use: str) -> dict[str, Any] | None:
    """The plugin class's ``config_schema()`` (None when it declares none or cannot be imported here)."""
    try:
        schema = getattr(resolve_class(use)(), "config_schema", None)
        return dict(schema()) if callable(schema) else None
    except Exception:  # the file's plugins loaded at start; a failure here only leaves the schema out
        return None
