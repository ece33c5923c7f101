"""gateway-tap's event contract: models, codec and topic names.

Everything that crosses Kafka is defined here and nowhere else.
"""

from schemas.codec import MAX_EVENT_BYTES, EventDecodeError, decode_event, encode_event
from schemas.control import ControlMessage, decode_control, encode_control
from schemas.events import (
    EVENT_MODELS,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Analytics,
    AnyEvent,
    BudgetUsage,
    ErrorInfo,
    Event,
    EventType,
    Latency,
    ProxyLog,
    new_event_id,
    status_class,
    utc_now,
)
from schemas.topics import (
    CONTROL_SUFFIX,
    control_headers,
    control_topic,
    dlq_topic,
    message_headers,
    message_headers_for,
    message_key,
    topic_for,
    type_for_topic,
)

__all__ = [
    "CONTROL_SUFFIX",
    "EVENT_MODELS",
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "SCHEMA_VERSION",
    "Analytics",
    "AnyEvent",
    "BudgetUsage",
    "ControlMessage",
    "ErrorInfo",
    "Event",
    "EventDecodeError",
    "EventType",
    "Latency",
    "ProxyLog",
    "control_headers",
    "control_topic",
    "decode_control",
    "decode_event",
    "dlq_topic",
    "encode_control",
    "encode_event",
    "message_headers",
    "message_headers_for",
    "message_key",
    "new_event_id",
    "status_class",
    "topic_for",
    "type_for_topic",
    "utc_now",
]
