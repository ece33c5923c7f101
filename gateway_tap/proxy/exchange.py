"""One request in flight (:class:`Exchange`) and the three events it turns into."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING

import msgspec

from gateway_tap.apps import presented_key
from gateway_tap.plugins.chain import RequestScope
from gateway_tap.pricing import Cost, PriceBook
from gateway_tap.proxy.accounting import Usage
from gateway_tap.proxy.bounds import (
    ERROR_CODE_CHARS,
    ERROR_MESSAGE_CHARS,
    ID_CHARS,
    METHOD_CHARS,
    MODEL_CHARS,
    PATH_CHARS,
    USER_AGENT_CHARS,
    clip,
    clip_metadata,
)
from gateway_tap.proxy.redaction import MIN_SECRET_CHARS, PATTERNS_ONLY, Redactor, finish_headers, kept
from gateway_tap.tracing import TraceContext
from schemas import SCHEMA_VERSION, new_event_id, utc_now
from schemas.wire import WireAnalytics, WireBudgetUsage, WireErrorInfo, WireLatency, WireProxyLog

if TYPE_CHECKING:
    from aiohttp import web

    from gateway_tap.budgets.enforcer import Reservation
    from gateway_tap.proxy.errors import TapError
    from gateway_tap.ratelimits import Admission
    from gateway_tap.settings import Period


def month_start(now: datetime) -> date:
    return date(now.year, now.month, 1)


class Exchange(RequestScope):
    """Everything recorded about one request, filled in as it progresses (the hook chain's scope plus the rest)."""

    __slots__ = (
        "blocked_by",
        "budget",
        "budget_period",
        "cache_hit",
        "capture_bytes",
        "charge",
        "client_address",
        "currency",
        "error",
        "finished",
        "first_chunk",
        "key_hash",
        "key_id",
        "method",
        "operation",
        "path",
        "price",
        "prices",
        "ratelimit",
        "ratelimit_headers",
        "recorded",
        "request_body",
        "request_bytes",
        "request_headers",
        "request_params",
        "requested_model",
        "response",
        "response_body",
        "response_bytes",
        "response_headers",
        "served_by",
        "server",
        "started",
        "status",
        "streamed",
        "ttfb",
        "upstream_end",
        "upstream_start",
        "usage",
        "user_agent",
    )

    def __init__(self, request_id: str, method: str, path: str, llm_id: str, started: float,
                 trace: TraceContext | None = None) -> None:
        super().__init__(request_id, llm_id, trace=trace)
        self.method = method
        self.path = path
        self.started = started
        self.requested_model: str | None = None
        self.status = 0
        self.streamed = False
        self.error: TapError | None = None
        self.blocked_by: str | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.request_headers: Mapping[str, str] = {}
        self.response_headers: Mapping[str, str] = {}
        self.response: web.StreamResponse | None = None  # once created: tells whether the status line went out
        self.request_body: bytes = b""
        self.response_body: bytes = b""
        self.client_address: str | None = None
        self.user_agent: str | None = None
        self.upstream_start: float | None = None
        self.ttfb: float | None = None
        self.first_chunk: float | None = None
        self.upstream_end: float | None = None
        self.finished = started
        self.usage: Usage | None = None
        self.prices: PriceBook | None = None  # the LLM's (set once the route is known)
        self.price: Cost | None = None  # set by settle_cost() when the request is recorded
        self.currency = "USD"
        self.operation: str | None = None
        self.request_params: tuple[int | None, float | None, float | None, bool | None] = _NO_PARAMS
        self.server: tuple[str, int] | None = None
        self.budget: Reservation | None = None  # set by the budget step when a budget admitted the request
        self.budget_period: tuple[Period, date] | None = None  # the period that request was counted against
        self.key_hash: str | None = None  # the key that authenticated (its sha256 hash); None with an auth plugin
        self.key_id: str | None = None  # that key's id (AppConfig.key_id): what events and key budgets name it by
        self.ratelimit: Admission | None = None  # set by the rate-limit step when a limit admitted the request
        self.ratelimit_headers: dict[str, str] | None = None  # OpenAI's x-ratelimit-* for the answer
        self.served_by: str | None = None  # the plugin that answered instead of the upstream (HookResult.respond)
        self.cache_hit = False
        self.capture_bytes = 0  # how much of a streamed answer to keep for the proxy_log capture (0: none)
        self.charge = True  # False: a plugin's answer that costs nothing (no cost, no budget usage)
        self.recorded = False  # its events are out: nothing records it again (proxy.guard)

    def settle_cost(self, now: datetime) -> None:
        """Price the usage at the LLM's prices in force at ``now`` (the events' ``emitted_at``, so a re-price of
        the events finds the same prices); nothing when a plugin's answer costs nothing (``charge`` False)."""
        usage = self.usage
        if usage is None or self.prices is None or not self.charge:
            self.price = None
            return
        self.price = self.prices.cost(usage, usage.model, self.requested_model, at=now)

    @property
    def cost(self) -> float:
        """The cost in units of ``currency`` (0 until :meth:`settle_cost`, or when no price applied)."""
        return 0.0 if self.price is None else self.price.total_micros / 1_000_000

    def fail(self, error: TapError) -> None:
        self.error = error
        self.status = error.status
        if error.blocked_by:
            self.blocked_by = error.blocked_by

    # Latencies in milliseconds.
    @property
    def total_ms(self) -> float:
        return max(0.0, (self.finished - self.started) * 1000)

    @property
    def upstream_ms(self) -> float | None:
        if self.upstream_start is None:
            return None
        end = self.upstream_end or self.finished
        return max(0.0, (end - self.upstream_start) * 1000)

    @property
    def ttfb_ms(self) -> float | None:
        return None if self.ttfb is None else max(0.0, (self.ttfb - self.started) * 1000)

    def proxy_log(self, gateway_id: str, *, capture_bodies: bool = False, body_limit: int = 0,
                  redactor: Redactor = PATTERNS_ONLY, now: datetime | None = None) -> msgspec.Struct:
        """The proxy_log of this exchange: client-controlled strings clipped to :mod:`.bounds`, secrets redacted
        (:class:`Redactor`), bodies only with ``capture_bodies``. ``llm_id`` is null when no LLM route matched."""
        return self._events(gateway_id, capture_bodies, body_limit, redactor, now, analytics=False)[0]

    def events(self, gateway_id: str, *, capture_bodies: bool, body_limit: int,
               redactor: Redactor = PATTERNS_ONLY, now: datetime | None = None) -> list[msgspec.Struct]:
        """proxy_log and analytics always; budget_usage when tokens or cost were consumed.

        ``now`` is their ``emitted_at`` (the time :meth:`settle_cost` priced at). Built as the writing structs
        of :mod:`schemas.wire` (no pydantic on the hot path); publish them with
        :meth:`gateway_tap.publisher.EventPublisher.publish_wire`.
        """
        return self._events(gateway_id, capture_bodies, body_limit, redactor, now, analytics=True)

    def _events(self, gateway_id: str, capture_bodies: bool, body_limit: int, redactor: Redactor,
                now: datetime | None, analytics: bool) -> list[msgspec.Struct]:
        now = now or utc_now()
        usage = self.usage or _NO_USAGE
        upstream_ms = 0.0 if self.served_by is not None else self.upstream_ms
        total_ms = self.total_ms
        overhead = max(0.0, total_ms - upstream_ms) if upstream_ms is not None else total_ms
        presented = self._presented()
        err = self.error
        metadata = clip_metadata(self.metadata)
        (request_headers, long_request), (response_headers, long_response) = \
            redactor.headers(self.request_headers), redactor.headers(self.response_headers)
        text = redactor.scrubber(presented, (
            self.path, self.user_agent or "", "" if err is None else err.message, *metadata.values(),
            *request_headers.values(), *response_headers.values()))
        error = None if err is None else WireErrorInfo(
            type=clip(err.type, ERROR_CODE_CHARS), code=clip(err.code, ERROR_CODE_CHARS),
            message=clip(text(err.message), ERROR_MESSAGE_CHARS))
        model = clip(usage.model or self.requested_model or "unknown", MODEL_CHARS)
        if metadata and text is not kept:
            metadata = {k: text(v) for k, v in metadata.items()}
        request_id = self.request_id
        app_id, user_id, key_id = clip(self.app_id, ID_CHARS), clip(self.user_id, ID_CHARS), self.key_id
        llm_id = clip(self.llm_id, ID_CHARS) or None
        blocked_by = clip(self.blocked_by, ID_CHARS)
        trace = self.trace
        trace_id, span_id, parent_span_id = trace.trace_id, trace.span_id, trace.parent_span_id
        price = self.price
        cost = 0.0 if price is None else price.total_micros / 1_000_000
        priced = _price_fields(price) if price is not None else _UNPRICED
        max_tokens, temperature, top_p, stream = self.request_params
        server_address, server_port = self.server or (None, None)
        events: list[msgspec.Struct] = [
            WireProxyLog(
                id=new_event_id(), schema_version=SCHEMA_VERSION, emitted_at=now, gateway_id=gateway_id,
                request_id=request_id, app_id=app_id, llm_id=llm_id, user_id=user_id,
                trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id, key_id=key_id,
                method=clip(self.method, METHOD_CHARS), path=clip(text(self.path), PATH_CHARS),
                vendor=self.vendor if self.vendor != "unknown" else None,
                status_code=self.status, request_bytes=self.request_bytes, response_bytes=self.response_bytes,
                streamed=self.streamed,
                latency=WireLatency(total_ms=total_ms, upstream_ms=upstream_ms, ttfb_ms=self.ttfb_ms,
                                    tap_overhead_ms=overhead),
                request_headers=finish_headers(request_headers, long_request, text),
                response_headers=finish_headers(response_headers, long_response, text),
                request_body=redactor.body(self.request_body, body_limit, presented) if capture_bodies else None,
                response_body=redactor.body(self.response_body, body_limit, presented) if capture_bodies else None,
                client_address=self.client_address,
                user_agent=None if self.user_agent is None else clip(text(self.user_agent), USER_AGENT_CHARS),
                error=error, blocked_by=blocked_by, metadata=metadata,
            ),
        ]
        if not analytics:
            return events
        events.append(WireAnalytics(
            id=new_event_id(), schema_version=SCHEMA_VERSION, emitted_at=now, gateway_id=gateway_id,
            request_id=request_id, app_id=app_id, llm_id=llm_id, user_id=user_id,
            trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id, key_id=key_id,
            vendor=self.vendor, model=model, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
            tokens_estimated=usage.estimated, usage_invalid=usage.invalid, cost=cost, currency=self.currency,
            latency_ms=total_ms,
            ttft_ms=None if self.first_chunk is None else max(0.0, (self.first_chunk - self.started) * 1000),
            upstream_ms=upstream_ms, status_code=self.status, streamed=self.streamed, choices=usage.choices,
            tool_calls=usage.tool_calls, cache_hit=self.cache_hit, blocked_by=blocked_by, tags=metadata,
            reasoning_tokens=usage.reasoning_tokens, **priced, operation=self.operation,
            request_model=clip(self.requested_model, MODEL_CHARS), response_model=clip(usage.model, MODEL_CHARS),
            response_id=clip(usage.response_id, ID_CHARS), finish_reasons=usage.finish_reasons,
            request_max_tokens=max_tokens, request_temperature=temperature, request_top_p=top_p,
            request_stream=stream, server_address=server_address, server_port=server_port,
        ))
        if (usage.total_tokens > 0 or cost > 0) and app_id is not None and llm_id is not None and self.charge:
            period, start = self.budget_period or ("monthly", month_start(now))
            events.append(WireBudgetUsage(
                id=new_event_id(), schema_version=SCHEMA_VERSION, emitted_at=now, gateway_id=gateway_id,
                request_id=request_id, app_id=app_id, llm_id=llm_id, user_id=user_id,
                trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id, key_id=key_id,
                model=model, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens, cost=cost, currency=self.currency, period=period,
                period_start=start, requests=1, cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens, **priced,
            ))
        return events

    def _presented(self) -> str | None:
        """The key the request presented, when long enough to scrub verbatim from its record."""
        presented = presented_key(self.request_headers)
        return presented if presented is not None and len(presented) >= MIN_SECRET_CHARS else None

    def access_fields(self, redactor: Redactor = PATTERNS_ONLY) -> dict[str, object]:
        """The fields every access log line of an exchange has, clipped and redacted like the events."""
        error = self.error
        return {
            "request_id": self.request_id, "trace_id": self.trace.trace_id, "app": clip(self.app_id, ID_CHARS),
            "llm": clip(self.llm_id, ID_CHARS) or None, "method": clip(self.method, METHOD_CHARS),
            "path": clip(redactor.scrubber(self._presented(), (self.path,))(self.path), PATH_CHARS),
            "status": self.status, "streamed": self.streamed,
            "latency_ms": round(self.total_ms, 3),
            "error": None if error is None else clip(error.code, ERROR_CODE_CHARS),
            "blocked_by": clip(self.blocked_by, ID_CHARS),
        }


_NO_USAGE = Usage()
_NO_PARAMS: tuple[int | None, float | None, float | None, bool | None] = (None, None, None, None)
_UNPRICED: dict[str, None] = {}


def _price_fields(price: Cost) -> dict[str, int | str]:
    """The events' cost split and price version fields."""
    return {"cost_micros": price.total_micros, "cost_input_micros": price.input_micros,
            "cost_cache_read_micros": price.cache_read_micros, "cost_cache_write_micros": price.cache_write_micros,
            "cost_output_micros": price.output_micros, "cost_reasoning_micros": price.reasoning_micros,
            "price_version": price.version, "price_source": price.source}

