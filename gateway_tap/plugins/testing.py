"""A test harness for plugin authors: run a plugin's hooks on a constructed request, without a server.

```python
async with PluginHarness("my_pkg.plugin:MyPlugin", {"header": "x-mine"}) as h:
    sent = await h.request(json={"model": "gpt-4o-mini", "messages": []}, app_id="demo")
    assert sent.stopped is None and sent.metadata == {"my_plugin": "seen"}
    got = await h.response(sent, headers={"content-type": "application/json"}, body=b"{}")
    assert got.headers["x-mine"] == "on"
```

The plugin is loaded exactly as the tap loads it (:func:`load_plugins`: ``use`` is
``module:Class`` or an entry point name of group ``gateway_tap.plugins``, the config is
validated against the plugin's schema, ``initialize`` is awaited, ``close`` on exit) and
its hooks run through the tap's own hook engine (:mod:`gateway_tap.plugins.chain`: the
same timeout, ``on_error``, order and interpretation of every ``HookResult``): pre-auth,
auth, post-auth, then response headers and each body chunk. Where the tap would answer
with an error, the outcome records it instead (``stopped`` / ``stopped_by``); a
fail-closed hook that raises or times out raises :class:`HookFailed` in the test.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from gateway_tap.apps import AppIndex
from gateway_tap.hooks import HookResult, StreamEvent, TapRequest, TapResponse
from gateway_tap.plugins.chain import (
    Chain,
    HookMetrics,
    RequestScope,
    Stopped,
    build_chains,
    parse_request_json,
    run_auth_hooks,
    run_body_hooks,
    run_chunk_end,
    run_chunk_hooks,
    run_request_hooks,
    run_response_header_hooks,
)
from gateway_tap.plugins.endpoints import (
    EndpointBrokeOff,
    EndpointFailed,
    EndpointRoutes,
    NoEndpoint,
    call_endpoint,
    endpoint_context,
    identify,
    track_response_start,
)
from gateway_tap.plugins.loader import LoadedPlugin, close_plugins, load_plugins
from gateway_tap.plugins.sse import EventReader, EventRelay
from gateway_tap.services import BudgetStatusFn, Gateway, new_control_message
from gateway_tap.settings import AppConfig, LLMConfig, PluginConfig
from schemas import ControlMessage

_ids = itertools.count(1)


@dataclass
class RequestOutcome:
    """The request after the request hooks ran.

    :ivar request: the request as it would be forwarded upstream (headers and body after the hooks).
    :ivar stopped: the ``HookResult.stop`` that ended the request, if any; :attr:`stopped_by` names the plugin.
    :ivar scope: request id, app, user, model, the shared metadata and each plugin's ``ctx.state``; pass the
        outcome to :meth:`response`.
    :ivar served: the ``HookResult.respond`` of a hook that answered instead of the upstream (the tap would
        run the response hooks on it: ``await h.response(sent, status=served.status, body=served.body)``).
    """

    request: TapRequest
    scope: RequestScope
    stopped: HookResult | None = None
    stopped_by: str | None = None
    served: HookResult | None = None

    @property
    def metadata(self) -> dict[str, str]:
        """Tags the hooks added; the tap puts them in ``proxy_log.metadata`` and ``analytics.tags``."""
        return self.scope.metadata


@dataclass
class ResponseOutcome:
    """The response after the response hooks ran: what the client would receive.

    :ivar stopped: the ``HookResult.stop`` that replaced the answer (or ended the stream), if any.
    """

    status: int
    headers: CIMultiDict[str]
    chunks: list[bytes]
    stopped: HookResult | None = None
    stopped_by: str | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def events(self) -> list[StreamEvent]:
        """The body parsed as server-sent events (for a streamed response)."""
        reader = EventReader()
        found = [*reader.feed(self.body), *reader.flush()]
        return [e for e in found if isinstance(e, StreamEvent)]


class PluginHarness:
    """Drives one plugin in-process, as configured under ``plugins:`` in the tap's config.

    :param use: ``module:Class`` or an entry point name in group ``gateway_tap.plugins`` (a class object
        defined at module level is accepted too).
    :param config: the plugin's ``config`` (validated against its schema; raises :class:`PluginLoadError`).
    :param name: the plugin's ``name`` (``ctx.plugin``, ``blocked_by``).
    :param llm_id: the LLM the requests go to; :param vendor: its vendor (``openai`` or ``anthropic``).
    :param apps: apps known to ``services.gateway`` (``get_app``, ``list_apps``, ``validate_credential``) and
        to the key check of :meth:`endpoint_client`.
    :param llms: LLMs known to ``services.gateway`` (``get_llm``, ``list_llms``, ``price_for``).
    :param budget_status: what ``services.gateway.budget_status(app_id, llm_id)`` answers: a mapping of app
        id to its report (:attr:`budget_status` may be changed between calls), or an ``async def (app_id,
        llm_id)`` for answers per LLM; None (default) answers None, as a tap without budgets does. The tap's
        reports are what ``GET /budget`` answers: ``{"app_id", "llm_id", "enforced", "store_available",
        "budgets": [{"period", "limit_usd", "spent_usd", "percent_used", "exceeded", ...}]}``.
    :param timeout_ms: per hook call; :param on_error: ``fail_closed`` (raise) or ``fail_open`` (skip the hook).
    """

    def __init__(self, use: str | type[Any], config: Mapping[str, Any] | None = None, *, name: str = "test",
                 llm_id: str = "openai", vendor: str = "openai", apps: Iterable[AppConfig] = (),
                 llms: Iterable[LLMConfig] = (),
                 budget_status: Mapping[str, Mapping[str, Any]] | BudgetStatusFn | None = None,
                 timeout_ms: float = 1000.0, on_error: Literal["fail_closed", "fail_open"] = "fail_closed") -> None:
        if isinstance(use, type):
            use = f"{use.__module__}:{use.__qualname__}"
        self.settings = PluginConfig.model_validate({"name": name, "use": use, "timeout_ms": timeout_ms,
                                                     "on_error": on_error, "config": dict(config or {})})
        self.llm_id = llm_id
        self.vendor = vendor
        self.registry = CollectorRegistry()
        """The hook metrics (``gateway_tap_hook_*``) of the harness's own requests."""
        self._metrics = HookMetrics(self.registry)
        self.apps = AppIndex(apps)
        self.budget_status: dict[str, Mapping[str, Any]] | BudgetStatusFn | None = \
            dict(budget_status) if isinstance(budget_status, Mapping) else budget_status
        """What ``services.gateway.budget_status`` answers (change it between calls to drive a plugin)."""
        self.gateway = Gateway(self.apps, self._budget_status, llms=list(llms))
        self._kv_data: dict[str, tuple[Any, float | None]] = {}
        self.control_messages: list[ControlMessage] = []
        """What the plugin sent with ``services.send_to_control`` (envelope filled in, gateway id ``harness``)."""
        self._loaded: list[LoadedPlugin] = []
        self.chain = Chain()
        self.endpoints: EndpointRoutes | None = None

    def _control(self, plugin: str, kind: str, payload: Mapping[str, Any]) -> str:
        message, _ = new_control_message("harness", plugin, kind, payload)  # the tap's TypeError for non-JSON
        self.control_messages.append(message)
        return message.id

    @property
    def plugin(self) -> Any:
        """The plugin instance (after ``async with``)."""
        return self._loaded[0].instance

    async def _budget_status(self, app_id: str, llm_id: str | None) -> Mapping[str, Any] | None:
        answers = self.budget_status
        if answers is None or isinstance(answers, Mapping):
            return answers.get(app_id) if answers is not None else None
        return await answers(app_id, llm_id)

    async def __aenter__(self) -> Self:
        self._compose(await load_plugins([self.settings], self.gateway, control=self._control,
                                         kv_data=self._kv_data))
        return self

    def _compose(self, loaded: list[LoadedPlugin]) -> None:
        self._loaded = loaded
        self.settings = loaded[0].settings  # the config as the plugin got it: schema defaults filled in
        chains = build_chains(loaded, [self.llm_id, "*"], self._metrics)  # "*": what endpoints authenticate with
        self.chain = chains[self.llm_id]
        self.endpoints = EndpointRoutes(loaded, self._metrics, chains["*"].auth)

    async def reconfigure(self, config: Mapping[str, Any]) -> None:
        """A live change of the plugin's ``config``, applied as a tap reload (or an admin API change) applies it.

        The new config is validated first (:class:`PluginLoadError` naming the key path; the plugin keeps its
        config). Then ``on_config_change(config)`` is awaited if the plugin has it (it raises: the change is
        rejected, with :class:`PluginLoadError`, and the plugin keeps its config); without it a fresh instance
        is created and initialised (:attr:`plugin` is then the new one, with the same ``services.kv`` data) and
        the old one closed. Requests after this run with the new config.
        """
        settings = self.settings.model_copy(update={"config": dict(config)})
        loaded = await load_plugins([settings], self.gateway, control=self._control, previous=self._loaded,
                                    kv_data=self._kv_data)
        replaced = [old for old in self._loaded if old.instance is not loaded[0].instance]
        self._compose(loaded)
        await close_plugins(replaced)

    async def __aexit__(self, *exc: object) -> None:
        await close_plugins(self._loaded)

    async def request(self, body: bytes = b"", *, json: Any = None, method: str = "POST",
                      path: str = "v1/chat/completions", query_string: str = "",
                      headers: Mapping[str, str] | None = None, app_id: str | None = None,
                      user_id: str | None = None, client_address: str | None = "127.0.0.1") -> RequestOutcome:
        """Run pre-auth, auth and post-auth hooks on a request to ``/llm/{llm_id}/{path}``.

        ``app_id``/``user_id`` stand for what the built-in key check would have found when no
        auth hook of the plugin returns an :class:`Identity`. ``json`` is serialised as the body.
        """
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        if json is not None:
            body = orjson.dumps(json)
            hdrs.setdefault("content-type", "application/json")
        req = TapRequest(method, path, query_string, hdrs, body, client_address)
        out = RequestOutcome(req, self._scope())
        try:
            answered = await run_request_hooks(self.chain.pre_auth, req, out.scope)
            if answered is None:
                if await run_auth_hooks(self.chain.auth, req, out.scope) is None:
                    out.scope.app_id, out.scope.user_id = app_id, user_id
                parse_request_json(req, out.scope)
                answered = await run_request_hooks(self.chain.post_auth, req, out.scope)
        except Stopped as stop:
            out.stopped, out.stopped_by = stop.result, stop.plugin
            return out
        out.served = answered.result if answered is not None else None
        return out

    def _scope(self) -> RequestScope:
        return RequestScope(f"req_test_{next(_ids)}", self.llm_id, self.vendor)

    async def response(self, after: RequestOutcome | None = None, *, status: int = 200,
                       headers: Mapping[str, str] | None = None, body: bytes | None = None,
                       chunks: Sequence[bytes] | None = None) -> ResponseOutcome:
        """Run the response hooks on an upstream response, as the tap does.

        Give ``body`` for a whole response: header hooks, body hooks, then one chunk hook call. Or
        ``chunks`` for a streamed one (``streamed`` is true, as for ``text/event-stream``): header
        hooks, then the chunks are parsed as server-sent events for the stream event hooks (an
        event split across chunks is seen whole), and the chunk hooks run on what they let through;
        a stop ends the stream with the vendor's error event (``stopped`` / ``stopped_by`` say so).
        ``after`` is the request it answers (its metadata and ids are shared); a fresh request
        context is used without it. When a hook of ``after`` answered itself (``after.served``) and
        neither ``body`` nor ``chunks`` is given, that answer is the response: a stream when its
        content type is ``text/event-stream``, as in the tap.
        """
        scope = after.scope if after is not None else self._scope()
        served = after.served if after is not None else None
        if served is not None and body is None and chunks is None:  # replay a plugin's own answer, as the tap does
            status, headers = served.status, {"content-type": "application/json", **(served.headers or {})}
            if headers["content-type"].startswith("text/event-stream"):
                chunks = [served.body or b""]
            else:
                body = served.body or b""
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        streamed = chunks is not None
        if streamed and "content-type" not in hdrs:
            hdrs["content-type"] = "text/event-stream"
        resp = TapResponse(status, hdrs, streamed)
        chain = self.chain
        try:
            await run_response_header_hooks(chain.response_headers, resp, scope)
            if chunks is None:
                body = await run_body_hooks(chain.response_body, resp, body or b"", scope)
        except Stopped as stop:
            result = stop.result
            return ResponseOutcome(result.status, CIMultiDict(result.headers or {}), [result.body or b""], result,
                                   stop.plugin)
        if chunks is None:
            body = await run_chunk_hooks(chain.response_chunk, body or b"", scope)
            if chain.response_end:
                body += await run_chunk_end(chain.response_chunk, chain.response_end, scope)
            return ResponseOutcome(resp.status, resp.headers, [body])
        # A stream: the event hooks on each parsed event (as the tap does), then the chunk hooks on what they sent.
        relay = EventRelay(chain.stream_event, self.vendor, scope) if chain.stream_event else None
        sent: list[bytes] = []
        for chunk in [*chunks, None]:
            if relay is not None:
                data = await (relay.feed(chunk) if chunk is not None else relay.flush())
            elif chunk is None:
                break
            else:
                data = chunk
            data = await run_chunk_hooks(chain.response_chunk, data, scope)
            if data:
                sent.append(data)
            if relay is not None and relay.stopped is not None:
                break
        if chain.response_end:  # the end of the body, as in the tap: what the chunk hooks held back
            held = await run_chunk_end(chain.response_chunk, chain.response_end, scope)
            if held:
                sent.append(held)
        if relay is not None and relay.stopped is not None:
            return ResponseOutcome(resp.status, resp.headers, sent, relay.stopped.result, relay.stopped.plugin)
        return ResponseOutcome(resp.status, resp.headers, sent)

    @asynccontextmanager
    async def endpoint_client(self) -> AsyncIterator[TestClient[web.Request, web.Application]]:
        """A real HTTP client of the plugin's endpoints (``/plugins/{name}/...``) on a local port.

        Calls follow the tap's rules (:mod:`gateway_tap.plugins.endpoints`): routing by the declared patterns
        (404 / 405), authentication unless ``public`` (the plugin's auth hook when it has one, then the app
        key, checked against ``apps``; 401 otherwise), the timeout to the response start and ``on_error``
        (500 ``plugin_failed`` / 503 ``plugin_unavailable``). Errors are the tap's JSON error bodies.

        ```python
        async with PluginHarness(MyPlugin, apps=[AppConfig(id="demo", key_hashes=[hash_key("k")])]) as h, \
                h.endpoint_client() as client:
            resp = await client.post(f"/plugins/{h.settings.name}/mcp/s1", headers={"x-api-key": "k"})
        ```
        """
        app = web.Application()
        track_response_start(app)
        app.router.add_route("*", "/plugins/{tail:.*}", self._serve_endpoint)
        async with TestClient(TestServer(app)) as client:
            yield client

    async def _serve_endpoint(self, request: web.Request) -> web.StreamResponse:
        routes = self.endpoints
        assert routes is not None, "use the harness inside 'async with'"
        scope = self._scope()
        try:
            bound, params = await routes.resolve(request)
            if not bound.public:
                found = await identify(routes.auth, request, scope, self.apps)
                if found != "identified":
                    return _error(401, "authentication_error", "missing_api_key" if found == "no_key" else
                                  "invalid_api_key", "the API key is missing or not valid", scope)
            return await call_endpoint(routes, bound, request, endpoint_context(bound, scope, params))
        except NoEndpoint as missing:
            return _error(405 if missing.allowed else 404, "invalid_request_error" if missing.allowed else
                          "not_found_error", "method_not_allowed" if missing.allowed else "route_not_found",
                          f"no endpoint for {request.method} {request.path}", scope)
        except Stopped as stop:
            return _error(stop.result.status, stop.error_type, stop.code, stop.message, scope)
        except EndpointFailed as failed:
            if failed.bound.fail_open:
                return _error(503, "service_unavailable", "plugin_unavailable", str(failed), scope)
            return _error(500, "plugin_error", "plugin_failed", str(failed), scope)
        except EndpointBrokeOff as broke:
            await broke.response.write_eof()
            return broke.response


def _error(status: int, type_: str, code: str, message: str, scope: RequestScope) -> web.Response:
    body = {"error": {"type": type_, "code": code, "message": message, "request_id": scope.request_id}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
