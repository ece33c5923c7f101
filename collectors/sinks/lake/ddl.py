"""``gateway-tap lake ddl``: external-table definitions of the lake for DuckDB, ClickHouse, Trino, Athena and BigQuery.

Generated from the same Arrow schemas the collector writes (:mod:`schemas.arrow`) and from the configured layout,
so a field added to the contract or a changed layout shows up here without edits. One table (or view) per event
type, named ``<table_prefix><type>``; the layout's directories below the type are its partition columns.
DuckDB and ClickHouse definitions are run by the test suite (DuckDB, and chdb: ClickHouse in-process) against a
lake written by the collector; the Trino, Athena and BigQuery ones are checked as text.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from collectors.sinks.lake.config import LakeConfig
from collectors.sinks.lake.layout import Layout
from schemas import EVENT_TYPES, EventType
from schemas.arrow import arrow_schema

ENGINES = ("duckdb", "clickhouse", "trino", "athena", "bigquery")

_PROJECTION = {  # Athena partition projection per layout placeholder
    "dt": "'projection.{c}.type'='date', 'projection.{c}.format'='yyyy-MM-dd', 'projection.{c}.range'='{since},NOW', "
          "'projection.{c}.interval'='1', 'projection.{c}.interval.unit'='DAYS'",
    "year": "'projection.{c}.type'='integer', 'projection.{c}.range'='{year},2099', 'projection.{c}.digits'='4'",
    "month": "'projection.{c}.type'='integer', 'projection.{c}.range'='1,12', 'projection.{c}.digits'='2'",
    "day": "'projection.{c}.type'='integer', 'projection.{c}.range'='1,31', 'projection.{c}.digits'='2'",
    "hour": "'projection.{c}.type'='integer', 'projection.{c}.range'='0,23', 'projection.{c}.digits'='2'",
}


def root_url(config: LakeConfig, scheme: str = "s3") -> str:
    """The lake's root as an engine reads it: a local path, ``s3://bucket/prefix`` or the endpoint's HTTP URL."""
    if config.s3 is None:
        assert config.directory is not None
        return config.directory.rstrip("/")
    s3 = config.s3
    if scheme == "http":
        if s3.endpoint_url:
            return f"{s3.endpoint_url.rstrip('/')}/{s3.bucket}/{s3.prefix}".rstrip("/")
        region = s3.region or "us-east-1"
        return f"https://{s3.bucket}.s3.{region}.amazonaws.com/{s3.prefix}".rstrip("/")
    return f"s3://{s3.bucket}/{s3.prefix}".rstrip("/")


def _duckdb_type(tp: pa.DataType) -> str:
    if pa.types.is_struct(tp):
        return "STRUCT(" + ", ".join(f'"{f.name}" {_duckdb_type(f.type)}' for f in tp) + ")"
    if pa.types.is_map(tp):
        return f"MAP({_duckdb_type(tp.key_type)}, {_duckdb_type(tp.item_type)})"
    if pa.types.is_list(tp):
        return f"{_duckdb_type(tp.value_type)}[]"
    return _scalar(tp, {"string": "VARCHAR", "int64": "BIGINT", "double": "DOUBLE", "bool": "BOOLEAN",
                        "timestamp": "TIMESTAMPTZ", "date32": "DATE"})


def _clickhouse_type(tp: pa.DataType, nullable: bool = True) -> str:
    if pa.types.is_struct(tp):
        return "Tuple(" + ", ".join(f"{f.name} {_clickhouse_type(f.type)}" for f in tp) + ")"
    if pa.types.is_map(tp):
        return f"Map({_clickhouse_type(tp.key_type, False)}, {_clickhouse_type(tp.item_type, False)})"
    if pa.types.is_list(tp):
        return f"Array({_clickhouse_type(tp.value_type)})"
    base = _scalar(tp, {"string": "String", "int64": "Int64", "double": "Float64", "bool": "Bool",
                        "timestamp": "DateTime64(6, 'UTC')", "date32": "Date32"})
    return f"Nullable({base})" if nullable else base


def _trino_type(tp: pa.DataType) -> str:
    if pa.types.is_struct(tp):
        return "ROW(" + ", ".join(f'"{f.name}" {_trino_type(f.type)}' for f in tp) + ")"
    if pa.types.is_map(tp):
        return f"MAP({_trino_type(tp.key_type)}, {_trino_type(tp.item_type)})"
    if pa.types.is_list(tp):
        return f"ARRAY({_trino_type(tp.value_type)})"
    return _scalar(tp, {"string": "varchar", "int64": "bigint", "double": "double", "bool": "boolean",
                        "timestamp": "timestamp(6)", "date32": "date"})


def _hive_type(tp: pa.DataType) -> str:
    if pa.types.is_struct(tp):
        return "struct<" + ",".join(f"{f.name}:{_hive_type(f.type)}" for f in tp) + ">"
    if pa.types.is_map(tp):
        return f"map<{_hive_type(tp.key_type)},{_hive_type(tp.item_type)}>"
    if pa.types.is_list(tp):
        return f"array<{_hive_type(tp.value_type)}>"
    return _scalar(tp, {"string": "string", "int64": "bigint", "double": "double", "bool": "boolean",
                        "timestamp": "timestamp", "date32": "date"})


def _bigquery_type(tp: pa.DataType) -> str:
    if pa.types.is_struct(tp):
        return "STRUCT<" + ", ".join(f"{f.name} {_bigquery_type(f.type)}" for f in tp) + ">"
    if pa.types.is_map(tp):  # BigQuery reads a Parquet MAP as its repeated key/value groups
        return f"ARRAY<STRUCT<key {_bigquery_type(tp.key_type)}, value {_bigquery_type(tp.item_type)}>>"
    if pa.types.is_list(tp):
        return f"ARRAY<{_bigquery_type(tp.value_type)}>"
    return _scalar(tp, {"string": "STRING", "int64": "INT64", "double": "FLOAT64", "bool": "BOOL",
                        "timestamp": "TIMESTAMP", "date32": "DATE"})


def _scalar(tp: pa.DataType, names: dict[str, str]) -> str:
    key = "timestamp" if pa.types.is_timestamp(tp) else "date32" if pa.types.is_date32(tp) else str(tp)
    if key not in names:
        raise TypeError(f"no SQL type for Arrow {tp}")
    return names[key]


def _columns(event_type: EventType, render: Callable[[pa.DataType], str], quote: str = '"') -> str:
    return ",\n".join(f"  {quote}{f.name}{quote} {render(f.type)}" for f in arrow_schema(event_type))


def _glob(layout: Layout) -> str:
    return "/".join("*" for _ in layout.partition_columns) + "/*.parquet"


def ddl(config: LakeConfig, engine: str, table_prefix: str = "gateway_", since: str = "2026-01-01") -> str:
    """SQL defining one table (or view) per event type over the lake ``config`` describes, for ``engine``."""
    layout = Layout.parse(config.layout)
    parts = layout.partition_columns
    out: list[str] = []
    for event_type in EVENT_TYPES:
        table = f"{table_prefix}{event_type}"
        prefix = layout.type_prefix(event_type)
        if engine == "duckdb":
            hive = ", ".join(f"'{c}': {'DATE' if p == 'dt' else 'INTEGER'}" for c, p in parts)
            out.append(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet(\n"
                       f"  '{root_url(config)}/{prefix}{_glob(layout)}',\n"
                       f"  hive_partitioning = true, hive_types = {{{hive}}}, union_by_name = true);")
        elif engine == "clickhouse":
            columns = _columns(event_type, _clickhouse_type, quote="`")
            if config.s3 is None:
                source = f"File(Parquet, '{root_url(config)}/{prefix}{_glob(layout)}')"
            else:
                source = f"S3('{root_url(config, 'http')}/{prefix}{_glob(layout)}', 'Parquet')"
            out.append(f"CREATE TABLE {table} (\n{columns}\n) ENGINE = {source};")
        elif engine == "trino":
            columns = _columns(event_type, _trino_type)
            part_cols = ",\n".join(f'  "{c}" varchar' for c, _ in parts)
            array = ", ".join(f"'{c}'" for c, _ in parts)
            out.append(f"CREATE TABLE hive.gateway.{event_type} (\n{columns},\n{part_cols}\n) WITH (\n"
                       f"  external_location = '{root_url(config)}/{prefix}',\n  format = 'PARQUET',\n"
                       f"  partitioned_by = ARRAY[{array}]\n);\n"
                       f"CALL hive.system.sync_partition_metadata('gateway', '{event_type}', 'ADD');")
        elif engine == "athena":
            columns = _columns(event_type, _hive_type, quote="`")
            part_cols = ", ".join(f"`{c}` string" for c, _ in parts)
            location = f"{root_url(config)}/{prefix}"
            template = location + "/".join(f"{c}=${{{c}}}" for c, _ in parts) + "/"
            projection = ",\n  ".join(_PROJECTION[p].format(c=c, since=since, year=since[:4]) for c, p in parts)
            out.append(f"CREATE EXTERNAL TABLE {table} (\n{columns}\n)\nPARTITIONED BY ({part_cols})\n"
                       f"STORED AS PARQUET\nLOCATION '{location}'\nTBLPROPERTIES (\n  'projection.enabled'='true',\n"
                       f"  {projection},\n  'storage.location.template'='{template}'\n);")
        elif engine == "bigquery":
            columns = _columns(event_type, _bigquery_type, quote="`")
            part_cols = ", ".join(f"{c} {'DATE' if p == 'dt' else 'INT64'}" for c, p in parts)
            location = f"{root_url(config)}/{prefix}"
            out.append(f"CREATE EXTERNAL TABLE `PROJECT.DATASET.{table}` (\n{columns}\n)\n"
                       f"WITH PARTITION COLUMNS ({part_cols})\nWITH CONNECTION `PROJECT.REGION.CONNECTION`\n"
                       f"OPTIONS (\n  format = 'PARQUET',\n  uris = ['{location}*'],\n"
                       f"  hive_partition_uri_prefix = '{location}'\n);")
        else:
            raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    header = {
        "duckdb": "-- DuckDB: on S3, first: INSTALL httpfs; LOAD httpfs; CREATE SECRET (TYPE s3, KEY_ID '...', "
                  "SECRET '...', ENDPOINT '...', URL_STYLE 'path');\n-- A view is checked when created: create "
                  "it once the event type has objects.",
        "clickhouse": "-- ClickHouse: the layout's directories are columns too (use_hive_partitioning = 1, the "
                      "default since 25.x): WHERE dt = '2026-12-07' reads only that day. S3 credentials: the "
                      "server's <s3> section or a named collection.",
        "trino": "-- Trino, Hive connector (catalog 'hive', schema 'gateway'); hive.timestamp-precision=MICROSECONDS "
                 "keeps the microseconds. Re-run sync_partition_metadata as new hours appear.",
        "athena": "-- Athena: partition projection, no MSCK REPAIR needed.",
        "bigquery": "-- BigQuery: an external table over S3 needs a BigQuery Omni connection (AWS); "
                    "replace PROJECT, DATASET, REGION and CONNECTION.",
    }[engine]
    return header + "\n\n" + "\n\n".join(out) + "\n"
