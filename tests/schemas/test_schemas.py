"""The event contract: models agree with the published JSON Schema files; decoding is strict and specific."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

import schemas
from schemas import (
    EVENT_MODELS,
    EventDecodeError,
    decode_event,
    encode_event,
    topic_for,
    type_for_topic,
)
from tests.support.events import sample_events

SCHEMA_DIR = Path(schemas.__file__).parent
ENV = b'{"id": "0190", "emitted_at": "2026-11-25T10:00:00Z", '


def schema_for(event_type: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{event_type}.schema.json").read_text())


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: f"{e.type}-{e.request_id}")
def test_examples_valid_against_published_schema_and_round_trip(event: schemas.Event) -> None:
    raw = encode_event(event)
    jsonschema.Draft202012Validator(schema_for(event.type),
                                    format_checker=jsonschema.FormatChecker()).validate(orjson.loads(raw))
    back = decode_event(raw, expected_type=event.type)
    assert back == event
    assert orjson.loads(raw)["emitted_at"].endswith("Z")


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_model_fields_match_schema_properties(event_type: str) -> None:
    schema = schema_for(event_type)
    model = EVENT_MODELS[event_type]  # type: ignore[index]
    assert set(model.model_fields) | {"type"} == set(schema["properties"])
    required_in_model = {name for name, f in model.model_fields.items() if f.is_required()}
    # Fields with a default in Python are filled in by the producer, so the schema may require them.
    assert required_in_model <= set(schema["required"])
    for name in schema["required"]:
        assert name == "type" or name in model.model_fields


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_schema_rejects_what_the_model_rejects(event_type: str) -> None:
    """A missing required field is refused by both the JSON Schema and the model."""
    validator = jsonschema.Draft202012Validator(schema_for(event_type))
    good = next(e for e in sample_events() if e.type == event_type).to_dict()
    good = orjson.loads(orjson.dumps(good))
    for name in schema_for(event_type)["required"]:
        broken = {k: v for k, v in good.items() if k != name}
        assert not validator.is_valid(broken), name
        with pytest.raises(EventDecodeError):
            decode_event(broken)


def test_unknown_fields_are_kept() -> None:
    data = orjson.loads(encode_event(sample_events()[2]))
    data["new_in_v1_5"] = {"x": 1}
    event = decode_event(orjson.dumps(data))
    assert orjson.loads(encode_event(event))["new_in_v1_5"] == {"x": 1}


@pytest.mark.parametrize(
    ("raw", "field", "needle"),
    [
        (b"{not json", None, "invalid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"type": "nope"}', "type", "unknown event type"),
        (b'{"type": "analytics", "schema_version": 2}', "schema_version", "unsupported schema_version 2"),
        (ENV + b'"type": "analytics", "schema_version": 1, "gateway_id": "g", "request_id": "r",'
         b' "vendor": "openai", "model": "m", "status_code": 200}', "latency_ms", "Field required"),
        (ENV + b'"type": "analytics", "schema_version": 1, "gateway_id": "g", "request_id": "r",'
         b' "vendor": "openai", "model": "m", "status_code": 200, "latency_ms": "fast"}', "latency_ms", "number"),
        (ENV + b'"type": "budget_usage", "schema_version": 1, "gateway_id": "g", "request_id": "r",'
         b' "app_id": "a", "llm_id": "l", "model": "m", "period_start": "2026-11-01", "cost": -1}',
         "cost", "greater than or equal to 0"),
    ],
)
def test_decode_errors_name_the_field(raw: bytes, field: str | None, needle: str) -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_event(raw)
    assert info.value.field == field
    assert needle in str(info.value)


def test_wrong_type_for_topic() -> None:
    with pytest.raises(EventDecodeError, match="topic carries 'proxy_log' events, got 'analytics'"):
        decode_event(encode_event(sample_events()[2]), expected_type="proxy_log")


def test_oversized_event_refused() -> None:
    with pytest.raises(EventDecodeError, match="larger than"):
        decode_event(b" " * (schemas.MAX_EVENT_BYTES + 1))


def test_topics() -> None:
    assert topic_for("proxy_log") == "gateway.proxy_logs"
    assert topic_for("budget_usage", "acme") == "acme.budget_usage"
    assert type_for_topic("acme.analytics", "acme") == "analytics"
    assert type_for_topic("acme.analytics.dlq", "acme") is None


def test_event_ids_are_uuid7_and_time_ordered() -> None:
    ids = [schemas.new_event_id() for _ in range(100)]
    assert all(i[14] == "7" for i in ids)
    assert ids == sorted(ids)


WRONG_VALUES: list[Any] = [None, "x", "", -1, 0, 1.5, 2**62, True, [], {}, {"a": 1}, "2026-13-45", "2026-11-01"]


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: f"{e.type}-{e.request_id}")
def test_fast_wire_validation_never_accepts_what_the_models_refuse(event: schemas.Event) -> None:
    """The msgspec fast path (derived from the models) agrees with decode_event on every mutation."""
    from schemas.wire import validate_event_bytes

    base = orjson.loads(encode_event(event))
    mutations: list[dict[str, Any]] = []
    for name in [*base, "latency"]:
        mutations.append({k: v for k, v in base.items() if k != name})
        for wrong in WRONG_VALUES:
            mutations.append({**base, name: wrong})
    if "latency" in base:
        for wrong in WRONG_VALUES:
            mutations.append({**base, "latency": {**base["latency"], "total_ms": wrong}})
    for mutated in mutations:
        raw = orjson.dumps(mutated)
        try:
            expected: Any = decode_event(raw, event.type).type
        except EventDecodeError as exc:
            expected = (exc.field, str(exc))
        try:
            got: Any = validate_event_bytes(raw, event.type)
        except EventDecodeError as exc:
            got = (exc.field, str(exc))
        assert got == expected, mutated


def test_lazy_events_build_models_on_access_only() -> None:
    from schemas.wire import LazyEvents

    values = [encode_event(e) for e in sample_events() if e.type == "proxy_log"]
    lazy = LazyEvents("proxy_log", list(values))
    assert len(lazy) == 2 and lazy._cache == {}
    assert lazy[1].request_id == "req-2" and list(lazy._cache) == [1]
    assert lazy[-1] is lazy[1]
    assert [e.request_id for e in lazy] == ["req-1", "req-2"]


def test_control_message_agrees_with_its_schema_and_round_trips() -> None:
    from schemas import ControlMessage, control_topic, decode_control, encode_control

    schema = schema_for("control")
    assert set(ControlMessage.model_fields) | {"type"} == set(schema["properties"])
    message = ControlMessage(gateway_id="tap-1", plugin="request_enricher", kind="request_counts",
                             payload={"requests": 3, "by_llm": {"openai": 3}})
    raw = encode_control(message)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    validator.validate(orjson.loads(raw))
    assert decode_control(raw) == message
    for name in schema["required"]:
        broken = {k: v for k, v in orjson.loads(raw).items() if k != name}
        assert not validator.is_valid(broken), name
        with pytest.raises(EventDecodeError):
            decode_control(orjson.dumps(broken))
    assert control_topic("acme") == "acme.control" and type_for_topic("acme.control", "acme") is None
    assert len(EVENT_MODELS) == 3  # control messages are not a fourth event type


@pytest.mark.parametrize(("raw", "field"), [
    (b"{nope", None), (b'{"type": "analytics"}', "type"), (b'{"type": "control", "schema_version": 9}',
                                                          "schema_version"),
    (b'{"type": "control", "schema_version": 1, "id": "x", "emitted_at": "2026-11-25T10:00:00Z", '
     b'"gateway_id": "g", "plugin": "p", "kind": "k", "payload": [1]}', "payload"),
])
def test_control_decode_errors_name_the_field(raw: bytes, field: str | None) -> None:
    from schemas import decode_control

    with pytest.raises(EventDecodeError) as info:
        decode_control(raw)
    assert info.value.field == field


def test_status_class_groups_by_hundreds() -> None:
    assert [schemas.status_class(code) for code in (100, 200, 299, 404, 429, 503)] == \
        ["1xx", "2xx", "2xx", "4xx", "4xx", "5xx"]
