"""Shared helpers for tests against the real broker: events onto topics, reading topics back, a
``gateway-tap collect`` child process, what the file sink wrote, polling."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway_tap.dev.servers import ManagedProcess, cli_argv, http_ok
from schemas import Analytics, Event, EventType, encode_event, message_headers, topic_for

PLUGIN_DIR = Path(__file__).parent / "plugin_example"  # a third-party collector


def analytics(n: int, model: str = "m", start: int = 0) -> list[Analytics]:
    return [Analytics(gateway_id="g", request_id=f"r{i}", app_id=f"app{i % 5}", vendor="openai", model=model,
                      latency_ms=1.0, status_code=200) for i in range(start, start + n)]


async def create_topics(bootstrap: str, prefix: str, partitions: int = 3) -> None:
    """The event topics and their DLQs, accepting messages up to 4 MiB (so a 'huge' event can be produced)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    big = {"max.message.bytes": str(4 * 1024 * 1024)}
    try:
        topics = [topic_for(t, prefix) for t in ("proxy_log", "analytics", "budget_usage")]
        await admin.create_topics([NewTopic(t, partitions, 1, topic_configs=big) for t in topics]
                                  + [NewTopic(t + ".dlq", 1, 1, topic_configs=big) for t in topics])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, values: Sequence[bytes | None],
                  keys: Sequence[bytes | None] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024,
                                linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=(keys[i] if keys else None),
                                       headers=[("type", b"x")]) for i, value in enumerate(values)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def produce_events(bootstrap: str, prefix: str, events: Sequence[Event]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic_for(e.type, prefix), encode_event(e), key=(e.app_id or "").encode(),
                                       headers=message_headers(e)) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_bytes=8 * 1024 * 1024,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < count:
                for recs in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(recs)
    finally:
        await consumer.stop()
    return out


def written(directory: Path, event_type: EventType) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    folder = directory / event_type
    if not folder.exists():
        return out
    for path in sorted(folder.iterdir()):
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        out += [orjson.loads(line) for line in data.splitlines()]
    return out


async def wait_for(check: Any, what: str, limit: float = 30) -> None:
    """Poll ``check`` (files, counters) until true; ``limit`` bounds a hang, it is not a timing assertion."""
    try:
        async with asyncio.timeout(limit):
            while not await asyncio.to_thread(check):  # noqa: ASYNC110 - polling files, no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"gave up waiting for: {what}") from None


def collect_process(label: str, name: str, config: dict[str, Any], tmp_path: Path, *extra: str) -> ManagedProcess:
    """``gateway-tap collect NAME`` as a child process (ready when /healthz answers), stopped with SIGTERM."""
    path = tmp_path / f"gateway-tap-{len(list(tmp_path.glob('gateway-tap-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = next(iter(config["collectors"].values()))["metrics"]["port"]
    proc = ManagedProcess(f"collect-{label}", cli_argv("collect", name, "--config", str(path), *extra),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
                          env={"PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])},
                          log_path=tmp_path / f"collect-{label}.log", stop_signal=signal.SIGTERM)
    return proc
