"""The lake as query engines see it: the generated DDL run in DuckDB and in ClickHouse (chdb, over the test S3),
the Parquet cookbook's numbers in both, the Trino / Athena / BigQuery text, and compaction."""

from __future__ import annotations

import asyncio
import math
import subprocess
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from chdb import session as chdb_session

from collectors.sinks.lake.collector import LakeCollector
from collectors.sinks.lake.compact import compact
from collectors.sinks.lake.config import LakeConfig, S3Settings
from collectors.sinks.lake.cookbook import QUERIES, markdown
from collectors.sinks.lake.ddl import ENGINES, ddl
from collectors.sinks.lake.layout import object_name
from collectors.sinks.lake.store import LocalStore, S3Store, Store
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import SeaweedServer, cli_argv
from schemas import Analytics, BudgetUsage, ErrorInfo, Event, Latency, ProxyLog
from schemas.arrow import arrow_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"


def data_set() -> list[Event]:
    """Calls of three apps, two models and three users over (up to) two days of this month, and proxy logs."""
    now = datetime.now(UTC).replace(microsecond=0)
    days = [now] if now.day == 1 else [now, now - timedelta(days=1)]
    events: list[Event] = []
    for i in range(60):
        when = days[i % len(days)] - timedelta(seconds=i)
        events.append(Analytics(
            gateway_id="g", request_id=f"r{i}", app_id=f"app{i % 3}", llm_id="llm",
            user_id=f"u{i % 4}" if i % 5 else None,
            vendor="openai", model="gpt-a" if i % 2 else "gpt-b", prompt_tokens=10 + i, completion_tokens=i % 7,
            total_tokens=10 + i + i % 7, cost=round(0.001 * (i % 9 + 1), 6), latency_ms=float(20 + (i * 37) % 100),
            ttft_ms=float(5 + i % 11) if i % 3 == 0 else None, status_code=200, emitted_at=when))
    for i in range(30):
        error = ErrorInfo(type=["rate_limit_error", "invalid_request_error", "upstream_error"][i % 3],
                          code="x") if i % 4 else None
        events.append(ProxyLog(gateway_id="g", request_id=f"p{i}", method="POST", path="/v1/chat/completions",
                               status_code=[429, 400, 502][i % 3] if error else 200, latency=Latency(total_ms=1.0),
                               error=error, emitted_at=days[0] - timedelta(seconds=i)))
    events.append(BudgetUsage(gateway_id="g", request_id="r0", app_id="app0", llm_id="llm", model="gpt-a",
                              total_tokens=10, cost=0.001, period_start=days[0].date().replace(day=1),
                              emitted_at=days[0]))
    return events


def expected(name: str, events: list[Event]) -> list[tuple[Any, ...]]:
    calls = [e for e in events if isinstance(e, Analytics)]
    if name == "spend_per_app_per_day":
        acc: dict[tuple[str, date], list[float]] = defaultdict(lambda: [0.0, 0, 0, 0, 0])
        for e in calls:
            row = acc[(e.app_id or "", e.emitted_at.date())]
            row[0] += e.cost
            row[1] += e.prompt_tokens
            row[2] += e.completion_tokens
            row[3] += e.total_tokens
            row[4] += 1
        return [(app, day, *vals) for (app, day), vals in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    if name == "latency_per_model":
        def q(values: list[float], p: float) -> float | None:
            if not values:
                return None
            values = sorted(values)
            k = (len(values) - 1) * p
            lo, hi = math.floor(k), math.ceil(k)
            return values[lo] + (values[hi] - values[lo]) * (k - lo)
        out = []
        for model in sorted({e.model for e in calls}):
            mine = [e for e in calls if e.model == model]
            lat = [e.latency_ms for e in mine]
            ttft = [e.ttft_ms for e in mine if e.ttft_ms is not None]
            out.append((model, len(mine), q(lat, 0.5), q(lat, 0.95), q(ttft, 0.95)))
        return out
    if name == "tokens_per_user":
        users: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for e in calls:
            if e.user_id is not None:
                u = users[e.user_id]
                u[0] += e.prompt_tokens
                u[1] += e.completion_tokens
                u[2] += e.total_tokens
                u[3] += 1
        return [(user, *vals) for user, vals in sorted(users.items(), key=lambda kv: (-kv[1][2], kv[0]))]
    if name == "errors_by_type":
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for e in events:
            if isinstance(e, ProxyLog) and e.error is not None:
                counts[(e.error.type, e.status_code)] += 1
        return [(t, s, n) for (t, s), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))]
    raise AssertionError(name)


def same(rows: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, datetime):
            return v.date()
        return v
    return [tuple(norm(v) for v in r) for r in rows] == [tuple(norm(v) for v in r) for r in want]


async def write(config: dict[str, Any], events: list[Event]) -> None:
    async with CollectorHarness(LakeCollector, config) as h:
        await h.feed(events)
        await h.precommit(force=True)


def statements(sql: str) -> list[str]:
    return [s for s in sql.split(";") if "CREATE" in s or "CALL" in s]


async def test_cookbook_and_ddl_in_duckdb_over_a_local_lake(tmp_path: Path) -> None:
    events = data_set()
    config = {"directory": str(tmp_path / "lake")}
    await write(config, events)
    con = duckdb.connect()
    con.execute(ddl(LakeConfig.model_validate(config), "duckdb"))
    assert con.execute("SELECT count(*), min(period_start) FROM gateway_budget_usage").fetchall()[0][0] == 1
    for query in QUERIES:
        rows = con.execute(query.duckdb).fetchall()
        assert same(rows, expected(query.name, events)), (query.name, rows)
    cols = [d[0] for d in con.execute("SELECT * FROM gateway_proxy_log LIMIT 0").description]
    assert cols == [*arrow_schema("proxy_log").names, "dt", "hour", "type"]  # every key=value directory


async def test_cookbook_and_ddl_in_clickhouse_over_the_test_s3(seaweed: SeaweedServer, s3_bucket: str) -> None:
    events = data_set()
    config = {"s3": {"bucket": s3_bucket, "prefix": "lake/", "endpoint_url": seaweed.endpoint,
                     "addressing_style": "path"}}
    await write(config, events)
    sess = chdb_session.Session()
    try:
        for stmt in statements(ddl(LakeConfig.model_validate(config), "clickhouse")):
            sess.query(stmt)
        for query in QUERIES:
            result = sess.query(query.clickhouse, "ArrowStream")
            table = pa.ipc.open_stream(result.bytes()).read_all() if result.bytes() else pa.table({})
            rows = [tuple(r.values()) for r in table.to_pylist()]
            assert same(rows, expected(query.name, events)), (query.name, rows)
        described = sess.query("DESCRIBE TABLE gateway_proxy_log", "TSV").data()
        assert "latency\tTuple(" in described and "metadata\tMap(String, String)" in described
    finally:
        sess.close()


def test_the_docs_show_the_lake_cookbook_verbatim() -> None:
    assert markdown() in DOC.read_text()


def test_ddl_for_the_other_engines_follows_schema_and_layout() -> None:
    config = LakeConfig(s3=S3Settings(bucket="lake-b", prefix="gw/"), layout="type={type}/dt={dt}/hour={hour}")
    athena = ddl(config, "athena", since="2026-03-01")
    assert "CREATE EXTERNAL TABLE gateway_analytics (" in athena
    assert "PARTITIONED BY (`dt` string, `hour` string)" in athena
    assert "'projection.dt.range'='2026-03-01,NOW'" in athena and "'projection.hour.digits'='2'" in athena
    assert ("'storage.location.template'='s3://lake-b/gw/type=analytics/dt=${dt}/hour=${hour}/'" in athena)
    assert "`latency` struct<total_ms:double,upstream_ms:double,ttfb_ms:double,tap_overhead_ms:double>" in athena
    assert "`tags` map<string,string>" in athena and "`emitted_at` timestamp" in athena
    trino = ddl(config, "trino")
    assert "external_location = 's3://lake-b/gw/type=proxy_log/'" in trino
    assert "partitioned_by = ARRAY['dt', 'hour']" in trino and '"emitted_at" timestamp(6)' in trino
    assert "CALL hive.system.sync_partition_metadata('gateway', 'budget_usage', 'ADD')" in trino
    bigquery = ddl(config, "bigquery")
    assert "WITH PARTITION COLUMNS (dt DATE, hour INT64)" in bigquery
    assert "`tags` ARRAY<STRUCT<key STRING, value STRING>>" in bigquery
    assert "hive_partition_uri_prefix = 's3://lake-b/gw/type=analytics/'" in bigquery
    for engine in set(ENGINES) - {"duckdb"}:  # DuckDB's views take the files' columns (union_by_name)
        text = ddl(config, engine)
        for event_type in ("proxy_log", "analytics", "budget_usage"):
            names = arrow_schema(event_type).names  # type: ignore[arg-type]
            assert all(f"{n}" in text for n in names)


def test_lake_ddl_command_reads_the_collectors_section(tmp_path: Path) -> None:
    path = tmp_path / "gateway-tap.yaml"
    path.write_text(yaml.safe_dump({"collectors": {"lake": {"config": {"directory": str(tmp_path / "lk")}}}}))
    done = subprocess.run(cli_argv("lake", "ddl", "--config", str(path), "--engine", "duckdb"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"'{tmp_path / 'lk'}/type=analytics/*/*/*.parquet'" in done.stdout
    path.write_text(yaml.safe_dump({"collectors": {"file": {"config": {"directory": str(tmp_path)}}}}))
    done = subprocess.run(cli_argv("lake", "ddl", "--config", str(path), "--engine", "duckdb", "--collector", "file"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "collectors.file: not a lake collector" in done.stderr


def ids_and_keys(store: Store) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    keys = [k for k in store.list("type=") if k.endswith(".parquet")]
    for key in keys:
        ids += pq.read_table(pa.BufferReader(store.get(key)), columns=["id"])["id"].to_pylist()
    return ids, keys


@pytest.fixture(params=["local", "s3"])
def lake(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Any], Store]:
    if request.param == "local":
        return {"directory": str(tmp_path / "lake")}, LocalStore(tmp_path / "lake")
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    s3 = {"bucket": request.getfixturevalue("s3_bucket"), "endpoint_url": seaweed.endpoint,
          "addressing_style": "path"}
    return {"s3": s3}, S3Store(S3Settings.model_validate(s3))


async def test_compaction_merges_old_hours_per_partition_without_losing_or_doubling(
        lake: tuple[dict[str, Any], Store]) -> None:
    config, store = lake
    old = datetime(2026, 11, 3, 10, 5, tzinfo=UTC)
    new = datetime(2026, 12, 2, 10, 5, tzinfo=UTC)
    events = {p: [Analytics(gateway_id="g", request_id=f"{p}-{i}", app_id="a", vendor="v", model="m",
                            latency_ms=1.0, status_code=200, emitted_at=(old if i < 30 else new) + timedelta(seconds=i))
                  for i in range(40)] for p in (0, 1)}
    async with CollectorHarness(LakeCollector, {**config, "flush_max_rows": 7}) as h:
        for p, evs in events.items():
            await h.feed(evs, partition=p)
        await h.precommit(force=True)
    ids_before, keys_before = ids_and_keys(store)
    lake_config = LakeConfig.model_validate(config)
    result = compact(store, lake_config, date(2026, 12, 1))
    ids_after, keys_after = ids_and_keys(store)
    assert sorted(ids_after) == sorted(ids_before), "no row lost, none doubled"
    old_dir = "type=analytics/dt=2026-11-03/hour=10/"
    assert [k for k in keys_after if k.startswith(old_dir)] == [
        old_dir + object_name("gateway.analytics", 0, 0, 34), old_dir + object_name("gateway.analytics", 1, 0, 34)]
    # (the roll 28..34 spans both days: its old part is merged, its name range kept)
    assert [k for k in keys_after if not k.startswith(old_dir)] == [k for k in keys_before if not k.startswith(old_dir)]
    assert result.written_objects == 2 and result.rows == 60
    assert compact(store, lake_config, date(2026, 12, 1)).written_objects == 0, "nothing left to merge"
    async with CollectorHarness(LakeCollector, config) as h:  # a replay over compacted hours writes nothing
        for p, evs in events.items():
            await h.feed(evs, partition=p)
        await h.precommit(force=True)
        assert h.collector.objects_written == 0
    assert sorted(ids_and_keys(store)[0]) == sorted(ids_before)


async def test_an_interrupted_compaction_is_finished_by_the_next_run(tmp_path: Path) -> None:
    config = {"directory": str(tmp_path / "lake")}
    store = LocalStore(tmp_path / "lake")
    old = datetime(2026, 11, 3, 10, 5, tzinfo=UTC)
    events = [Analytics(gateway_id="g", request_id=f"r{i}", vendor="v", model="m", latency_ms=1.0,
                        status_code=200, emitted_at=old + timedelta(seconds=i)) for i in range(20)]
    async with CollectorHarness(LakeCollector, {**config, "flush_max_rows": 5}) as h:
        await h.feed(events)
        await h.precommit(force=True)
    ids_before, _ = ids_and_keys(store)
    delete = store.delete
    store.delete = lambda keys: (_ for _ in ()).throw(OSError("killed"))  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError):
        compact(store, LakeConfig.model_validate(config), date(2026, 12, 1))
    store.delete = delete  # type: ignore[method-assign]
    assert len(ids_and_keys(store)[0]) == 40, "merged object complete, sources not removed yet"
    result = compact(store, LakeConfig.model_validate(config), date(2026, 12, 1))
    assert result.finished_interrupted == 1
    assert sorted(ids_and_keys(store)[0]) == sorted(ids_before) and store.list("_lake/") == []


async def test_lake_compact_command(tmp_path: Path) -> None:
    lake_dir = tmp_path / "lk"
    old = datetime(2026, 11, 3, 10, 5, tzinfo=UTC)
    events = [Analytics(gateway_id="g", request_id=f"r{i}", vendor="v", model="m", latency_ms=1.0, status_code=200,
                        emitted_at=old + timedelta(seconds=i)) for i in range(12)]
    async with CollectorHarness(LakeCollector, {"directory": str(lake_dir), "flush_max_rows": 4}) as h:
        await h.feed(events)
        await h.precommit(force=True)
    path = tmp_path / "gateway-tap.yaml"
    path.write_text(yaml.safe_dump({"collectors": {"lake": {"config": {"directory": str(lake_dir)}}}}))
    done = await asyncio.to_thread(subprocess.run, cli_argv("lake", "compact", "--config", str(path), "--before",
                                                            "2026-12-01"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged 3 object(s) into 1 (12 rows)" in done.stdout
    ids, keys = ids_and_keys(LocalStore(lake_dir))
    assert sorted(ids) == sorted(e.id for e in events) and len(keys) == 1
