"""The Arrow schemas are generated from the contract files, and values convert into them losslessly."""

from __future__ import annotations

import copy
from datetime import date

import pyarrow as pa
import pytest

import schemas
from schemas import EVENT_MODELS, encode_event
from schemas.arrow import ARROW_SCHEMAS, arrow_schema, contract, schema_from_contract, table_from_values
from tests.support.events import sample_events


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_every_contract_field_is_a_column_except_type(event_type: schemas.EventType) -> None:
    props = contract(event_type)["properties"]
    assert arrow_schema(event_type).names == [name for name in props if name != "type"]
    assert set(EVENT_MODELS[event_type].model_fields) == set(arrow_schema(event_type).names)
    assert all(f.nullable for f in arrow_schema(event_type))


def test_types_follow_the_contract() -> None:
    log = ARROW_SCHEMAS["proxy_log"]
    assert log.field("emitted_at").type == pa.timestamp("us", tz="UTC")
    assert log.field("status_code").type == pa.int64()
    assert log.field("streamed").type == pa.bool_()
    assert log.field("latency").type == pa.struct([("total_ms", pa.float64()), ("upstream_ms", pa.float64()),
                                                   ("ttfb_ms", pa.float64()), ("tap_overhead_ms", pa.float64())])
    assert log.field("error").type == pa.struct([("type", pa.string()), ("code", pa.string()),
                                                 ("message", pa.string())])
    for name in ("request_headers", "response_headers", "metadata"):
        assert log.field(name).type == pa.map_(pa.string(), pa.string())
    assert ARROW_SCHEMAS["analytics"].field("tags").type == pa.map_(pa.string(), pa.string())
    assert ARROW_SCHEMAS["analytics"].field("cost").type == pa.float64()
    budget = ARROW_SCHEMAS["budget_usage"]
    assert budget.field("period_start").type == pa.date32()
    assert budget.field("period").type == pa.string()
    assert b"schema_version 1" in (budget.metadata or {})[b"gateway_tap.contract"]


def test_a_field_added_to_the_contract_becomes_a_column_without_other_edits() -> None:
    spec = copy.deepcopy(contract("analytics"))
    spec["properties"]["future_tokens"] = {"type": ["integer", "null"], "minimum": 0}
    spec["properties"]["route"] = {"type": "object", "properties": {"name": {"type": "string"},
                                                                    "at": {"type": "string", "format": "date-time"}}}
    evolved = schema_from_contract(spec)
    assert evolved.names == [*arrow_schema("analytics").names, "future_tokens", "route"]
    assert evolved.field("route").type == pa.struct([("name", pa.string()), ("at", pa.timestamp("us", tz="UTC"))])


def test_an_untyped_field_is_refused() -> None:
    spec = copy.deepcopy(contract("analytics"))
    spec["properties"]["blob"] = {"description": "anything"}
    with pytest.raises(TypeError, match="needs a type"):
        schema_from_contract(spec)


@pytest.mark.parametrize("event_type", list(EVENT_MODELS))
def test_values_convert_losslessly(event_type: schemas.EventType) -> None:
    events = [e for e in sample_events() if e.type == event_type]
    table = table_from_values(event_type, [encode_event(e) for e in events])
    assert table.schema == arrow_schema(event_type)
    for event, row in zip(events, table.to_pylist(), strict=True):
        expected = event.model_dump(mode="python")
        for name, value in row.items():
            want = expected.get(name)
            if isinstance(table.schema.field(name).type, pa.MapType):
                value = dict(value or [])
                want = want or {}
            assert value == want, name


def test_dates_and_times_are_parsed() -> None:
    event = next(e for e in sample_events() if e.type == "budget_usage")
    row = table_from_values("budget_usage", [encode_event(event)]).to_pylist()[0]
    assert row["period_start"] == date(2026, 11, 1)
    assert row["emitted_at"] == event.emitted_at
