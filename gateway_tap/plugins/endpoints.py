"""Plugin endpoints: the routes under ``/plugins/{plugin}/...`` and the rules of one call, for the tap and
``PluginHarness`` alike (the tap adds the HTTP errors, metrics and events: :mod:`gateway_tap.proxy.endpoints`).

- Routing is aiohttp's own: each plugin's declared :class:`~gateway_tap.hooks.Endpoint` paths are
  route patterns (``"mcp/{session}"``, ``"files/{name:.+}"``) in one ``UrlDispatcher`` per
  configuration, so a reload may add or remove endpoints; a ``GET`` route answers ``HEAD`` too.
- Authentication: unless the endpoint is ``public``, the caller is identified as on ``/llm/``: the auth
  hooks of the plugins attached to every LLM (``llms: ["*"]``, the gateway-wide ones; an auth plugin
  scoped to some LLMs is about those LLMs) and, when they all defer, the app key. Auth hooks see the
  method, path and headers; the body is left unread for the handler.
- Timeout: ``timeout_ms`` runs from calling the handler to the start of its response (the handler
  returned it, or prepared a streamed one), so a long-lived stream (server-sent events, MCP) is never
  cut by it; what happens after the start is the handler's business. A handler that blocked the event loop
  past it is held to it like a hook (:func:`~gateway_tap.plugins.chain.blocked_past_timeout`).
- A handler that raises or times out before its response started is the plugin's failure
  (:class:`EndpointFailed`; the caller answers by ``on_error``); after the start, the stream just ends
  (:class:`EndpointBrokeOff`). Raising one of aiohttp's ``web.HTTPException`` answers with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import AbstractRoute
from multidict import CIMultiDict

from gateway_tap.apps import AppIndex, presented_key
from gateway_tap.hooks import Endpoint, EndpointContext, TapRequest
from gateway_tap.plugins.chain import HookMetrics, RequestScope, Step, blocked_past_timeout, run_auth_hooks
from gateway_tap.plugins.loader import LoadedPlugin, route_path, routed
from gateway_tap.unsent import forget_unsent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BoundEndpoint:
    """One plugin endpoint with its options resolved against the plugin's settings."""

    plugin: LoadedPlugin
    endpoint: Endpoint
    label: str
    """``"METHOD path-pattern"``: bounded, for metrics and logs (never the concrete path)."""
    timeout_s: float
    fail_open: bool

    @property
    def public(self) -> bool:
        return self.endpoint.public


class EndpointFailed(Exception):
    """The handler raised or timed out before its response started; ``fail_open`` says how to answer."""

    def __init__(self, bound: BoundEndpoint, reason: str, timed_out: bool) -> None:
        super().__init__(f"{bound.plugin.name} endpoint {bound.label}: {reason}")
        self.bound = bound
        self.reason = reason
        self.timed_out = timed_out


class EndpointBrokeOff(Exception):
    """The handler raised after its response started: ``response`` is that response (end it, record it)."""

    def __init__(self, bound: BoundEndpoint, reason: str, response: web.StreamResponse) -> None:
        super().__init__(f"{bound.plugin.name} endpoint {bound.label} broke off its response: {reason}")
        self.bound = bound
        self.reason = reason
        self.response = response


class NoEndpoint(Exception):
    """No endpoint matches: ``allowed`` is empty for an unknown path, else the methods the path accepts."""

    def __init__(self, allowed: frozenset[str]) -> None:
        super().__init__("method not allowed" if allowed else "no such endpoint")
        self.allowed = allowed


class EndpointRoutes:
    """Every plugin endpoint of one configuration, routed with aiohttp's ``UrlDispatcher``.

    ``auth`` are the gateway-wide auth steps (the chain of the plugins attached to every LLM).
    """

    def __init__(self, plugins: Sequence[LoadedPlugin], metrics: HookMetrics, auth: Sequence[Step] = ()) -> None:
        self.auth = tuple(auth)
        self._router = web.UrlDispatcher()
        self._bound: dict[AbstractRoute, BoundEndpoint] = {}
        self._errors = metrics.errors
        for plugin in plugins:
            settings = plugin.settings
            for endpoint in plugin.endpoints:  # checked at load: valid patterns, no duplicates
                timeout_ms = endpoint.timeout_ms if endpoint.timeout_ms is not None else settings.timeout_ms
                on_error = endpoint.on_error or settings.on_error
                bound = BoundEndpoint(plugin, endpoint, f"{endpoint.method} {endpoint.path or '/'}",
                                      timeout_ms / 1000, on_error == "fail_open")
                resource = self._router.add_resource(route_path(plugin.name, endpoint.path))
                methods = [endpoint.method]
                if endpoint.method == hdrs.METH_GET and not any(
                        e.method == hdrs.METH_HEAD and e.path == endpoint.path for e in plugin.endpoints):
                    methods.append(hdrs.METH_HEAD)
                for method in methods:
                    self._bound[resource.add_route(method, routed)] = bound

    def __len__(self) -> int:
        return len(self._bound)

    async def resolve(self, request: web.Request) -> tuple[BoundEndpoint, Mapping[str, str]]:
        """The endpoint serving ``request`` and the values of its path parameters.

        :raises NoEndpoint: no endpoint has this path (``allowed`` empty) or none this method.
        """
        match = await self._router.resolve(request)
        error = match.http_exception
        if error is not None:
            allowed = frozenset(getattr(error, "allowed_methods", ()) or ())
            raise NoEndpoint(allowed)
        return self._bound[match.route], dict(match)

    def failed(self, bound: BoundEndpoint, kind: Literal["exception", "timeout"]) -> None:
        """Count a handler failure in ``gateway_tap_hook_errors_total{hook="endpoint"}``."""
        self._errors.labels(bound.plugin.name, "endpoint", kind).inc()


async def identify(steps: Sequence[Step], request: web.Request, scope: RequestScope,
                   apps: AppIndex) -> Literal["identified", "no_key", "unknown_key"]:
    """Identify an endpoint's caller as ``/llm/`` does: the auth hooks, then the app key (``scope.app_id``).

    :raises Stopped: an auth hook rejected the caller.
    :raises HookFailed: a fail-closed auth hook failed.
    """
    if steps:
        req = TapRequest(request.method, request.path, request.rel_url.raw_query_string,
                         CIMultiDict(request.headers), b"", request.remote)
        if await run_auth_hooks(steps, req, scope) is not None:
            return "identified"
    key = presented_key(request.headers)
    if key is None:
        return "no_key"
    app = apps.app_for_key(key)
    if app is None:
        return "unknown_key"
    scope.app_id = app.id
    return "identified"


def endpoint_context(bound: BoundEndpoint, scope: RequestScope, params: Mapping[str, str]) -> EndpointContext:
    plugin = bound.plugin
    return EndpointContext(scope.request_id, scope.llm_id, "", plugin.name, plugin.settings.config,
                           plugin.services, scope.metadata, scope.app_id, scope.user_id, None, {}, scope.claims,
                           scope.trace.trace_id, scope.trace.traceparent, params=params)


async def call_endpoint(routes: EndpointRoutes, bound: BoundEndpoint, request: web.Request,
                        ctx: EndpointContext) -> web.StreamResponse:
    """The handler's response; its timeout runs until the response starts. A handler that got there (returned
    its answer, or started its stream) past the timeout without giving the event loop back, so that no timer could
    interrupt it, timed out all the same (:func:`~gateway_tap.plugins.chain.blocked_past_timeout`): its answer is
    discarded, a stream is refused before its first byte.

    :raises EndpointFailed: the handler raised, timed out or returned no response before its response started.
    :raises EndpointBrokeOff: the handler raised after its response started.
    """
    call = _Call(asyncio.timeout(bound.timeout_s), time.perf_counter(), bound.timeout_s)
    request[_CALL] = call
    request[_REQUEST_ID] = ctx.request_id
    try:
        async with call.deadline:
            resp = await bound.endpoint.handler(request, ctx)
    except web.HTTPException as answer:  # aiohttp's way to answer from deep inside a handler: an answer, not a fault
        if request.get(_STARTED) is not None:
            raise EndpointBrokeOff(bound, repr(answer), request[_STARTED]) from answer
        resp = answer
    except Exception as exc:
        started = request.get(_STARTED)
        if started is not None:
            routes.failed(bound, "exception")
            log.warning("endpoint broke off its response", exc_info=True, extra={
                "plugin": bound.plugin.name, "endpoint": bound.label, "request_id": ctx.request_id})
            raise EndpointBrokeOff(bound, repr(exc), started) from exc
        if call.blocked is not None:  # it started its stream too late (:func:`_on_response_prepare` refused it)
            raise _failed(routes, bound, ctx, call.blocked, True) from exc
        timed_out = call.deadline.expired()
        reason = f"no response within {bound.timeout_s * 1000:.0f} ms" if timed_out else repr(exc)
        raise _failed(routes, bound, ctx, reason, timed_out) from exc
    finally:
        del request[_CALL]
    if request.get(_STARTED) is None:  # a started stream was checked when it started
        blocked = call.blocked or blocked_past_timeout(time.perf_counter() - call.started_s, call.timeout_s)
        if blocked is not None:
            raise _failed(routes, bound, ctx, blocked, True)
    if not isinstance(resp, web.StreamResponse):
        routes.failed(bound, "exception")
        raise EndpointFailed(bound, f"returned {type(resp).__name__}, expected a web.StreamResponse", False)
    return resp


def _failed(routes: EndpointRoutes, bound: BoundEndpoint, ctx: EndpointContext, reason: str,
            timed_out: bool) -> EndpointFailed:
    """A handler's failure before its response started: counted, logged, and the exception to raise."""
    routes.failed(bound, "timeout" if timed_out else "exception")
    log.warning("endpoint failed", extra={"plugin": bound.plugin.name, "endpoint": bound.label,
                                          "request_id": ctx.request_id, "reason": reason})
    return EndpointFailed(bound, reason, timed_out)


@dataclass(slots=True)
class _Call:
    """A handler call until its response starts."""

    deadline: asyncio.Timeout
    started_s: float
    """``time.perf_counter()`` when the handler was called."""
    timeout_s: float
    blocked: str | None = None
    """Why it timed out, when it started its response past the timeout without giving the loop back."""


class _StartedTooLate(Exception):
    """Raised into a handler's ``response.prepare()`` when it blocked past its timeout: nothing was sent."""


_CALL = web.RequestKey("gateway_tap_endpoint_call", _Call)
_STARTED = web.RequestKey("gateway_tap_endpoint_started", web.StreamResponse)
_REQUEST_ID = web.RequestKey("gateway_tap_endpoint_request_id", str)


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    call = request.get(_CALL)
    if call is not None:
        blocked = blocked_past_timeout(time.perf_counter() - call.started_s, call.timeout_s)
        if blocked is not None:  # nothing went out yet: the call is answered as timed out instead
            call.blocked = blocked
            forget_unsent(request)
            raise _StartedTooLate(blocked)
        call.deadline.reschedule(None)  # the response starts: the endpoint's timeout no longer applies
        request[_STARTED] = response
    request_id = request.get(_REQUEST_ID)
    if request_id is not None:
        response.headers.setdefault("x-request-id", request_id)


def track_response_start(app: web.Application) -> None:
    """Let :func:`call_endpoint` see a handler start its response: register it on the (sub-)application
    serving the endpoints only, so other routes pay nothing for it."""
    app.on_response_prepare.append(_on_response_prepare)
