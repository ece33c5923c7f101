"""The collector runtime against the real broker: dead letters for every kind of poison, retries that
never skip or commit early, a plugin author's collector under ``gateway-tap collect``, metrics and signals."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from collectors import BadEvents, CollectorError, RetryLater
from collectors.runtime import CollectorRuntime
from collectors.sinks.file import FileCollector
from gateway_tap.dev.servers import cli_argv, free_port
from gateway_tap.settings import CollectorSettings
from schemas import Event, EventType, ProxyLog, encode_event, topic_for
from tests.support.collectors import (
    analytics,
    collect_process,
    create_topics,
    produce,
    produce_events,
    read_topic,
    wait_for,
    written,
)
from tests.support.events import sample_events


def settings(directory: Path, **overrides: Any) -> CollectorSettings:
    base: dict[str, Any] = {
        "batch": {"max_events": 500, "max_wait_ms": 20},
        "retry": {"initial_backoff_ms": 10, "max_backoff_ms": 50},
        "metrics": {"port": free_port()},
        "shutdown_grace_s": 10,
        "config": {"directory": str(directory)},
    }
    base.update(overrides)
    return CollectorSettings.model_validate(base)


@pytest.fixture
async def runtime_task() -> AsyncIterator[Any]:
    """Starts runtimes as tasks; stops any still running at the end of the test."""
    started: list[tuple[CollectorRuntime, asyncio.Task[int]]] = []

    def start(rt: CollectorRuntime) -> asyncio.Task[int]:
        task = asyncio.create_task(rt.run())
        started.append((rt, task))
        return task

    yield start
    for rt, task in started:
        rt.request_stop()
        await asyncio.wait([task], timeout=30)


class RejectingFileCollector(FileCollector):
    """The file sink, except that it rejects events whose model is 'reject-me' (a collector-side BadEvent)."""

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        bad = {e.id for e in events if getattr(e, "model", None) == "reject-me"}
        keep = [i for i, e in enumerate(events) if e.id not in bad]
        await super().handle_raw_batch(event_type, [events[i] for i in keep], [values[i] for i in keep])
        if bad:
            raise BadEvents(dict.fromkeys(bad, "model reject-me is refused"))


async def test_each_kind_of_poison_goes_to_the_dlq_and_the_rest_is_written(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, runtime_task: Any) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    topic = topic_for("analytics", topic_prefix)
    good = analytics(6)
    valid = orjson.loads(encode_event(good[0]))
    missing_field = {k: v for k, v in valid.items() if k != "model"} | {"id": "missing-model"}
    wrong_type = encode_event(ProxyLog.model_validate(orjson.loads(encode_event(sample_events()[0]))))
    huge = orjson.dumps(valid | {"id": "huge", "tags": {"blob": "x" * (1_100_000)}})
    rejected = analytics(1, model="reject-me", start=100)[0]
    poison: dict[bytes | None, str] = {
        b"not json {": "invalid JSON",
        orjson.dumps(missing_field): "model: Field required",
        wrong_type: "topic carries 'analytics' events, got 'proxy_log'",
        orjson.dumps(valid | {"id": "v99", "schema_version": 99}): "unsupported schema_version 99",
        huge: "larger than the 1048576 limit",
        encode_event(rejected): "model reject-me is refused",
        None: "empty message value",
    }
    values: list[bytes | None] = [encode_event(good[0]), *poison, *(encode_event(e) for e in good[1:])]
    keys = [f"k{i}".encode() for i in range(len(values))]
    await produce(kafka_bootstrap, topic, values, keys)

    s = settings(tmp_path)
    rt = CollectorRuntime("file", RejectingFileCollector, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    task = runtime_task(rt)
    dead = await read_topic(kafka_bootstrap, topic + ".dlq", len(poison))
    await wait_for(lambda: len(written(tmp_path, "analytics")) >= len(good), "good events written")

    assert sorted(r["id"] for r in written(tmp_path, "analytics")) == sorted(e.id for e in good)
    assert len(dead) == len(poison)
    sent_key = {v: keys[i] for i, v in enumerate(values)}
    for record in dead:
        headers = dict(record.headers)
        assert record.value in poison, "the dead letter carries the original value unchanged"
        assert poison[record.value] in headers["error"].decode()
        assert record.key == sent_key[record.value]
        assert headers["collector"] == b"file"
        assert headers["original_topic"] == topic.encode()
        assert headers["type"] == b"x", "original headers are kept"
        assert int(headers["original_offset"]) == values.index(record.value)  # one partition: offset = index
        assert headers["error_class"] == (b"BadEvent" if record.value == encode_event(rejected)
                                          else b"EventDecodeError")

    port = s.metrics.port
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    assert 'gateway_tap_collector_events_handled_total{collector="file",type="analytics"} 6.0' in text
    assert ('gateway_tap_collector_events_dead_lettered_total{collector="file",error_class="EventDecodeError",'
            'type="analytics"} 6.0') in text
    assert 'gateway_tap_collector_events_consumed_total{collector="file",type="analytics"} 13.0' in text
    assert "gateway_tap_collector_freshness_seconds_bucket" in text
    assert "gateway_tap_collector_consumer_lag{" in text
    # the runtime's event-loop lag (sampled every 100 ms; tests/test_eventloop.py proves the sampling)
    assert re.search(r'^gateway_tap_event_loop_lag_seconds_count{collector="file"} \S+$', text, re.M)

    rt.request_stop()
    assert await asyncio.wait_for(task, 30) == 0


class FlakyCollector(FileCollector):
    """Fails every flush with RetryLater until ``healed``; counts the failures."""

    failures = 0
    healed = False

    async def flush(self) -> None:
        if not FlakyCollector.healed:
            FlakyCollector.failures += 1
            raise RetryLater("disk is busy", retry_after=0.01)
        await super().flush()


async def committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


async def test_retry_later_retries_without_committing_then_delivers_everything(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, runtime_task: Any) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    events = analytics(50)
    await produce_events(kafka_bootstrap, topic_prefix, events)
    s = settings(tmp_path, group_id=f"{topic_prefix}-flaky")
    rt = CollectorRuntime("flaky", FlakyCollector, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    task = runtime_task(rt)
    await wait_for(lambda: FlakyCollector.failures >= 5, "several failed flushes")
    tp = TopicPartition(topic_for("analytics", topic_prefix), 0)
    assert (await committed(kafka_bootstrap, s.group_id or "", [tp]))[tp] is None, "nothing committed while failing"
    # Nothing is fetched while a batch retries: the partitions are paused.
    await wait_for(lambda: bool(rt.consumer and rt.consumer.paused()), "fetching paused while retrying")
    FlakyCollector.healed = True
    await wait_for(lambda: len(written(tmp_path, "analytics")) >= len(events), "all events written")
    rt.request_stop()
    assert await asyncio.wait_for(task, 30) == 0
    # Each retry hands the batch over again: duplicates are expected (at-least-once), gaps are not.
    assert {r["id"] for r in written(tmp_path, "analytics")} == {e.id for e in events}
    assert (await committed(kafka_bootstrap, s.group_id or "", [tp]))[tp] == len(events)
    text = rt.metrics.render().decode()
    assert f'gateway_tap_collector_retries_total{{collector="flaky"}} {float(FlakyCollector.failures)}' in text


async def test_plugin_authors_collector_runs_under_gateway_tap_collect(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix)
    name = "audit_collector:AuditCollector"
    out = tmp_path / "audit.txt"
    config = {"kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
              "collectors": {name: {"metrics": {"port": free_port()}, "batch": {"max_wait_ms": 20},
                                    "config": {"path": str(out)}}}}
    good, forbidden = analytics(20), analytics(1, model="forbidden", start=50)
    await produce_events(kafka_bootstrap, topic_prefix, [*good[:10], *forbidden, *good[10:]])
    proc = collect_process("audit", name, config, tmp_path)
    await asyncio.to_thread(proc.start)
    try:
        dead = await read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix) + ".dlq", 1)
        await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= len(good), "audit lines")
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.log_tail()
    assert sorted(line.split()[0] for line in out.read_text().splitlines()) == sorted(e.id for e in good)
    assert dict(dead[0].headers)["error"] == b"model 'forbidden' is not allowed"
    assert dict(dead[0].headers)["collector"] == name.encode()


async def test_bad_collector_config_is_refused_with_the_key_path(tmp_path: Path) -> None:
    config = {"collectors": {"file": {"config": {"directory": 5}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(*cli_argv("collect", "file", "--config", str(path)),
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"collectors.file.config.directory: Input should be a valid string" in err


async def test_two_workers_share_the_partitions_and_a_rebalance_loses_nothing(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, runtime_task: Any) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=4)
    events = analytics(3000)
    group = {"group_id": f"{topic_prefix}-shared"}
    one = CollectorRuntime("file", FileCollector, settings(tmp_path / "one", **group),
                           {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    two = CollectorRuntime("file", FileCollector, settings(tmp_path / "two", **group),
                           {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    runtime_task(one)
    await produce_events(kafka_bootstrap, topic_prefix, events[:1500])
    await wait_for(lambda: len(written(tmp_path / "one", "analytics")) >= 1500, "first worker caught up")
    runtime_task(two)  # joins: partitions are revoked from `one` and split between both
    await wait_for(lambda: bool(two.consumer and two.consumer.assignment()), "second worker assigned")
    await produce_events(kafka_bootstrap, topic_prefix, events[1500:])

    def ids() -> set[str]:
        return {r["id"] for d in ("one", "two") for r in written(tmp_path / d, "analytics")}

    await wait_for(lambda: ids() >= {e.id for e in events}, "every event written by one of the workers")
    assert ids() == {e.id for e in events}
    assert written(tmp_path / "two", "analytics"), "the second worker took a share"
    assert one.consumer is not None and two.consumer is not None
    assert not one.consumer.assignment() & two.consumer.assignment()


class DownCollector(FileCollector):
    """A sink that is down for good."""

    async def flush(self) -> None:
        raise RetryLater("sink down")


async def test_stop_while_the_sink_is_down_gives_up_after_the_grace_period_without_committing(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    await produce_events(kafka_bootstrap, topic_prefix, analytics(10))
    s = settings(tmp_path, group_id=f"{topic_prefix}-down", shutdown_grace_s=0.5,
                 retry={"initial_backoff_ms": 100, "max_backoff_ms": 400})
    rt = CollectorRuntime("down", DownCollector, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    task = asyncio.create_task(rt.run())
    await wait_for(lambda: (rt.metrics.registry.get_sample_value(
        "gateway_tap_collector_retries_total", {"collector": "down"}) or 0) >= 2, "the batch is being retried")
    rt.request_stop()
    assert await asyncio.wait_for(task, 30) == 1
    tp = TopicPartition(topic_for("analytics", topic_prefix), 0)
    assert (await committed(kafka_bootstrap, s.group_id or "", [tp]))[tp] is None


class Unstorable(CollectorError):
    """A sink's own error saying the events can never be stored."""

    retriable = False


class PickyCollector(FileCollector):
    """Refuses every batch holding a 'poison' model with a non-retriable error; stores the others."""

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        if any(getattr(e, "model", None) == "poison" for e in events):
            raise Unstorable("the archive refuses this batch")
        await super().handle_raw_batch(event_type, events, values)


async def test_a_non_retriable_collector_error_dead_letters_its_events_without_retrying(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, runtime_task: Any) -> None:
    await create_topics(kafka_bootstrap, topic_prefix, partitions=1)
    poison = analytics(3, model="poison", start=100)
    await produce_events(kafka_bootstrap, topic_prefix, poison)
    s = settings(tmp_path, group_id=f"{topic_prefix}-picky")
    rt = CollectorRuntime("picky", PickyCollector, s, {"bootstrap_servers": kafka_bootstrap}, topic_prefix)
    runtime_task(rt)
    dead = await read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix) + ".dlq", len(poison))
    good = analytics(4)
    await produce_events(kafka_bootstrap, topic_prefix, good)
    await wait_for(lambda: len(written(tmp_path, "analytics")) >= len(good), "the later events written")
    assert {dict(d.headers)["error_class"] for d in dead} == {b"Unstorable"}
    assert {dict(d.headers)["error"] for d in dead} == {b"the archive refuses this batch"}
    assert {r["id"] for r in written(tmp_path, "analytics")} == {e.id for e in good}
    assert not rt.metrics.registry.get_sample_value("gateway_tap_collector_retries_total", {"collector": "picky"})
