"""The admin HTTP API: apps, keys, budgets, plugins and LLMs, on its own listener.

Every call needs ``Authorization: Bearer <admin token>``: the token's sha256 is compared in
constant time with every configured one (``tap.admin.tokens``); a ``read`` token may only
GET; a refused call is logged (never the token) and counted. A change is validated exactly as
each worker will apply it (:mod:`gateway_tap.admin.state`'s entry checks with the YAML's
models; for a plugin also its own checks and ``initialize``, tried on a fresh instance) and
answered 422 naming the field before anything is stored; then it is written in one transaction
that bumps the state's version (:class:`~gateway_tap.admin.store.AdminStore`), applied by this
worker before the answer (the others follow within ``poll_interval_s``), logged and published
as an audit record on the control topic. Entries declared in the YAML file are read-only here
(409), a file plugin's config excepted. Every answer is JSON with a request id made here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
import uuid_utils
from aiohttp import web
from pydantic import BaseModel

from gateway_tap.admin import models as m
from gateway_tap.admin.metrics import AdminMetrics
from gateway_tap.admin.openapi import Route, openapi_document
from gateway_tap.admin.state import (
    EntryError,
    ManagedApp,
    ManagedKey,
    app_entry,
    budget_entry,
    budget_entry_path,
    key_rate_limit_entry,
    plugin_allowed,
    plugin_config_entry,
    plugin_entry,
    rate_limit_entry,
    validated,
)
from gateway_tap.admin.store import AdminStore, Conflict, NotFound, app_view, key_view
from gateway_tap.budgets.store import BudgetStoreError, StoreUnavailable
from gateway_tap.plugins.loader import resolve_class
from gateway_tap.settings import (
    AdminSettings,
    AdminTokenSettings,
    BudgetSettings,
    GatewayConfig,
    PluginConfig,
    RateLimitSettings,
)
from gateway_tap.settings.base import ID_PATTERN, is_id
from gateway_tap.settings.extension import declared_schema

log = logging.getLogger("gateway_tap.admin")

M = TypeVar("M", bound=BaseModel)

CLIENT_REQUEST_ID_MAX = 128
"""A caller's own ``x-request-id`` is kept in the audit record (``client_request_id``) up to this length, when
it is printable ASCII; the request id of every answer is made by the API."""
REFUSED_LOG_LINES = 10
"""Refused calls logged per :data:`REFUSED_LOG_WINDOW_S`; the rest are counted in the next line (and the metric)."""
REFUSED_LOG_WINDOW_S = 10.0
_PATH_IDS = ("app_id", "key_id", "name")
_CLIENT_ID = re.compile(rf"[\x21-\x7e]{{1,{CLIENT_REQUEST_ID_MAX}}}")
_REQUEST_ID = web.RequestKey("admin_request_id", str)


class AdminRuntime(Protocol):
    """What the API needs from the tap worker serving it (:mod:`gateway_tap.proxy.admin_link`)."""

    def file_config(self) -> GatewayConfig:
        """The YAML file's configuration in force (without the API's state)."""

    def applied_version(self) -> int:
        """The state version this worker runs."""

    async def refresh(self) -> None:
        """Apply the newest state in this worker now."""

    async def check_plugin(self, plugin: PluginConfig) -> list[str]:
        """The problems of loading ``plugin`` as a worker would (its checks, schema and ``initialize``, on a fresh
        instance), by key path (``plugins[0]...``); empty when it loads."""

    def budget_report(self, app_id: str, llm_id: str | None, key_id: str | None = None) -> dict[str, Any] | None:
        """What ``GET /budget`` shows for the app, and for its key ``key_id`` (None when this tap enforces no
        budget)."""

    def audit(self, record: Mapping[str, Any]) -> None:
        """Publish one audit record (control topic)."""


class ApiError(Exception):
    """Answered as an OpenAI-style error body."""

    def __init__(self, status: int, type_: str, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.message, self.param = status, type_, code, message, param


_ENTRY_STATUS = {"declared_in_file": 409, "not_found": 404}


def _entry_error(exc: EntryError) -> ApiError:
    status = _ENTRY_STATUS.get(exc.code, 422)
    type_ = "not_found_error" if status == 404 else "invalid_request_error"
    return ApiError(status, type_, exc.code, exc.message, exc.param)


def new_request_id() -> str:
    """The request id of an admin answer (``adm_`` + a UUIDv7: sortable by time)."""
    return "adm_" + uuid_utils.uuid7().hex


def shown(text: str, limit: int = 200) -> str:
    """``text`` safe for a log line: bounded, control and non-printing characters escaped."""
    cut = text[:limit]
    return (cut if cut.isprintable() else repr(cut)[1:-1]) + ("..." if len(text) > limit else "")


def _error_response(exc: ApiError, request_id: str) -> web.Response:
    body = {"error": {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param,
                      "request_id": request_id}}
    return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/json",
                        headers={"x-request-id": request_id})


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
    """Gives every call its request id, and turns every error into the API's JSON errors: aiohttp's own (unknown
    path 404, wrong method 405) and anything unexpected (500, logged with its traceback, never plain text)."""
    rid = request[_REQUEST_ID] = new_request_id()
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            error = _not_found(f"no route for {shown(request.path)}")
        elif exc.status == 405:
            error = ApiError(405, "invalid_request_error", "method_not_allowed",
                             f"{shown(request.method, 20)} is not allowed on {shown(request.path)}")
        else:
            error = ApiError(exc.status, "invalid_request_error", "http_error", exc.reason)
        return _error_response(error, rid)
    except Exception:
        log.exception("admin call failed: %s %s (request id %s)", shown(request.method, 20), shown(request.path), rid)
        return _error_response(ApiError(500, "api_error", "internal_error",
                                        "the call failed; the tap's log has the details (search its request id)"),
                               rid)


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
        if digest is None:  # `serve` and `check-config` refuse this before a worker starts
            raise ValueError(f"admin token {t.id!r}: ${t.token_env} is not set (or empty) in the environment")
        out.append(_Token(t.id, t.role, digest))
    return out


class _RefusedLog:
    """Logs refused calls, at most :data:`REFUSED_LOG_LINES` per window (a flood of bad tokens must not flood
    the log); the lines not written are counted in the next one."""

    def __init__(self) -> None:
        self._window_s = 0.0
        self._lines = 0
        self._skipped = 0

    def __call__(self, code: str, request: web.Request, rid: str, token_id: str | None = None) -> None:
        now = time.monotonic()
        if now - self._window_s >= REFUSED_LOG_WINDOW_S:
            self._window_s, self._lines = now, 0
        if self._lines >= REFUSED_LOG_LINES:
            self._skipped += 1
            return
        self._lines += 1
        skipped, self._skipped = self._skipped, 0
        log.warning("admin call refused: %s: %s %s from %s%s (request id %s)%s", code, shown(request.method, 20),
                    shown(request.path), request.remote or "?", f" with token {token_id!r}" if token_id else "",
                    rid, f"; {skipped} more refused calls were not logged" if skipped else "",
                    extra={"code": code, "remote": request.remote, "token_id": token_id, "request_id": rid})


Handler = Callable[[web.Request, "Caller"], Awaitable[BaseModel | web.Response | None]]


@dataclass(frozen=True)
class Caller:
    token_id: str
    request_id: str
    client_request_id: str | None = None
    """The caller's own ``x-request-id`` when it was printable ASCII of at most 128 characters."""


class AdminAPI:
    """The aiohttp application of the admin API (``web_app``)."""

    def __init__(self, settings: AdminSettings, store: AdminStore, runtime: AdminRuntime,
                 metrics: AdminMetrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.metrics = metrics
        self._tokens = _tokens(settings.tokens)
        self._refused = _RefusedLog()
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
            rid = request[_REQUEST_ID]
            try:
                caller = self._authenticate(request, rid, writes)
                for name in _PATH_IDS:
                    value = request.match_info.get(name)
                    if value is not None and not is_id(value):
                        raise ApiError(422, "invalid_request_error", "invalid_id",
                                       f"{name}: {shown(value, 80)!r} is not an id (1 to 64 letters, digits, '.', "
                                       f"'_' or '-', not starting with '.' or '-': {ID_PATTERN})", name)
                result = await handler(request, caller)
            except ApiError as exc:
                return _error_response(exc, rid)
            except EntryError as exc:
                return _error_response(_entry_error(exc), rid)
            except NotFound as exc:
                return _error_response(_not_found(str(exc)), rid)
            except Conflict as exc:
                return _error_response(ApiError(409, "invalid_request_error", "conflict", str(exc)), rid)
            except StoreUnavailable as exc:
                log.warning("admin call failed: the state database is unavailable: %s", exc)
                return _error_response(ApiError(503, "api_error", "state_store_unavailable",
                                                "the admin state database is unavailable; retry later"), rid)
            except BudgetStoreError:
                log.exception("admin call failed (request id %s)", rid)
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
            raise self._refuse(request, rid, ApiError(401, "authentication_error", "missing_admin_token",
                                                      "no admin token: send 'Authorization: Bearer <token>'"))
        digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        found: _Token | None = None
        for candidate in self._tokens:  # all of them, whatever matches: the time taken never depends on which
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate
        if found is None:
            raise self._refuse(request, rid, ApiError(401, "authentication_error", "invalid_admin_token",
                                                      "the admin token is not valid"))
        if writes and found.role != "admin":
            raise self._refuse(request, rid, ApiError(
                403, "permission_error", "read_only_token",
                f"admin token {found.id!r} may only read ({request.method} needs role admin)"), found.id)
        client_id = request.headers.get("x-request-id")
        return Caller(found.id, rid, client_id if client_id and _CLIENT_ID.fullmatch(client_id) else None)

    def _refuse(self, request: web.Request, rid: str, error: ApiError, token_id: str | None = None) -> ApiError:
        """Log (never the token) and count a refused call; returns the error to answer with."""
        self._refused(error.code, request, rid, token_id)
        if self.metrics is not None:
            self.metrics.auth_failures.labels(error.code).inc()
        return error

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
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request_error", "validation_error",
                           f"(root): expected a JSON object, got {type(data).__name__}", "(root)")
        return validated(model, data)

    async def _changed(self, caller: Caller, action: str, target: str, version: int, before: Any,
                       after: Any) -> None:
        """After a committed change: apply it here, log it, publish the audit record."""
        record = {"actor": caller.token_id, "action": action, "target": target, "version": version,
                  "before": before, "after": after, "request_id": caller.request_id,
                  "client_request_id": caller.client_request_id}
        log.info("admin change: %s %s by %s (version %d)", action, target, caller.token_id, version,
                 extra={"admin_audit": record})
        self.runtime.audit(record)
        await self.runtime.refresh()

    def _yaml_app(self, app_id: str) -> bool:
        return any(a.id == app_id for a in self.runtime.file_config().apps)

    def _llm_ids(self) -> set[str]:
        return {llm.id for llm in self.runtime.file_config().llms}

    async def _api_app(self, app_id: str) -> ManagedApp:
        state = await self.store.state()
        app = state.apps.get(app_id)
        if app is None:
            if self._yaml_app(app_id):
                raise _read_only(f"app {app_id!r}")
            raise _not_found(f"no app {app_id!r}")
        return app

    async def _check_plugin(self, plugin: PluginConfig) -> None:
        """422 naming the field unless ``plugin`` loads as a worker will load it (its own checks included)."""
        problems = await self.runtime.check_plugin(plugin)
        if problems:
            raise ApiError(422, "invalid_request_error", "invalid_plugin_config",
                           "; ".join(p.removeprefix("plugins[0]").lstrip(".") for p in problems),
                           plugin_problem_param(problems[0], plugin.config))

    # -- routes ----------------------------------------------------------------------------------------------

    def _add_routes(self) -> None:
        r = self._route
        r("GET", "/v1/openapi.json", self._get_openapi, "This document (OpenAPI 3.1).")
        r("GET", "/v1/status", self._status, "The state's version, and the version each tap worker runs with the "
          "entries it could not apply.", response=m.Status)
        r("GET", "/v1/apps", self._list_apps, "Every app (from the file and from the API).", response=m.AppList)
        r("POST", "/v1/apps", self._create_app, "Create an app.", body=m.AppCreate, response=m.App, status=201)
        r("GET", "/v1/apps/{app_id}", self._get_app, "One app.", response=m.App)
        r("PATCH", "/v1/apps/{app_id}", self._update_app, "Change an app's name, allowed LLMs, metadata or "
          "enabled flag.", body=m.AppUpdate, response=m.App)
        r("DELETE", "/v1/apps/{app_id}", self._delete_app, "Delete an app with its keys and budgets.", status=204)
        r("GET", "/v1/apps/{app_id}/keys", self._list_keys, "The app's keys (prefixes, never secrets).",
          response=m.KeyList)
        r("POST", "/v1/apps/{app_id}/keys", self._issue_key, "Issue a key (optionally named, expiring, with its own "
          "rate limits); the secret is in this answer only.", body=m.KeyIssue, response=m.IssuedKey, status=201)
        r("PATCH", "/v1/apps/{app_id}/keys/{key_id}", self._update_key, "Change a key's name, expiry or rate "
          "limits.", body=m.KeyUpdate, response=m.Key)
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
        r("GET", "/v1/apps/{app_id}/keys/{key_id}/budgets", self._list_key_budgets, "A key's own budgets and current "
          "spend (with the app's budgets that apply to it).", response=m.BudgetList,
          query=(("llm_id", "Only the spend of this LLM's budgets."),))
        r("PUT", "/v1/apps/{app_id}/keys/{key_id}/budgets", self._set_key_budget, "Create or replace a key's own "
          "budget for (llm_id, period); a rotation's successor keeps it.", body=m.BudgetSet, response=m.Budget)
        r("DELETE", "/v1/apps/{app_id}/keys/{key_id}/budgets", self._delete_key_budget, "Delete one of a key's "
          "budgets.", status=204, query=(("period", "monthly (default) or daily."),
                                         ("llm_id", "The LLM of a key x LLM budget (default: all its LLMs).")))
        r("GET", "/v1/budgets", self._all_budgets, "Every budget.", response=m.BudgetList)
        r("GET", "/v1/apps/{app_id}/rate-limits", self._list_rate_limits, "The app's rate limits (the file's and the "
          "API's).", response=m.RateLimitList)
        r("PUT", "/v1/apps/{app_id}/rate-limits", self._set_rate_limit, "Create or replace the app's rate limits for "
          "(llm_id, model).", body=m.RateLimitSet, response=m.RateLimit)
        r("DELETE", "/v1/apps/{app_id}/rate-limits", self._delete_rate_limit, "Delete one of the app's rate limits.",
          status=204, query=(("llm_id", "The LLM of app x LLM limits (default: the app-wide ones)."),
                             ("model", "The model of app x LLM x model limits.")))
        r("GET", "/v1/plugins", self._list_plugins, "Every plugin (the file's and the API's) with its effective "
          "config.", response=m.PluginList)
        r("POST", "/v1/plugins", self._create_plugin, "Add a plugin instance of an allowed class (an installed entry "
          "point, a class the file's plugins use, or one in tap.admin.allowed_plugins), validated as the file's "
          "plugins are and by its own initialize.", body=PluginConfig, response=m.Plugin, status=201)
        r("GET", "/v1/plugins/{name}", self._get_plugin, "One plugin's effective config and schema.",
          response=m.Plugin)
        r("PATCH", "/v1/plugins/{name}", self._update_plugin, "Enable or disable a plugin created through the API, "
          "attach it to LLMs, set its order, timeout or on_error.", body=m.PluginUpdate, response=m.Plugin)
        r("DELETE", "/v1/plugins/{name}", self._delete_plugin, "Remove a plugin created through the API.",
          status=204)
        r("PUT", "/v1/plugins/{name}/config", self._set_plugin_config, "Replace a plugin's config (validated "
          "against its config_schema and by its own initialize; requests in flight finish with the old one).",
          body=m.PluginConfigSet, response=m.Plugin)
        r("DELETE", "/v1/plugins/{name}/config", self._reset_plugin_config, "A file plugin back to the file's "
          "config.", response=m.Plugin)
        r("GET", "/v1/llms", self._list_llms, "The LLMs (ids, vendor, prices; never upstream secrets).",
          response=m.LLMList)

    async def _get_openapi(self, request: web.Request, caller: Caller) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def _status(self, request: web.Request, caller: Caller) -> BaseModel:
        taps = await self.store.taps()
        return m.Status(version=await self.store.version(), applied_version=self.runtime.applied_version(),
                        taps=[m.TapState(gateway_id=t.gateway_id, worker=t.worker, pid=t.pid, version=t.version,
                                         seen_at=m.datetime_of(t.seen_s),
                                         rejected=[m.RejectedEntry(entry=r.entry, error=r.error) for r in t.rejected])
                              for t in taps])

    # apps

    @staticmethod
    def _app_out(app: ManagedApp) -> m.App:
        return m.App(id=app.id, name=app.name, allowed_llms=list(app.allowed_llms), metadata=dict(app.metadata),
                     enabled=app.enabled, source="api", created_at=m.at(app.created_s),
                     updated_at=m.at(app.updated_s))

    async def _list_apps(self, request: web.Request, caller: Caller) -> BaseModel:
        state = await self.store.state()
        out = [m.App(id=a.id, name=a.name, allowed_llms=a.allowed_llms, metadata=a.metadata, enabled=True,
                     source="yaml") for a in self.runtime.file_config().apps]
        out += [self._app_out(a) for a in state.apps.values()]
        return m.AppList(data=out)

    async def _get_app(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        for a in self.runtime.file_config().apps:
            if a.id == app_id:
                return m.App(id=a.id, name=a.name, allowed_llms=a.allowed_llms, metadata=a.metadata, enabled=True,
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
        app_entry(ManagedApp(body.id, body.name, tuple(body.allowed_llms), body.metadata, body.enabled, 0, 0), [],
                  self._llm_ids())
        app, version = await self.store.create_app(body.id, body.name, body.allowed_llms, body.metadata,
                                                   body.enabled)
        await self._changed(caller, "app.create", f"apps/{app.id}", version, None, app_view(app))
        return self._app_out(app)

    async def _update_app(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.AppUpdate)
        current = await self._api_app(app_id)
        changes = body.model_dump(exclude_none=True)
        app_entry(ManagedApp(app_id, changes.get("name", current.name),
                             tuple(changes.get("allowed_llms", current.allowed_llms)),
                             changes.get("metadata", current.metadata), True, 0, 0), [], self._llm_ids())
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
                     last_used_at=m.at(key.last_used_s), name=key.name,
                     rate_limits=dict(key.rate_limits) if key.rate_limits else None, lineage_id=key.lineage)

    def _issued(self, key: ManagedKey, secret: str) -> m.IssuedKey:
        return m.IssuedKey(**self._key_out(key, self.store.clock()).model_dump(), key=secret)

    async def _list_keys(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        await self._api_app(app_id)
        now = self.store.clock()
        return m.KeyList(data=[self._key_out(k, now) for k in await self.store.keys(app_id)])

    async def _issue_key(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.KeyIssue)
        await self._api_app(app_id)
        now = self.store.clock()
        if body.expires_at is not None and body.expires_in_s is not None:
            raise ApiError(422, "invalid_request_error", "validation_error",
                           "expires_in_s: give expires_at or expires_in_s, not both", "expires_in_s")
        expires_s = (body.expires_at.timestamp() if body.expires_at is not None
                     else now + body.expires_in_s if body.expires_in_s is not None else None)
        if expires_s is not None and expires_s <= now:
            raise ApiError(422, "invalid_request_error", "validation_error", "expires_at: not in the future",
                           "expires_at")
        limits = body.rate_limits.model_dump(exclude_none=True) if body.rate_limits is not None else None
        if limits:
            key_rate_limit_entry("sha256:" + "0" * 64, limits)  # the checks the tap applies to it (422 naming it)
        (key, secret), version = await self.store.issue_key(app_id, name=body.name, expires_s=expires_s,
                                                            rate_limits=limits or None)
        await self._changed(caller, "key.issue", f"apps/{app_id}/keys/{key.id}", version, None, key_view(key))
        return self._issued(key, secret)

    async def _update_key(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id, key_id = request.match_info["app_id"], request.match_info["key_id"]
        body = await self._body(request, m.KeyUpdate)
        await self._api_app(app_id)
        changes: dict[str, Any] = {}
        given = body.model_fields_set
        if "name" in given and body.name is not None:
            changes["name"] = body.name
        if "expires_at" in given:
            changes["expires_s"] = body.expires_at.timestamp() if body.expires_at is not None else None
        if "rate_limits" in given:
            limits = body.rate_limits.model_dump(exclude_none=True) if body.rate_limits is not None else {}
            if limits:
                key_rate_limit_entry("sha256:" + "0" * 64, limits)
            changes["rate_limits"] = limits or None
        (before, after), version = await self.store.update_key(app_id, key_id, changes)
        await self._changed(caller, "key.update", f"apps/{app_id}/keys/{key_id}", version, key_view(before),
                            key_view(after))
        return self._key_out(after, self.store.clock())

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
        return await self._put_budget(request, caller, None)

    async def _set_key_budget(self, request: web.Request, caller: Caller) -> BaseModel:
        return await self._put_budget(request, caller, await self._key_lineage(request))

    async def _put_budget(self, request: web.Request, caller: Caller, key: tuple[str, set[str]] | None) -> BaseModel:
        """An app's budget (``key`` None), or a key's: ``(its lineage id, the app's lineage ids)``."""
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.BudgetSet)
        extra = {"key_id": key[0]} if key is not None else {}
        budget = validated(BudgetSettings, {"app_id": app_id, **body.model_dump(), **extra})
        if any(b.key == budget.key for b in self.runtime.file_config().budgets):
            raise _read_only(f"the {budget.period} budget of {budget.key.rsplit(':', 1)[0]!r}")
        await self._api_app(app_id)
        budget_entry(budget, {app_id}, self._llm_ids(), {app_id: key[1]} if key is not None else None)
        before, version = await self.store.set_budget(budget)
        await self._changed(caller, "budget.set", budget_entry_path(budget), version,
                            before.model_dump() if before else None, budget.model_dump())
        return m.Budget(settings=budget, source="api")

    async def _key_lineage(self, request: web.Request) -> tuple[str, set[str]]:
        """The lineage id of the API app's key in the path (any key of a rotation chain names the chain), and the
        lineage ids of every key of the app (what :func:`budget_entry` checks a key budget against)."""
        app_id, key_id = request.match_info["app_id"], request.match_info["key_id"]
        await self._api_app(app_id)
        keys = await self.store.keys(app_id)
        key = next((k for k in keys if k.id == key_id), None)
        if key is None:
            raise _not_found(f"app {app_id!r} has no key {key_id!r}")
        return key.lineage, {k.lineage for k in keys}

    async def _list_key_budgets(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        lineage, _ = await self._key_lineage(request)
        state = await self.store.state()
        llm_id = request.query.get("llm_id") or None
        return m.BudgetList(data=[m.Budget(settings=b, source="api") for b in state.budgets
                                  if b.app_id == app_id and b.key_id == lineage],
                            spend=self.runtime.budget_report(app_id, llm_id, lineage))

    async def _delete_key_budget(self, request: web.Request, caller: Caller) -> None:
        await self._remove_budget(request, caller, (await self._key_lineage(request))[0])

    # rate limits

    async def _list_rate_limits(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        state = await self.store.state()
        if app_id not in state.apps and not self._yaml_app(app_id):
            raise _not_found(f"no app {app_id!r}")
        out = [m.RateLimit(settings=r, source="yaml") for r in self.runtime.file_config().rate_limits
               if r.app_id == app_id]
        out += [m.RateLimit(settings=r, source="api") for r in state.rate_limits if r.app_id == app_id]
        return m.RateLimitList(data=out)

    async def _set_rate_limit(self, request: web.Request, caller: Caller) -> BaseModel:
        app_id = request.match_info["app_id"]
        body = await self._body(request, m.RateLimitSet)
        limit = validated(RateLimitSettings, {"app_id": app_id, **body.model_dump(exclude_none=True)})
        if any(r.scope == limit.scope for r in self.runtime.file_config().rate_limits):
            raise _read_only(f"the rate limits of {limit.scope}")
        await self._api_app(app_id)
        rate_limit_entry(limit, {app_id}, self._llm_ids())
        _, version = await self.store.set_rate_limit(limit)
        await self._changed(caller, "rate_limit.set", f"apps/{app_id}/rate_limits/{limit.scope}", version, None,
                            limit.model_dump(exclude_none=True))
        return m.RateLimit(settings=limit, source="api")

    async def _delete_rate_limit(self, request: web.Request, caller: Caller) -> None:
        app_id = request.match_info["app_id"]
        llm_id, model = request.query.get("llm_id") or None, request.query.get("model") or None
        if llm_id is not None and not is_id(llm_id):
            raise ApiError(422, "invalid_request_error", "invalid_id", f"llm_id: {shown(llm_id, 80)!r} is not an id",
                           "llm_id")
        if model is not None and llm_id is None:
            raise ApiError(422, "invalid_request_error", "validation_error", "model: needs llm_id", "model")
        scope = f"app={app_id}" + (f",llm={llm_id}" if llm_id else "") + (f",model={model}" if model else "")
        if any(r.scope == scope for r in self.runtime.file_config().rate_limits):
            raise _read_only(f"the rate limits of {scope}")
        _, version = await self.store.delete_rate_limit(app_id, scope)
        await self._changed(caller, "rate_limit.delete", f"apps/{app_id}/rate_limits/{scope}", version, scope, None)

    async def _delete_budget(self, request: web.Request, caller: Caller) -> None:
        await self._remove_budget(request, caller, None)

    async def _remove_budget(self, request: web.Request, caller: Caller, key_id: str | None) -> None:
        """Delete an app's budget (``key_id`` None) or a key's (its lineage id)."""
        app_id = request.match_info["app_id"]
        period = request.query.get("period", "monthly")
        if period not in ("monthly", "daily"):
            raise ApiError(422, "invalid_request_error", "validation_error",
                           f"period: expected 'monthly' or 'daily', got {shown(period, 40)!r}", "period")
        llm_id = request.query.get("llm_id") or None
        if llm_id is not None and not is_id(llm_id):
            raise ApiError(422, "invalid_request_error", "invalid_id", f"llm_id: {shown(llm_id, 80)!r} is not an id",
                           "llm_id")
        if key_id is None:
            key = f"{app_id}{'/' + llm_id if llm_id else ''}:{period}"
            if any(b.key == key for b in self.runtime.file_config().budgets):
                raise _read_only(f"the {period} budget of {key.rsplit(':', 1)[0]!r}")
        before, version = await self.store.delete_budget(app_id, llm_id, period, key_id)
        await self._changed(caller, "budget.delete", budget_entry_path(before), version, before.model_dump(), None)

    # plugins

    def _file_plugin(self, name: str) -> PluginConfig | None:
        return next((p for p in self.runtime.file_config().plugins if p.name == name), None)

    def _plugin_out(self, plugin: PluginConfig, source: m.Source, config_source: m.Source) -> m.Plugin:
        # A stored entry naming a class nobody allowed (written by hand) is listed, never imported for its schema.
        allowed = plugin_allowed(plugin.use, self.runtime.file_config())
        return m.Plugin(name=plugin.name, use=plugin.use, enabled=plugin.enabled, llms=plugin.llms,
                        order=plugin.order, timeout_ms=plugin.timeout_ms, on_error=plugin.on_error,
                        config=plugin.config, source=source, config_source=config_source,
                        config_schema=_config_schema(plugin.use) if allowed else None)

    async def _plugins(self) -> list[m.Plugin]:
        state = await self.store.state()
        out = []
        for p in self.runtime.file_config().plugins:
            config = state.plugin_configs.get(p.name)
            shown_config = p if config is None else p.model_copy(update={"config": dict(config)})
            out.append(self._plugin_out(shown_config, "yaml", "yaml" if config is None else "api"))
        file_names = {p.name for p in out}
        out += [self._plugin_out(p, "api", "api") for p in state.plugins.values() if p.name not in file_names]
        return out

    async def _list_plugins(self, request: web.Request, caller: Caller) -> BaseModel:
        return m.PluginList(data=await self._plugins())

    async def _get_plugin(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        for plugin in await self._plugins():
            if plugin.name == name:
                return plugin
        raise _not_found(f"no plugin {name!r}")

    async def _api_plugin(self, name: str) -> PluginConfig:
        if self._file_plugin(name) is not None:
            raise _read_only(f"plugin {name!r} (its config excepted: PUT /v1/plugins/{name}/config)")
        plugin = (await self.store.state()).plugins.get(name)
        if plugin is None:
            raise _not_found(f"no plugin {name!r}")
        return plugin

    async def _create_plugin(self, request: web.Request, caller: Caller) -> BaseModel:
        plugin = await self._body(request, PluginConfig)
        plugin_entry(plugin, self.runtime.file_config())  # before anything is imported: only allowed classes
        if plugin.name in (await self.store.state()).plugins:
            raise ApiError(409, "invalid_request_error", "conflict", f"plugin {plugin.name!r} already exists")
        await self._check_plugin(plugin)
        created, version = await self.store.create_plugin(plugin)
        await self._changed(caller, "plugin.create", f"plugins/{plugin.name}", version, None, created.model_dump())
        return self._plugin_out(created, "api", "api")

    async def _update_plugin(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        body = await self._body(request, m.PluginUpdate)
        current = await self._api_plugin(name)
        plugin = validated(PluginConfig, {**current.model_dump(), **body.model_dump(exclude_none=True)})
        await self._replace_plugin(caller, current, plugin, "plugin.update")
        return self._plugin_out(plugin, "api", "api")

    async def _replace_plugin(self, caller: Caller, current: PluginConfig, plugin: PluginConfig, action: str) -> None:
        plugin_entry(plugin, self.runtime.file_config())
        await self._check_plugin(plugin)
        before, version = await self.store.replace_plugin(plugin, current)
        await self._changed(caller, action, f"plugins/{plugin.name}", version, before.model_dump(),
                            plugin.model_dump())

    async def _delete_plugin(self, request: web.Request, caller: Caller) -> None:
        name = request.match_info["name"]
        await self._api_plugin(name)
        before, version = await self.store.delete_plugin(name)
        await self._changed(caller, "plugin.delete", f"plugins/{name}", version, dict(before), None)

    async def _set_plugin_config(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        body = await self._body(request, m.PluginConfigSet)
        if self._file_plugin(name) is None:
            current = (await self.store.state()).plugins.get(name)
            if current is None:
                raise _not_found(f"no plugin {name!r}")
            plugin = validated(PluginConfig, {**current.model_dump(), "config": body.config})
            await self._replace_plugin(caller, current, plugin, "plugin.config.set")
            return self._plugin_out(plugin, "api", "api")
        plugin = plugin_config_entry(name, body.config, self.runtime.file_config())
        await self._check_plugin(plugin)
        before, version = await self.store.set_plugin_config(name, body.config)
        file_plugin = self._file_plugin(name)
        await self._changed(caller, "plugin.config.set", f"plugins/{name}", version,
                            dict(before) if before is not None else file_plugin and file_plugin.config, body.config)
        return self._plugin_out(plugin, "yaml", "api")

    async def _reset_plugin_config(self, request: web.Request, caller: Caller) -> BaseModel:
        name = request.match_info["name"]
        plugin = self._file_plugin(name)
        if plugin is None:
            if name in (await self.store.state()).plugins:
                raise ApiError(409, "invalid_request_error", "conflict",
                               f"plugin {name!r} was created through the API and has no file config to go back to; "
                               "PUT its config instead")
            raise _not_found(f"no plugin {name!r}")
        before, version = await self.store.delete_plugin_config(name)
        await self._changed(caller, "plugin.config.reset", f"plugins/{name}", version, dict(before), None)
        return self._plugin_out(plugin, "yaml", "yaml")

    async def _list_llms(self, request: web.Request, caller: Caller) -> BaseModel:
        return m.LLMList(data=[m.LLM(id=llm.id, vendor=llm.vendor, currency=llm.currency, prices=llm.prices,
                                     timeouts=llm.timeouts) for llm in self.runtime.file_config().llms])


_LEADING_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\[\d+\]|\.[A-Za-z_][\w-]*)*")


def plugin_problem_param(problem: str, config: Mapping[str, Any]) -> str:
    """The field a plugin load problem names, as a request ``param``: ``plugins[0].config.patterns: ...`` ->
    ``config.patterns``; when the plugin's ``initialize`` refused its config (``plugins[0].config: <its message>``)
    and the message starts with a path into the config (``patterns[0] is not ...``), that path."""
    rest = re.sub(r"^plugins\[0\](?: \([^)]*\))?\.?", "", problem)
    path, _, message = rest.partition(": ")
    if path == "config" and (match := _LEADING_PATH.match(message)) and _resolves(config, match.group(0)):
        return f"config.{match.group(0)}"
    return path or "(root)"


def _resolves(value: Any, path: str) -> bool:
    for part in re.findall(r"\[(\d+)\]|([^.\[\]]+)", path):
        index, key = part
        if index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        elif key and isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return False
    return True


def _config_schema(use: str) -> dict[str, Any] | None:
    """The JSON Schema the tap validates the plugin's config against (:func:`declared_schema`: its ``Config``
    model's, else its ``config_schema`` dict or method), or None when it declares none or cannot be imported here."""
    try:
        return declared_schema(resolve_class(use))
    except Exception:  # the plugins loaded (or were checked) already; a failure here only leaves the schema out
        return None
