"""The Elasticsearch data model: index names, mappings and index templates.

Analytics teams query these indices directly, so the names and field types here are
product, not plumbing (``docs/analytics.md`` documents them):

- one index per event type and UTC day of the event's ``emitted_at``:
  ``<prefix>-<type>-YYYY.MM.DD`` (e.g. ``gateway-analytics-2026.11.24``);
- one read alias per type, ``<prefix>-<type>``, that covers every day;
- one component template ``<prefix>-events-common`` (settings and envelope fields) and one
  composable index template per type, ``<prefix>-<type>``, installed at collector start-up.

Mappings are explicit and ``dynamic: false``: a field the mapping does not name is kept
in ``_source`` but not indexed, so a newer tap cannot explode the mapping.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import EVENT_TYPES, EventType

TEMPLATE_VERSION = 4
"""Bumped whenever a mapping below changes; stored as the templates' ``version``."""

TEMPLATE_PRIORITY = 200
"""Above the built-in ``logs-*-*``/``metrics-*-*`` templates (100) of a real cluster."""

KEYWORD: dict[str, Any] = {"type": "keyword", "ignore_above": 1024}
LONG: dict[str, Any] = {"type": "long"}
INTEGER: dict[str, Any] = {"type": "integer"}
SHORT: dict[str, Any] = {"type": "short"}
DOUBLE: dict[str, Any] = {"type": "double"}
FLOAT: dict[str, Any] = {"type": "float"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
DATE: dict[str, Any] = {"type": "date"}
FLATTENED: dict[str, Any] = {"type": "flattened"}
"""String maps (tags, hook metadata): every key is searchable and aggregatable, one mapping entry."""
NOT_INDEXED: dict[str, Any] = {"type": "object", "enabled": False}
"""Kept in ``_source`` only (headers: useful to read, not to search)."""
BODY_TEXT: dict[str, Any] = {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}
"""Prompt/response excerpts: full-text search, plus exact match/aggregation on short values."""

ENVELOPE_PROPERTIES: dict[str, Any] = {
    "id": KEYWORD,
    "type": KEYWORD,
    "schema_version": SHORT,
    "emitted_at": DATE,
    "gateway_id": KEYWORD,
    "request_id": KEYWORD,
    "app_id": KEYWORD,
    "llm_id": KEYWORD,
    "user_id": KEYWORD,
    "trace_id": KEYWORD,
    "span_id": KEYWORD,
    "parent_span_id": KEYWORD,
    "key_id": KEYWORD,  # revision 1.4
}

TYPE_PROPERTIES: dict[EventType, dict[str, Any]] = {
    "proxy_log": {
        "method": KEYWORD,
        "path": KEYWORD,
        "vendor": KEYWORD,
        "status_code": SHORT,
        "status_class": KEYWORD,
        "request_bytes": LONG,
        "response_bytes": LONG,
        "streamed": BOOLEAN,
        "latency": {"properties": {"total_ms": FLOAT, "upstream_ms": FLOAT, "ttfb_ms": FLOAT,
                                   "tap_overhead_ms": FLOAT}},
        "request_headers": NOT_INDEXED,
        "response_headers": NOT_INDEXED,
        "request_body": BODY_TEXT,
        "response_body": BODY_TEXT,
        "client_address": KEYWORD,
        "user_agent": KEYWORD,
        "error": {"properties": {"type": KEYWORD, "code": KEYWORD, "message": BODY_TEXT}},
        "blocked_by": KEYWORD,
        "metadata": FLATTENED,
    },
    "analytics": {
        "vendor": KEYWORD,
        "model": KEYWORD,
        "prompt_tokens": LONG,
        "completion_tokens": LONG,
        "total_tokens": LONG,
        "cache_read_tokens": LONG,
        "cache_write_tokens": LONG,
        "tokens_estimated": BOOLEAN,
        "usage_invalid": BOOLEAN,
        "cost": DOUBLE,
        "currency": KEYWORD,
        "latency_ms": FLOAT,
        "ttft_ms": FLOAT,
        "upstream_ms": FLOAT,
        "status_code": SHORT,
        "status_class": KEYWORD,
        "streamed": BOOLEAN,
        # integer, not long: a count of choices or tool calls above 2^31 is corrupt data,
        # and the server rejecting it (400) sends the event to the dead-letter topic.
        "choices": INTEGER,
        "tool_calls": INTEGER,
        "cache_hit": BOOLEAN,
        "blocked_by": KEYWORD,
        "tags": FLATTENED,
        # Revision 1.2: the token classes, the cost split in integer micro-USD, the prices that produced it.
        "reasoning_tokens": LONG,
        "cost_micros": LONG,
        "cost_input_micros": LONG,
        "cost_cache_read_micros": LONG,
        "cost_cache_write_micros": LONG,
        "cost_output_micros": LONG,
        "cost_reasoning_micros": LONG,
        "price_version": KEYWORD,
        "price_source": KEYWORD,
        "operation": KEYWORD,
        "request_model": KEYWORD,
        "response_model": KEYWORD,
        "response_id": KEYWORD,
        "finish_reasons": KEYWORD,
        "request_max_tokens": LONG,
        "request_temperature": FLOAT,
        "request_top_p": FLOAT,
        "request_stream": BOOLEAN,
        "server_address": KEYWORD,
        "server_port": INTEGER,
    },
    "budget_usage": {
        "model": KEYWORD,
        "prompt_tokens": LONG,
        "completion_tokens": LONG,
        "total_tokens": LONG,
        "cost": DOUBLE,
        "currency": KEYWORD,
        "period": KEYWORD,
        "period_start": DATE,
        "requests": INTEGER,
        "cache_read_tokens": LONG,
        "cache_write_tokens": LONG,
        # Revision 1.2: the token classes, the cost split in integer micro-USD, the prices that produced it.
        "reasoning_tokens": LONG,
        "cost_micros": LONG,
        "cost_input_micros": LONG,
        "cost_cache_read_micros": LONG,
        "cost_cache_write_micros": LONG,
        "cost_output_micros": LONG,
        "cost_reasoning_micros": LONG,
        "price_version": KEYWORD,
        "price_source": KEYWORD,
    },
}

DERIVED_FIELDS = ("status_class",)
"""Fields the collector adds at index time (not in the event): ``status_class`` = ``"2xx"`` etc."""


def index_name(prefix: str, event_type: EventType, emitted_at: datetime) -> str:
    """``<prefix>-<type>-YYYY.MM.DD`` for the UTC day of ``emitted_at`` (naive times are UTC)."""
    if emitted_at.tzinfo is not None:
        emitted_at = emitted_at.astimezone(UTC)
    return f"{prefix}-{event_type}-{emitted_at:%Y.%m.%d}"


def alias_name(prefix: str, event_type: EventType) -> str:
    """The read alias over every daily index of one type: ``<prefix>-<type>``."""
    return f"{prefix}-{event_type}"


def common_component_name(prefix: str) -> str:
    return f"{prefix}-events-common"


def policy_name(prefix: str) -> str:
    return f"{prefix}-events"


def common_component(shards: int, replicas: int | None, refresh_interval: str,
                     lifecycle_policy: str | None) -> dict[str, Any]:
    """Body of the component template shared by the three index templates."""
    settings: dict[str, Any] = {"number_of_shards": shards, "refresh_interval": refresh_interval}
    if replicas is not None:
        settings["number_of_replicas"] = replicas
    if lifecycle_policy is not None:
        settings["index.lifecycle.name"] = lifecycle_policy
    return {
        "version": TEMPLATE_VERSION,
        "_meta": {"managed_by": "gateway-tap"},
        "template": {
            "settings": settings,
            "mappings": {"dynamic": False, "properties": ENVELOPE_PROPERTIES},
        },
    }


def index_template(prefix: str, event_type: EventType) -> dict[str, Any]:
    """Body of the composable index template of one event type."""
    return {
        "index_patterns": [f"{prefix}-{event_type}-*"],
        "priority": TEMPLATE_PRIORITY,
        "version": TEMPLATE_VERSION,
        "composed_of": [common_component_name(prefix)],
        "_meta": {"managed_by": "gateway-tap", "event_type": event_type},
        "template": {
            "aliases": {alias_name(prefix, event_type): {}},
            "mappings": {"dynamic": False, "properties": TYPE_PROPERTIES[event_type]},
        },
    }


def lifecycle_policy(delete_after_days: int) -> dict[str, Any]:
    """An ILM policy that deletes a daily index ``delete_after_days`` after its creation."""
    return {
        "policy": {
            "_meta": {"managed_by": "gateway-tap"},
            "phases": {
                "hot": {"min_age": "0ms", "actions": {}},
                "delete": {"min_age": f"{delete_after_days}d", "actions": {"delete": {}}},
            },
        }
    }


def expected_properties(event_type: EventType) -> dict[str, Any]:
    """The full mapping properties an index of ``event_type`` gets (envelope + type fields)."""
    return {**ENVELOPE_PROPERTIES, **TYPE_PROPERTIES[event_type]}


__all__ = [
    "DERIVED_FIELDS",
    "EVENT_TYPES",
    "TEMPLATE_VERSION",
    "alias_name",
    "common_component",
    "expected_properties",
    "index_name",
    "index_template",
    "lifecycle_policy",
]
