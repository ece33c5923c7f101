"""Collector runtime throughput: the built-in ``file`` collector vs a bare aiokafka loop, same topic, same run.

1. start a private noida-db broker (Kafka only) on free ports (or use ``--bootstrap``);
2. produce ``--events`` analytics events (real ``schemas`` JSON, ~450 B, unique ids) to one
   topic with ``--partitions`` partitions;
3. consume the whole topic twice, each with a fresh consumer group, writing to a temp dir:
   - ``bare``: ``getmany()`` batches + ``orjson.loads`` per event + one ``write`` of the raw
     values per batch + a commit per batch (no validation, no fsync, no DLQ, no metrics);
   - ``file``: the real :class:`CollectorRuntime` running the ``file`` collector in-process
     (decode + validate with the ``schemas`` models, write, fsync per batch, commit, metrics),
     with the GC tuning ``gateway-tap collect`` applies.

Rates are steady-state (first event handed over to the last one flushed); ``startup`` is
consumer start to first event. Both loops run in this process, one after the other.

Usage::

    .venv/bin/python -m bench.collector_bench [--events 1000000] [--partitions 3] [--batch 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.kafka_fill import fill_topic
from collectors.runtime import CollectorRuntime
from collectors.sinks.file import FileCollector
from gateway_tap.dev.servers import NoidaServer
from gateway_tap.eventloop import tune_gc
from gateway_tap.settings import CollectorSettings
from schemas import Event, EventType, encode_event, topic_for
from schemas.events import Analytics


@dataclass
class Result:
    name: str
    events: int
    startup_s: float
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s


def make_values(n: int) -> list[bytes]:
    template = orjson.loads(encode_event(Analytics(
        gateway_id="tap-1", request_id="req", app_id="app-a", llm_id="openai-main", vendor="openai",
        model="gpt-4o-mini", prompt_tokens=10, completion_tokens=16, total_tokens=26, cost=0.0000111,
        latency_ms=12.5, ttft_ms=3.2, status_code=200, choices=1, tags={"team": "search"})))
    prefix = uuid.uuid4().hex[:8]
    return [orjson.dumps(template | {"id": f"{prefix}-{i:08d}", "request_id": f"req-{i}"}) for i in range(n)]


async def consume_bare(bootstrap: str, topic: str, expected: int, out: Path, batch: int) -> Result:
    """The minimal loop: fetch a batch, parse each value, append the raw values, commit."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=batch,
                                fetch_max_bytes=50 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    out.mkdir(parents=True)  # noqa: ASYNC240 - the baseline is the simplest loop, blocking I/O included
    launched = time.monotonic()
    await consumer.start()
    seen, first = 0, 0.0
    try:
        with open(out / "analytics.jsonl", "ab") as f:  # noqa: ASYNC230 - see above
            while seen < expected:
                batches = await consumer.getmany(timeout_ms=1000, max_records=batch)
                if batches and not first:
                    first = time.monotonic()
                for records in batches.values():
                    values = [r.value for r in records]
                    for value in values:
                        orjson.loads(value)
                    f.write(b"\n".join(values) + b"\n")
                    seen += len(values)
                if batches:
                    await consumer.commit()
            f.flush()
        done = time.monotonic()
    finally:
        await consumer.stop()
    return Result("bare aiokafka + orjson + write", seen, first - launched, done - first)


class _TimedFileCollector(FileCollector):
    """The file collector, noting when the first event arrived and when the expected count was flushed."""

    expected = 0
    seen = 0
    first = 0.0
    done: asyncio.Event

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        if not self.first:
            type(self).first = time.monotonic()
        await super().handle_raw_batch(event_type, events, values)
        type(self).seen += len(events)

    async def flush(self) -> None:
        await super().flush()
        if self.seen >= self.expected:
            self.done.set()


async def consume_file_collector(bootstrap: str, prefix: str, expected: int, out: Path, batch: int,
                                 fsync: str) -> Result:
    _TimedFileCollector.expected, _TimedFileCollector.seen, _TimedFileCollector.first = expected, 0, 0.0
    _TimedFileCollector.done = asyncio.Event()
    settings = CollectorSettings.model_validate({
        "group_id": f"bench-file-{uuid.uuid4().hex[:8]}",
        "batch": {"max_events": batch, "max_wait_ms": 50},
        "metrics": {"port": None},
        "config": {"directory": str(out), "fsync": fsync},
    })
    tune_gc()  # what `gateway-tap collect` does at start
    runtime = CollectorRuntime("file", _TimedFileCollector, settings, {"bootstrap_servers": bootstrap}, prefix)
    launched = time.monotonic()
    task = asyncio.create_task(runtime.run())
    await _TimedFileCollector.done.wait()
    done = time.monotonic()
    runtime.request_stop()
    assert await task == 0
    first = _TimedFileCollector.first
    return Result(f"file collector (fsync {fsync})", _TimedFileCollector.seen, first - launched, done - first)


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    server = None
    bootstrap = args.bootstrap
    try:
        if not bootstrap:
            server = NoidaServer(data_dir=work / "noida", services=("kafka",), log_path=work / "noida.log").start()
            bootstrap = server.bootstrap
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        topic = topic_for("analytics", prefix)
        values = make_values(args.events)
        size = sum(len(v) for v in values) / len(values)
        produce_s = await fill_topic(bootstrap, topic, args.partitions, values)
        del values
        print(f"produced {args.events} events ({size:.0f} B avg) to {args.partitions} partitions "
              f"in {produce_s:.1f}s ({args.events / produce_s:,.0f}/s)")
        results = [await consume_bare(bootstrap, topic, args.events, work / "bare", args.batch),
                   await consume_file_collector(bootstrap, prefix, args.events, work / "file", args.batch, args.fsync)]
        for r in results:
            print(f"{r.name:40s} {r.rate:>10,.0f} events/s  ({r.events} in {r.elapsed_s:.2f}s, "
                  f"startup {r.startup_s:.2f}s)")
        print(f"file collector / bare = {results[1].rate / results[0].rate:.0%}")
        print(f"python {platform.python_version()}, {platform.machine()}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=5000, help="max events per batch (both loops)")
    parser.add_argument("--fsync", choices=("always", "never"), default="always")
    parser.add_argument("--bootstrap", help="use this broker instead of starting noida-db")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
