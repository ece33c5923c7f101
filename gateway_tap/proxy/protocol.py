"""Requests aiohttp rejects while parsing, before any route runs, answered like every other tap error.

aiohttp answers a request it cannot parse itself, with a plain-text ``400 Got more than 8190 bytes...``, and
offers no public hook for it (aio-libs/aiohttp#3287). :class:`TapRunner` serves the app through a
:class:`TapRequestHandler`, which answers those requests with the OpenAI-style JSON error and its request
id: 431 for a header longer than ``tap.limits.max_header_bytes`` or more than ``max_header_count`` headers,
414 for a URL longer than ``max_url_bytes``, 400 for anything else that is not valid HTTP. The limits reach
aiohttp's parser as the app's ``handler_args`` (:func:`parser_limits`). The connection is closed after the
answer, as aiohttp does: the parser cannot find the next request in what follows.

Slow clients are closed (``tap.limits``): a connection must complete its request line and headers within
``header_timeout_s`` of its start, or of the first byte of a request on a kept-alive connection; one idle
between requests is closed after ``keepalive_timeout_s`` (aiohttp's keep-alive timer, which this shortens
for the header phase). A slow body is the handler's (408 after ``body_timeout_s``).

Each answer to a request the parser rejected is recorded (a proxy_log) by the app's
:class:`gateway_tap.proxy.guard.RecordingGuard`, which :class:`TapRunner` also puts around the whole application.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import _ErrInfo

from gateway_tap.proxy import errors
from gateway_tap.proxy.errors import TapError
from gateway_tap.proxy.guard import GUARD_KEY, RecordingGuard, new_request_id
from gateway_tap.settings import LimitSettings

log = logging.getLogger(__name__)

LIMITS_KEY = web.AppKey("gateway_tap_limits", LimitSettings)
"""The app's ``tap.limits``, for :class:`TapRunner` (the header timeout is not one of aiohttp's arguments)."""

TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message (both parsers) when max_headers is exceeded


def parser_limits(limits: LimitSettings) -> dict[str, Any]:
    """``tap.limits`` as the keyword arguments of aiohttp's request parser."""
    return {"max_field_size": limits.max_header_bytes, "max_headers": limits.max_header_count,
            "max_line_size": limits.max_url_bytes, "keepalive_timeout": limits.keepalive_timeout_s}


def protocol_error(exc: HttpProcessingError, max_header_bytes: int, max_header_count: int,
                   max_url_bytes: int) -> TapError:
    """The tap's answer to a request aiohttp could not parse."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_url_bytes != max_header_bytes:
            return errors.url_too_long(max_url_bytes)
        # Equal limits: the parser does not say which one was hit; a long header is by far the likelier.
        keys = "tap.limits.max_header_bytes" if max_url_bytes != max_header_bytes else \
            "tap.limits.max_header_bytes, or tap.limits.max_url_bytes for the URL"
        return errors.header_too_large(max_header_bytes, keys)
    if exc.message == TOO_MANY_HEADERS:
        return errors.too_many_headers(max_header_count)
    return errors.bad_http_from(exc)


class TapRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol; requests it cannot parse get the tap's JSON error, recorded by
    ``guard`` when the application has one (the proxy's; the admin API's has none), and a request head that takes
    longer than ``header_timeout_s`` closes the connection (see the module); a body that breaks HTTP's framing while its
    handler reads it fails that read (:meth:`_body_broken`)."""

    def __init__(self, *args: Any, guard: RecordingGuard | None = None, header_timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._header_timeout_s = header_timeout_s
        self._head_timed = False  # the head being received has its deadline

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_deadline()  # the first request's head is due from the start

    def data_received(self, data: bytes) -> None:
        # Waiting for a request (aiohttp's own future): these bytes start or continue a request head.
        waiter = self._waiter
        if data and not self._head_timed and waiter is not None and not waiter.done():
            self._head_deadline()
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued and self._current_request is not None:
            self._body_broken()

    def _body_broken(self) -> None:
        """A body that breaks HTTP's framing once its handler is reading it (a bad chunk size): aiohttp queues the
        parser's error as if it were the next request and leaves this body waiting for bytes that never come
        (until ``body_timeout_s``, a 408). The error goes to this body instead: its handler answers 400
        ``bad_http_request``, recorded, and the connection closes after it (the parser has lost its place)."""
        message, _ = self._messages[-1]
        content = self._current_request.content if self._current_request is not None else None
        if isinstance(message, _ErrInfo) and content is not None and not content.is_eof():
            self._messages.pop()
            content.set_exception(message.exc)
            content.feed_eof()  # nothing more will come: aiohttp's lingering read after the answer must not wait
            self.close()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        self._head_timed = False  # the next request's head gets its own deadline from its first byte
        return await super().finish_response(request, resp, start_time)

    def _head_deadline(self) -> None:
        """Close the connection if no complete request head arrived ``header_timeout_s`` from now: aiohttp's
        keep-alive timer closes a connection that waits for a request, so it is brought forward (never later)."""
        if self._header_timeout_s is None or self._force_close:
            return
        self._head_timed = True
        when = self._loop.time() + self._header_timeout_s
        if self._keepalive_handle is not None:
            if self._next_keepalive_close_time <= when:
                return
            self._keepalive_handle.cancel()
        self._next_keepalive_close_time = when
        self._keepalive_handle = self._loop.call_at(when, self._process_keepalive)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        guard = self.guard
        if not isinstance(exc, HttpProcessingError):
            if guard is None:
                return super().handle_error(request, status, exc, message)
            # Only an exception that escaped the guard could come here (it answers everything else itself).
            log.error("request failed outside the guard", exc_info=exc)
            response = guard.rejected(request, errors.internal_error())
        else:
            error = protocol_error(exc, self.max_field_size, self.max_headers, self.max_line_size)
            response = guard.rejected(request, error) if guard is not None else \
                errors.error_response(error, new_request_id())
            # No traceback and none of the client's bytes (a too-long header may be a credential): status, code.
            log.log(logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING,
                    "request rejected by the HTTP parser: %d %s", error.status, error.code,
                    extra={"status": error.status, "code": error.code,
                           "request_id": response.headers[errors.REQUEST_ID_HEADER], "client": request.remote})
        response.force_close()
        return response


class _TapServer(web.Server):
    guard: RecordingGuard | None

    def __call__(self) -> TapRequestHandler:
        return TapRequestHandler(self, guard=self.guard, loop=self._loop, **self._kwargs)


class TapRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` on :class:`TapRequestHandler` connections, serving the application through
    its guard when it has one (:data:`gateway_tap.proxy.guard.GUARD_KEY`: the proxy's, which records every
    answer)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        guard = self.app.get(GUARD_KEY)
        server.__class__ = _TapServer  # the same server; only the protocol it makes per connection differs
        server.guard = guard  # type: ignore[attr-defined]
        if guard is not None:
            server.request_handler = guard.wrap(server.request_handler)
        limits = self._app.get(LIMITS_KEY)
        if limits is not None:
            server._kwargs["header_timeout_s"] = limits.header_timeout_s
        return server
