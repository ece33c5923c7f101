"""Arrow schemas of the events, generated from the published contract (the ``*.schema.json`` files).

One Arrow schema per event type, for columnar sinks (the ``lake`` collector's Parquet). Nothing here is
written by hand per field: a field added to a contract file (schemas/README.md, "Evolution rule") becomes
a column the next time this module is imported, so schema evolution stays additive.

Mapping (JSON Schema -> Arrow):

- ``string`` -> ``string``; with ``format: date-time`` -> ``timestamp[us, UTC]``; ``format: date`` -> ``date32``
- ``integer`` -> ``int64``; ``number`` -> ``float64``; ``boolean`` -> ``bool``
- ``object`` with ``properties`` -> ``struct`` (nested fields kept, in the file's order);
  ``object`` with only ``additionalProperties: {type: string}`` -> ``map<string, string>``
- ``array`` -> ``list`` of its ``items``' type
- ``enum`` / ``const`` of strings -> ``string``

The envelope's ``type`` is not a column: it is the ``type=`` partition of the layout (and a partition column
must not repeat a data column for Hive, Trino and BigQuery). Every column is nullable, so files written before
a field existed and after read as one table. Fields an event carries beyond the contract (``extra="allow"``)
are not columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import orjson
import pyarrow as pa

from schemas.events import EVENT_TYPES, EventType

OMITTED = frozenset({"type"})
"""Contract fields that are not columns (the partition carries them)."""

CONTRACT_REVISION_KEY = b"gateway_tap.contract"
"""Parquet/Arrow metadata key: the ``$id`` and ``$comment`` of the contract file the schema came from."""


@cache
def contract(event_type: EventType) -> dict[str, Any]:
    """The published JSON Schema of ``event_type`` (parsed once)."""
    text = files("schemas").joinpath(f"{event_type}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _types(node: dict[str, Any]) -> list[str]:
    kind = node.get("type")
    if kind is None:
        if "const" in node or "enum" in node:
            values = node.get("enum", [node.get("const")])
            return ["string" if all(isinstance(v, str) for v in values) else "integer"]
        raise TypeError(f"no Arrow type for {node!r}: a contract field needs a type")
    kinds = [kind] if isinstance(kind, str) else list(kind)
    return [k for k in kinds if k != "null"]


def arrow_type(node: dict[str, Any]) -> pa.DataType:
    """The Arrow type of one JSON Schema node of the contract (see the module docstring)."""
    kinds = _types(node)
    if len(kinds) != 1:
        raise TypeError(f"no Arrow type for a field of types {kinds}: the contract keeps one type per field")
    kind = kinds[0]
    if kind == "string":
        fmt = node.get("format")
        if fmt == "date-time":
            return pa.timestamp("us", tz="UTC")
        if fmt == "date":
            return pa.date32()
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            raise TypeError("an array field needs typed items")
        return pa.list_(arrow_type(items))
    if kind == "object":
        props = node.get("properties")
        if props:
            return pa.struct([pa.field(name, arrow_type(sub)) for name, sub in props.items()])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return pa.map_(pa.string(), arrow_type(extra))
        raise TypeError("an object field needs properties or typed additionalProperties")
    raise TypeError(f"no Arrow type for JSON Schema type {kind!r}")


@cache
def arrow_schema(event_type: EventType) -> pa.Schema:
    """The Arrow schema of ``event_type``: one nullable column per contract field except ``type``."""
    return schema_from_contract(contract(event_type))


def schema_from_contract(spec: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of one contract file (a parsed ``*.schema.json``)."""
    fields = []
    for name, node in spec["properties"].items():
        if name in OMITTED:
            continue
        field = pa.field(name, arrow_type(node), nullable=True)
        if node.get("description"):
            field = field.with_metadata({b"description": node["description"].encode()})
        fields.append(field)
    revision = f"{spec.get('$id', '')} ({spec.get('$comment', '')})".encode()
    return pa.schema(fields, metadata={CONTRACT_REVISION_KEY: revision})


def _build_type(tp: pa.DataType) -> pa.DataType:
    """The type values are collected as before the cast: timestamps and dates arrive as JSON strings."""
    if pa.types.is_timestamp(tp) or pa.types.is_date(tp):
        return pa.string()
    if pa.types.is_struct(tp):
        return pa.struct([pa.field(f.name, _build_type(f.type)) for f in tp])
    if pa.types.is_map(tp):
        return pa.map_(tp.key_type, _build_type(tp.item_type))
    if pa.types.is_list(tp):
        return pa.list_(_build_type(tp.value_type))
    return tp


@cache
def _plan(event_type: EventType) -> tuple[tuple[str, pa.DataType, pa.DataType], ...]:
    return tuple((f.name, _build_type(f.type), f.type) for f in arrow_schema(event_type))


def table_from_values(event_type: EventType, values: Sequence[bytes]) -> pa.Table:
    """An Arrow table of ``arrow_schema(event_type)`` from validated message values (JSON), one row each.

    Columns are built one at a time from the parsed objects (several times faster than
    ``Table.from_pylist``); date-time and date strings are cast by Arrow's ISO 8601 parser.
    """
    rows = [orjson.loads(v) for v in values]
    arrays = []
    for name, build, final in _plan(event_type):
        array = pa.array([row.get(name) for row in rows], type=build)
        arrays.append(array if build == final else array.cast(final))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(event_type))


ARROW_SCHEMAS: dict[EventType, pa.Schema] = {t: arrow_schema(t) for t in EVENT_TYPES}
