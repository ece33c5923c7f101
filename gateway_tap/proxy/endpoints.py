"""``/plugins/{plugin}/...``: plugin endpoints served as real requests of the tap.

Each call is routed, authenticated and run by the rules of :mod:`gateway_tap.plugins.endpoints`;
this module says what the outcomes mean in HTTP (OpenAI-style error JSON with the request id) and
records every call like any other request: ``gateway_tap_endpoint_*`` metrics, the access log line
and a ``proxy_log`` event (``llm_id`` null, the path, status, sizes, latency, the caller's
``app_id``/``user_id``, hook metadata, ``blocked_by`` when an auth hook refused it, the error when
it failed). No ``analytics`` or ``budget_usage``: an endpoint call is not an LLM call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import msgspec
from aiohttp import web

from gateway_tap.plugins.chain import HookFailed, Stopped
from gateway_tap.plugins.endpoints import (
    BoundEndpoint,
    EndpointBrokeOff,
    EndpointFailed,
    NoEndpoint,
    call_endpoint,
    endpoint_context,
    identify,
    track_response_start,
)
from gateway_tap.proxy import errors
from gateway_tap.proxy.errors import REQUEST_ID_HEADER, TapError
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.proxy.guard import answer, exchange_of, send, sent_anything
from gateway_tap.proxy.handler import stop_error
from gateway_tap.proxy.logs import access_log
from gateway_tap.proxy.metrics import TapMetrics
from gateway_tap.proxy.paths import plain_path
from gateway_tap.proxy.snapshot import ConfigSnapshot
from gateway_tap.tracing import TRACEPARENT
from schemas import status_class

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""``Retry-After`` of the 503 a ``fail_open`` endpoint answers when its handler failed."""


def endpoints_app(server: EndpointServer) -> web.Application:
    """The sub-application mounted at ``/plugins/``: its own response-start signal (the endpoint timeout),
    which requests to ``/llm/`` never pass through."""
    app = web.Application()
    track_response_start(app)
    app.router.add_route("*", "/{plugin}/{path:.*}", server.handle)
    app.router.add_route("*", "/{tail:.*}", server.handle)
    return app


class EndpointServer:
    """Serves plugin endpoints from the snapshot in force (``snapshot()``); ``publish`` takes the events
    (the structs of :data:`schemas.wire.WIRE_EVENTS`: ``EventPublisher.publish_wire``)."""

    def __init__(self, snapshot: Callable[[], ConfigSnapshot], metrics: TapMetrics,
                 publish: Callable[[msgspec.Struct], None]) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        self._publish = publish

    async def handle(self, request: web.Request) -> web.StreamResponse:
        snap = self._snapshot()  # captured once: a reload during this call never changes what it sees
        snap.inflight += 1
        ex = exchange_of(request)
        ex.request_bytes = request.content_length or 0
        bound: BoundEndpoint | None = None
        try:
            try:
                # Path parameters reach handlers decoded: refuse what would decode to "/", "..", a backslash...
                plain_path(request.rel_url.raw_path[1:])
                bound, params = await snap.endpoints.resolve(request)
                if not bound.public:
                    await self._authenticate(request, ex, snap)
                resp = await self._call(request, ex, snap, bound, params)
            except NoEndpoint as missing:
                resp = await answer(request, ex, errors.method_not_allowed(request.method, missing.allowed)
                                    if missing.allowed else errors.not_found(request.path))
            except TapError as err:
                resp = await answer(request, ex, err)
            except Stopped as stop:
                resp = await answer(request, ex, stop_error(stop))
            except HookFailed as exc:
                resp = await answer(request, ex, errors.plugin_failed(
                    exc.plugin, exc.hook, "timed out" if exc.timed_out else "raised an error"))
            except EndpointFailed as failed:
                resp = await answer(request, ex, _failure(failed))
            except Exception:  # a bug of ours: still a recorded call and a JSON 500 with the request id
                log.exception("endpoint call %s failed unexpectedly", ex.request_id)
                if sent_anything(request):
                    raise  # the answer broke off: the guard records it and aiohttp closes the connection
                resp = await answer(request, ex, errors.internal_error())
            ex.finished = time.perf_counter()
            self._record(ex, snap, bound)
            return resp
        finally:
            snap.inflight -= 1

    async def _authenticate(self, request: web.Request, ex: Exchange, snap: ConfigSnapshot) -> None:
        found = await identify(snap.endpoints.auth, request, ex, snap.apps)
        if found == "no_key":
            raise errors.missing_key()
        if found == "unknown_key":
            raise errors.unknown_key()

    async def _call(self, request: web.Request, ex: Exchange, snap: ConfigSnapshot, bound: BoundEndpoint,
                    params: Mapping[str, str]) -> web.StreamResponse:
        ctx = endpoint_context(bound, ex, params)
        try:
            resp = await call_endpoint(snap.endpoints, bound, request, ctx)
        except EndpointBrokeOff as broke:  # the status line is out: end the stream, record the failure
            ex.error = errors.plugin_failed(bound.plugin.name, f"endpoint {bound.label}", "raised mid-response")
            resp = broke.response
            with contextlib.suppress(Exception):
                await resp.write_eof()
            ex.streamed = True
            self._finish(ex, resp)
            return resp
        ex.streamed = resp.prepared  # the handler started it itself: it streamed
        if not resp.prepared:
            resp.headers[REQUEST_ID_HEADER] = ex.request_id
            resp.headers[TRACEPARENT] = ex.trace.traceparent
            await send(request, ex, resp)  # a header aiohttp refuses: TapError, answered as JSON
            if ex.status == 499:
                return resp
        self._finish(ex, resp)
        return resp

    @staticmethod
    def _finish(ex: Exchange, resp: web.StreamResponse) -> None:
        ex.status = resp.status
        ex.response_headers = resp.headers
        ex.response_bytes = resp.body_length

    def _record(self, ex: Exchange, snap: ConfigSnapshot, bound: BoundEndpoint | None) -> None:
        """Metrics, the access log line and the proxy_log event of one call. Never raises into serving."""
        ex.recorded = True
        try:
            plugin, label = (bound.plugin.name, bound.label) if bound is not None else ("none", "none")
            self._metrics.endpoint_requests.labels(plugin, label, status_class(ex.status)).inc()
            self._metrics.endpoint_seconds.labels(plugin, label).observe(ex.total_ms / 1000)
            if snap.access_log:
                fields = ex.access_fields(snap.redactor)
                fields["plugin"], fields["endpoint"] = plugin, label
                access_log.info("request", extra=fields)
            self._publish(ex.proxy_log(snap.gateway_id, redactor=snap.redactor))
        except Exception:
            log.exception("recording endpoint call %s failed", ex.request_id)


def _failure(failed: EndpointFailed) -> TapError:
    bound = failed.bound
    hook = f"endpoint {bound.label}"
    reason = "timed out before responding" if failed.timed_out else "raised an error"
    if bound.fail_open:
        return errors.plugin_unavailable(bound.plugin.name, hook, reason, RETRY_AFTER_S)
    return errors.plugin_failed(bound.plugin.name, hook, reason)
