"""Kafka topic names and message headers for the event streams."""

from __future__ import annotations

from schemas.events import SCHEMA_VERSION, Event, EventType

TOPIC_SUFFIXES: dict[EventType, str] = {
    "proxy_log": "proxy_logs",
    "analytics": "analytics",
    "budget_usage": "budget_usage",
}
DLQ_SUFFIX = ".dlq"
CONTROL_SUFFIX = "control"
"""Edge-to-control messages (:mod:`schemas.control`): not an event stream, so not in ``TOPIC_SUFFIXES``."""


def topic_for(event_type: EventType, prefix: str = "gateway") -> str:
    """``gateway.proxy_logs``, ``gateway.analytics`` or ``gateway.budget_usage`` for the default prefix."""
    return f"{prefix}.{TOPIC_SUFFIXES[event_type]}"


def type_for_topic(topic: str, prefix: str = "gateway") -> EventType | None:
    """The event type a topic carries, or ``None`` for a topic that is not an event stream."""
    for event_type, suffix in TOPIC_SUFFIXES.items():
        if topic == f"{prefix}.{suffix}":
            return event_type
    return None


def control_topic(prefix: str = "gateway") -> str:
    """``gateway.control`` for the default prefix: where plugins' control messages go."""
    return f"{prefix}.{CONTROL_SUFFIX}"


def control_headers() -> list[tuple[str, bytes]]:
    return [("type", b"control"), ("schema_version", str(SCHEMA_VERSION).encode())]


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def message_key(event: Event) -> bytes | None:
    """Events are keyed by app id so one app's events keep their order within a partition."""
    return event.app_id.encode() if event.app_id else None


def message_headers(event: Event) -> list[tuple[str, bytes]]:
    return message_headers_for(event.type)


def message_headers_for(event_type: EventType) -> list[tuple[str, bytes]]:
    """The headers of every message of ``event_type``: ``type`` and ``schema_version``."""
    return [("type", event_type.encode()), ("schema_version", str(SCHEMA_VERSION).encode())]
