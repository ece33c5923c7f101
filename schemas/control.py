"""Edge-to-control messages: what a tap's plugin reports to the control plane (``<prefix>.control``).

Not one of the three event types: a control message belongs to no request, carries a
plugin-defined ``payload`` under a plugin-defined ``kind``, and is read by collectors
that implement :meth:`collectors.sdk.DataCollector.handle_control`. The envelope is
published as ``control.schema.json``; a test keeps both in agreement.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas.codec import EventDecodeError, build_model, parse_object, validate_envelope
from schemas.events import SCHEMA_VERSION, new_event_id, utc_now

CONTROL_TYPE = "control"
"""The ``type`` field and header of every control message."""

CONTROL_REQUIRED = ("id", "schema_version", "emitted_at", "gateway_id", "plugin", "kind", "payload")


class ControlMessage(BaseModel):
    """One message from a plugin in a tap to whoever aggregates ``kind`` in the control plane.

    ``id`` (UUIDv7) is the idempotency key: a redelivered message carries the same id.
    """

    model_config = ConfigDict(extra="allow")

    id: str = Field(default_factory=new_event_id, min_length=1)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    emitted_at: datetime = Field(default_factory=utc_now)
    gateway_id: str = Field(min_length=1)
    plugin: str = Field(min_length=1)
    kind: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="python")
        data["type"] = CONTROL_TYPE
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_UTC_Z)


def encode_control(message: ControlMessage) -> bytes:
    """The Kafka message value for ``message`` (UTF-8 JSON)."""
    return message.to_json()


def decode_control(raw: bytes | str | dict[str, Any]) -> ControlMessage:
    """Parse and validate one control message.

    :raises EventDecodeError: invalid JSON, not a control message, unsupported ``schema_version``,
        a missing or invalid envelope field, or a value over 1 MiB.
    """
    data = parse_object(raw, "message")
    if data.get("type") != CONTROL_TYPE:
        raise EventDecodeError(f"expected a {CONTROL_TYPE!r} message, got type {data.get('type')!r}", "type")
    validate_envelope(data, CONTROL_REQUIRED)
    return build_model(ControlMessage, data)
