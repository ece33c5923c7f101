"""The event contract: envelope plus the three payload types the tap publishes.

The JSON Schema files next to this module (``*.schema.json``) are the published
contract; these models are the Python side of it and a test keeps both in
agreement. Unknown extra fields are kept (``extra="allow"``) so an old consumer
can read events written by a newer producer within the same major version.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, Literal

import orjson
import uuid_utils
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""Major version of every event type written by this release."""

EventType = Literal["proxy_log", "analytics", "budget_usage"]
EVENT_TYPES: tuple[EventType, ...] = ("proxy_log", "analytics", "budget_usage")

TraceId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
SpanId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
KeyId = Annotated[str, Field(pattern=r"^(?:sha256:[0-9a-f]{12}|[A-Za-z0-9_][A-Za-z0-9._-]{0,63})$")]
"""A key's id: never the key nor its full hash (the pattern refuses a full ``sha256:`` hash)."""
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


def new_event_id() -> str:
    """A UUIDv7 string: unique, and sortable by creation time."""
    return str(uuid_utils.uuid7())


def utc_now() -> datetime:
    return datetime.now(UTC)


def status_class(status_code: int) -> str:
    """``"2xx"``, ``"4xx"``, ...: how the tap's metrics label a status and how analytics queries group one."""
    return f"{status_code // 100}xx"


class ErrorInfo(BaseModel):
    """Why the tap rejected a request or the upstream failed."""

    model_config = ConfigDict(extra="allow")

    type: str
    code: str | None = None
    message: str = ""


class Latency(BaseModel):
    """Latencies of one request, in milliseconds."""

    model_config = ConfigDict(extra="allow")

    total_ms: NonNegFloat
    upstream_ms: NonNegFloat | None = None
    ttfb_ms: NonNegFloat | None = None
    tap_overhead_ms: NonNegFloat | None = None


class Event(BaseModel):
    """Envelope shared by every event type.

    ``id`` is the idempotency key in every sink: a redelivered event carries the
    same id and must overwrite, never add.
    """

    model_config = ConfigDict(extra="allow", frozen=False)

    type: ClassVar[EventType]

    id: str = Field(default_factory=new_event_id, min_length=1)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    emitted_at: datetime = Field(default_factory=utc_now)
    gateway_id: str = Field(min_length=1)
    request_id: str = Field(min_length=1)
    app_id: str | None = None
    llm_id: str | None = None
    user_id: str | None = None
    trace_id: TraceId | None = None
    span_id: SpanId | None = None
    parent_span_id: SpanId | None = None
    # Since 1.4: the key that authenticated the request (an issued key's id, or a short hash prefix).
    key_id: KeyId | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, ``type`` included."""
        data = self.model_dump(mode="python", exclude_none=True)
        data["type"] = self.type
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_UTC_Z)


class ProxyLog(Event):
    """The raw exchange: one per request, including requests the tap rejected."""

    type: ClassVar[EventType] = "proxy_log"

    method: str
    path: str
    vendor: str | None = None
    status_code: int = Field(ge=100, le=599)
    request_bytes: NonNegInt = 0
    response_bytes: NonNegInt = 0
    streamed: bool = False
    latency: Latency
    request_headers: dict[str, str] = Field(default_factory=dict)
    response_headers: dict[str, str] = Field(default_factory=dict)
    request_body: str | None = None
    response_body: str | None = None
    client_address: str | None = None
    user_agent: str | None = None
    error: ErrorInfo | None = None
    blocked_by: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class Analytics(Event):
    """Usage and performance of one LLM call."""

    type: ClassVar[EventType] = "analytics"

    vendor: str
    model: str
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    total_tokens: NonNegInt = 0
    cache_read_tokens: NonNegInt | None = None
    cache_write_tokens: NonNegInt | None = None
    tokens_estimated: bool = False
    usage_invalid: bool = False
    cost: NonNegFloat = 0.0
    currency: str = "USD"
    latency_ms: NonNegFloat
    ttft_ms: NonNegFloat | None = None
    upstream_ms: NonNegFloat | None = None
    status_code: int = Field(ge=100, le=599)
    streamed: bool = False
    choices: NonNegInt | None = None
    tool_calls: NonNegInt | None = None
    cache_hit: bool = False
    blocked_by: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    # Since 1.2: the token classes and the cost split the same way (schemas/README.md, docs/pricing.md).
    reasoning_tokens: NonNegInt | None = None
    cost_micros: NonNegInt | None = None
    cost_input_micros: NonNegInt | None = None
    cost_cache_read_micros: NonNegInt | None = None
    cost_cache_write_micros: NonNegInt | None = None
    cost_output_micros: NonNegInt | None = None
    cost_reasoning_micros: NonNegInt | None = None
    price_version: str | None = None
    price_source: str | None = None
    # Since 1.2: what the OpenTelemetry GenAI conventions describe a call by (docs/opentelemetry.md).
    operation: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] | None = None
    request_max_tokens: NonNegInt | None = None
    request_temperature: float | None = None
    request_top_p: float | None = None
    request_stream: bool | None = None
    server_address: str | None = None
    server_port: Annotated[int, Field(ge=1, le=65535)] | None = None


class BudgetUsage(Event):
    """What one call consumed against budgets. Emitted only when it consumed something."""

    type: ClassVar[EventType] = "budget_usage"

    app_id: str  # type: ignore[assignment]  # required here, optional in the envelope
    llm_id: str  # type: ignore[assignment]
    model: str
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    total_tokens: NonNegInt = 0
    cost: NonNegFloat = 0.0
    currency: str = "USD"
    period: Literal["monthly", "daily"] = "monthly"
    period_start: date
    requests: int = Field(default=1, ge=0)
    # Since 1.2 (as in analytics):
    cache_read_tokens: NonNegInt | None = None
    cache_write_tokens: NonNegInt | None = None
    reasoning_tokens: NonNegInt | None = None
    cost_micros: NonNegInt | None = None
    cost_input_micros: NonNegInt | None = None
    cost_cache_read_micros: NonNegInt | None = None
    cost_cache_write_micros: NonNegInt | None = None
    cost_output_micros: NonNegInt | None = None
    cost_reasoning_micros: NonNegInt | None = None
    price_version: str | None = None
    price_source: str | None = None


EVENT_MODELS: dict[EventType, type[Event]] = {
    "proxy_log": ProxyLog,
    "analytics": Analytics,
    "budget_usage": BudgetUsage,
}

AnyEvent = ProxyLog | Analytics | BudgetUsage
