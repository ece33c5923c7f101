"""Fast wire validation and encoding of events, derived from the pydantic models.

Collectors that write the message value as it is (files, Elasticsearch) only need
to know that a value honours the contract; building a full pydantic model per
event costs several times what parsing the JSON does. :func:`validate_event_bytes`
checks a value against msgspec structs generated *from the models in
:mod:`schemas.events`* (one source of truth; a test keeps both verdicts equal) at
roughly the cost of ``orjson.loads``.

The tap builds its events on the hot path the same way round: :data:`WIRE_EVENTS`
are msgspec structs generated from the same models for *writing*
(:func:`encode_wire` gives what ``encode_event`` gives for the equivalent model, up
to key order; a test checks every field, the JSON Schema files and the id and
time formats). They do not validate: the producer is our own code.
"""

from __future__ import annotations

import types
import typing
from datetime import date, datetime
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
from pydantic import BaseModel

from schemas.codec import ENVELOPE_REQUIRED, MAX_EVENT_BYTES, EventDecodeError
from schemas.events import EVENT_MODELS, SCHEMA_VERSION, ErrorInfo, Event, EventType, Latency


def _meta(metadata: list[Any]) -> msgspec.Meta | None:
    bounds: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["ge"] = item.ge
        elif isinstance(item, annotated_types.Le):
            bounds["le"] = item.le
        elif isinstance(item, annotated_types.Gt):
            bounds["gt"] = item.gt
        elif isinstance(item, annotated_types.Lt):
            bounds["lt"] = item.lt
        elif isinstance(item, annotated_types.MinLen):
            bounds["min_length"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            bounds["max_length"] = item.max_length
        elif getattr(item, "pattern", None) is not None:
            bounds["pattern"] = item.pattern
    return msgspec.Meta(**bounds) if bounds else None


def _convert(tp: Any, writing: bool = False) -> Any:
    """The msgspec equivalent of a pydantic field annotation (nested models as decoding or writing structs)."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        meta = _meta([m for e in extra for m in (getattr(e, "metadata", None) or [e])])
        converted = _convert(base, writing)
        return Annotated[converted, meta] if meta is not None else converted
    if origin in (Union, types.UnionType):
        return Union[tuple(_convert(a, writing) for a in get_args(tp))]  # noqa: UP007 - built dynamically
    if origin in (dict, typing.Dict):  # noqa: UP006
        key, value = get_args(tp)
        return dict[_convert(key, writing), _convert(value, writing)]  # type: ignore[misc]
    if origin in (list, typing.List):  # noqa: UP006
        return list[_convert(get_args(tp)[0], writing)]  # type: ignore[misc]
    if origin is Literal:
        return tp
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _writing_struct_for(tp) if writing else _struct_for(tp)
    if tp in (str, int, float, bool, type(None), datetime, date, Any):
        return tp
    raise TypeError(f"no wire type for {tp!r}")


@cache
def _struct_for(model: type[BaseModel], tag: str | None = None) -> type[msgspec.Struct]:
    """The decoding struct: every field optional, except the envelope (models fill it in for producers)."""
    fields: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        annotation = info.rebuild_annotation()
        wire_type = _convert(annotation)
        if info.is_required() or name in ENVELOPE_REQUIRED or (tag is not None and name == "schema_version"):
            fields.append((name, wire_type, msgspec.NODEFAULT))
        else:
            fields.append((name, wire_type, None))
    return msgspec.defstruct(f"Wire{model.__name__}", fields, tag_field="type" if tag else None, tag=tag,
                             kw_only=True, forbid_unknown_fields=False)


@cache
def _writing_struct_for(model: type[BaseModel], tag: str | None = None) -> type[msgspec.Struct]:
    """The writing struct: what ``model_dump(exclude_none=True)`` writes.

    A field whose model default is None defaults to None and is left out when None
    (``omit_defaults``); every other field is required, so it is always written,
    as the model writes a field with a non-None default. Fields keep the model's order.
    """
    fields: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        wire_type = _convert(info.rebuild_annotation(), writing=True)
        if not info.is_required() and info.default_factory is None and info.default is None:
            fields.append((name, wire_type, None))
        else:
            fields.append((name, wire_type, msgspec.NODEFAULT))
    return msgspec.defstruct(f"Wire{model.__name__}Out", fields, tag_field="type" if tag else None, tag=tag,
                             kw_only=True, omit_defaults=True, array_like=False)


def _event_structs() -> dict[EventType, type[msgspec.Struct]]:
    return {name: _struct_for(model, name) for name, model in EVENT_MODELS.items()}


_STRUCTS = _event_structs()
# Always the tagged union: decoding a single tagged struct would accept a value with no ``type`` at all.
_DECODER = msgspec.json.Decoder(Union[tuple(_STRUCTS.values())])  # noqa: UP007


WIRE_EVENTS: dict[EventType, type[msgspec.Struct]] = {
    name: _writing_struct_for(model, name) for name, model in EVENT_MODELS.items()}
"""Per event type, the struct the tap builds (keyword arguments = the model's fields, ``id`` and
``emitted_at`` and ``schema_version`` included: nothing is filled in)."""
WireProxyLog = WIRE_EVENTS["proxy_log"]
WireAnalytics = WIRE_EVENTS["analytics"]
WireBudgetUsage = WIRE_EVENTS["budget_usage"]
WireLatency = _writing_struct_for(Latency)
WireErrorInfo = _writing_struct_for(ErrorInfo)
_ENCODER = msgspec.json.Encoder()


def wire_type(event: msgspec.Struct) -> EventType:
    """The ``type`` of a struct from :data:`WIRE_EVENTS`."""
    tag: EventType = event.__struct_config__.tag  # type: ignore[assignment]
    return tag


def encode_wire(event: msgspec.Struct, max_bytes: int = MAX_EVENT_BYTES) -> bytes:
    """The Kafka message value of a struct from :data:`WIRE_EVENTS` (UTF-8 JSON, times in UTC with ``Z``).

    Never fails on what its strings hold, and never exceeds ``max_bytes`` (at most :data:`MAX_EVENT_BYTES`, what
    the collectors accept): text that is not valid Unicode (the lone surrogates Python keeps for undecodable bytes,
    as aiohttp does for a header byte like ``\\xff``) is escaped (``\\xff``), and an event still too large has its
    longest strings clipped with ``...[truncated]``. Both are rare (the tap bounds what it puts in), so the common
    case costs one encode.

    :raises ValueError: the event does not fit in ``max_bytes`` even with every string clipped and every mapping
        emptied (only with an absurdly small ``max_bytes``).
    """
    max_bytes = min(max_bytes, MAX_EVENT_BYTES)
    try:
        value = _ENCODER.encode(event)
    except UnicodeEncodeError:
        pass
    else:
        if len(value) <= max_bytes:
            return value
    data: dict[str, Any] = msgspec.to_builtins(event)
    for cap in _CLIP_STEPS:
        value = _ENCODER.encode(_repaired(data, cap))
        if len(value) <= max_bytes:
            return value
    value = _ENCODER.encode(_repaired(data, 64, drop=_DROPPABLE))
    if len(value) <= max_bytes:
        return value
    raise ValueError(f"event does not fit in {max_bytes} bytes even with every string clipped")


TRUNCATED = "...[truncated]"
_CLIP_STEPS = (1 << 20, 16384, 4096, 1024, 256, 64)
"""Longest string kept on each try of :func:`encode_wire`'s repair."""
_UNCLIPPED = frozenset({"type", "id", "emitted_at", "gateway_id", "request_id", "trace_id", "span_id",
                        "parent_span_id", "period_start"})
"""Envelope fields a repair never shortens (ids and times: the tap's own, short and needed whole)."""
_DROPPABLE = frozenset({"request_headers", "response_headers", "request_body", "response_body", "metadata",
                        "tags"})
"""Optional fields the last repair leaves empty."""


def valid_text(value: str) -> str:
    """``value`` as valid Unicode: lone surrogates escaped (``\\xff`` for a byte surrogateescape kept, else
    ``\\ud800``); ``value`` itself when it has none."""
    try:
        value.encode()
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no undecodable byte produced
        return value.encode("utf-8", "backslashreplace").decode()


def _repaired(event: dict[str, Any], cap: int, drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``event`` (builtins) with every string valid Unicode and at most ``cap`` characters, but the envelope's."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in drop:
            continue
        out[key] = valid_text(value) if key in _UNCLIPPED and isinstance(value, str) else _clipped(value, cap)
    return out


def _clipped(data: Any, cap: int) -> Any:
    if isinstance(data, str):
        data = valid_text(data)
        return data if len(data) <= cap else data[:cap] + TRUNCATED
    if isinstance(data, dict):
        return {_clipped(k, max(cap, 64)): _clipped(v, cap) for k, v in data.items()}
    if isinstance(data, list):
        return [_clipped(v, cap) for v in data]
    return data


def to_wire(event: Event) -> msgspec.Struct:
    """The writing struct equivalent to a model (tests, and producers holding a model)."""
    return msgspec.convert(event.model_dump(mode="python", exclude_none=True), WIRE_EVENTS[event.type],
                           from_attributes=False, strict=False)


def validate_event_bytes(raw: bytes, expected_type: EventType | None = None) -> EventType:
    """Check that ``raw`` is a valid event (of ``expected_type`` when given) and return its type.

    Accepts and rejects exactly what :func:`schemas.decode_event` does, with the same
    :class:`EventDecodeError` fields, but builds no model.
    """
    if len(raw) > MAX_EVENT_BYTES:
        raise EventDecodeError(f"event is {len(raw)} bytes, larger than the {MAX_EVENT_BYTES} limit")
    try:
        wire = _DECODER.decode(raw)
        event_type: EventType = type(wire).__struct_config__.tag
        if expected_type is not None and event_type != expected_type:
            raise msgspec.ValidationError("wrong type for the topic")
    except (msgspec.ValidationError, msgspec.DecodeError):
        # msgspec is stricter than the models (no lax coercion), so a refusal here is not final:
        # the models are the authority, and they also word the error (field path and reason).
        from schemas.codec import decode_event

        return decode_event(raw, expected_type).type
    if wire.schema_version != SCHEMA_VERSION:
        raise EventDecodeError(
            f"unsupported schema_version {wire.schema_version!r} (this release reads {SCHEMA_VERSION})",
            "schema_version",
        )
    return event_type


class LazyEvents(typing.Sequence[Event]):
    """Validated message values whose pydantic models are built on first access only.

    Sinks that write values as they are never pay for the models.
    """

    __slots__ = ("_cache", "_event_type", "values")

    def __init__(self, event_type: EventType, values: list[bytes]) -> None:
        self._event_type = event_type
        self.values = values  # shared, not copied: appending to the list grows this sequence
        self._cache: dict[int, Event] = {}

    def __len__(self) -> int:
        return len(self.values)

    @typing.overload
    def __getitem__(self, index: int) -> Event: ...

    @typing.overload
    def __getitem__(self, index: slice) -> list[Event]: ...

    def __getitem__(self, index: int | slice) -> Event | list[Event]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self.values)
        event = self._cache.get(index)
        if event is None:
            from schemas.codec import decode_event

            event = self._cache[index] = decode_event(self.values[index], self._event_type)
        return event
