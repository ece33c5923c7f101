"""The built-in ``otlp`` collector: analytics events as OpenTelemetry GenAI spans and metrics over OTLP/HTTP.

Per analytics event, one span (``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT) whose trace and
span ids are the event's (``trace_id``, ``span_id``, parent ``parent_span_id``), so it joins the calling
application's trace where the tap continued its ``traceparent``; per batch, the ``gen_ai.client.token.usage``
and ``gen_ai.client.operation.duration`` histograms (delta temporality: each export covers the events handled
since the previous one). Attribute names follow the OpenTelemetry semantic conventions v1.41 (GenAI, status
Development); the cost is the documented extension ``gateway_tap.cost.*``. docs/opentelemetry.md has the
mapping of every event field.

The ``otlp_content`` collector (the same exporter) reads proxy_log events and exports what the tap captured of
the prompt and the answer (``tap.capture_bodies``) as ``gen_ai.client.inference.operation.details`` log records
in the request's span: content leaves the gateway only when both are explicitly turned on.

Sending is OTLP/HTTP with binary protobuf (``opentelemetry-proto``), gzip by default. The runtime owns batching
and retries: an answer 429 or 5xx, a timeout or a refused connection is :class:`RetryLater` (``Retry-After`` as
the floor of the backoff); any other 4xx is final and the batch goes to the dead-letter topic with the
collector's reason. A retried batch does not resend a signal the backend already accepted. A partial success
(the backend rejected some spans or points) is logged and counted, not retried (the OTLP specification).
Spans are idempotent by span id; the metrics are at-least-once (a batch redelivered after a crash counts twice).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

import aiohttp
import msgspec
import orjson
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO, LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_DELTA,
    Histogram,
    HistogramDataPoint,
    Metric,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from collectors.config import parse_collector_config
from collectors.sdk import CollectorError, CollectorServices, ConfigError, DataCollector, RetryLater
from gateway_tap import __version__
from gateway_tap.settings import Section
from schemas import Event, EventType

SEMCONV_VERSION = "1.41.0"
"""The OpenTelemetry semantic conventions the attributes follow (the resource's and scope's ``schema_url``)."""
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
CONTENT_EVENT = "gen_ai.client.inference.operation.details"
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class OtlpConfig(Section):
    """The ``otlp`` / ``otlp_content`` collectors' config."""

    endpoint: str | None = Field(
        default=None, pattern=r"^https?://",
        description="Base URL of the OTLP/HTTP receiver; /v1/traces, /v1/metrics and /v1/logs are appended "
                    "(default: the OTEL_EXPORTER_OTLP_ENDPOINT environment variable, else http://127.0.0.1:4318).")
    traces_endpoint: str | None = Field(default=None, pattern=r"^https?://",
                                        description="Full URL for spans, used as it is (overrides endpoint).")
    metrics_endpoint: str | None = Field(default=None, pattern=r"^https?://",
                                         description="Full URL for metrics, used as it is (overrides endpoint).")
    logs_endpoint: str | None = Field(default=None, pattern=r"^https?://",
                                      description="Full URL for log records, used as it is (overrides endpoint).")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="Extra request headers (nothing secret: see headers_env).")
    headers_env: str | None = Field(
        default=None, description="Environment variable holding secret headers as key=value,key2=value2 (the "
                                  "OTEL_EXPORTER_OTLP_HEADERS format), e.g. an Authorization header.")
    timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one export request.")
    compression: Literal["gzip", "none"] = Field(default="gzip", description="Request body compression.")
    ca_certs: str | None = Field(default=None, description="CA bundle (PEM) for an https endpoint.")
    service_name: str = Field(default="gateway-tap", min_length=1, description="The resource's service.name.")
    resource_attributes: dict[str, str] = Field(default_factory=dict,
                                                description="More resource attributes (deployment.environment...).")
    spans: bool = Field(default=True, description="Export one span per request (otlp).")
    metrics: bool = Field(default=True, description="Export the gen_ai.client.* histograms (otlp).")
    capture_content: bool = Field(
        default=False, description="otlp_content only, and required there: export the prompt and answer bodies "
                                   "the tap captured (tap.capture_bodies) as log records. Off: otlp_content "
                                   "refuses to start.")


class Rejected(CollectorError):
    """The receiver refused the batch for good (a 4xx other than 429): the runtime dead-letters it."""

    retriable = False


class _Call(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """The analytics fields the spans and metrics are made of (decoded from the Kafka value, no pydantic)."""

    id: str
    emitted_at: datetime
    gateway_id: str
    request_id: str
    app_id: str | None = None
    llm_id: str | None = None
    user_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    vendor: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    tokens_estimated: bool = False
    usage_invalid: bool = False
    cost: float = 0.0
    currency: str = "USD"
    cost_micros: int | None = None
    cost_input_micros: int | None = None
    cost_cache_read_micros: int | None = None
    cost_cache_write_micros: int | None = None
    cost_output_micros: int | None = None
    cost_reasoning_micros: int | None = None
    price_version: str | None = None
    price_source: str | None = None
    latency_ms: float
    ttft_ms: float | None = None
    status_code: int
    streamed: bool = False
    cache_hit: bool = False
    blocked_by: str | None = None
    operation: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] | None = None
    request_max_tokens: int | None = None
    request_temperature: float | None = None
    request_top_p: float | None = None
    request_stream: bool | None = None
    server_address: str | None = None
    server_port: int | None = None


class _Exchange(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """The proxy_log fields the content log records are made of."""

    id: str
    emitted_at: datetime
    request_id: str
    trace_id: str | None = None
    span_id: str | None = None
    path: str
    vendor: str | None = None
    request_body: str | None = None
    response_body: str | None = None


_CALL = msgspec.json.Decoder(_Call)
_EXCHANGE = msgspec.json.Decoder(_Exchange)


def _ns(when: datetime) -> int:
    return (when - _EPOCH) // _US * 1000


def _ids(trace_id: str | None, span_id: str | None, request_id: str, event_id: str) -> tuple[bytes, bytes]:
    """The event's W3C ids as bytes; an event written before trace context existed gets ids derived from it
    (stable, so a redelivered event becomes the same span)."""
    if trace_id and span_id:
        return bytes.fromhex(trace_id), bytes.fromhex(span_id)
    return hashlib.sha256(request_id.encode()).digest()[:16], hashlib.sha256(event_id.encode()).digest()[:8]


def _attr(attrs: Any, key: str, value: str | int | float | bool | list[str] | None) -> None:
    """Append one attribute (nothing for None): the AnyValue field follows the Python type."""
    if value is None:
        return
    kv = attrs.add()
    kv.key = key
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    elif isinstance(value, str):
        kv.value.string_value = value
    else:
        kv.value.array_value.values.extend(AnyValue(string_value=v) for v in value)


def provider_name(vendor: str) -> str:
    """``gen_ai.provider.name`` of an event's vendor (the LLM's API style)."""
    return _PROVIDERS.get(vendor, vendor)


def error_type(status_code: int) -> str | None:
    """``error.type`` of a failed call: its HTTP status code, as the conventions suggest for HTTP errors."""
    return str(status_code) if status_code >= 400 else None


def span_of(call: _Call, span: Span) -> None:
    """Fill ``span`` with the request an analytics event records (docs/opentelemetry.md, the mapping table)."""
    trace_id, span_id = _ids(call.trace_id, call.span_id, call.request_id, call.id)
    span.trace_id, span.span_id = trace_id, span_id
    if call.parent_span_id:
        span.parent_span_id = bytes.fromhex(call.parent_span_id)
    operation = call.operation or "chat"
    request_model = call.request_model or call.model
    span.name = f"{operation} {request_model}"
    span.kind = Span.SPAN_KIND_CLIENT
    end = _ns(call.emitted_at)
    span.end_time_unix_nano = end
    span.start_time_unix_nano = end - int(call.latency_ms * 1_000_000)
    if call.status_code >= 400:
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = f"HTTP {call.status_code}"
    a = span.attributes
    _attr(a, "gen_ai.operation.name", operation)
    _attr(a, "gen_ai.provider.name", provider_name(call.vendor))
    _attr(a, "gen_ai.request.model", request_model)
    _attr(a, "gen_ai.response.model", call.response_model)
    _attr(a, "gen_ai.request.max_tokens", call.request_max_tokens)
    _attr(a, "gen_ai.request.temperature", call.request_temperature)
    _attr(a, "gen_ai.request.top_p", call.request_top_p)
    if call.request_stream or call.streamed:
        _attr(a, "gen_ai.request.stream", True)
    _attr(a, "gen_ai.response.id", call.response_id)
    _attr(a, "gen_ai.response.finish_reasons", call.finish_reasons)
    if call.streamed and call.ttft_ms is not None:
        _attr(a, "gen_ai.response.time_to_first_chunk", call.ttft_ms / 1000)
    if call.prompt_tokens or call.completion_tokens:
        _attr(a, "gen_ai.usage.input_tokens", call.prompt_tokens)
        _attr(a, "gen_ai.usage.output_tokens", call.completion_tokens)
        _attr(a, "gen_ai.usage.cache_read.input_tokens", call.cache_read_tokens)
        _attr(a, "gen_ai.usage.cache_creation.input_tokens", call.cache_write_tokens)
        _attr(a, "gen_ai.usage.reasoning.output_tokens", call.reasoning_tokens)
    _attr(a, "server.address", call.server_address)
    _attr(a, "server.port", call.server_port)
    _attr(a, "error.type", error_type(call.status_code))
    _attr(a, "http.response.status_code", call.status_code)
    _attr(a, "user.id", call.user_id)
    _attr(a, "gateway_tap.request.id", call.request_id)
    _attr(a, "gateway_tap.gateway.id", call.gateway_id)
    _attr(a, "gateway_tap.app.id", call.app_id)
    _attr(a, "gateway_tap.llm.id", call.llm_id)
    if call.tokens_estimated:
        _attr(a, "gateway_tap.usage.estimated", True)
    if call.usage_invalid:
        _attr(a, "gateway_tap.usage.invalid", True)
    if call.cache_hit:
        _attr(a, "gateway_tap.cache_hit", True)
    _attr(a, "gateway_tap.blocked_by", call.blocked_by)
    if call.cost_micros is not None:
        _attr(a, "gateway_tap.cost.amount", call.cost)
        _attr(a, "gateway_tap.cost.currency", call.currency)
        _attr(a, "gateway_tap.cost.total_micros", call.cost_micros)
        _attr(a, "gateway_tap.cost.input_micros", call.cost_input_micros)
        _attr(a, "gateway_tap.cost.cache_read_micros", call.cost_cache_read_micros)
        _attr(a, "gateway_tap.cost.cache_write_micros", call.cost_cache_write_micros)
        _attr(a, "gateway_tap.cost.output_micros", call.cost_output_micros)
        _attr(a, "gateway_tap.cost.reasoning_micros", call.cost_reasoning_micros)
        _attr(a, "gateway_tap.cost.price_version", call.price_version)
        _attr(a, "gateway_tap.cost.price_source", call.price_source)


class _Histograms:
    """The batch's two histograms, one data point per attribute set."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, tuple[tuple[str, Any], ...]], list[Any]] = {}

    def observe(self, name: str, key: tuple[tuple[str, Any], ...], value: float, bounds: Sequence[float]) -> None:
        point = self.points.get((name, key))
        if point is None:
            point = self.points[(name, key)] = [[0] * (len(bounds) + 1), 0, 0.0, value, value]
        counts = point[0]
        i = 0
        while i < len(bounds) and value > bounds[i]:
            i += 1
        counts[i] += 1
        point[1] += 1
        point[2] += value
        point[3] = min(point[3], value)
        point[4] = max(point[4], value)

    def add(self, call: _Call) -> None:
        base = (("gen_ai.operation.name", call.operation or "chat"),
                ("gen_ai.provider.name", provider_name(call.vendor)),
                ("gen_ai.request.model", call.request_model or call.model),
                ("gen_ai.response.model", call.response_model), ("server.address", call.server_address),
                ("server.port", call.server_port))
        error = error_type(call.status_code)
        self.observe("gen_ai.client.operation.duration", (*base, ("error.type", error)), call.latency_ms / 1000,
                     DURATION_BUCKETS_S)
        # Only reported usage (the conventions: no estimates), and only when there was some.
        if not call.tokens_estimated and (call.prompt_tokens or call.completion_tokens):
            self.observe("gen_ai.client.token.usage", (*base, ("gen_ai.token.type", "input")), call.prompt_tokens,
                         TOKEN_BUCKETS)
            self.observe("gen_ai.client.token.usage", (*base, ("gen_ai.token.type", "output")),
                         call.completion_tokens, TOKEN_BUCKETS)

    def metrics(self, start_ns: int, end_ns: int) -> list[Metric]:
        by_name: dict[str, Metric] = {}
        for (name, key), (counts, count, total, low, high) in self.points.items():
            metric = by_name.get(name)
            if metric is None:
                metric = by_name[name] = Metric(
                    name=name, unit="s" if name.endswith("duration") else "{token}",
                    description="GenAI operation duration." if name.endswith("duration")
                    else "Number of input and output tokens used.",
                    histogram=Histogram(aggregation_temporality=AGGREGATION_TEMPORALITY_DELTA))
            point = HistogramDataPoint(start_time_unix_nano=start_ns, time_unix_nano=end_ns, count=count, sum=total,
                                       min=low, max=high, bucket_counts=counts,
                                       explicit_bounds=DURATION_BUCKETS_S if name.endswith("duration")
                                       else TOKEN_BUCKETS)
            for k, v in key:
                _attr(point.attributes, k, v)
            metric.histogram.data_points.append(point)
        return list(by_name.values())


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def input_messages(body: str | None) -> str | None:
    """``gen_ai.input.messages`` (the conventions' JSON) of a captured request body, when it is whole JSON."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # clipped at tap.body_capture_bytes, or not JSON: exported raw
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        return None
    messages = []
    if isinstance(system := _text(data.get("system")), str):
        messages.append({"role": "system", "parts": [{"type": "text", "content": system}]})
    for message in data["messages"]:
        if isinstance(message, dict):
            text = _text(message.get("content"))
            parts = [{"type": "text", "content": text}] if text is not None else []
            messages.append({"role": str(message.get("role", "user")), "parts": parts})
    return orjson.dumps(messages).decode()


def output_messages(body: str | None) -> str | None:
    """``gen_ai.output.messages`` of a captured whole answer (OpenAI choices, Anthropic content)."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # a stream, or clipped
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("choices"), list):
        out = []
        for choice in data["choices"]:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                text = _text(message.get("content"))
                out.append({"role": "assistant", "parts": [{"type": "text", "content": text}] if text else [],
                            "finish_reason": choice.get("finish_reason")})
        return orjson.dumps(out).decode()
    if isinstance(data.get("content"), list):
        text = _text(data["content"])
        return orjson.dumps([{"role": "assistant", "parts": [{"type": "text", "content": text}] if text else [],
                              "finish_reason": data.get("stop_reason")}]).decode()
    return None


def content_record(exchange: _Exchange, record: LogRecord) -> bool:
    """Fill ``record`` with the content a proxy_log captured; False when it captured none."""
    if not exchange.request_body and not exchange.response_body:
        return False
    trace_id, span_id = _ids(exchange.trace_id, exchange.span_id, exchange.request_id, exchange.id)
    record.trace_id, record.span_id = trace_id, span_id
    record.time_unix_nano = record.observed_time_unix_nano = _ns(exchange.emitted_at)
    record.severity_number = SEVERITY_NUMBER_INFO
    record.event_name = CONTENT_EVENT
    a = record.attributes
    if exchange.vendor:
        _attr(a, "gen_ai.provider.name", provider_name(exchange.vendor))
    _attr(a, "gateway_tap.request.id", exchange.request_id)
    inputs, outputs = input_messages(exchange.request_body), output_messages(exchange.response_body)
    _attr(a, "gen_ai.input.messages", inputs)
    _attr(a, "gen_ai.output.messages", outputs)
    if inputs is None:
        _attr(a, "gateway_tap.request.body", exchange.request_body)
    if outputs is None:
        _attr(a, "gateway_tap.response.body", exchange.response_body)
    return True


def parse_headers(value: str) -> dict[str, str]:
    """``key=value,key2=value2`` (values URL-decoded), the OTEL_EXPORTER_OTLP_HEADERS format."""
    from urllib.parse import unquote

    headers = {}
    for item in value.split(","):
        key, sep, raw = item.partition("=")
        if sep and key.strip():
            headers[key.strip()] = unquote(raw.strip())
    return headers


class OtlpCollector(DataCollector):
    """Exports analytics events as GenAI spans and metrics over OTLP/HTTP protobuf."""

    event_types: ClassVar[tuple[EventType, ...]] = ("analytics",)
    Config = OtlpConfig

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        self.settings = parse_collector_config(services.name, OtlpConfig, config)
        self.check_settings()
        base = (self.settings.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or "http://127.0.0.1:4318").rstrip("/")
        self.urls = {"traces": self.settings.traces_endpoint or f"{base}/v1/traces",
                     "metrics": self.settings.metrics_endpoint or f"{base}/v1/metrics",
                     "logs": self.settings.logs_endpoint or f"{base}/v1/logs"}
        headers = {"content-type": "application/x-protobuf", "user-agent": f"gateway-tap/{__version__}",
                   **self.settings.headers}
        if self.settings.headers_env:
            secret = os.environ.get(self.settings.headers_env)
            if not secret:
                raise ConfigError(f"{services.name}.headers_env: environment variable "
                                  f"{self.settings.headers_env!r} is not set")
            headers.update(parse_headers(secret))
        if self.settings.compression == "gzip":
            headers["content-encoding"] = "gzip"
        self.headers = headers
        instance = str(services.extras.get("group_instance_id") or f"{socket.gethostname()}-{os.getpid()}")
        resource = Resource()
        for key, value in {"service.name": self.settings.service_name, "service.instance.id": instance,
                           "service.version": __version__, **self.settings.resource_attributes}.items():
            _attr(resource.attributes, key, value)
        self.resource = resource
        self.scope = InstrumentationScope(name="gateway-tap", version=__version__)
        registry = services.metrics if isinstance(services.metrics, CollectorRegistry) else CollectorRegistry()
        self.exported = Counter("gateway_tap_otlp_exported_total", "Spans, metric points and log records the "
                                "receiver accepted, by signal.", ["signal"], registry=registry)
        self.partial = Counter("gateway_tap_otlp_rejected_total", "Items the receiver rejected in a partial "
                               "success (not retried), by signal.", ["signal"], registry=registry)
        self.session: aiohttp.ClientSession | None = None
        self._window_start_ns = time.time_ns()
        self._done: dict[tuple[str, str, int], set[str]] = {}  # signals already accepted, per batch

    def check_settings(self) -> None:
        """Refuse settings this collector does not honour (``capture_content`` belongs to ``otlp_content``)."""
        if self.settings.capture_content:
            raise ConfigError(f"{self.services.name}.capture_content: the otlp collector exports no content; "
                              "run otlp_content on the proxy_log topic for that")

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            ssl: Any = None
            if self.settings.ca_certs:
                import ssl as ssl_module

                ssl = ssl_module.create_default_context(cafile=self.settings.ca_certs)
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                connector=aiohttp.TCPConnector(limit=4, ssl=ssl if ssl is not None else True))
        return self.session

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        if not values:
            return
        key = (_first_id(values[0]), _first_id(values[-1]), len(values))
        done = self._done.setdefault(key, set())
        if len(self._done) > 64:  # keep the last batches only: a retry comes right after its failure
            for old in list(self._done)[:-32]:
                del self._done[old]
        if event_type == "analytics":
            calls = [_CALL.decode(v) for v in values]
            if self.settings.spans and "traces" not in done:
                request = ExportTraceServiceRequest()
                resource_spans = request.resource_spans.add(resource=self.resource, schema_url=SCHEMA_URL)
                scope_spans = resource_spans.scope_spans.add(scope=self.scope, schema_url=SCHEMA_URL)
                spans = scope_spans.spans
                for call in calls:
                    span_of(call, spans.add())
                await self._send("traces", request.SerializeToString(), ExportTraceServiceResponse, len(calls))
                done.add("traces")
            if self.settings.metrics and "metrics" not in done:
                histograms = _Histograms()
                for call in calls:
                    histograms.add(call)
                end_ns = max(time.time_ns(), self._window_start_ns + 1)
                request_m = ExportMetricsServiceRequest()
                resource_metrics = request_m.resource_metrics.add(resource=self.resource, schema_url=SCHEMA_URL)
                scope_metrics = resource_metrics.scope_metrics.add(scope=self.scope, schema_url=SCHEMA_URL)
                scope_metrics.metrics.extend(histograms.metrics(self._window_start_ns, end_ns))
                await self._send("metrics", request_m.SerializeToString(), ExportMetricsServiceResponse,
                                 len(histograms.points))
                self._window_start_ns = end_ns
                done.add("metrics")
        elif event_type == "proxy_log" and "logs" not in done:
            request_l = ExportLogsServiceRequest()
            resource_logs = request_l.resource_logs.add(resource=self.resource, schema_url=SCHEMA_URL)
            records = resource_logs.scope_logs.add(scope=self.scope, schema_url=SCHEMA_URL).log_records
            for value in values:
                record = LogRecord()
                if content_record(_EXCHANGE.decode(value), record):
                    records.append(record)
            if records:
                await self._send("logs", request_l.SerializeToString(), ExportLogsServiceResponse, len(records))
            done.add("logs")
        self._done.pop(key, None)

    async def _send(self, signal: str, body: bytes, response_type: Any, items: int) -> None:
        """POST one export request; classify the answer for the runtime."""
        if self.settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)
        url = self.urls[signal]
        try:
            async with self._session().post(url, data=body, headers=self.headers) as resp:
                answer = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("retry-after")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryLater(f"OTLP {signal} receiver {url} unreachable: {type(exc).__name__}: {exc}") from exc
        if status == 429 or status >= 500:
            hint = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise RetryLater(f"OTLP {signal} receiver {url} answered {status}", retry_after=hint)
        if status >= 300:
            raise Rejected(f"OTLP {signal} receiver {url} refused the batch: {status} {_status_message(answer)}")
        self.exported.labels(signal).inc(items)
        if answer:
            try:
                partial = response_type.FromString(answer).partial_success
            except Exception:  # a receiver that answers something else than the protobuf response: accepted
                return
            rejected = (getattr(partial, "rejected_spans", 0) or getattr(partial, "rejected_data_points", 0)
                        or getattr(partial, "rejected_log_records", 0))
            if rejected:
                self.partial.labels(signal).inc(rejected)
                self.services.logger.warning("OTLP %s receiver rejected %d of %d: %s", signal, rejected, items,
                                             partial.error_message)

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()


class OtlpContentCollector(OtlpCollector):
    """Exports the prompts and answers the tap captured (proxy_log bodies) as GenAI log records over OTLP/HTTP;
    starts only with ``capture_content: true``."""

    event_types: ClassVar[tuple[EventType, ...]] = ("proxy_log",)

    def check_settings(self) -> None:
        if not self.settings.capture_content:
            raise ConfigError(f"{self.services.name}.capture_content: otlp_content exports prompt and answer "
                              "content; set capture_content: true to confirm (and tap.capture_bodies to capture it)")


def _first_id(value: bytes) -> str:
    """The event id of a Kafka value (the batch's identity for not resending a signal on retry)."""
    start = value.find(b'"id":"')
    return value[start + 6:value.find(b'"', start + 6)].decode() if start >= 0 else ""


def _status_message(answer: bytes) -> str:
    """The receiver's reason, short and printable (a google.rpc.Status in protobuf, or text)."""
    text = answer[:300].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()
