"""The hot path: ``/llm/{llm_id}/{rest}`` through the hook chain to the upstream and back.

Order: body limit -> pre-auth hooks -> auth (plugin or built-in key check) ->
LLM allowed -> JSON parse (only for POST bodies, for model and stream flag) ->
post-auth (built-in steps, then plugins) -> upstream -> response hooks on the
headers, then the body hooks on a whole answer or the stream event hooks on each
parsed event of a streamed one, then the chunk hooks on each body write -> client.
The chain's rules are :mod:`gateway_tap.plugins.chain`'s; this module only says
what the answers mean in HTTP. The events, metrics and access log
are produced after the client has its response, so they add no latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from gateway_tap.apps import AppIndex, presented_key
from gateway_tap.hooks import TapRequest, TapResponse
from gateway_tap.plugins.chain import (
    Answered,
    HookFailed,
    RequestScope,
    Step,
    Stopped,
    parse_request_json,
    run_auth_hooks,
    run_body_hooks,
    run_chunk_end,
    run_chunk_hooks,
    run_request_hooks,
    run_response_header_hooks,
)
from gateway_tap.plugins.sse import EventRelay
from gateway_tap.proxy import errors
from gateway_tap.proxy.accounting import (
    StreamAccounting,
    Usage,
    estimate_prompt_tokens,
    operation_of,
    prepare_openai_stream,
    request_parameters,
    usage_from_body,
)
from gateway_tap.proxy.errors import REQUEST_ID_HEADER, TapError
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.proxy.guard import CLIENT_GONE, answer, exchange_of, refused, send, sent_anything
from gateway_tap.proxy.paths import confined_path
from gateway_tap.proxy.snapshot import ConfigSnapshot
from gateway_tap.proxy.upstream import FORWARDED_METHODS, REQUEST_HEADERS_DROPPED, RESPONSE_HEADERS_DROPPED, Upstream
from gateway_tap.tracing import TRACEPARENT

log = logging.getLogger(__name__)

def stop_error(stop: Stopped) -> TapError:
    """The error answer of a hook's stop (``blocked_by`` the plugin)."""
    result = stop.result
    return TapError(result.status, stop.error_type, stop.code, stop.message, blocked_by=stop.plugin, body=result.body,
                    headers=dict(result.headers) if result.headers else None)


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    """A plugin's whole stream as the chunk source of the stream path."""
    yield body


def _strips_usage(up: Upstream, ex: Exchange, parsed: Any) -> bool:
    """Whether an OpenAI stream's usage chunk is withheld from this client (it did not ask for it)."""
    if up.vendor != "openai" or not isinstance(parsed, dict) or parsed.get("stream") is not True \
            or "chat/completions" not in ex.path:
        return False
    return prepare_openai_stream(dict(parsed))  # on a copy: the request is not forwarded anywhere


def _without(headers: CIMultiDict[str], names: tuple[str, ...]) -> CIMultiDict[str]:
    """``headers`` with every one of ``names`` removed, in place: a few case-insensitive lookups, not a loop
    lower-casing every header."""
    for name in names:
        if name in headers:
            del headers[name]
    return headers


def _hook_error(exc: HookFailed) -> TapError:
    return errors.plugin_failed(exc.plugin, exc.hook, "timed out" if exc.timed_out else "raised an error")


class ProxyHandler:
    """Serves ``/llm/...``; ``finish`` is called with every completed :class:`Exchange` and its snapshot.

    ``snapshot`` is the runtime configuration in force; a reload replaces it (one reference swap).
    """

    def __init__(self, snapshot: ConfigSnapshot, session: aiohttp.ClientSession, max_body_bytes: int,
                 finish: Callable[[Exchange, ConfigSnapshot], None], body_timeout_s: float = 60.0) -> None:
        self.snapshot = snapshot
        self.session = session
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.finish = finish

    async def handle(self, request: web.Request) -> web.StreamResponse:
        snap = self.snapshot  # captured once: a reload during this request never changes what it sees
        snap.inflight += 1
        try:
            return await self._handle(request, snap)
        finally:
            snap.inflight -= 1

    async def _handle(self, request: web.Request, snap: ConfigSnapshot) -> web.StreamResponse:
        # The guard opened it with the path as the client sent it; the forwarded one replaces it once known.
        ex = exchange_of(request)
        ex.llm_id = request.match_info["llm_id"]
        if snap.capture_bodies:  # one byte more than is captured: the capture says when it was truncated
            ex.capture_bytes = snap.body_limit + 1
        resp: web.StreamResponse
        try:
            resp = await self._proxy(request, ex, snap)
        except TapError as err:
            resp = await answer(request, ex, err)
        except Stopped as stop:
            resp = await answer(request, ex, stop_error(stop))
        except HookFailed as exc:
            resp = await answer(request, ex, _hook_error(exc))
        except Exception:
            # A bug of ours, or a failure nobody anticipated: still one recorded exchange, and a JSON 500 with the
            # request id unless bytes of the answer already went out (then the stream just ends).
            log.exception("request %s failed unexpectedly", ex.request_id)
            if sent_anything(request) and ex.response is not None:
                ex.error = errors.internal_error()
                resp = ex.response
                with contextlib.suppress(Exception):
                    await resp.write_eof()
            else:
                resp = await answer(request, ex, errors.internal_error())
        except BaseException:
            if ex.budget is not None:  # a cancelled handler must not leak the budget reservation
                ex.budget.release()
            if ex.ratelimit is not None:  # nor its rate-limit admission (a concurrency claim)
                ex.ratelimit.settle(None)
            raise
        ex.finished = time.perf_counter()
        try:
            self.finish(ex, snap)
        except Exception:  # accounting must never break serving
            log.exception("recording request %s failed", ex.request_id)
        finally:
            if ex.budget is not None:  # finish() settled it; released here only when recording failed first
                ex.budget.release()
            if ex.ratelimit is not None:  # the same for the rate-limit admission
                ex.ratelimit.settle(None)
        return resp

    async def _authenticate(self, up: Upstream, req: TapRequest, ex: Exchange, apps: AppIndex) -> None:
        if await run_auth_hooks(up.chain.auth, req, ex) is None:
            key = presented_key(req.headers)
            if key is None:
                raise errors.missing_key()
            found = apps.identify(key)
            if found is None:
                raise errors.expired_key() if apps.expired_key(key) else errors.unknown_key()
            ex.app_id, ex.key_hash, ex.key_id = found[0].id, found[1], found[2]
        if ex.app_id in apps.by_id and not apps.allowed(ex.app_id, up.id):
            raise errors.llm_not_allowed(ex.app_id, up.id)

    async def _proxy(self, request: web.Request, ex: Exchange, snap: ConfigSnapshot) -> web.StreamResponse:
        if ex.method not in FORWARDED_METHODS:
            raise errors.method_not_allowed(ex.method, FORWARDED_METHODS)
        up = snap.upstreams.get(ex.llm_id)
        if up is None:
            raise errors.unknown_llm(ex.llm_id)
        ex.vendor = up.vendor
        ex.currency = up.config.currency
        ex.prices = up.prices
        ex.server = (up.server_address, up.server_port)
        # Cut from the raw path at its own separators (the router matched the same ones: an encoded "/" is no
        # separator to it either), never by the decoded id's length; then confined below upstream_url.
        parts = ex.path.split("/", 3)
        rest = confined_path(parts[3] if len(parts) == 4 else "")
        ex.path = f"/llm/{ex.llm_id}/{rest}"
        ex.operation = operation_of(rest)
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise errors.body_too_large(self.max_body_bytes)
        try:
            if request.content.is_eof():  # the whole body came with the head (the common case): nothing to wait for
                body = await request.read()
            else:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.body_too_large(self.max_body_bytes) from None
        except TimeoutError:
            raise errors.request_timeout(self.body_timeout_s) from None
        except HttpProcessingError as exc:  # the body broke HTTP's framing (TapRequestHandler._body_broken)
            raise errors.bad_http_from(exc) from None
        except CLIENT_GONE:  # the client aborted its upload: its doing, not a failure of the gateway
            log.debug("request %s: the client went away while sending its body", ex.request_id)
            raise errors.client_disconnected("client went away while sending the request body") from None
        ex.request_bytes = len(body)
        req = TapRequest(request.method, rest, request.rel_url.raw_query_string, CIMultiDict(request.headers),
                         body, ex.client_address)
        chain = up.chain
        if chain.pre_auth:
            served = await run_request_hooks(chain.pre_auth, req, ex)
            if served is not None:
                return await self._serve_local(request, up, ex, None, served)
        await self._authenticate(up, req, ex, snap.apps)

        try:
            parsed = parse_request_json(req, ex)
        except orjson.JSONDecodeError as exc:
            raise errors.malformed_json(str(exc)) from None
        ex.requested_model = ex.model
        ex.request_params = request_parameters(parsed)
        if chain.post_auth:
            served = await run_request_hooks(chain.post_auth, req, ex)
            parsed = req.json() if req.body is not body else parsed
            if served is not None:
                ex.request_body = req.body
                return await self._serve_local(request, up, ex, parsed, served)

        strip_usage = False
        stream_requested = isinstance(parsed, dict) and parsed.get("stream") is True
        if stream_requested and up.vendor == "openai" and "chat/completions" in req.path:
            strip_usage = prepare_openai_stream(parsed)
            if strip_usage:
                req.set_json(parsed)
        ex.request_body = req.body
        return await self._forward(request, up, req, ex, parsed, strip_usage)

    @staticmethod
    def _upstream_headers(up: Upstream, req: TapRequest, ex: RequestScope) -> CIMultiDict[str]:
        # The request's own copy is forwarded (nobody reads it after this): no second copy, no per-name lower().
        headers = _without(req.headers, REQUEST_HEADERS_DROPPED)
        if up.credential is not None:
            headers[up.credential[0]] = up.credential[1]
        headers[REQUEST_ID_HEADER] = ex.request_id
        headers[TRACEPARENT] = ex.trace.traceparent  # the upstream's work is a child of the tap's span
        return headers

    async def _forward(self, request: web.Request, up: Upstream, req: TapRequest, ex: Exchange, parsed: Any,
                       strip_usage: bool) -> web.StreamResponse:
        path = req.path
        if path != ex.path[len(ex.llm_id) + 6:]:  # a hook rewrote it: confined like the client's, recorded as sent
            path = confined_path(path)
            ex.path = f"/llm/{ex.llm_id}/{path}"
        url = up.base_url + path + ("?" + req.query_string if req.query_string else "")
        headers = self._upstream_headers(up, req, ex)
        ex.upstream_start = time.perf_counter()
        try:
            async with asyncio.timeout(up.first_byte_s):
                upstream = await self.session.request(req.method, URL(url, encoded=True), headers=headers,
                                                      data=req.body or None, timeout=up.timeout,
                                                      allow_redirects=False)
        except TimeoutError:
            ex.upstream_end = time.perf_counter()
            raise errors.upstream_timeout(up.id, "no response headers in time") from None
        except aiohttp.ClientError as exc:
            ex.upstream_end = time.perf_counter()
            raise errors.upstream_unreachable(up.id, type(exc).__name__) from None
        ex.ttfb = time.perf_counter()
        try:
            return await self._respond(request, up, upstream, ex, parsed, strip_usage)
        finally:
            upstream.release()

    async def _respond(self, request: web.Request, up: Upstream, upstream: aiohttp.ClientResponse, ex: Exchange,
                       parsed: Any, strip_usage: bool) -> web.StreamResponse:
        headers = _without(CIMultiDict(upstream.headers), RESPONSE_HEADERS_DROPPED)
        streamed = headers.get("content-type", "").startswith("text/event-stream")
        tap_resp = TapResponse(upstream.status, headers, streamed)
        await self._run_response_header_hooks(up, tap_resp, ex)
        if not tap_resp.streamed:
            return await self._respond_whole(request, up, upstream, tap_resp, ex, parsed)
        return await self._respond_stream(request, up, upstream.content.iter_any(), upstream.status, tap_resp, ex,
                                          parsed, strip_usage)

    async def _serve_local(self, request: web.Request, up: Upstream, ex: Exchange, parsed: Any,
                           answered: Answered) -> web.StreamResponse:
        """A plugin answered (``HookResult.respond``): the whole-response or the stream path, without the upstream."""
        result = answered.result
        ex.served_by = answered.plugin
        ex.cache_hit = result.cache_hit
        ex.charge = result.charge
        ex.first_chunk = time.perf_counter()
        headers: CIMultiDict[str] = CIMultiDict(result.headers or {})
        headers.setdefault("content-type", "application/json")
        # As for an upstream answer, the content type says whether it is a stream.
        tap_resp = TapResponse(result.status, headers, headers["content-type"].startswith("text/event-stream"))
        await self._run_response_header_hooks(up, tap_resp, ex)
        if tap_resp.streamed:
            return await self._respond_stream(request, up, _replay(result.body or b""), result.status, tap_resp, ex,
                                              parsed, _strips_usage(up, ex, parsed))
        return await self._send_whole(request, up, tap_resp, ex, parsed, result.body or b"")

    async def _run_response_header_hooks(self, up: Upstream, tap_resp: TapResponse, ex: Exchange) -> None:
        await run_response_header_hooks(up.chain.response_headers, tap_resp, ex)
        if ex.ratelimit_headers:
            tap_resp.headers.update(ex.ratelimit_headers)
        tap_resp.headers[REQUEST_ID_HEADER] = ex.request_id
        tap_resp.headers[TRACEPARENT] = ex.trace.traceparent
        ex.status = tap_resp.status
        ex.streamed = tap_resp.streamed
        ex.response_headers = tap_resp.headers

    async def _respond_whole(self, request: web.Request, up: Upstream, upstream: aiohttp.ClientResponse,
                             tap_resp: TapResponse, ex: Exchange, parsed: Any) -> web.StreamResponse:
        try:
            body = await self._read_whole(up, upstream, ex)
        except TimeoutError:
            raise errors.upstream_timeout(up.id, "response body not complete in time") from None
        except aiohttp.ClientError as exc:
            raise errors.upstream_unreachable(up.id, f"response body broke off: {type(exc).__name__}") from None
        ex.upstream_end = ex.first_chunk = time.perf_counter()
        return await self._send_whole(request, up, tap_resp, ex, parsed, body)

    @staticmethod
    async def _read_whole(up: Upstream, upstream: aiohttp.ClientResponse, ex: Exchange) -> bytes:
        """The upstream's whole body, decompressed, read chunk by chunk up to ``limits.max_response_bytes``:
        more is refused without reading (or inflating) the rest, and the connection is dropped."""
        limit = up.config.limits.max_response_bytes
        declared = upstream.content_length
        if declared is not None and declared > limit and ex.method != "HEAD":
            upstream.close()
            raise errors.upstream_response_too_large(up.id, limit, "max_response_bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            if size > limit:
                chunks.clear()
                upstream.close()
                raise errors.upstream_response_too_large(up.id, limit, "max_response_bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _send_whole(self, request: web.Request, up: Upstream, tap_resp: TapResponse, ex: Exchange,
                          parsed: Any, body: bytes) -> web.StreamResponse:
        """Account a whole response body, run the body hooks and the chunk hooks on it once, and send it."""
        if 200 <= tap_resp.status < 300:
            ex.usage = usage_from_body(up.vendor, body)
            self._price(up, ex, parsed, estimated_completion=None)
        if up.chain.response_body:
            try:
                body = await run_body_hooks(up.chain.response_body, tap_resp, body, ex)
            except Stopped:
                self._withhold_completion(up, ex)  # the client gets the stop's error, not the answer
                raise
            ex.status = tap_resp.status  # a body hook may have changed it
        if up.chain.response_chunk:
            body = await run_chunk_hooks(up.chain.response_chunk, body, ex)
            if up.chain.response_end:
                body += await run_chunk_end(up.chain.response_chunk, up.chain.response_end, ex)
        ex.response_body = body
        ex.response_bytes = len(body)
        resp = ex.response = web.Response(status=tap_resp.status, body=body, headers=tap_resp.headers)
        await send(request, ex, resp)
        return resp

    async def _respond_stream(self, request: web.Request, up: Upstream, chunks: AsyncIterator[bytes], status: int,
                              tap_resp: TapResponse, ex: Exchange, parsed: Any,
                              strip_usage: bool) -> web.StreamResponse:
        """Relay a stream (the upstream's body, or a plugin's answer) through accounting and the stream hooks;
        ``status`` is its own status, before the header hooks."""
        resp = ex.response = web.StreamResponse(status=tap_resp.status, headers=tap_resp.headers)
        try:
            await resp.prepare(request)
        except CLIENT_GONE:
            ex.fail(errors.client_disconnected("client went away before the answer was sent"))
            return resp
        except ValueError as exc:  # aiohttp refused a header (a plugin's, holding CR or LF): nothing went out
            raise refused(request, exc) from exc
        # From here on the status line is out: a failure can only end the stream, never change the response.
        acct = StreamAccounting(up.vendor, strip_usage) if 200 <= status < 300 else None
        relay = EventRelay(up.chain.stream_event, up.vendor, ex, acct.account if acct is not None else None) \
            if up.chain.stream_event else None
        hooks = up.chain.response_chunk
        captured: list[bytes] = []
        limits = up.config.limits
        received = 0
        try:
            async for chunk in chunks:
                if ex.first_chunk is None:
                    ex.first_chunk = time.perf_counter()
                received += len(chunk)
                if received > limits.max_stream_bytes:
                    ex.error = errors.upstream_response_too_large(up.id, limits.max_stream_bytes, "max_stream_bytes")
                    break
                if relay is not None:
                    out = await relay.feed(chunk)
                    pending = relay.pending_bytes
                else:
                    out = acct.feed(chunk) if acct is not None else chunk
                    pending = acct.pending_bytes if acct is not None else 0
                if out:
                    await self._write_chunk(resp, out, hooks, ex, captured)
                if relay is not None and relay.stopped is not None:
                    ex.error, ex.blocked_by = stop_error(relay.stopped), relay.stopped.plugin
                    break  # a hook ended the stream: nothing more of the upstream's answer goes out
                if pending > limits.max_event_bytes:  # one event the tap would have to hold without end
                    ex.error = errors.upstream_response_too_large(up.id, limits.max_event_bytes, "max_event_bytes")
                    break
            else:
                tail = await relay.flush() if relay is not None else acct.flush() if acct is not None else b""
                if tail:
                    await self._write_chunk(resp, tail, hooks, ex, captured)
            if up.chain.response_end:  # the body ended (also by a stop's error event): what chunk hooks held back
                held = await run_chunk_end(hooks, up.chain.response_end, ex)
                if held:
                    await self._write_chunk(resp, held, (), ex, captured)
        except TimeoutError:
            ex.error = errors.upstream_timeout(up.id, "stream not complete in time")
        except HookFailed as exc:
            ex.error = _hook_error(exc)
        except CLIENT_GONE:
            ex.error = errors.client_disconnected("client went away mid-stream")
        except aiohttp.ClientError as exc:
            ex.error = errors.upstream_unreachable(up.id, f"stream broke off: {type(exc).__name__}")
        ex.upstream_end = time.perf_counter()
        ex.response_body = b"".join(captured)
        if acct is not None:
            ex.usage = acct.usage
            delivered = relay.delivered if relay is not None else None
            if relay is not None and relay.stopped is not None and not acct.complete:
                # Cut before the upstream's final usage report: bill what the client got, estimated.
                acct.usage.estimated = True
                acct.usage.completion_tokens = acct.estimate_completion_tokens(delivered)
                acct.usage.total_tokens = 0
            self._price(up, ex, parsed, estimated_completion=acct.estimate_completion_tokens(delivered))
        with contextlib.suppress(*CLIENT_GONE):
            await resp.write_eof()
        return resp

    @staticmethod
    async def _write_chunk(resp: web.StreamResponse, data: bytes, hooks: tuple[Step, ...], ex: Exchange,
                           captured: list[bytes]) -> None:
        if hooks:
            data = await run_chunk_hooks(hooks, data, ex)
        if data:
            kept = ex.response_bytes
            ex.response_bytes += len(data)
            if kept < ex.capture_bytes:  # never more than the capture needs: a stream may be hundreds of MiB
                captured.append(data[:ex.capture_bytes - kept])
            await resp.write(data)

    @staticmethod
    def _withhold_completion(up: Upstream, ex: Exchange) -> None:
        """A body hook replaced the answer with an error: the completion was not delivered, so not billed."""
        usage = ex.usage
        if usage is None:
            return
        usage.completion_tokens = 0
        usage.reasoning_tokens = None
        usage.total_tokens = usage.prompt_tokens

    @staticmethod
    def _price(up: Upstream, ex: Exchange, parsed: Any, estimated_completion: int | None) -> None:
        usage = ex.usage or Usage()
        if not usage.found or usage.invalid:  # no report, or a broken one: never free, estimated
            usage.estimated = True
            usage.prompt_tokens = estimate_prompt_tokens(parsed)
            if estimated_completion is not None:
                usage.completion_tokens = estimated_completion
            usage.total_tokens = 0
            if usage.invalid:  # none of the broken report's parts are trusted
                usage.cache_read_tokens = usage.cache_write_tokens = usage.reasoning_tokens = None
        usage.finish()
        ex.usage = usage
        if usage.model:
            ex.model = usage.model
        # Priced when the request is recorded (Exchange.settle_cost), at the time its events are emitted.

