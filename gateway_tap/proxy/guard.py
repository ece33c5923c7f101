"""The outermost layer: every answer the tap gives carries a request id and ends as exactly one proxy_log.

:class:`RecordingGuard` wraps the whole application as the server's request handler (:class:`TapRunner` installs
it), outside routing: it gives each request its :class:`Exchange` (request id, trace, client, headers) before
anything else runs. The proxy and the plugin endpoints fill that exchange in and record it themselves (their
records say more: the app, the LLM, usage); every other answer is recorded here: ``/budget``, unknown routes,
what aiohttp's router raises (a path it cannot match: ``%0d%0a``, bare ``/plugins``), an ``Expect`` it would
answer in plain text, a handler that failed (a JSON 500 if nothing went out yet), a request cancelled before it
was answered. Requests the HTTP parser rejects never reach an application;
:class:`gateway_tap.proxy.protocol.TapRequestHandler` hands them to :meth:`RecordingGuard.rejected`. Only the
probes' own answers (``GET /healthz``, ``/readyz``) are neither given an id nor recorded: an orchestrator
polls them every few seconds, and they carry nothing of a client's.

:func:`send` and :func:`answer` send a whole response and note in the exchange what actually went out: a
response aiohttp refuses (a header holding CR or LF) becomes a JSON 500 ``invalid_response_header`` instead
of a silent connection, and a client gone before anything went out is recorded as 499 ``client_disconnected``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uuid_utils
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway_tap.proxy import errors
from gateway_tap.proxy.client_address import ClientAddresses
from gateway_tap.proxy.errors import TapError
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.tracing import TRACEPARENT, continue_trace
from gateway_tap.unsent import forget_unsent

log = logging.getLogger(__name__)

CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
"""What aiohttp raises when the client's connection closed under a read or a write."""
PROBES = frozenset({"/healthz", "/readyz"})
"""Paths whose ``GET`` answers carry no request id and are not recorded (errors on them are)."""
_EXCHANGE = web.RequestKey("gateway_tap_exchange", Exchange)
_PARSER_UNKNOWN = "-"
"""Method and path of a request the HTTP parser rejected (it could not tell them)."""

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    return "req_" + uuid_utils.uuid7().hex


def exchange_of(request: web.BaseRequest) -> Exchange:
    """The exchange the guard opened for ``request``."""
    return request[_EXCHANGE]


def sent_anything(request: web.BaseRequest) -> bool:
    """Whether bytes of a response went to the client's connection (then no other response can replace it)."""
    return request.writer.output_size > 0


async def send(request: web.BaseRequest, ex: Exchange, resp: web.StreamResponse) -> None:
    """Send ``resp`` whole and set ``ex.status`` to what went out; a client already gone is recorded as 499.

    :raises TapError: ``invalid_response_header``: aiohttp refused the response before anything went out.
    """
    before = request.writer.output_size  # aiohttp counts a write it then refuses for a closed connection
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except CLIENT_GONE:
        _client_gone(ex, before == 0, "client went away before the answer was sent")
        return
    except ValueError as exc:  # aiohttp's "forbidden control character" check of a header name or value
        if before == 0 and request.writer.output_size == 0:
            raise refused(request, exc) from exc
        raise
    ex.status = resp.status


def refused(request: web.BaseRequest, exc: ValueError) -> TapError:
    """The error to answer instead of a response aiohttp refused to start (nothing of it went out).

    Its headers were refused after aiohttp had set up the connection's writer for it (:func:`forget_unsent`).
    """
    forget_unsent(request)
    log.warning("a response could not be sent: %s", exc)
    return errors.invalid_response_header()


async def answer(request: web.BaseRequest, ex: Exchange, error: TapError) -> web.Response:
    """Answer ``error`` as the OpenAI-style JSON (nothing went out yet) and note it in ``ex``."""
    ex.fail(error)
    resp = errors.error_response(error, ex.request_id, ex.trace.traceparent)
    if error.status == 408:
        resp.force_close()  # the rest of a stalled body is not worth waiting for
    if ex.ratelimit_headers and error.code != "rate_limit_exceeded":  # a refusal carries its own
        resp.headers.update(ex.ratelimit_headers)
    ex.response_headers = resp.headers
    try:
        await send(request, ex, resp)
    except TapError as unsendable:  # the error's own headers (a plugin's stop) were refused: answer without them
        log.warning("request %s: the answer's headers could not be sent (%s %s); answered %d %s instead",
                    ex.request_id, error.status, error.code, unsendable.status, unsendable.code)
        ex.fail(unsendable)
        resp = errors.error_response(unsendable, ex.request_id, ex.trace.traceparent)
        ex.response_headers = resp.headers
        await send(request, ex, resp)
    ex.response_bytes = 0 if ex.status == 499 else len(resp.body) if isinstance(resp.body, bytes) else 0
    return resp


def _client_gone(ex: Exchange, nothing_sent: bool, message: str) -> None:
    if nothing_sent:
        ex.fail(errors.client_disconnected(message))
    else:  # the status line went out: that is the status the client got
        ex.error = errors.client_disconnected(message)


def http_error(exc: web.HTTPException, request: web.BaseRequest, max_body_bytes: int) -> TapError:
    """The tap's error for what aiohttp raised (its router's 404 and 405, its body reader's 413, ...)."""
    if isinstance(exc, web.HTTPNotFound):
        return errors.not_found(request.path)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return errors.method_not_allowed(request.method, frozenset(exc.allowed_methods))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return errors.body_too_large(max_body_bytes)
    if exc.status >= 500:
        return errors.internal_error()
    return TapError(exc.status, "invalid_request_error", exc.reason.lower().replace(" ", "_"), exc.reason)


class RecordingGuard:
    """The server's request handler around ``handler`` (the application): see the module.

    :param record: records an exchange nobody else recorded (its proxy_log, the access log line).
    :param max_body_bytes: ``tap.limits.max_body_bytes``, named in a 413.
    :param clients: who the client is behind ``tap.trusted_proxies``; None: the connection's peer.
    """

    def __init__(self, record: Callable[[Exchange], None], max_body_bytes: int,
                 clients: ClientAddresses | None = None) -> None:
        self._record = record
        self._max_body_bytes = max_body_bytes
        self._clients = clients

    def wrap(self, handler: Handler) -> Handler:
        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            return await self._guard(handler, request)

        return guarded

    async def _guard(self, handler: Handler, request: web.BaseRequest) -> web.StreamResponse:
        # A probe's answer (even a 503) is not recorded; an error it raises is, like any other.
        ex = None if request.method == "GET" and request.path in PROBES else self.open(request)
        try:
            expect = request.headers.get("expect")
            if expect is not None and expect.lower() != "100-continue":
                # aiohttp would answer in plain text (and fail on a byte that is not UTF-8); 100-continue is its.
                raise errors.expectation_failed()
            resp = await handler(request)
            if ex is not None and not ex.recorded:
                if resp.prepared:  # a handler that sent its answer itself
                    ex.status = resp.status
                else:
                    resp = await self._send(request, ex, resp)
        except TapError as err:  # a handler's answer (``/budget`` without a key, an unknown route)
            ex = ex or self.open(request)
            resp = await self._fail(request, ex, err)
        except web.HTTPException as exc:
            ex = ex or self.open(request)
            resp = await self._fail(request, ex, http_error(exc, request, self._max_body_bytes))
        except HttpProcessingError as exc:  # a body that broke HTTP's framing, read by a plugin endpoint or route
            ex = ex or self.open(request)
            resp = await self._fail(request, ex, errors.bad_http_from(exc))
        except Exception:
            # A bug of ours: a JSON 500 with the request id unless bytes went out (then the connection just ends).
            ex = ex or self.open(request)
            log.exception("request %s failed unexpectedly", ex.request_id)
            resp = await self._fail(request, ex, errors.internal_error())
        except BaseException:  # cancelled (the server stops): the client got nothing more
            if ex is not None and not ex.recorded:
                _client_gone(ex, not sent_anything(request), "the request was cancelled before it was answered")
                self._finish(ex)
            raise
        if ex is not None and not ex.recorded:
            self._finish(ex)
        return resp

    async def _fail(self, request: web.BaseRequest, ex: Exchange, error: TapError) -> web.StreamResponse:
        if sent_anything(request):  # the status line is out: the answer can only be cut short
            if not ex.recorded:
                ex.error = error
                self._finish(ex)
            raise ConnectionResetError(f"request {ex.request_id}: the answer broke off")  # aiohttp closes it
        return await answer(request, ex, error)

    def open(self, request: web.BaseRequest) -> Exchange:
        """The request's exchange, opened as it arrives (its id is the one every answer to it carries)."""
        headers = request.headers
        ex = Exchange(new_request_id(), request.method, request.rel_url.raw_path, "", time.perf_counter(),
                      continue_trace(headers.get(TRACEPARENT)))
        clients = self._clients
        ex.client_address = request.remote if clients is None else clients.client_of(request.remote, headers)
        ex.user_agent = headers.get("user-agent")
        ex.request_headers = headers
        request[_EXCHANGE] = ex
        return ex

    async def _send(self, request: web.BaseRequest, ex: Exchange, resp: web.StreamResponse) -> web.StreamResponse:
        """A handler's answer (``/budget``, a 404...), with the request id, sent here so the record says what went
        out."""
        resp.headers[errors.REQUEST_ID_HEADER] = ex.request_id
        ex.response_headers = resp.headers
        try:
            await send(request, ex, resp)
        except TapError as unsendable:
            return await answer(request, ex, unsendable)
        if ex.status != 499:
            body = resp.body if isinstance(resp, web.Response) else None
            ex.response_bytes = len(body) if isinstance(body, bytes) else resp.body_length
        return resp

    def rejected(self, request: web.BaseRequest, error: TapError) -> web.Response:
        """The answer to a request the HTTP parser rejected, recorded (method and path ``-``: the parser could not
        tell them; the client's bytes are not kept, a too-long header may be a credential)."""
        ex = Exchange(new_request_id(), _PARSER_UNKNOWN, _PARSER_UNKNOWN, "", time.perf_counter())
        ex.client_address = request.remote
        ex.fail(error)
        resp = errors.error_response(error, ex.request_id)
        ex.response_headers = resp.headers
        ex.response_bytes = len(resp.body) if isinstance(resp.body, bytes) else 0
        self._finish(ex)
        return resp

    def _finish(self, ex: Exchange) -> None:
        ex.finished = time.perf_counter()
        try:
            self._record(ex)
        except Exception:  # recording must never break serving
            log.exception("recording request %s failed", ex.request_id)


GUARD_KEY = web.AppKey("gateway_tap_guard", RecordingGuard)
"""A tap application's guard, which :class:`gateway_tap.proxy.protocol.TapRunner` serves it through."""
