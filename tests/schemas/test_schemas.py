"""The event contract: models agree with the published JSON Schema files; decoding is strict and specific."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

import schemas
from schemas import (
    EVENT_MODELS,
    Analytics,
    BudgetUsage,
    ErrorInfo,
    EventDecodeError,
    Latency,
    ProxyLog,
    decode_event,
    encode_event,
    topic_for,
    type_for_topic,
)
from schemas.wire import validate_event_bytes
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


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_a_key_is_named_by_its_id_never_by_its_full_hash(event_type: str) -> None:
    """``key_id`` (1.4) takes an id or a 12-digit hash prefix; a full key hash or a key itself is refused by the
    schema, the model and the collectors' fast validation alike (such an event goes to the dead-letter topic)."""
    validator = jsonschema.Draft202012Validator(schema_for(event_type))
    good = orjson.loads(orjson.dumps(next(e for e in sample_events() if e.type == event_type).to_dict()))
    for key_id in ("key_3f2a9c01d4e5b6a7", "sha256:9f86d081884c", "ci-runner"):
        assert validator.is_valid({**good, "key_id": key_id}), key_id
        decode_event({**good, "key_id": key_id})
    for key_id in ("sha256:" + "9f86d081884c" * 5 + "abcd", "gt-secret key", "sha256:9F86D081884C", ""):
        event = {**good, "key_id": key_id}
        assert not validator.is_valid(event), key_id
        with pytest.raises(EventDecodeError) as exc:
            decode_event(event)
        assert exc.value.field == "key_id"
        with pytest.raises(EventDecodeError):
            validate_event_bytes(orjson.dumps(event), event_type)  # type: ignore[arg-type]


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


# -- the tap's writing structs (schemas.wire.WIRE_EVENTS): what it publishes without building models ---------

RFC3339_UTC = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"


def every_field_set() -> list[schemas.Event]:
    """One event per type with every optional field given a value (the examples leave many unset)."""
    common = {"gateway_id": "tap-1", "request_id": "req-9", "app_id": "app-a", "llm_id": "l", "user_id": "u-1",
              "key_id": "key_0123456789abcdef"}
    return [
        ProxyLog(**common, method="POST", path="/p", vendor="anthropic", status_code=502, request_bytes=1,
                 response_bytes=2, streamed=True,
                 latency=Latency(total_ms=3.5, upstream_ms=1e-7, ttfb_ms=0.0, tap_overhead_ms=2.9e-6),
                 request_headers={"a": "b"}, response_headers={"c": "d"}, request_body="{}", response_body="x",
                 client_address="127.0.0.1", user_agent="ua", error=ErrorInfo(type="t", code="c", message="m"),
                 blocked_by="firewall", metadata={"k": "v"}),
        Analytics(**common, vendor="openai", model="m", prompt_tokens=1, completion_tokens=2, total_tokens=3,
                  cache_read_tokens=4, cache_write_tokens=5, tokens_estimated=True, cost=1e16, currency="EUR",
                  latency_ms=0.5, ttft_ms=0.25, upstream_ms=0.125, status_code=200, streamed=True, choices=2,
                  tool_calls=1, cache_hit=True, blocked_by="b", tags={"t": "v"}),
        BudgetUsage(**common, model="m", prompt_tokens=1, completion_tokens=2, total_tokens=3, cost=0.1 + 0.2,
                    currency="USD", period="daily", period_start=date(2026, 12, 31), requests=0),
    ]


@pytest.mark.parametrize("event", sample_events() + every_field_set(), ids=lambda e: f"{e.type}-{e.request_id}")
def test_writing_structs_write_what_the_models_write(event: schemas.Event) -> None:
    from schemas.wire import WIRE_EVENTS, encode_wire, to_wire, wire_type

    struct = WIRE_EVENTS[event.type]
    assert list(struct.__struct_fields__) == list(type(event).model_fields)  # same fields, same order
    wire = to_wire(event)
    assert wire_type(wire) == event.type
    assert orjson.loads(encode_wire(wire)) == orjson.loads(encode_event(event))


def assert_honours_contract(raw: bytes, event_type: str) -> dict[str, Any]:
    """``raw`` passes the JSON Schema (formats checked), the models and the wire validator, and the models
    write back exactly what it holds (no field the models would leave out, none they would add)."""
    import re
    import uuid

    from schemas.wire import validate_event_bytes

    data: dict[str, Any] = orjson.loads(raw)
    jsonschema.Draft202012Validator(schema_for(event_type), format_checker=jsonschema.FormatChecker()).validate(data)
    model = decode_event(raw, expected_type=event_type)  # type: ignore[arg-type]
    assert orjson.loads(encode_event(model)) == data
    assert validate_event_bytes(raw, event_type) == event_type  # type: ignore[arg-type]
    event_id = uuid.UUID(data["id"])
    assert event_id.version == 7 and event_id.variant == uuid.RFC_4122 and str(event_id) == data["id"]
    assert re.match(RFC3339_UTC, data["emitted_at"]), data["emitted_at"]
    if "period_start" in data:
        assert re.match(r"^\d{4}-\d{2}-\d{2}$", data["period_start"])
    return data


def exchanges() -> dict[str, Any]:
    """Exchanges as the handler leaves them: completed, rejected, streamed, answered by a plugin."""
    from gateway_tap.pricing import PriceBook
    from gateway_tap.proxy.accounting import Usage
    from gateway_tap.proxy.errors import TapError
    from gateway_tap.proxy.exchange import Exchange
    from gateway_tap.settings import ModelPrice

    prices = PriceBook("openai", "openai", {"gpt-4o-mini": ModelPrice(input_per_1m=0.15, output_per_1m=0.6,
                                                                      cache_read_per_1m=0.075)}, "none")

    def exchange(**fields: Any) -> Exchange:
        ex = Exchange("req_0190a", "POST", "/llm/openai/v1/chat/completions", "openai", 100.0)
        ex.vendor, ex.status, ex.finished = "openai", 200, 100.012
        for name, value in fields.items():
            setattr(ex, name, value)
        return ex

    usage = Usage(prompt_tokens=3000, completion_tokens=4000, total_tokens=7000, found=True, model="gpt-4o-mini",
                  choices=1, tool_calls=0, cache_read_tokens=2000, reasoning_tokens=1000, response_id="chatcmpl-1",
                  finish_reasons=["stop"])
    done = exchange(app_id="demo", user_id="u1", model="gpt-4o-mini", requested_model="gpt-4o-mini", usage=usage,
                    prices=prices, operation="chat", request_params=(4096, 0.5, 1.0, False),
                    server=("api.openai.com", 443), request_bytes=99, response_bytes=300, upstream_start=100.001,
                    ttfb=100.004, first_chunk=100.005, upstream_end=100.011, client_address="127.0.0.1",
                    user_agent="wrk", request_headers={"Authorization": "Bearer sk-secret12345", "X-Team": "a"},
                    response_headers={"content-type": "application/json"}, metadata={"team": "demo"},
                    request_body=b'{"api_key": "sk-abcdefgh1234"}', response_body=b"{}",
                    budget_period=("daily", date(2026, 12, 3)))
    rejected = exchange(status=401, error=TapError(401, "invalid_request_error", "invalid_api_key", "unknown key"),
                        vendor="unknown", finished=100.0002)
    streamed = exchange(app_id="demo", streamed=True, usage=Usage(prompt_tokens=5, completion_tokens=18,
                                                                  total_tokens=23, estimated=True,
                                                                  model="gpt-4o-mini"),
                        prices=prices, upstream_start=100.001, ttfb=100.002, first_chunk=100.003,
                        error=TapError(499, "client_error", "client_disconnected", "client went away mid-stream"))
    served = exchange(app_id="demo", served_by="response_cache", cache_hit=True, charge=False, usage=usage,
                      metadata={"hits": 3})  # a plugin put a number in: written as the string the contract types
    return {"completed": done, "rejected": rejected, "streamed": streamed, "served_by_plugin": served}


@pytest.mark.parametrize("name", list(exchanges()))
@pytest.mark.parametrize("capture_bodies", [False, True])
def test_the_taps_events_honour_the_contract(name: str, capture_bodies: bool) -> None:
    """What Exchange.events() builds and the publisher writes (no pydantic on that path) is what the models,
    the JSON Schema files and the collectors' wire validator accept, with UUIDv7 ids and RFC 3339 UTC times."""
    from schemas.wire import encode_wire, wire_type

    ex = exchanges()[name]
    now = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    ex.settle_cost(now)
    events = ex.events("tap-1", capture_bodies=capture_bodies, body_limit=16, now=now)
    types = [wire_type(e) for e in events]
    assert types[:2] == ["proxy_log", "analytics"]
    assert types[2:] == (["budget_usage"] if name in ("completed", "streamed") else [])
    written = [assert_honours_contract(encode_wire(e), t) for e, t in zip(events, types, strict=True)]
    assert len({w["id"] for w in written}) == len(written)
    assert {w["request_id"] for w in written} == {"req_0190a"}
    log = written[0]
    assert log["request_headers"].get("authorization", "[REDACTED]") == "[REDACTED]"
    assert "sk-secret" not in orjson.dumps(written).decode() and "sk-abcdefgh" not in orjson.dumps(written).decode()
    if name == "completed":
        assert log["latency"] == pytest.approx({"total_ms": 12.0, "upstream_ms": 10.0, "ttfb_ms": 4.0,
                                                "tap_overhead_ms": 2.0})
        assert written[2]["period"] == "daily" and written[2]["period_start"] == "2026-12-03"
        # 1000 uncached input x 0.15 + 2000 cached x 0.075 + 4000 output (1000 of them reasoning) x 0.6 per 1M
        split = {"cost_input_micros": 150, "cost_cache_read_micros": 150, "cost_cache_write_micros": 0,
                 "cost_output_micros": 1800, "cost_reasoning_micros": 600, "cost_micros": 2700}
        for event in written[1:]:
            assert {k: event[k] for k in split} == split and event["cost"] == 0.0027
            assert event["price_source"] == "config:gpt-4o-mini" and event["price_version"] == ex.prices.version
            assert (event["cache_read_tokens"], event["reasoning_tokens"]) == (2000, 1000)
            assert event["emitted_at"] == "2026-12-03T10:00:00Z"
        assert {k: written[1][k] for k in ("operation", "request_model", "response_model", "response_id",
                                           "finish_reasons", "request_max_tokens", "request_temperature",
                                           "request_top_p", "request_stream", "server_address", "server_port")} == {
            "operation": "chat", "request_model": "gpt-4o-mini", "response_model": "gpt-4o-mini",
            "response_id": "chatcmpl-1", "finish_reasons": ["stop"], "request_max_tokens": 4096,
            "request_temperature": 0.5, "request_top_p": 1.0, "request_stream": False,
            "server_address": "api.openai.com", "server_port": 443}
        assert ("request_body" in log) is capture_bodies
    if name == "rejected":
        assert log["error"] == {"type": "invalid_request_error", "code": "invalid_api_key", "message": "unknown key"}
        assert "vendor" not in log and "upstream_ms" not in log["latency"]
    if name == "served_by_plugin":  # charge=False: no cost, no price fields
        assert log["metadata"] == {"hits": "3"} and written[1]["cache_hit"] is True
        assert written[1]["cost"] == 0 and "cost_micros" not in written[1] and "price_version" not in written[1]
