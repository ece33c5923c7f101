"""The lake collector through the collector harness: rolls, names, layout, recovery after a crash or a replay,
on a local directory and on the test S3 (SeaweedFS)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collectors import RetryLater
from collectors.config import validate_collector_config
from collectors.sdk import ConfigError
from collectors.sinks.lake.collector import LakeCollector
from collectors.sinks.lake.config import S3Settings
from collectors.sinks.lake.layout import Layout, object_name, parse_name
from collectors.sinks.lake.store import LocalStore, S3Store, Store, StoreError
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import SeaweedServer
from schemas import Analytics
from tests.support.collectors import analytics
from tests.support.events import sample_events

TOPIC = "gateway.analytics"


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 12, 7, hour, minute, second, tzinfo=UTC)


def events_at(n: int, when: datetime, start: int = 0) -> list[Analytics]:
    out = analytics(n, start=start)
    for i, e in enumerate(out):
        e.emitted_at = when + timedelta(milliseconds=i)
    return out


def objects(store: Store, prefix: str = "") -> list[str]:
    return [k for k in store.list(prefix) if k.endswith(".parquet")]


def read_ids(store: Store) -> list[str]:
    ids: list[str] = []
    for key in objects(store):
        ids += pq.read_table(pa.BufferReader(store.get(key)), columns=["id"])["id"].to_pylist()
    return ids


@pytest.fixture(params=["local", "s3"])
def destination(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Any], Store]:
    """The collector's destination config and a store reading the same place."""
    if request.param == "local":
        return {"directory": str(tmp_path / "lake")}, LocalStore(tmp_path / "lake")
    seaweed: SeaweedServer = request.getfixturevalue("seaweed")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = {"bucket": bucket, "prefix": "events/", "endpoint_url": seaweed.endpoint, "addressing_style": "path"}
    return {"s3": s3}, S3Store(S3Settings.model_validate(s3))


async def test_rolls_by_rows_with_names_from_offsets(destination: tuple[dict[str, Any], Store]) -> None:
    config, store = destination
    async with CollectorHarness(LakeCollector, {**config, "flush_max_rows": 100}) as h:
        await h.feed(events_at(250, at(14, 5)))
        assert await h.precommit() == {(TOPIC, 0): 250}
        metric = h.registry.get_sample_value
        assert metric("gateway_tap_lake_objects_total", {"type": "analytics"}) == 3
        assert metric("gateway_tap_lake_rows_total", {"type": "analytics", "outcome": "written"}) == 250
        assert metric("gateway_tap_lake_freshness_seconds_count", {"type": "analytics"}) >= 3
        assert metric("gateway_tap_lake_write_seconds_count") == 3
    day = "type=analytics/dt=2026-12-07/hour=14/"
    assert objects(store) == [day + object_name(TOPIC, 0, 0, 99), day + object_name(TOPIC, 0, 100, 199),
                              day + object_name(TOPIC, 0, 200, 249)]
    table = pq.read_table(pa.BufferReader(store.get(objects(store)[0])))
    assert table.num_rows == 100
    meta = pq.read_metadata(pa.BufferReader(store.get(objects(store)[0])))
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert "type" not in table.column_names and "schema_version" in table.column_names


async def test_nothing_is_written_or_durable_before_a_rolling_rule_says_so(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "lake")
    async with CollectorHarness(LakeCollector, {"directory": str(tmp_path / "lake"), "rotate_interval_ms": 300,
                                                "flush_max_bytes": 50_000}) as h:
        await h.feed(events_at(10, at(9)))
        assert await h.precommit() == {(TOPIC, 0): 0}
        assert objects(store) == []
        await asyncio.sleep(0.35)
        assert await h.precommit() == {(TOPIC, 0): 10}, "rotate_interval_ms passed"
        await h.feed(events_at(200, at(9), start=10))  # ~470 bytes each: past flush_max_bytes
        assert await h.precommit() == {(TOPIC, 0): 210}
        await h.feed(events_at(3, at(9), start=500))
        assert await h.precommit(force=True) == {(TOPIC, 0): 213}
    assert len(objects(store)) == 3


async def test_a_roll_spanning_hours_writes_one_object_per_hour_under_the_rolls_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "lake")
    events = events_at(3, at(10, 59, 59)) + events_at(2, at(11, 0, 1), start=3) + events_at(1, at(10, 59, 58), 5)
    async with CollectorHarness(LakeCollector, {"directory": str(tmp_path / "lake")}) as h:
        await h.feed(events)
        await h.precommit(force=True)
    name = object_name(TOPIC, 0, 0, 5)
    assert objects(store) == [f"type=analytics/dt=2026-12-07/hour=10/{name}",
                              f"type=analytics/dt=2026-12-07/hour=11/{name}"]
    assert sorted(read_ids(store)) == sorted(e.id for e in events)
    assert store.list("_lake/") == [], "the pending marker is gone once the roll is complete"


async def test_redelivery_and_replay_write_nothing_twice(destination: tuple[dict[str, Any], Store]) -> None:
    config, store = destination
    first = events_at(100, at(8))
    more = events_at(50, at(8, 30), start=100)
    async with CollectorHarness(LakeCollector, config) as h:
        await h.feed(first)
        await h.precommit(force=True)
        await h.feed(more[:20])  # held, never written: the "crash" comes first
    before = objects(store)
    async with CollectorHarness(LakeCollector, config) as h:  # a new owner, handed over from offset 40 (a replay)
        await h.feed(first[40:] + more, offsets=range(40, 150))
        assert await h.precommit() == {(TOPIC, 0): 100}, "offsets 40..99 are in a complete roll: durable at once"
        await h.precommit(force=True)
        assert h.collector.rows_skipped == 60
        assert h.registry.get_sample_value("gateway_tap_lake_rows_total",
                                           {"type": "analytics", "outcome": "skipped"}) == 60
    after = objects(store)
    assert after[0] == before[0] and len(after) == 2
    ids = read_ids(store)
    assert sorted(ids) == sorted(e.id for e in first + more), "every event exactly once"
    async with CollectorHarness(LakeCollector, config) as h:  # replay of everything: no object is written
        await h.feed(first + more)
        await h.precommit(force=True)
        assert h.collector.objects_written == 0
    assert objects(store) == after


async def test_an_incomplete_roll_is_removed_before_the_partition_is_written_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "lake")
    events = events_at(4, at(10, 59, 59)) + events_at(4, at(11, 0, 1), start=4)
    config = {"directory": str(tmp_path / "lake")}
    async with CollectorHarness(LakeCollector, config) as h:
        put = h.collector.store.put
        calls = 0

        def crash_after_first_object(key: str, data: bytes, if_absent: bool) -> bool:
            nonlocal calls
            calls += 1
            if calls == 3:  # marker, first object, then "SIGKILL"
                raise StoreError("killed")
            return put(key, data, if_absent)

        h.collector.store.put = crash_after_first_object  # type: ignore[method-assign]
        await h.feed(events)
        with pytest.raises(RetryLater):
            await h.precommit(force=True)
    assert len(objects(store)) == 1 and len(store.list("_lake/pending/")) == 1
    async with CollectorHarness(LakeCollector, {**config, "flush_max_rows": 3}) as h:  # cut differently now
        await h.feed(events)
        await h.precommit(force=True)
    assert store.list("_lake/") == []
    assert sorted(read_ids(store)) == sorted(e.id for e in events), "exactly once, nothing of the torn roll left"


async def test_partitions_are_rolled_apart_and_released_ones_forgotten(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "lake")
    async with CollectorHarness(LakeCollector, {"directory": str(tmp_path / "lake")}) as h:
        await h.feed(events_at(5, at(3)), partition=0)
        await h.feed(events_at(7, at(3), start=5), partition=2)
        await h.release([(TOPIC, 2)])
        assert await h.precommit(force=True) == {(TOPIC, 0): 5}
    assert [parse_name(k).partition for k in objects(store)] == [0]  # type: ignore[union-attr]


async def test_every_event_type_lands_in_its_own_tree(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "lake")
    async with CollectorHarness(LakeCollector, {"directory": str(tmp_path / "lake"),
                                                "layout": "kind={type}/day={dt}"}) as h:
        await h.feed(sample_events())
        await h.precommit(force=True)
    assert sorted({k.split("/")[0] for k in objects(store)}) == ["kind=analytics", "kind=budget_usage",
                                                                 "kind=proxy_log"]
    assert all(k.split("/")[1].startswith("day=") for k in objects(store))


async def test_s3_refusals_name_the_setting_and_nothing_held_is_lost(seaweed: SeaweedServer, s3_bucket: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"{s3_bucket}-gone"
    s3 = {"bucket": missing, "endpoint_url": seaweed.endpoint, "addressing_style": "path"}
    events = events_at(20, at(5))
    async with CollectorHarness(LakeCollector, {"s3": s3}, name="lake") as h:
        with pytest.raises(RetryLater, match=r"collectors\.lake\.config\.s3\.bucket: bucket .*gone' does not exist"):
            await h.feed(events)  # the look-up for earlier rolls fails first: the runtime hands the batch over again
        boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id=seaweed.access_key,
                     aws_secret_access_key=seaweed.secret_key, region_name="us-east-1").create_bucket(Bucket=missing)
        await h.feed(events, offsets=range(20))  # the same batch again, as the runtime retries it
        assert await h.precommit(force=True) == {("gateway.analytics", 0): 20}, "retried: written once it exists"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    async with CollectorHarness(LakeCollector, {"s3": {**s3, "bucket": s3_bucket}}, name="lake") as h:
        with pytest.raises(RetryLater, match=r"collectors\.lake\.config\.s3: credentials refused .*AWS_SECRET_ACC"):
            await h.feed(events)


def test_s3_objects_are_never_replaced(seaweed: SeaweedServer, s3_bucket: str) -> None:
    store = S3Store(S3Settings(bucket=s3_bucket, endpoint_url=seaweed.endpoint, addressing_style="path",
                               multipart_threshold_bytes=5 * 1024 * 1024, part_size_bytes=5 * 1024 * 1024))
    assert store.put("a/x.parquet", b"one", if_absent=True)
    assert not store.put("a/x.parquet", b"two", if_absent=True)
    big = b"z" * (11 * 1024 * 1024)  # three parts, completed multipart upload
    assert store.put("a/big.parquet", big, if_absent=True)
    assert not store.put("a/big.parquet", b"q" * (6 * 1024 * 1024), if_absent=True)
    assert store.get("a/x.parquet") == b"one" and store.get("a/big.parquet") == big


def test_config_needs_exactly_one_destination_and_a_valid_layout() -> None:
    with pytest.raises(ConfigError, match="exactly one destination"):
        validate_collector_config("lake", LakeCollector, {})
    with pytest.raises(ConfigError, match=r"collectors\.lake\.config\.s3\.bucket"):
        validate_collector_config("lake", LakeCollector, {"s3": {"prefix": "x/"}})
    with pytest.raises(ConfigError, match=r"needs a \{type\} segment"):
        validate_collector_config("lake", LakeCollector, {"directory": "/tmp/x", "layout": "dt={dt}"})
    with pytest.raises(ConfigError, match="not of the form"):
        validate_collector_config("lake", LakeCollector, {"directory": "/tmp/x", "layout": "type={type}/{dt}"})
    assert Layout.parse("t={type}/y={year}/m={month}").unit_us == 24 * 3600 * 10**6
