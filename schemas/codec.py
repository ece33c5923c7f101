"""Encoding and decoding events to and from Kafka message values.

Decoding never crashes on bad input: every failure is an
:class:`EventDecodeError` naming the field and the problem, which the
collector runtime turns into a dead letter.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from schemas.events import EVENT_MODELS, SCHEMA_VERSION, Event, EventType

ENVELOPE_REQUIRED = ("id", "emitted_at", "gateway_id", "request_id")
MAX_EVENT_BYTES = 1_048_576
"""Events larger than this are refused on decode (a tap never writes one)."""


class EventDecodeError(ValueError):
    """An event could not be decoded. ``field`` is the offending JSON path or ``None``."""

    retriable = False

    def __init__(self, reason: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


def encode_event(event: Event) -> bytes:
    """The Kafka message value for ``event`` (UTF-8 JSON)."""
    return event.to_json()


def _loc(error: Any) -> str:
    return ".".join(str(part) for part in error["loc"]) or "$"


def decode_event(raw: bytes | str | dict[str, Any], expected_type: EventType | None = None) -> Event:
    """Parse and validate one event.

    :param raw: message value (JSON bytes) or an already parsed dict.
    :param expected_type: the type the topic carries; a different ``type`` is an error.
    :raises EventDecodeError: invalid JSON, wrong or unknown type, unsupported
        ``schema_version``, missing or invalid field, or an oversized value.
    """
    if isinstance(raw, dict):
        data = raw
    else:
        if len(raw) > MAX_EVENT_BYTES:
            raise EventDecodeError(f"event is {len(raw)} bytes, larger than the {MAX_EVENT_BYTES} limit")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise EventDecodeError(f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EventDecodeError(f"expected a JSON object, got {type(data).__name__}")
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_MODELS:
        raise EventDecodeError(f"unknown event type {event_type!r}", "type")
    if expected_type is not None and event_type != expected_type:
        raise EventDecodeError(f"topic carries {expected_type!r} events, got {event_type!r}", "type")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EventDecodeError(
            f"unsupported schema_version {version!r} (this release reads {SCHEMA_VERSION})",
            "schema_version",
        )
    for name in ENVELOPE_REQUIRED:
        if name not in data:
            # The models fill these in for producers; on the wire they must be present.
            raise EventDecodeError("Field required", name)
    model = EVENT_MODELS[event_type]
    # ``type`` is a class attribute of each model, not a field: keep it out of the extras.
    fields = {k: v for k, v in data.items() if k != "type"}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EventDecodeError(first["msg"], _loc(first)) from None
