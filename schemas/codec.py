"""Encoding and decoding events to and from Kafka message values.

Decoding never crashes on bad input: every failure is an
:class:`EventDecodeError` naming the field and the problem, which the
collector runtime turns into a dead letter.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.events import EVENT_MODELS, SCHEMA_VERSION, Event, EventType

ModelT = TypeVar("ModelT", bound=BaseModel)

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


def parse_object(raw: bytes | str | dict[str, Any], what: str = "event") -> dict[str, Any]:
    """The JSON object in ``raw`` (passed through when already parsed).

    :raises EventDecodeError: larger than :data:`MAX_EVENT_BYTES`, invalid JSON, or not an object.
    """
    if isinstance(raw, dict):
        return raw
    if len(raw) > MAX_EVENT_BYTES:
        raise EventDecodeError(f"{what} is {len(raw)} bytes, larger than the {MAX_EVENT_BYTES} limit")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventDecodeError(f"expected a JSON object, got {type(data).__name__}")
    return data


def validate_envelope(data: dict[str, Any], required: tuple[str, ...]) -> None:
    """Check ``schema_version`` and that the ``required`` envelope fields are on the wire.

    The models fill these fields in for producers, so model validation alone would accept
    a message that lacks them.
    """
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EventDecodeError(
            f"unsupported schema_version {version!r} (this release reads {SCHEMA_VERSION})",
            "schema_version",
        )
    for name in required:
        if name not in data:
            raise EventDecodeError("Field required", name)


def build_model(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """Validate ``data`` (without its ``type``: a class attribute, not a field) into ``model``."""
    fields = {k: v for k, v in data.items() if k != "type"}
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EventDecodeError(first["msg"], _loc(first)) from None


def decode_event(raw: bytes | str | dict[str, Any], expected_type: EventType | None = None) -> Event:
    """Parse and validate one event.

    :param raw: message value (JSON bytes) or an already parsed dict.
    :param expected_type: the type the topic carries; a different ``type`` is an error.
    :raises EventDecodeError: invalid JSON, wrong or unknown type, unsupported
        ``schema_version``, missing or invalid field, or an oversized value.
    """
    data = parse_object(raw)
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_MODELS:
        raise EventDecodeError(f"unknown event type {event_type!r}", "type")
    if expected_type is not None and event_type != expected_type:
        raise EventDecodeError(f"topic carries {expected_type!r} events, got {event_type!r}", "type")
    validate_envelope(data, ENVELOPE_REQUIRED)
    return build_model(EVENT_MODELS[event_type], data)
