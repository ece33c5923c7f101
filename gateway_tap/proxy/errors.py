"""OpenAI-style error responses: ``{"error": {"type", "code", "message", "request_id"}}`` plus ``x-request-id``."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway_tap.tracing import TRACEPARENT

REQUEST_ID_HEADER = "x-request-id"


class TapError(Exception):
    """The tap answers the request itself with ``status`` and the standard error body."""

    def __init__(self, status: int, type_: str, code: str, message: str, *, blocked_by: str | None = None,
                 body: bytes | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.blocked_by = blocked_by
        self.body = body
        self.headers = headers


def error_body(type_: str, code: str, message: str, request_id: str) -> bytes:
    return orjson.dumps({"error": {"type": type_, "code": code, "message": message, "request_id": request_id}})


def error_response(error: TapError, request_id: str, traceparent: str | None = None) -> web.Response:
    """The error as JSON, with the request id (and the tap's ``traceparent`` when the request has a span)."""
    body = error.body if error.body is not None else error_body(error.type, error.code, error.message, request_id)
    resp = web.Response(status=error.status, body=body, content_type="application/json")
    if error.headers:
        resp.headers.update(error.headers)
    resp.headers[REQUEST_ID_HEADER] = request_id
    if traceparent is not None:
        resp.headers[TRACEPARENT] = traceparent
    return resp


def not_found(path: str) -> TapError:
    return TapError(404, "not_found_error", "route_not_found", f"no route for {path}")


def method_not_allowed(method: str, allowed: frozenset[str]) -> TapError:
    methods = ", ".join(sorted(allowed))
    return TapError(405, "invalid_request_error", "method_not_allowed", f"{method} is not allowed here; use {methods}",
                    headers={"Allow": methods})


def unknown_llm(llm_id: str) -> TapError:
    return TapError(404, "not_found_error", "unknown_llm", f"no LLM with id {llm_id!r} is configured")


def invalid_path(path: str, why: str) -> TapError:
    """A path the tap will not forward: it could mean something else to the upstream (:mod:`.paths`)."""
    return TapError(400, "invalid_request_error", "invalid_path", f"the request path {path!r} is refused: {why}")


def path_outside_upstream(path: str) -> TapError:
    """A path whose dot-segments climb above the LLM's ``upstream_url`` path."""
    return TapError(400, "invalid_request_error", "path_outside_upstream",
                    f"the request path {path!r} climbs above the LLM's base path")


def missing_key() -> TapError:
    return TapError(401, "authentication_error", "missing_api_key",
                    "no API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")


def unknown_key() -> TapError:
    return TapError(401, "authentication_error", "invalid_api_key", "the API key is not valid")


def expired_key() -> TapError:
    return TapError(401, "authentication_error", "expired_api_key", "the API key has expired")


def llm_not_allowed(app_id: str, llm_id: str) -> TapError:
    return TapError(403, "permission_error", "llm_not_allowed", f"app {app_id!r} may not use LLM {llm_id!r}")


def body_too_large(limit: int) -> TapError:
    return TapError(413, "invalid_request_error", "request_too_large",
                    f"request body is larger than the {limit} byte limit")


def request_timeout(limit_s: float) -> TapError:
    """The request body did not arrive in time (a slow or stalled client); the connection is closed after it."""
    return TapError(408, "invalid_request_error", "request_timeout",
                    f"the request body did not arrive within {limit_s:g} s (tap.limits.body_timeout_s)")


def malformed_json(detail: str) -> TapError:
    return TapError(400, "invalid_request_error", "invalid_json", f"request body is not valid JSON: {detail}")


def upstream_unreachable(llm_id: str, detail: str) -> TapError:
    return TapError(502, "upstream_error", "upstream_unreachable", f"LLM {llm_id!r} is unreachable: {detail}")


def upstream_response_too_large(llm_id: str, limit_bytes: int, key: str) -> TapError:
    """The upstream's answer (decompressed) is larger than ``llms[].limits.<key>``."""
    what = "a server-sent event" if key == "max_event_bytes" else "an answer"
    return TapError(502, "upstream_error", "upstream_response_too_large",
                    f"LLM {llm_id!r} sent {what} larger than {limit_bytes} bytes (llms[{llm_id}].limits.{key})")


def upstream_timeout(llm_id: str, which: str) -> TapError:
    return TapError(504, "upstream_error", "upstream_timeout", f"LLM {llm_id!r} timed out ({which})")


def plugin_failed(plugin: str, hook: str, reason: str) -> TapError:
    return TapError(500, "plugin_error", "plugin_failed", f"plugin {plugin!r} failed in {hook}: {reason}")


def plugin_unavailable(plugin: str, hook: str, reason: str, retry_after: int) -> TapError:
    """A ``fail_open`` plugin endpoint failed: a transient failure the client may retry."""
    return TapError(503, "service_unavailable", "plugin_unavailable",
                    f"plugin {plugin!r} failed in {hook}: {reason}; retry later",
                    headers={"Retry-After": str(retry_after)})


def internal_error() -> TapError:
    """Something failed that the tap did not anticipate (a bug): the details are in its log, by request id."""
    return TapError(500, "internal_error", "internal_error",
                    "the gateway failed to handle this request; its log has the details under this request id")


def expectation_failed() -> TapError:
    return TapError(417, "invalid_request_error", "expectation_failed",
                    "the only expectation the gateway meets is 'Expect: 100-continue'")


def client_disconnected(message: str) -> TapError:
    """The client closed its connection before it had its answer (nginx's 499): not a failure of the gateway."""
    return TapError(499, "client_error", "client_disconnected", message)


def invalid_response_header() -> TapError:
    """aiohttp refused to send a response (a header set by a plugin holds CR, LF or another control character)."""
    return TapError(500, "internal_error", "invalid_response_header",
                    "the response could not be sent: a header holds a control character (CR, LF, ...)")


def budget_exceeded(message: str, retry_after: int) -> TapError:
    """Over a hard budget: what OpenAI clients know as running out of quota."""
    return TapError(429, "insufficient_quota", "budget_exceeded", message, headers={"Retry-After": str(retry_after)})


def rate_limited(kind: str, message: str, retry_after: int, headers: dict[str, str]) -> TapError:
    """Over a rate limit: OpenAI's 429 (``type`` ``requests`` or ``tokens``, ``code`` ``rate_limit_exceeded``)."""
    return TapError(429, kind, "rate_limit_exceeded", message, headers={**headers, "Retry-After": str(retry_after)})


def rate_limit_unavailable(retry_after: int) -> TapError:
    """``rate_limiting.on_redis_error: fail_closed`` while Redis cannot be reached."""
    return TapError(503, "service_unavailable", "rate_limit_unavailable",
                    "rate limits cannot be checked right now (redis unreachable)",
                    headers={"Retry-After": str(retry_after)})


def budget_store_unavailable(retry_after: int) -> TapError:
    """``on_store_error: fail_closed`` while the budget store cannot be read."""
    return TapError(503, "service_unavailable", "budget_store_unavailable",
                    "budgets cannot be checked right now (budget store unreachable)",
                    headers={"Retry-After": str(retry_after)})


def header_too_large(limit_bytes: int, limit_keys: str) -> TapError:
    return TapError(431, "invalid_request_error", "request_header_too_large",
                    f"a request header is longer than the {limit_bytes} byte limit ({limit_keys})")


def too_many_headers(limit: int) -> TapError:
    return TapError(431, "invalid_request_error", "too_many_request_headers",
                    f"the request has more than {limit} headers (tap.limits.max_header_count)")


def url_too_long(limit_bytes: int) -> TapError:
    return TapError(414, "invalid_request_error", "url_too_long",
                    f"the request URL is longer than the {limit_bytes} byte limit (tap.limits.max_url_bytes)")


def bad_http(reason: str) -> TapError:
    return TapError(400, "invalid_request_error", "bad_http_request", f"the request is not valid HTTP: {reason}")


def bad_http_from(exc: HttpProcessingError) -> TapError:
    """:func:`bad_http` for what aiohttp's parser raised: its first line, none of the client's bytes beyond it."""
    return bad_http((exc.message or type(exc).__name__).splitlines()[0].rstrip(": ")[:200])
